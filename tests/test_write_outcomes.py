"""No-op updates and what a write says it did.

An update or patch whose content equals the current version's (meta.versionId and lastUpdated
aside) stores nothing and answers 200 with the current version, as HAPI FHIR does; single
writes and transaction entries alike, in both write modes. Every write's OperationOutcome
carries a code (`created`, `updated`, `unchanged`, `matched`, `deleted`, `not-found`) in
`issue.details.coding`; transaction response entries always carry it in `response.outcome`.
"""

import asyncio
import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pymongo.database
import pytest
from conftest import FHIR_JSON, ServerProcess, assert_outcome, patient, post, put, unique
from pymongo import AsyncMongoClient

from fhir_server.services.resources import WRITE_OUTCOME_SYSTEM
from fhir_server.storage.client import CODEC_OPTIONS
from fhir_server.storage.embedded import EmbeddedDatabase
from fhir_server.storage.repository import Change, Planned, ResourceRepository, StaleWrite

JSON_PATCH = "application/json-patch+json"


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def http(writer: ServerProcess) -> Iterator[httpx.Client]:
    """A client of each write mode's server in turn."""
    with httpx.Client(base_url=f"{writer.url}/fhir", timeout=120) as c:
        yield c


def outcome_code(outcome: dict[str, Any]) -> str:
    """The write-outcome code of an OperationOutcome (its one information issue)."""
    assert outcome["resourceType"] == "OperationOutcome", outcome
    [issue] = outcome["issue"]
    assert issue["severity"] == "information" and issue["diagnostics"], issue
    [coding] = issue["details"]["coding"]
    assert coding["system"] == WRITE_OUTCOME_SYSTEM, coding
    return str(coding["code"])


def history(client: httpx.Client, path: str) -> list[str]:
    """The versionIds of a resource's history, newest first."""
    response = client.get(f"/{path}/_history")
    assert response.status_code == 200, response.text
    return [e["response"]["etag"].removeprefix('W/"').rstrip('"') for e in response.json().get("entry", [])]


def created_with_id(client: httpx.Client, **fields: object) -> dict[str, Any]:
    """A Patient created by PUT with a client id (version 1)."""
    rid = f"wo-{unique()}"
    response = put(client, patient(id=rid, **fields))
    assert response.status_code == 201, response.text
    return response.json()


def json_patch(client: httpx.Client, path: str, operations: list[dict[str, Any]], **headers: str) -> httpx.Response:
    return client.patch(f"/{path}", content=json.dumps(operations), headers={"Content-Type": JSON_PATCH, **headers})


def send(client: httpx.Client, *entries: dict[str, Any], **headers: str) -> httpx.Response:
    body = {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}
    return client.post("", json=body, headers={"Content-Type": FHIR_JSON, **headers})


def entry(method: str, url: str, resource: dict[str, Any] | None = None, **request: str) -> dict[str, Any]:
    found: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        found["resource"] = resource
    return found


def binary_patch(operations: list[dict[str, Any]]) -> dict[str, Any]:
    data = base64.b64encode(json.dumps(operations).encode()).decode()
    return {"resourceType": "Binary", "contentType": JSON_PATCH, "data": data}


