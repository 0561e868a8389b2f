"""Batch and transaction Bundles (`POST /fhir`): processing order, placeholders and conditional
references, conditional entries, all-or-nothing commits in both write modes, concurrent
transactions, batches, limits, and the Synthea sample bundles."""

import base64
import json
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import bson
import httpx
import pymongo.database
import pytest
from conftest import FHIR_JSON, ServerProcess, assert_outcome, patient, post, unique

from fhir_server import fhir_json
from fhir_server.storage.embedded import EmbeddedDatabase

RUN = unique()
TAG_SYSTEM = "urn:test:transactions"
TAG = {"system": TAG_SYSTEM, "code": RUN}
SYNTHEA = Path(__file__).parents[2] / "shared" / "synthea-r4"
LOCATION = re.compile(r"^(?P<type>[A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})/_history/(?P<vid>[0-9]+)$")
INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


# -- helpers ------------------------------------------------------------------------------------


def tagged(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource with this module's tag, so that counts see only what these tests store."""
    return {**resource, "meta": {"tag": [TAG]}}


def observation(**fields: object) -> dict[str, Any]:
    return tagged({"resourceType": "Observation", "status": "final", "code": {"text": "transaction test"}, **fields})


def entry(method: str, url: str, resource: dict[str, Any] | None = None, full_url: str | None = None,
          **request: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if full_url is not None:
        found["fullUrl"] = full_url
    if resource is not None:
        found["resource"] = resource
    found["request"] = {"method": method, "url": url, **request}
    return found


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def send(client: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post("", content=fhir_json.dumps(body), headers={"Content-Type": FHIR_JSON, **headers})


def answered(response: httpx.Response, kind: str) -> list[dict[str, Any]]:
    """The entries of a 200 batch-response or transaction-response."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["resourceType"] == "Bundle" and body["type"] == f"{kind}-response", body
    return body.get("entry", [])


def status(found: dict[str, Any]) -> int:
    return int(found["response"]["status"][:3])


def location(found: dict[str, Any]) -> tuple[str, str, int]:
    """(type, id, version) of a response entry's relative location."""
    match = LOCATION.match(found["response"]["location"])
    assert match, found
    return match["type"], match["id"], int(match["vid"])


def check_write(found: dict[str, Any], code: int, resource_type: str) -> tuple[str, int]:
    """A write's response entry: status, relative location, matching etag, lastModified."""
    assert status(found) == code, found
    kind, rid, vid = location(found)
    assert kind == resource_type
    assert found["response"]["etag"] == f'W/"{vid}"'
    assert INSTANT.match(found["response"]["lastModified"]), found
    return rid, vid


def uuid_urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def count(client: httpx.Client, resource_type: str, **params: str) -> int:
    response = client.get(f"/{resource_type}", params={"_tag": f"{TAG_SYSTEM}|{RUN}", **params, "_summary": "count"})
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


def history_total(client: httpx.Client, path: str = "") -> int:
    response = client.get(f"{path}/_history", params={"_count": 0})
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


def created(client: httpx.Client, resource: dict[str, Any]) -> dict[str, Any]:
    response = post(client, resource)
    assert response.status_code == 201, response.text
    return response.json()


def with_identifier(value: str, system: str = "urn:test:tx-id", **fields: object) -> dict[str, Any]:
    return tagged(patient(identifier=[{"system": system, "value": value}], **fields))


def binary_patch(operations: list[dict[str, Any]], content_type: str = "application/json-patch+json") -> dict[str, Any]:
    data = base64.b64encode(json.dumps(operations).encode()).decode()
    return {"resourceType": "Binary", "contentType": content_type, "data": data}


def outcome_names(body: dict[str, Any], where: str) -> None:
    """An OperationOutcome whose diagnostics name the Bundle entry `where`."""
    assert body["resourceType"] == "OperationOutcome", body
    assert any(where in issue.get("diagnostics", "") for issue in body["issue"]), body


def client_of(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/fhir", timeout=120)


# -- transactions: order and response -------------------------------------------------------------


def test_transaction_processing_order_and_response_entries(client: httpx.Client) -> None:
    kept = created(client, tagged(patient(gender="male")))
    doomed = created(client, tagged(patient(gender="male")))
    value = unique()
    matched = created(client, with_identifier(value, gender="male"))
    new_patient = uuid_urn()
    entries = [
        entry("GET", f"Patient/{kept['id']}"),
        entry("PUT", f"Patient?identifier=urn:test:tx-id|{value}", with_identifier(value, gender="female")),
        entry("POST", "Observation", observation(subject={"reference": f"Patient/{kept['id']}"}), uuid_urn()),
        entry("DELETE", f"Patient/{doomed['id']}"),
        entry("PUT", f"Patient/{kept['id']}", tagged(patient(id=kept["id"], gender="female"))),
        entry("GET", f"Patient/{doomed['id']}"),
        entry("GET", f"Observation?subject=Patient/{kept['id']}"),
        entry("POST", "Patient", tagged(patient(gender="other")), new_patient),
    ]
    found = answered(send(client, bundle("transaction", *entries)), "transaction")
    assert len(found) == len(entries)

    # GET entries run after every write: they see the new versions, the deletion and the new Observation.
    read = found[0]
    assert status(read) == 200 and read["resource"]["id"] == kept["id"]
    assert read["resource"]["gender"] == "female" and read["resource"]["meta"]["versionId"] == "2"
    assert read["response"]["etag"] == 'W/"2"'
    assert_gone = found[5]
    assert status(assert_gone) == 410 and assert_gone["response"]["outcome"]["resourceType"] == "OperationOutcome"
    searchset = found[6]["resource"]
    assert searchset["type"] == "searchset"
    obs_id, obs_vid = check_write(found[2], 201, "Observation")
    assert [e["resource"]["id"] for e in searchset["entry"] if e["search"]["mode"] == "match"] == [obs_id]

    # Writes, in request order, each with status, location, etag and lastModified.
    assert check_write(found[1], 200, "Patient") == (matched["id"], 2)
    assert obs_vid == 1
    assert status(found[3]) == 200 and found[3]["response"]["etag"] == 'W/"2"'
    assert INSTANT.match(found[3]["response"]["lastModified"])
    assert check_write(found[4], 200, "Patient") == (kept["id"], 2)
    new_id, new_vid = check_write(found[7], 201, "Patient")
    assert new_vid == 1 and new_id not in (kept["id"], doomed["id"], matched["id"])
    for written_entry, expected in [(found[1], "female"), (found[4], "female"), (found[7], "other")]:
        assert written_entry["resource"]["gender"] == expected  # return=representation by default

    # And the database agrees.
    assert client.get(f"/Patient/{doomed['id']}").status_code == 410
    assert client.get(f"/Patient/{matched['id']}").json()["gender"] == "female"
    assert client.get(f"/Patient/{kept['id']}").json()["meta"]["versionId"] == "2"
    assert client.get(f"/Observation/{obs_id}").json()["subject"]["reference"] == f"Patient/{kept['id']}"


@pytest.mark.parametrize("prefer", ["minimal", "representation", "OperationOutcome"])
def test_transaction_prefer_return(client: httpx.Client, prefer: str) -> None:
    existing = created(client, tagged(patient()))
    doomed = created(client, tagged(patient()))
    entries = [
        entry("POST", "Patient", tagged(patient(gender="female"))),
        entry("PUT", f"Patient/{existing['id']}", tagged(patient(id=existing["id"], gender="male"))),
        entry("DELETE", f"Patient/{doomed['id']}"),
    ]
    found = answered(send(client, bundle("transaction", *entries), Prefer=f"return={prefer}"), "transaction")
    check_write(found[0], 201, "Patient")
    check_write(found[1], 200, "Patient")
    assert status(found[2]) == 200
    writes = found[:2]
    if prefer == "minimal":
        assert all("resource" not in e for e in found)
    elif prefer == "representation":
        for e in writes:
            assert e["resource"]["resourceType"] == "Patient"
            assert e["response"]["etag"] == f'W/"{e["resource"]["meta"]["versionId"]}"'
            assert e["response"]["location"].startswith(f"Patient/{e['resource']['id']}/")
        assert [e["resource"]["gender"] for e in writes] == ["female", "male"]
    else:
        for e in found:
            assert "resource" not in e
            assert e["response"]["outcome"]["resourceType"] == "OperationOutcome"


def test_empty_transaction_and_batch(client: httpx.Client) -> None:
    for kind in ("transaction", "batch"):
        assert answered(send(client, {"resourceType": "Bundle", "type": kind}), kind) == []


# -- placeholders ------------------------------------------------------------------------------


def test_placeholders_are_resolved_in_references_and_narrative(client: httpx.Client) -> None:
    person, member, chosen_id = uuid_urn(), "urn:oid:1.2.840.10008.99." + str(uuid.uuid4().int % 10**9), f"tx-{unique()}"
    performer = uuid_urn()
    div = (f'<div xmlns="http://www.w3.org/1999/xhtml">Panel of <a href="{person}">the patient</a>'
           f' with <img src="{member}" alt="member"/></div>')
    panel = observation(
        subject={"reference": person},
        performer=[{"reference": performer}],
        hasMember=[{"reference": member}],
        text={"status": "generated", "div": div},
        extension=[
            {"url": "http://example.org/source", "valueReference": {"reference": person}},
            {"url": "http://example.org/nested", "extension": [
                {"url": "member", "valueReference": {"reference": member}},
            ]},
        ],
        contained=[{
            "resourceType": "Provenance", "id": "prov", "recorded": "2024-01-02T03:04:05Z",
            "target": [{"reference": member}], "agent": [{"who": {"reference": person}}],
        }],
    )
    entries = [  # the panel comes first: placeholders name later entries
        entry("POST", "Observation", panel, uuid_urn()),
        entry("POST", "Patient", tagged(patient()), person),
        entry("POST", "Observation", observation(), member),
        entry("PUT", f"Patient/{chosen_id}", tagged(patient(id=chosen_id)), performer),
    ]
    found = answered(send(client, bundle("transaction", *entries)), "transaction")
    panel_id, _ = check_write(found[0], 201, "Observation")
    person_id, _ = check_write(found[1], 201, "Patient")
    member_id, _ = check_write(found[2], 201, "Observation")
    assert check_write(found[3], 201, "Patient") == (chosen_id, 1)

    stored = client.get(f"/Observation/{panel_id}").json()
    assert stored["subject"]["reference"] == f"Patient/{person_id}"
    assert stored["performer"][0]["reference"] == f"Patient/{chosen_id}"
    assert stored["hasMember"][0]["reference"] == f"Observation/{member_id}"
    assert stored["extension"][0]["valueReference"]["reference"] == f"Patient/{person_id}"
    assert stored["extension"][1]["extension"][0]["valueReference"]["reference"] == f"Observation/{member_id}"
    provenance = stored["contained"][0]
    assert provenance["target"][0]["reference"] == f"Observation/{member_id}"
    assert provenance["agent"][0]["who"]["reference"] == f"Patient/{person_id}"
    assert f'href="Patient/{person_id}"' in stored["text"]["div"]
    assert f'src="Observation/{member_id}"' in stored["text"]["div"]
    assert "urn:uuid:" not in json.dumps(stored) and "urn:oid:" not in json.dumps(stored)
    assert found[0]["resource"] == stored  # the response shows what was stored


def test_placeholders_in_uri_and_url_elements_are_resolved(client: httpx.Client) -> None:
    """R4 transaction rules: matching links are replaced in references and also in elements of
    type uri and url (e.g. Attachment.url pointing at a Binary of the same Bundle)."""
    content = uuid_urn()
    document = tagged({
        "resourceType": "DocumentReference", "status": "current",
        "content": [{"attachment": {"contentType": "text/plain", "url": content}}],
        "extension": [{"url": "http://example.org/source", "valueUri": content}],
    })
    entries = [
        entry("POST", "DocumentReference", document),
        entry("POST", "Binary", {"resourceType": "Binary", "contentType": "text/plain", "data": "aGVsbG8="}, content),
    ]
    found = answered(send(client, bundle("transaction", *entries)), "transaction")
    document_id, _ = check_write(found[0], 201, "DocumentReference")
    binary_id, _ = check_write(found[1], 201, "Binary")
    stored = client.get(f"/DocumentReference/{document_id}").json()
    assert stored["content"][0]["attachment"]["url"] == f"Binary/{binary_id}"
    assert stored["extension"][0]["valueUri"] == f"Binary/{binary_id}"


def test_unknown_placeholder_fails_the_transaction(client: httpx.Client) -> None:
    before = count(client, "Patient"), count(client, "Observation")
    missing = uuid_urn()
    entries = [
        entry("POST", "Patient", tagged(patient()), uuid_urn()),
        entry("POST", "Observation", observation(hasMember=[{"reference": missing}])),
    ]
    body = assert_outcome(send(client, bundle("transaction", *entries)), 400, "Bundle.entry[1]")
    assert any(missing in issue["diagnostics"] for issue in body["issue"])
    assert (count(client, "Patient"), count(client, "Observation")) == before


# -- conditional references and conditional entries --------------------------------------------


def test_conditional_references(client: httpx.Client) -> None:
    one, none, many = unique(), unique(), unique()
    target = created(client, with_identifier(one))
    created(client, with_identifier(many))
    created(client, with_identifier(many))
    query = f"Patient?identifier=urn:test:tx-id|{one}"
    found = answered(send(client, bundle(
        "transaction",
        entry("POST", "Observation", observation(subject={"reference": query}, performer=[{"reference": query}])),
    )), "transaction")
    obs_id, _ = check_write(found[0], 201, "Observation")
    stored = client.get(f"/Observation/{obs_id}").json()
    assert stored["subject"]["reference"] == stored["performer"][0]["reference"] == f"Patient/{target['id']}"

    before = count(client, "Patient"), count(client, "Observation")
    for value in (none, many):
        entries = [
            entry("POST", "Patient", tagged(patient())),
            entry("POST", "Observation", observation(subject={"reference": f"Patient?identifier=urn:test:tx-id|{value}"})),
        ]
        response = send(client, bundle("transaction", *entries))
        assert response.status_code in (400, 404, 412), response.text
        outcome_names(assert_outcome(response, response.status_code), "Bundle.entry[1]")
    assert (count(client, "Patient"), count(client, "Observation")) == before  # nothing stored


def test_conditional_reference_to_a_conditional_create_of_the_same_bundle(client: httpx.Client) -> None:
    fresh, existing_value = unique(), unique()
    existing = created(client, with_identifier(existing_value))
    for value, created_status in [(fresh, 201), (existing_value, 200)]:
        criteria = f"identifier=urn:test:tx-id|{value}"
        entries = [
            entry("POST", "Observation", observation(subject={"reference": f"Patient?{criteria}"})),
            entry("POST", "Patient", with_identifier(value), ifNoneExist=criteria),
        ]
        found = answered(send(client, bundle("transaction", *entries)), "transaction")
        obs_id, _ = check_write(found[0], 201, "Observation")
        patient_id, _ = check_write(found[1], created_status, "Patient")
        if created_status == 200:
            assert patient_id == existing["id"]
        stored = client.get(f"/Observation/{obs_id}").json()
        assert stored["subject"]["reference"] == f"Patient/{patient_id}"
        assert client.get("/Patient", params={"identifier": f"urn:test:tx-id|{value}"}).json()["total"] == 1


def test_if_none_exist_and_if_match(client: httpx.Client) -> None:
    value = unique()
    existing = created(client, with_identifier(value))
    placeholder = uuid_urn()
    criteria = f"identifier=urn:test:tx-id|{value}"
    found = answered(send(client, bundle(
        "transaction",
        entry("POST", "Patient", with_identifier(value, gender="female"), placeholder, ifNoneExist=criteria),
        entry("POST", "Patient", with_identifier(unique()), ifNoneExist=f"identifier=urn:test:tx-id|{unique()}"),
        entry("POST", "Observation", observation(subject={"reference": placeholder})),
    )), "transaction")
    assert check_write(found[0], 200, "Patient") == (existing["id"], 1)  # matched: nothing created
    check_write(found[1], 201, "Patient")
    obs_id, _ = check_write(found[2], 201, "Observation")
    assert client.get(f"/Observation/{obs_id}").json()["subject"]["reference"] == f"Patient/{existing['id']}"
    assert client.get("/Patient", params={"identifier": f"urn:test:tx-id|{value}"}).json()["total"] == 1
    assert "gender" not in client.get(f"/Patient/{existing['id']}").json()

    # ifMatch: the right version updates; a wrong one fails the whole transaction.
    rid = existing["id"]
    found = answered(send(client, bundle(
        "transaction", entry("PUT", f"Patient/{rid}", with_identifier(value, id=rid, gender="male"), ifMatch='W/"1"'),
    )), "transaction")
    assert check_write(found[0], 200, "Patient") == (rid, 2)
    before = count(client, "Patient"), history_total(client)
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", tagged(patient())),
        entry("PUT", f"Patient/{rid}", with_identifier(value, id=rid, gender="other"), ifMatch='W/"1"'),
    ))
    outcome_names(assert_outcome(response, 412), "Bundle.entry[1]")
    assert (count(client, "Patient"), history_total(client)) == before
    current = client.get(f"/Patient/{rid}").json()
    assert current["gender"] == "male" and current["meta"]["versionId"] == "2"


def test_conditional_read_entries(client: httpx.Client) -> None:
    rid = created(client, tagged(patient()))["id"]
    updated = client.put(f"/Patient/{rid}", json=tagged(patient(id=rid, gender="male")), headers={"Content-Type": FHIR_JSON})
    assert updated.status_code == 200, updated.text
    entries = [
        entry("GET", f"Patient/{rid}", ifNoneMatch='W/"2"'),
        entry("GET", f"Patient/{rid}", ifNoneMatch='W/"1"'),
        entry("GET", f"Patient/{rid}", ifModifiedSince="Fri, 01 Jan 2100 00:00:00 GMT"),
        entry("GET", f"Patient/{rid}", ifModifiedSince="Sat, 01 Jan 2000 00:00:00 GMT"),
    ]
    for kind in ("transaction", "batch"):
        found = answered(send(client, bundle(kind, *entries)), kind)
        assert [status(e) for e in found] == [304, 200, 304, 200]
        assert "resource" not in found[0] and "resource" not in found[2]
        assert found[0]["response"]["etag"] == 'W/"2"'
        assert found[1]["resource"]["meta"]["versionId"] == "2" and found[3]["resource"]["gender"] == "male"


def test_conditional_create_after_a_delete_of_its_match(client: httpx.Client) -> None:
    """DELETE entries are processed before POST entries: a conditional create whose only match is
    deleted by the same transaction finds nothing (or the transaction fails); it never answers
    with the resource the transaction deletes."""
    value = unique()
    criteria = f"identifier=urn:test:tx-id|{value}"
    old = created(client, with_identifier(value))
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", with_identifier(value, gender="female"), ifNoneExist=criteria),
        entry("DELETE", f"Patient?{criteria}"),
    ))
    if response.status_code != 200:  # refused as a whole: nothing changed
        assert_outcome(response, response.status_code)
        assert 400 <= response.status_code < 500
        assert client.get(f"/Patient/{old['id']}").status_code == 200
        return
    found = answered(response, "transaction")
    new_id, _ = check_write(found[0], 201, "Patient")
    assert new_id != old["id"]
    assert client.get(f"/Patient/{old['id']}").status_code == 410
    remaining = client.get("/Patient", params={"identifier": f"urn:test:tx-id|{value}"}).json()
    assert [e["resource"]["id"] for e in remaining.get("entry", [])] == [new_id]


