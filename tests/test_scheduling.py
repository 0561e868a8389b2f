"""No double booking of a practitioner: Appointments that overlap another one of the same
practitioner are refused (409) on create, update, patch, conditional writes, and batch and
transaction entries; what does not hold a slot (cancelled, noshow, entered-in-error, declined
participants, other practitioners, back-to-back slots) never conflicts; and racing creates
book one slot once."""

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import FHIR_JSON, ServerProcess, assert_outcome, post, put, unique

from fhir_server import fhir_json
from fhir_server.services.scheduling import booking
from fhir_server.storage.embedded import EmbeddedDatabase

DAY = "2031-05-06"
JSON_PATCH = "application/json-patch+json"


def at(clock: str) -> str:
    return f"{DAY}T{clock}:00Z"


def appointment(practitioner: str, start: str, end: str | None, status: str = "booked", **fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Appointment", "status": status, "start": at(start)}
    if end is not None:
        resource["end"] = at(end)
    resource["participant"] = [
        {"actor": {"reference": f"Patient/{unique()}"}, "status": "accepted"},
        {"actor": {"reference": f"Practitioner/{practitioner}"}, "status": "accepted"},
    ]
    return {**resource, **fields}


def created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return response.json()


def refused(response: httpx.Response, blocking_id: str) -> dict[str, Any]:
    """A 409 naming the appointment that holds the slot."""
    return assert_outcome(response, 409, f"Appointment/{blocking_id}")


def transaction(client: httpx.Client, *entries: dict[str, Any], kind: str = "transaction") -> httpx.Response:
    body = {"resourceType": "Bundle", "type": kind, "entry": list(entries)}
    return client.post("", content=fhir_json.dumps(body), headers={"Content-Type": FHIR_JSON})


def post_entry(resource: dict[str, Any], full_url: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource, "request": {"method": "POST", "url": "Appointment"}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def search_ids(client: httpx.Client, practitioner: str) -> set[str]:
    response = client.get("/Appointment", params={"actor": f"Practitioner/{practitioner}", "_count": "100"})
    assert response.status_code == 200, response.text
    return {e["resource"]["id"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"}


@pytest.fixture
def doctor() -> str:
    return unique()


@pytest.fixture
def first(client: httpx.Client, doctor: str) -> dict[str, Any]:
    """The doctor's 10:00-10:30 appointment."""
    return created(post(client, appointment(doctor, "10:00", "10:30")))


# -- single requests ---------------------------------------------------------------------------


def test_an_overlapping_appointment_is_refused(client: httpx.Client, doctor: str, first: dict[str, Any]) -> None:
    body = refused(post(client, appointment(doctor, "10:15", "10:45")), first["id"])
    assert body["issue"][0]["code"] == "conflict"
    assert f"Practitioner/{doctor}" in body["issue"][0]["diagnostics"]
    refused(post(client, appointment(doctor, "09:00", "12:00")), first["id"])  # around it
    refused(post(client, appointment(doctor, "10:10", "10:20")), first["id"])  # inside it
    assert search_ids(client, doctor) == {first["id"]}


def test_back_to_back_appointments_are_allowed(client: httpx.Client, doctor: str, first: dict[str, Any]) -> None:
    before = created(post(client, appointment(doctor, "09:30", "10:00")))
    after = created(post(client, appointment(doctor, "10:30", "11:00")))
    assert search_ids(client, doctor) == {first["id"], before["id"], after["id"]}


def test_other_time_zones_are_compared_as_instants(client: httpx.Client, doctor: str, first: dict[str, Any]) -> None:
    overlapping = appointment(doctor, "10:00", "10:30")
    overlapping.update(start=f"{DAY}T12:20:00+02:00", end=f"{DAY}T12:50:00+02:00")  # 10:20-10:50 UTC
    refused(post(client, overlapping), first["id"])
    adjacent = {**overlapping, "start": f"{DAY}T12:30:00+02:00", "end": f"{DAY}T13:00:00+02:00"}
    created(post(client, adjacent))


@pytest.mark.parametrize("status", ["cancelled", "noshow", "entered-in-error"])
def test_appointments_that_free_their_slot_neither_block_nor_are_refused(
    client: httpx.Client, doctor: str, first: dict[str, Any], status: str
) -> None:
    created(post(client, appointment(doctor, "10:00", "10:30", status)))  # written over the booked slot
    other = unique()
    created(post(client, appointment(other, "14:00", "15:00", status)))
    created(post(client, appointment(other, "14:00", "15:00")))  # the freed slot is bookable


def test_fulfilled_and_other_booked_like_statuses_hold_their_slot(client: httpx.Client, doctor: str) -> None:
    for index, status in enumerate(["fulfilled", "proposed", "pending", "arrived", "checked-in", "waitlist"]):
        hour = f"{8 + index:02d}"
        holding = created(post(client, appointment(doctor, f"{hour}:00", f"{hour}:30", status)))
        refused(post(client, appointment(doctor, f"{hour}:15", f"{hour}:45")), holding["id"])


def test_a_different_practitioner_does_not_conflict(client: httpx.Client, first: dict[str, Any]) -> None:
    created(post(client, appointment(unique(), "10:00", "10:30")))


def test_a_declined_participant_holds_no_slot(client: httpx.Client, doctor: str, first: dict[str, Any]) -> None:
    declined = appointment(doctor, "10:00", "10:30")
    declined["participant"][1]["status"] = "declined"
    created(post(client, declined))


def test_minutes_duration_stands_for_a_missing_end(client: httpx.Client, doctor: str) -> None:
    holding = created(post(client, appointment(doctor, "16:00", None, minutesDuration=45)))
    refused(post(client, appointment(doctor, "16:30", "17:00")), holding["id"])
    created(post(client, appointment(doctor, "16:45", "17:00")))


def test_every_practitioner_of_an_appointment_is_checked(client: httpx.Client, doctor: str, first: dict[str, Any]) -> None:
    both = appointment(unique(), "10:20", "10:40")
    both["participant"].append({"actor": {"reference": f"Practitioner/{doctor}"}, "status": "tentative"})
    refused(post(client, both), first["id"])


def test_updating_an_appointment_onto_its_own_slot_is_fine(
    client: httpx.Client, doctor: str, first: dict[str, Any]
) -> None:
    moved = {**first, "start": at("10:10"), "end": at("10:40"), "comment": "ten minutes later"}
    response = put(client, moved)
    assert response.status_code == 200, response.text
    assert response.json()["start"] == at("10:10")


def test_an_update_onto_another_appointments_slot_is_refused(
    client: httpx.Client, doctor: str, first: dict[str, Any]
) -> None:
    second = created(post(client, appointment(doctor, "11:00", "11:30")))
    refused(put(client, {**second, "start": at("10:20"), "end": at("10:50")}), first["id"])
    assert client.get(f"/Appointment/{second['id']}").json()["start"] == at("11:00")
    # a create-on-update with a client id is checked too
    refused(put(client, {**second, "id": unique(), "start": at("10:20"), "end": at("10:50")}), first["id"])
    # cancelling the first frees its slot
    assert put(client, {**first, "status": "cancelled"}).status_code == 200
    assert put(client, {**second, "start": at("10:20"), "end": at("10:50")}).status_code == 200


def test_a_patch_onto_another_appointments_slot_is_refused(writer: ServerProcess, doctor: str) -> None:
    with httpx.Client(base_url=f"{writer.url}/fhir", timeout=60) as client:
        check_patches(client, doctor)


def check_patches(client: httpx.Client, doctor: str) -> None:
    first = created(post(client, appointment(doctor, "10:00", "10:30")))
    second = created(post(client, appointment(doctor, "11:00", "11:30")))
    url = f"/Appointment/{second['id']}"
    headers = {"Content-Type": JSON_PATCH}
    operations = [{"op": "replace", "path": "/start", "value": at("10:15")},
                  {"op": "replace", "path": "/end", "value": at("10:45")}]
    refused(client.patch(url, content=fhir_json.dumps(operations), headers=headers), first["id"])
    cancel = [{"op": "replace", "path": "/status", "value": "cancelled"}, *operations]
    response = client.patch(url, content=fhir_json.dumps(cancel), headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    move_self = [{"op": "replace", "path": "/start", "value": at("10:05")}]  # first onto its own slot
    assert client.patch(f"/Appointment/{first['id']}", content=fhir_json.dumps(move_self), headers=headers).status_code == 200
    missing = client.patch(f"/Appointment/{unique()}", content=fhir_json.dumps(operations), headers=headers)
    assert_outcome(missing, 404)


def test_conditional_creates_and_updates_are_checked(client: httpx.Client, doctor: str, first: dict[str, Any]) -> None:
    identifier = {"system": "urn:test:scheduling", "value": unique()}
    overlapping = appointment(doctor, "10:15", "10:45", identifier=[identifier])
    criteria = f"identifier=urn:test:scheduling|{identifier['value']}"
    refused(post(client, overlapping, **{"If-None-Exist": criteria}), first["id"])
    response = client.put(f"/Appointment?{criteria}", json=overlapping, headers={"Content-Type": FHIR_JSON})
    refused(response, first["id"])


# -- Bundles -----------------------------------------------------------------------------------


def test_a_transaction_entry_that_double_books_fails_the_transaction(
    client: httpx.Client, doctor: str, first: dict[str, Any]
) -> None:
    free = appointment(doctor, "12:00", "12:30")
    overlapping = appointment(doctor, "10:15", "10:45")
    body = refused(transaction(client, post_entry(free), post_entry(overlapping)), first["id"])
    assert body["issue"][0]["diagnostics"].startswith("Bundle.entry[1] (POST Appointment)")
    assert body["issue"][0]["expression"] == ["Bundle.entry[1].resource.start"]
    assert search_ids(client, doctor) == {first["id"]}  # nothing of it stored


def test_two_entries_of_one_transaction_may_not_overlap(client: httpx.Client, doctor: str) -> None:
    response = transaction(
        client,
        post_entry(appointment(doctor, "13:00", "13:30")),
        post_entry(appointment(doctor, "13:15", "13:45")),
    )
    assert_outcome(response, 409, "Double booking")
    assert "Bundle.entry[" in response.json()["issue"][0]["diagnostics"]
    assert search_ids(client, doctor) == set()


def test_a_transaction_may_move_a_booking_into_a_slot_it_frees(
    client: httpx.Client, doctor: str, first: dict[str, Any]
) -> None:
    cancel = {"resource": {**first, "status": "cancelled"}, "request": {"method": "PUT", "url": f"Appointment/{first['id']}"}}
    replacement = appointment(doctor, "10:00", "10:30")
    response = transaction(client, cancel, post_entry(replacement))
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"][:3] for e in entries] == ["200", "201"]
    replacement_id = entries[1]["response"]["location"].split("/")[1]
    refused(transaction(client, post_entry(appointment(doctor, "10:00", "10:30"))), replacement_id)
    delete = {"request": {"method": "DELETE", "url": f"Appointment/{replacement_id}"}}
    response = transaction(client, delete, post_entry(appointment(doctor, "10:00", "10:30")))
    assert response.status_code == 200, response.text


def test_a_transaction_entry_with_a_conditional_practitioner_reference_is_checked(
    client: httpx.Client, doctor: str
) -> None:
    identifier = unique()
    practitioner = created(post(client, {"resourceType": "Practitioner",
                                         "identifier": [{"system": "urn:test:scheduling", "value": identifier}]}))
    holding = created(post(client, appointment(practitioner["id"], "15:00", "15:30")))
    overlapping = appointment(doctor, "15:10", "15:20")
    overlapping["participant"][1]["actor"] = {"reference": f"Practitioner?identifier=urn:test:scheduling|{identifier}"}
    refused(transaction(client, post_entry(overlapping)), holding["id"])


def test_a_batch_entry_that_double_books_is_refused_alone(
    client: httpx.Client, doctor: str, first: dict[str, Any]
) -> None:
    response = transaction(
        client, post_entry(appointment(doctor, "10:15", "10:45")), post_entry(appointment(doctor, "12:00", "12:30")),
        kind="batch",
    )
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert entries[0]["response"]["status"].startswith("409")
    assert f"Appointment/{first['id']}" in entries[0]["response"]["outcome"]["issue"][0]["diagnostics"]
    assert entries[1]["response"]["status"].startswith("201")


# -- races -------------------------------------------------------------------------------------


def test_racing_creates_book_a_slot_once(writer: ServerProcess, doctor: str) -> None:
    """In both write modes (ordered writes, and MongoDB transactions)."""
    server = writer
    threads = 8
    barrier = threading.Barrier(threads)

    def book(index: int) -> int:
        body = appointment(doctor, f"17:{index:02d}", f"17:{30 + index:02d}")
        with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as own:
            barrier.wait()
            return post(own, body).status_code

    with ThreadPoolExecutor(threads) as pool:
        statuses = sorted(pool.map(book, range(threads)))
    assert statuses == [201] + [409] * (threads - 1)
    with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as check:
        assert len(search_ids(check, doctor)) == 1


# -- the rule itself ---------------------------------------------------------------------------


def test_what_holds_a_slot() -> None:
    assert booking(appointment("a", "10:00", "10:30")) is not None
    assert booking(appointment("a", "10:00", None)) is None  # neither end nor duration
    assert booking(appointment("a", "10:00", "10:00")) is None  # empty
    assert booking({**appointment("a", "10:00", "10:30"), "end": "2031-05-08T10:00:00Z"}) is None  # two days
    assert booking({**appointment("a", "10:00", "10:30"), "start": DAY}) is None  # not an instant
    absolute = appointment("a", "10:00", "10:30")
    absolute["participant"][1]["actor"]["reference"] = "https://fhir.example/fhir/Practitioner/a/_history/2"
    found = booking(absolute, "https://fhir.example/fhir")
    assert found is not None and found.practitioners == {"Practitioner/a"}


def test_appointments_at_the_ends_of_the_calendar_are_not_a_500(client: httpx.Client) -> None:
    for start, end in (("9999-12-31T23:30:00Z", None), ("0001-01-01T00:30:00Z", "0001-01-01T03:00:00Z"),
                       ("0001-01-01T00:30:00+01:00", "0001-01-01T02:00:00+01:00")):
        body = {"resourceType": "Appointment", "status": "booked", "start": start,
                "participant": [{"actor": {"reference": "Practitioner/edge"}, "status": "accepted"}]}
        body |= {"end": end} if end else {"minutesDuration": 60, "end": "9999-12-31T23:59:59.999Z"}
        response = client.post("/Appointment", json=body, headers={"Content-Type": "application/fhir+json"})
        assert response.status_code in (201, 400), response.text


def test_more_bookings_than_can_be_checked_are_a_refusal(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The check reads at most FHIR_MAX_SEARCH_RESULTS bookings around the slot; beyond that it
    refuses (409) rather than book after checking only some of them."""
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_tests_scheduling_limit", "FHIR_MAX_SEARCH_RESULTS": "3"}
    proc = ServerProcess(tmp_path_factory.mktemp("scheduling_limit"), env).start()
    try:
        with httpx.Client(base_url=f"{proc.url}/fhir", timeout=60) as client:
            doctor = unique()
            for hour in ("08", "09", "10", "11"):  # the fourth is checked against all three before it
                created(post(client, appointment(doctor, f"{hour}:00", f"{hour}:30")))
            response = post(client, appointment(doctor, "12:00", "12:30"))
            assert_outcome(response, 409, "more than 3 bookings")
            assert len(search_ids(client, doctor)) == 4
    finally:
        proc.stop()