def answered(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "transaction-response", body
    return list(body["entry"])


# -- single writes ------------------------------------------------------------------------------


def test_repeated_put_stores_no_new_version(http: httpx.Client) -> None:
    first = created_with_id(http, gender="female", meta={"tag": [{"system": "urn:test", "code": "t"}]})
    rid = first["id"]
    before = http.get(f"/Patient/{rid}")

    # The same content: as read back (with the server's versionId and lastUpdated), and in
    # another key order with any versionId and lastUpdated.
    for body in (first, {**patient(gender="female", id=rid), "meta": {
            "tag": [{"code": "t", "system": "urn:test"}], "versionId": "7", "lastUpdated": "2000-01-01T00:00:00Z"}}):
        again = put(http, body)
        assert again.status_code == 200, again.text
        assert again.headers["ETag"] == 'W/"1"' == before.headers["ETag"]
        assert again.headers["Last-Modified"] == before.headers["Last-Modified"]
        assert again.headers["Content-Location"].endswith(f"/Patient/{rid}/_history/1")
        assert again.json() == before.json()
    assert history(http, f"Patient/{rid}") == ["1"]

    changed = put(http, patient(id=rid, gender="male", meta={"tag": [{"system": "urn:test", "code": "t"}]}))
    assert changed.status_code == 200 and changed.headers["ETag"] == 'W/"2"'
    assert changed.json()["gender"] == "male"
    retagged = put(http, patient(id=rid, gender="male"))  # meta.tag is content: dropping it is a change
    assert retagged.status_code == 200 and retagged.headers["ETag"] == 'W/"3"'
    assert history(http, f"Patient/{rid}") == ["3", "2", "1"]


def test_decimal_precision_is_content(http: httpx.Client) -> None:
    rid = f"wo-{unique()}"
    body = '{"resourceType":"Observation","id":"%s","status":"final","code":{"text":"x"},"valueQuantity":{"value":%s}}'
    headers = {"Content-Type": FHIR_JSON}
    assert http.put(f"/Observation/{rid}", content=body % (rid, "1.50"), headers=headers).status_code == 201
    same = http.put(f"/Observation/{rid}", content=body % (rid, "1.50"), headers=headers)
    assert same.status_code == 200 and same.headers["ETag"] == 'W/"1"'
    other = http.put(f"/Observation/{rid}", content=body % (rid, "1.5"), headers=headers)
    assert other.status_code == 200 and other.headers["ETag"] == 'W/"2"'


def test_prefer_operation_outcome_says_what_a_write_did(http: httpx.Client) -> None:
    prefer = {"Prefer": "return=OperationOutcome"}
    rid = f"wo-{unique()}"
    created = put(http, patient(id=rid), **prefer)
    assert created.status_code == 201 and outcome_code(created.json()) == "created"
    unchanged = put(http, patient(id=rid), **prefer)
    assert unchanged.status_code == 200 and outcome_code(unchanged.json()) == "unchanged"
    assert f"Patient/{rid} is already at version 1" in unchanged.json()["issue"][0]["diagnostics"]
    updated = put(http, patient(id=rid, active=True), **prefer)
    assert updated.status_code == 200 and outcome_code(updated.json()) == "updated"
    assert f"Updated Patient/{rid} to version 2" in updated.json()["issue"][0]["diagnostics"]
    identifier = [{"system": "urn:test:wo", "value": unique()}]
    new = post(http, patient(identifier=identifier), **prefer)
    assert new.status_code == 201 and outcome_code(new.json()) == "created"
    found = post(http, patient(identifier=identifier), **prefer, **{"If-None-Exist": f"identifier=urn:test:wo|{identifier[0]['value']}"})
    assert found.status_code == 200 and outcome_code(found.json()) == "matched"
    gone = http.delete(f"/Patient/{rid}", headers=prefer)
    assert gone.status_code == 200 and outcome_code(gone.json()) == "deleted"
    again = http.delete(f"/Patient/{rid}")  # an outcome whatever Prefer says: there is no resource
    assert outcome_code(again.json()) == "not-found"
    nothing = http.delete("/Patient", params={"identifier": f"urn:test:wo|{unique()}"})
    assert outcome_code(nothing.json()) == "not-found"


def test_patch_that_changes_nothing_stores_nothing(http: httpx.Client) -> None:
    rid = created_with_id(http, gender="female")["id"]
    noop = json_patch(http, f"Patient/{rid}", [{"op": "replace", "path": "/gender", "value": "female"}])
    assert noop.status_code == 200, noop.text
    assert noop.headers["ETag"] == 'W/"1"' and noop.json()["meta"]["versionId"] == "1"
    said = json_patch(http, f"Patient/{rid}", [{"op": "test", "path": "/gender", "value": "female"}],
                      Prefer="return=OperationOutcome")
    assert said.status_code == 200 and outcome_code(said.json()) == "unchanged"
    changed = json_patch(http, f"Patient/{rid}", [{"op": "add", "path": "/active", "value": True}],
                         Prefer="return=OperationOutcome")
    assert changed.status_code == 200 and outcome_code(changed.json()) == "updated"
    assert history(http, f"Patient/{rid}") == ["2", "1"]


def test_conditional_put_that_changes_nothing(http: httpx.Client) -> None:
    value = unique()
    url = f"/Patient?identifier=urn:test:wo|{value}"
    body = patient(identifier=[{"system": "urn:test:wo", "value": value}], gender="other")
    headers = {"Content-Type": FHIR_JSON, "Prefer": "return=OperationOutcome"}
    first = http.put(url, json=body, headers=headers)
    assert first.status_code == 201 and outcome_code(first.json()) == "created"
    again = http.put(url, json=body, headers=headers)
    assert again.status_code == 200 and outcome_code(again.json()) == "unchanged"
    assert again.headers["ETag"] == 'W/"1"'
    rid = again.headers["Content-Location"].split("/Patient/")[1].split("/")[0]
    assert history(http, f"Patient/{rid}") == ["1"]
    with_id = http.put(url, json={**body, "id": rid}, headers=headers)  # the body's id is the match's
    assert with_id.status_code == 200 and outcome_code(with_id.json()) == "unchanged"


def test_stale_if_match_is_412_even_when_nothing_would_change(http: httpx.Client) -> None:
    rid = created_with_id(http, gender="female")["id"]
    assert put(http, patient(id=rid, gender="male")).status_code == 200
    assert_outcome(put(http, patient(id=rid, gender="male"), **{"If-Match": 'W/"1"'}), 412)
    assert_outcome(json_patch(http, f"Patient/{rid}", [{"op": "test", "path": "/gender", "value": "male"}],
                              **{"If-Match": 'W/"1"'}), 412)
    current = put(http, patient(id=rid, gender="male"), **{"If-Match": 'W/"2"'})
    assert current.status_code == 200 and current.headers["ETag"] == 'W/"2"'


def test_update_of_a_deleted_resource_with_its_old_content_creates_a_version(http: httpx.Client) -> None:
    first = created_with_id(http, gender="female")
    rid = first["id"]
    assert http.delete(f"/Patient/{rid}").status_code in (200, 204)
    revived = put(http, first, Prefer="return=OperationOutcome")
    assert revived.status_code == 201 and outcome_code(revived.json()) == "created"
    assert revived.headers["ETag"] == 'W/"3"'
    assert http.get(f"/Patient/{rid}").json()["gender"] == "female"


def test_appointment_updates_that_change_nothing(http: httpx.Client) -> None:
    """The double-booking rule does not refuse an unchanged Appointment its own slot."""
    practitioner = f"Practitioner/{unique()}"
    rid = f"wo-{unique()}"
    appointment = {
        "resourceType": "Appointment", "id": rid, "status": "booked",
        "start": "2031-05-06T09:00:00Z", "end": "2031-05-06T09:30:00Z",
        "participant": [{"actor": {"reference": practitioner}, "status": "accepted"}],
    }
    assert put(http, appointment).status_code == 201
    again = put(http, appointment)
    assert again.status_code == 200 and again.headers["ETag"] == 'W/"1"'
    patched = json_patch(http, f"Appointment/{rid}", [{"op": "replace", "path": "/status", "value": "booked"}])
    assert patched.status_code == 200 and patched.headers["ETag"] == 'W/"1"'
    overlapping = {**appointment, "id": f"wo-{unique()}", "start": "2031-05-06T09:15:00Z", "end": "2031-05-06T09:45:00Z"}
    assert_outcome(put(http, overlapping), 409)  # the kept appointment still holds its slot


# -- transactions -------------------------------------------------------------------------------


@pytest.mark.parametrize("prefer", ["representation", "minimal", "OperationOutcome"])
def test_transaction_entries_say_what_they_did(http: httpx.Client, prefer: str) -> None:
    same = created_with_id(http, gender="female")
    changed = created_with_id(http, gender="female")
    patched = created_with_id(http, gender="female")
    doomed = created_with_id(http)
    value, other = unique(), unique()
    existing = post(http, patient(identifier=[{"system": "urn:test:wo", "value": value}])).json()
    conditional = post(http, patient(identifier=[{"system": "urn:test:wo", "value": other}], active=True)).json()
    entries = [
        entry("PUT", f"Patient/{same['id']}", same),
        entry("PUT", f"Patient/{changed['id']}", patient(id=changed["id"], gender="male")),
        entry("POST", "Patient", patient(gender="other")),
        entry("POST", "Patient", patient(identifier=[{"system": "urn:test:wo", "value": value}]),
              ifNoneExist=f"identifier=urn:test:wo|{value}"),
        entry("PATCH", f"Patient/{patched['id']}", binary_patch([{"op": "replace", "path": "/gender", "value": "female"}])),
        entry("DELETE", f"Patient/{doomed['id']}"),
        entry("DELETE", f"Patient?identifier=urn:test:wo|{unique()}"),
        entry("PUT", f"Patient?identifier=urn:test:wo|{other}",
              patient(identifier=[{"system": "urn:test:wo", "value": other}], active=True)),
    ]
    found = answered(send(http, *entries, Prefer=f"return={prefer}"))
    codes = [outcome_code(e["response"]["outcome"]) for e in found]
    assert codes == ["unchanged", "updated", "created", "matched", "unchanged", "deleted", "not-found", "unchanged"]
    assert [e["response"]["status"][:3] for e in found] == ["200", "200", "201", "200", "200", "200", "200", "200"]
    assert found[0]["response"]["etag"] == 'W/"1"' and found[0]["response"]["location"] == f"Patient/{same['id']}/_history/1"
    assert found[0]["response"]["lastModified"] == same["meta"]["lastUpdated"]
    assert found[1]["response"]["etag"] == 'W/"2"' and found[4]["response"]["etag"] == 'W/"1"'
    assert found[3]["response"]["location"] == f"Patient/{existing['id']}/_history/1"
    assert found[7]["response"]["location"] == f"Patient/{conditional['id']}/_history/1"
    if prefer == "representation":
        assert found[0]["resource"] == same and found[1]["resource"]["gender"] == "male"
        assert found[4]["resource"]["meta"]["versionId"] == "1"
    else:
        assert not any("resource" in e for e in found)
    assert history(http, f"Patient/{same['id']}") == ["1"]
    assert history(http, f"Patient/{patched['id']}") == ["1"]
    assert history(http, f"Patient/{changed['id']}") == ["2", "1"]
    assert http.get(f"/Patient/{doomed['id']}").status_code == 410


def test_transaction_of_unchanged_entries_only(http: httpx.Client) -> None:
    first = created_with_id(http, gender="female")
    second = created_with_id(http, gender="male")
    found = answered(send(http, entry("PUT", f"Patient/{first['id']}", first),
                          entry("PUT", f"Patient/{second['id']}", second), Prefer="return=minimal"))
    assert [outcome_code(e["response"]["outcome"]) for e in found] == ["unchanged", "unchanged"]
    assert [e["response"]["etag"] for e in found] == ['W/"1"', 'W/"1"']


def test_failing_transaction_with_unchanged_entries_stores_nothing(http: httpx.Client) -> None:
    same, changed, guarded = (created_with_id(http, gender="female") for _ in range(3))
    identifier = [{"system": "urn:test:wo", "value": unique()}]
    response = send(
        http,
        entry("PUT", f"Patient/{same['id']}", same),
        entry("PUT", f"Patient/{changed['id']}", patient(id=changed["id"], gender="male")),
        entry("POST", "Patient", patient(identifier=identifier)),
        entry("PUT", f"Patient/{guarded['id']}", guarded, ifMatch='W/"9"'),  # fails when planned, after the others
    )
    assert_outcome(response, 412, "Bundle.entry[3]")
    assert history(http, f"Patient/{changed['id']}") == ["1"]
    assert http.get("/Patient", params={"identifier": f"urn:test:wo|{identifier[0]['value']}"}).json()["total"] == 0


def test_unchanged_entry_waits_for_a_pending_claim_on_its_resource(
    client: httpx.Client, mongo: pymongo.database.Database
) -> None:
    """An unchanged entry answers with the current version, so the commit checks it still is:
    a live transaction claiming the next version makes it retry (then 409), and once that
    claim is abandoned the entry is unchanged again."""
    same = created_with_id(client, gender="female")
    rid = same["id"]
    claim = mongo["history"].find_one({"_id": f"Patient/{rid}/{1:010d}"})
    assert claim is not None
    tx = unique()
    claim.update(_id=f"Patient/{rid}/{2:010d}", v=2, m="PUT", tx=tx)
    claim.pop("c", None)
    mongo["history"].insert_one(claim)
    mongo["transactions"].insert_one({"_id": tx, "state": "pending", "lease": datetime.now(UTC) + timedelta(minutes=5),
                                      "claims": [claim["_id"]]})
    other = patient(gender="other", identifier=[{"system": "urn:test:wo", "value": unique()}])
    entries = [entry("PUT", f"Patient/{rid}", same), entry("POST", "Patient", other)]
    assert_outcome(send(client, *entries), 409)
    query = {"identifier": f"urn:test:wo|{other['identifier'][0]['value']}"}
    assert client.get("/Patient", params=query).json()["total"] == 0

    mongo["transactions"].update_one({"_id": tx}, {"$set": {"lease": datetime.now(UTC) - timedelta(seconds=1)}})
    found = answered(send(client, *entries))
    assert [outcome_code(e["response"]["outcome"]) for e in found] == ["unchanged", "created"]
    assert found[0]["response"]["etag"] == 'W/"1"'
    assert client.get("/Patient", params=query).json()["total"] == 1


@pytest.mark.parametrize("mode", ["off", "on"])
def test_commit_fails_when_a_kept_version_is_no_longer_current(database: EmbeddedDatabase, mode: str) -> None:
    """`write_all(planned, kept)`: the versions an unchanged entry answers with are checked at
    the commit, in both write modes; nothing of the transaction is stored when one moved."""

    async def scenario() -> None:
        client: AsyncMongoClient = AsyncMongoClient(database.uri)
        try:
            repository = ResourceRepository(client.get_database(f"fhir_outcomes_{mode}", codec_options=CODEC_OPTIONS))
            await repository.prepare(mode)
            rid, other = unique(), unique()
            body = {"resourceType": "Patient", "id": rid, "gender": "female"}
            first, _ = await repository.write("Patient", rid, lambda current: Change(body, "PUT"))
            assert first is not None
            moved, _ = await repository.write("Patient", rid, lambda current: Change({**body, "active": True}, "PUT"))
            assert moved is not None and moved.vid == 2
            planned = [Planned("Patient", other, None, Change({"resourceType": "Patient", "gender": "male"}, "POST"))]
            with pytest.raises(StaleWrite):
                await repository.write_all(planned, [first])
            assert await repository.read("Patient", other) is None
            [written] = await repository.write_all(planned, [moved])
            assert written.vid == 1 and (await repository.read("Patient", rid)).vid == 2  # type: ignore[union-attr]
            assert await repository.write_all([], [moved]) == []
            with pytest.raises(StaleWrite):
                await repository.write_all([], [first])
        finally:
            await client.close()

    asyncio.run(scenario())