def test_identical_conditional_creates_in_one_transaction_create_once(client: httpx.Client) -> None:
    """Entries act as if processed one after another: the second conditional create with the
    same criteria matches what the first created (or the transaction is refused)."""
    value = unique()
    criteria = f"identifier=urn:test:tx-id|{value}"
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", with_identifier(value), ifNoneExist=criteria),
        entry("POST", "Patient", with_identifier(value), ifNoneExist=criteria),
    ))
    total = client.get("/Patient", params={"identifier": f"urn:test:tx-id|{value}"}).json()["total"]
    if response.status_code != 200:
        assert 400 <= response.status_code < 500 and total == 0, response.text
        return
    found = answered(response, "transaction")
    ids = {location(e)[1] for e in found}
    assert total == 1 and len(ids) == 1, found
    assert sorted(status(e) for e in found) == [200, 201]


def test_patch_entries(client: httpx.Client) -> None:
    for kind in ("transaction", "batch"):
        rid = created(client, tagged(patient(gender="male")))["id"]
        patch = binary_patch([{"op": "add", "path": "/active", "value": True},
                              {"op": "replace", "path": "/gender", "value": "female"}])
        found = answered(send(client, bundle(kind, entry("PATCH", f"Patient/{rid}", patch))), kind)
        assert location(found[0]) == ("Patient", rid, 2) and status(found[0]) == 200
        current = client.get(f"/Patient/{rid}").json()
        assert current["active"] is True and current["gender"] == "female" and current["meta"]["versionId"] == "2"

        failing = binary_patch([{"op": "remove", "path": "/birthDate"}])  # nothing to remove
        if kind == "batch":
            found = answered(send(client, bundle(kind, entry("PATCH", f"Patient/{rid}", failing),
                                                 entry("POST", "Patient", tagged(patient())))), kind)
            assert status(found[0]) == 422 and found[0]["response"]["outcome"]["resourceType"] == "OperationOutcome"
            check_write(found[1], 201, "Patient")
        else:
            response = send(client, bundle(kind, entry("POST", "Patient", tagged(patient())),
                                           entry("PATCH", f"Patient/{rid}", failing)))
            outcome_names(assert_outcome(response, 422), "Bundle.entry[1]")
        not_json_patch = binary_patch([{"op": "add", "path": "/active", "value": False}], "application/json")
        if kind == "batch":
            found = answered(send(client, bundle(kind, entry("PATCH", f"Patient/{rid}", not_json_patch))), kind)
            assert 400 <= status(found[0]) < 500
        else:
            response = send(client, bundle(kind, entry("PATCH", f"Patient/{rid}", not_json_patch)))
            assert 400 <= response.status_code < 500
            assert_outcome(response, response.status_code)
        assert client.get(f"/Patient/{rid}").json()["meta"]["versionId"] == "2"


# -- all or nothing ----------------------------------------------------------------------------


FAILURES = {
    # name: (the failing middle entry, given the ids of the resources the transaction touches; status)
    "invalid resource": (lambda ids: entry("POST", "Patient", tagged(patient(gender="robot"))), 400),
    "failed ifMatch": (lambda ids: entry("PUT", f"Patient/{ids['other']}", tagged(patient(id=ids["other"])),
                                         ifMatch='W/"5"'), 412),
    "unknown type": (lambda ids: entry("POST", "NotAType", {"resourceType": "NotAType"}), None),
    "same resource twice": (lambda ids: entry("PUT", f"Patient/{ids['kept']}",
                                              tagged(patient(id=ids["kept"], gender="other"))), 400),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failing_entry_rolls_back_the_whole_transaction(writer: ServerProcess, failure: str) -> None:
    with client_of(writer) as client:
        ids = {name: created(client, tagged(patient(gender="male")))["id"] for name in ("kept", "doomed", "other")}
        make, expected = FAILURES[failure]
        person = uuid_urn()
        entries = [
            entry("POST", "Patient", tagged(patient(gender="female")), person),
            entry("PUT", f"Patient/{ids['kept']}", tagged(patient(id=ids["kept"], gender="female"))),
            make(ids),
            entry("DELETE", f"Patient/{ids['doomed']}"),
            entry("POST", "Observation", observation(subject={"reference": person})),
        ]

        def counts() -> tuple[int, ...]:
            return (count(client, "Patient"), count(client, "Observation"), history_total(client),
                    history_total(client, "/Patient"), history_total(client, f"/Patient/{ids['kept']}"))

        before = counts()
        response = send(client, bundle("transaction", *entries))
        if expected is None:
            assert response.status_code in (400, 404), response.text
        body = assert_outcome(response, expected or response.status_code)
        outcome_names(body, "Bundle.entry[2]")
        assert counts() == before
        kept = client.get(f"/Patient/{ids['kept']}").json()
        assert kept["gender"] == "male" and kept["meta"]["versionId"] == "1"
        assert client.get(f"/Patient/{ids['doomed']}").status_code == 200
        # The same transaction without the failing entry goes through.
        found = answered(send(client, bundle("transaction", *entries[:2], *entries[3:])), "transaction")
        assert [status(e) for e in found] == [201, 200, 200, 201]
        assert counts() != before


def test_resource_over_the_size_limit_is_refused_in_a_transaction_too(client: httpx.Client) -> None:
    """The session server takes bodies up to 1,000,000 bytes: a larger resource is refused alone
    and in a batch, and a transaction does not store it either."""
    big = tagged({"resourceType": "Binary", "contentType": "application/octet-stream",
                  "data": base64.b64encode(b"x" * 900_000).decode()})
    assert_outcome(post(client, big), 413)
    found = answered(send(client, bundle("batch", entry("POST", "Binary", big))), "batch")
    assert status(found[0]) == 413
    before = count(client, "Binary"), count(client, "Patient")
    response = send(client, bundle("transaction", entry("POST", "Patient", tagged(patient())),
                                   entry("POST", "Binary", big)), Prefer="return=minimal")
    assert_outcome(response, 413)
    assert (count(client, "Binary"), count(client, "Patient")) == before


# -- concurrency -------------------------------------------------------------------------------


THREADS = 8
ROUNDS = 3


def test_concurrent_transactions_never_interleave(writer: ServerProcess) -> None:
    with client_of(writer) as client:
        first = created(client, tagged(patient()))["id"]
        second = created(client, tagged(patient()))["id"]

        def run(marker: str) -> tuple[str, httpx.Response]:
            body = bundle(
                "transaction",
                entry("PUT", f"Patient/{first}", tagged(patient(id=first, name=[{"family": marker}]))),
                entry("PUT", f"Patient/{second}", tagged(patient(id=second, name=[{"family": marker}]))),
            )
            with client_of(writer) as own:
                return marker, send(own, body, Prefer="return=minimal")

        markers = [f"tx-{n}" for n in range(THREADS * ROUNDS)]
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(run, markers))
        assert {r.status_code for _, r in results} <= {200, 409}, [r.text for _, r in results if r.status_code not in (200, 409)]
        done = {m: r for m, r in results if r.status_code == 200}
        assert done, "no transaction went through"

        def markers_of(rid: str) -> list[str]:
            history = client.get(f"/Patient/{rid}/_history", params={"_count": 1000}).json()
            versions = [int(e["resource"]["meta"]["versionId"]) for e in reversed(history["entry"])]
            assert history["total"] == len(versions) == len(done) + 1
            assert versions == list(range(1, len(done) + 2))  # consecutive, none lost
            return [e["resource"]["name"][0]["family"] for e in reversed(history["entry"][:-1])]

        on_first, on_second = markers_of(first), markers_of(second)
        assert on_first == on_second  # the same order of transactions on both resources
        assert sorted(on_first) == sorted(done)
        for marker, response in done.items():  # each answer names the versions it wrote
            found = answered(response, "transaction")
            (_, id_a, v_a), (_, id_b, v_b) = location(found[0]), location(found[1])
            assert (id_a, id_b) == (first, second)
            assert on_first[v_a - 2] == marker and on_second[v_b - 2] == marker


def test_concurrent_transactions_with_if_match_have_one_winner(writer: ServerProcess) -> None:
    with client_of(writer) as client:
        first = created(client, tagged(patient()))["id"]
        second = created(client, tagged(patient()))["id"]

        def run(n: int) -> httpx.Response:
            body = bundle(
                "transaction",
                entry("PUT", f"Patient/{first}", tagged(patient(id=first, name=[{"family": f"w{n}"}])), ifMatch='W/"1"'),
                entry("PUT", f"Patient/{second}", tagged(patient(id=second, name=[{"family": f"w{n}"}])), ifMatch='W/"1"'),
            )
            with client_of(writer) as own:
                return send(own, body)

        with ThreadPoolExecutor(THREADS) as pool:
            responses = list(pool.map(run, range(THREADS)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) == 1 and set(statuses) <= {200, 409, 412}, statuses
        a, b = client.get(f"/Patient/{first}").json(), client.get(f"/Patient/{second}").json()
        assert a["meta"]["versionId"] == b["meta"]["versionId"] == "2"
        assert a["name"] == b["name"]


# -- batches -----------------------------------------------------------------------------------


def test_batch_entries_succeed_or_fail_on_their_own(client: httpx.Client) -> None:
    existing = created(client, tagged(patient(gender="male")))
    before = count(client, "Patient")
    entries = [
        entry("POST", "Patient", tagged(patient(gender="female"))),
        entry("POST", "Patient", tagged(patient(gender="robot"))),
        entry("POST", "NotAType", {"resourceType": "NotAType"}),
        entry("GET", f"Patient/{existing['id']}"),
        entry("GET", f"Patient/missing-{unique()}"),
        entry("GET", f"Patient?_id={existing['id']}&gender=male"),
        entry("PUT", f"Patient/{existing['id']}", tagged(patient(id=existing["id"], gender="other"))),
        entry("PUT", f"Patient/{existing['id']}", {"resourceType": "Observation"}),
        entry("DELETE", f"Patient/missing-{unique()}"),
    ]
    found = answered(send(client, bundle("batch", *entries)), "batch")
    assert len(found) == len(entries)
    new_id, _ = check_write(found[0], 201, "Patient")
    for failed, code in [(1, 400), (2, 404), (4, 404), (7, 400)]:
        assert status(found[failed]) == code, found[failed]
        assert found[failed]["response"]["outcome"]["resourceType"] == "OperationOutcome"
        assert "resource" not in found[failed]
    assert "Patient.gender" in json.dumps(found[1]["response"]["outcome"])
    assert status(found[3]) == 200 and found[3]["resource"]["id"] == existing["id"]
    searchset = found[5]["resource"]
    assert status(found[5]) == 200 and searchset["type"] == "searchset"
    assert [e["resource"]["id"] for e in searchset["entry"] if e["search"]["mode"] == "match"] == [existing["id"]]
    assert check_write(found[6], 200, "Patient") == (existing["id"], 2)
    assert status(found[8]) == 200
    assert count(client, "Patient") == before + 1
    assert client.get(f"/Patient/{new_id}").json()["gender"] == "female"
    assert client.get(f"/Patient/{existing['id']}").json()["gender"] == "other"


def test_nested_bundle_is_refused_in_its_own_entry(client: httpx.Client) -> None:
    nested = bundle("batch", entry("POST", "Patient", tagged(patient())))
    base = f"{client.base_url}".rstrip("/")
    before = count(client, "Patient")
    found = answered(send(client, bundle(
        "batch",
        entry("POST", "/", nested),
        entry("POST", f"{base}/", nested),
        entry("POST", "Patient", tagged(patient())),
    )), "batch")
    for refused in found[:2]:
        assert status(refused) == 400, refused
        assert refused["response"]["outcome"]["resourceType"] == "OperationOutcome"
    check_write(found[2], 201, "Patient")
    assert count(client, "Patient") == before + 1  # the nested Bundle's entry did not run


def test_bad_bundles(client: httpx.Client) -> None:
    for body, text in [
        (b"not json", "JSON"),
        (b'{"resourceType":"Bundle","type":"collection"}', "Bundle.type"),
        (b'{"resourceType":"Patient"}', "Bundle"),
        (b'{"resourceType":"Bundle","type":"transaction","entry":{}}', "Bundle.entry"),
        (b'{"resourceType":"Bundle","type":"batch","entry":[{"resource":{"resourceType":"Patient"}}]}', "Bundle.entry[0]"),
        (b'{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"FETCH","url":"Patient"}}]}',
         "Bundle.entry[0].request.method"),
        (b'{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET"}}]}', "Bundle.entry[0].request.url"),
    ]:
        response = client.post("", content=body, headers={"Content-Type": FHIR_JSON})
        assert_outcome(response, 400, text)
    wrong_type = client.post("", content=b'{"resourceType":"Bundle","type":"batch"}', headers={"Content-Type": "text/plain"})
    assert_outcome(wrong_type, 415)
    before = count(client, "Patient")
    half_bad = bundle("transaction", entry("POST", "Patient", tagged(patient())), {"fullUrl": uuid_urn()})
    assert_outcome(send(client, half_bad), 400, "Bundle.entry[1]")
    assert count(client, "Patient") == before


# -- limits ------------------------------------------------------------------------------------


@pytest.fixture
def small_server(database: EmbeddedDatabase, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {
        "MONGODB_URI": database.uri,
        "FHIR_MONGODB_DB": f"fhir_tests_limits_{unique()}",
        "FHIR_MAX_BUNDLE_ENTRIES": "5",
        "FHIR_MAX_BUNDLE_BYTES": "20000",
    }
    proc = ServerProcess(tmp_path, env).start()
    yield proc
    proc.stop()


def test_bundle_limits(small_server: ServerProcess) -> None:
    with client_of(small_server) as client:
        five = [entry("POST", "Patient", tagged(patient())) for _ in range(5)]
        for kind in ("batch", "transaction"):
            assert len(answered(send(client, bundle(kind, *five), Prefer="return=minimal"), kind)) == 5
        before = count(client, "Patient")
        for kind in ("batch", "transaction"):
            response = send(client, bundle(kind, *five, entry("POST", "Patient", tagged(patient()))))
            assert_outcome(response, 413)
        big = tagged(patient(name=[{"family": "x" * 25_000}]))
        raw = fhir_json.dumps(bundle("transaction", entry("POST", "Patient", big)))
        assert_outcome(client.post("", content=raw, headers={"Content-Type": FHIR_JSON}), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: the size is counted while reading
            for start in range(0, len(raw), 4096):
                yield raw[start:start + 4096]

        assert_outcome(client.post("", content=chunks(), headers={"Content-Type": FHIR_JSON}), 413)
        assert count(client, "Patient") == before


# -- Synthea ---------------------------------------------------------------------------------------


def _references(node: Any, found: list[str]) -> list[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                found.append(value)
            else:
                _references(value, found)
    elif isinstance(node, list):
        for value in node:
            _references(value, found)
    return found


def _rewritten(node: Any, ids: dict[str, str]) -> Any:
    """The bundle's resource as it should be stored: placeholders replaced by the new ids."""
    if isinstance(node, dict):
        return {k: ids.get(v, v) if k == "reference" and isinstance(v, str) else _rewritten(v, ids)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewritten(v, ids) for v in node]
    return node


def _comparable(node: Any) -> Any:
    """Decimals by their text (precision included), whether parsed or read back from MongoDB."""
    if isinstance(node, dict):
        return {k: _comparable(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_comparable(v) for v in node]
    if isinstance(node, bson.Decimal128):
        return ("decimal", str(node.to_decimal()))
    if isinstance(node, Decimal):
        return ("decimal", str(node))
    return node


@pytest.mark.skipif(not SYNTHEA.exists(), reason=f"{SYNTHEA} is not there")
def test_synthea_bundles_as_transactions(client: httpx.Client, mongo: pymongo.database.Database) -> None:
    files = sorted(SYNTHEA.glob("*.json"))
    assert files
    for path in files:
        sent = fhir_json.loads(path.read_bytes())
        assert sent["type"] == "transaction"
        response = send(client, sent, Prefer="return=minimal")
        found = answered(response, "transaction")
        assert len(found) == len(sent["entry"]), path.name
        ids: dict[str, str] = {}
        by_type: dict[str, dict[str, dict[str, Any]]] = {}
        for request, answer in zip(sent["entry"], found, strict=True):
            resource = request["resource"]
            rid, vid = check_write(answer, 201, resource["resourceType"])
            assert vid == 1
            ids[request["fullUrl"]] = f"{resource['resourceType']}/{rid}"
            by_type.setdefault(resource["resourceType"], {})[rid] = resource

        # Stored exactly as sent, references rewritten to the new ids, decimals as written.
        for resource_type, resources in by_type.items():
            stored = {doc["_id"]: doc["res"] for doc in mongo[resource_type].find({"_id": {"$in": list(resources)}})}
            assert set(stored) == set(resources), (path.name, resource_type)
            for rid, resource in resources.items():
                kept = {k: v for k, v in stored[rid].items() if k not in ("id", "meta")}
                assert not [r for r in _references(kept, []) if r.startswith("urn:uuid:")], (path.name, rid)
                expected = {k: v for k, v in resource.items() if k not in ("id", "meta")}
                assert _comparable(kept) == _comparable(_rewritten(expected, ids)), (path.name, rid)
                meta = {k: v for k, v in stored[rid]["meta"].items() if k not in ("versionId", "lastUpdated")}
                assert meta == resource.get("meta", {}), (path.name, rid)  # the client's tags are kept

        patients = by_type.get("Patient", {})
        if not patients:
            continue
        [(patient_id, sent_patient)] = patients.items()
        identifier = sent_patient["identifier"][0]
        search = client.get("/Patient", params={"identifier": f"{identifier['system']}|{identifier['value']}"}).json()
        assert patient_id in [e["resource"]["id"] for e in search["entry"]], path.name
        for resource_type in ("Observation", "Encounter", "Condition"):
            expected = len(by_type.get(resource_type, {}))
            response = client.get(f"/{resource_type}", params={"subject": f"Patient/{patient_id}", "_summary": "count"})
            assert response.json()["total"] == expected, (path.name, resource_type)


# -- review findings: input that must not crash, locks, deletions, HEAD ------------------------------


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_malformed_patch_binaries_and_if_match_are_400(client: httpx.Client, kind: str) -> None:
    rid = created(client, with_identifier(unique()))["id"]
    for binary in (
        {"resourceType": "Binary", "contentType": 5, "data": "e30="},
        {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": 5},
        {"resourceType": "Binary", "contentType": "application/json-patch+json"},
    ):
        response = send(client, bundle(kind, entry("PATCH", f"Patient/{rid}", binary)))
        if kind == "batch":
            assert status(answered(response, kind)[0]) == 400
        else:
            assert_outcome(response, 400, "Bundle.entry[0]")
    bad_tag = send(client, bundle(kind, entry("PUT", f"Patient/{rid}", with_identifier("x", id=rid), ifMatch='W/"²"')))
    if kind == "batch":
        assert status(answered(bad_tag, kind)[0]) == 400
    else:
        assert_outcome(bad_tag, 400, "Bundle.entry[0]")


def test_deeply_nested_resource_in_a_transaction_is_400(client: httpx.Client) -> None:
    deep = '{"url": "urn:x", "valueString": "leaf"}'
    for _ in range(600):
        deep = '{"url": "urn:x", "extension": [' + deep + "]}"
    text = ('{"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "POST", "url": "Patient"},'
            ' "resource": {"resourceType": "Patient", "extension": [' + deep + "]}}]}")
    response = client.post("", content=text, headers={"Content-Type": FHIR_JSON})
    assert_outcome(response, 400)


def test_two_conditions_with_one_lock_key_do_not_block_each_other(client: httpx.Client) -> None:
    value = unique()
    existing = created(client, with_identifier(value, system="urn:test:b"))
    response = send(client, bundle(
        "transaction",
        entry("POST", "Patient", with_identifier(value, system="urn:test:a"), ifNoneExist=f"identifier=urn:test:a|{value}"),
        entry("PUT", f"Patient?identifier=urn:test:b|{value}", with_identifier(value, system="urn:test:b", active=True)),
        entry("POST", "Patient", with_identifier(value, system="urn:test:b"), ifNoneExist=f"identifier=urn:test:b|{value}"),
    ))
    found = answered(response, "transaction")
    assert status(found[0]) == 201  # not taken for the urn:test:b patient
    assert location(found[1])[1] == existing["id"] and status(found[1]) == 200
    assert status(found[2]) == 200 and location(found[2])[1] == existing["id"]


def test_duplicate_full_urls_are_refused(client: httpx.Client) -> None:
    urn = uuid_urn()
    response = send(client, bundle("transaction", entry("POST", "Patient", with_identifier(unique()), urn),
                                   entry("POST", "Patient", with_identifier(unique()), urn)))
    assert_outcome(response, 400, "used twice")


def test_conditional_reference_to_a_resource_deleted_by_the_same_transaction_fails(client: httpx.Client) -> None:
    value = unique()
    doomed = created(client, with_identifier(value))
    response = send(client, bundle(
        "transaction",
        entry("DELETE", f"Patient/{doomed['id']}"),
        entry("POST", "Observation", observation(subject={"reference": f"Patient?identifier=urn:test:tx-id|{value}"})),
    ))
    assert_outcome(response, 412, "Bundle.entry[1]")
    assert client.get(f"/Patient/{doomed['id']}").status_code == 200  # rolled back


def test_head_entries_answer_like_get_without_a_body(client: httpx.Client) -> None:
    rid = created(client, with_identifier(unique()))["id"]
    found = answered(send(client, bundle("batch", entry("HEAD", f"Patient/{rid}"))), "batch")
    assert status(found[0]) == 200 and found[0]["response"]["etag"] == 'W/"1"'
    assert "resource" not in found[0]
