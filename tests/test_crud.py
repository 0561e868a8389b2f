"""create, read, vread, update, patch and delete over HTTP, with their headers."""

from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime

import httpx
from conftest import FHIR_JSON, assert_outcome, patient, post, put, unique


def test_create_assigns_id_version_and_headers(client: httpx.Client) -> None:
    sent = patient(id="client-chosen", name=[{"family": "Chalmers", "given": ["Peter"]}], gender="male",
                   meta={"versionId": "99", "lastUpdated": "2000-01-01T00:00:00Z", "tag": [{"code": "t"}]})
    response = post(client, sent)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] != "client-chosen"
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] != "2000-01-01T00:00:00Z"
    assert body["meta"]["tag"] == [{"code": "t"}]
    assert body["name"] == sent["name"]
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Location"].endswith(f"/fhir/Patient/{body['id']}/_history/1")
    assert response.headers["Location"].startswith("http://")
    assert parsedate_to_datetime(response.headers["Last-Modified"])
    assert response.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert response.headers["x-request-id"]


def test_read_returns_what_was_stored(client: httpx.Client) -> None:
    created = post(client, patient(birthDate="1974-12-25", active=True)).json()
    response = client.get(f"/Patient/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created
    assert response.headers["ETag"] == 'W/"1"'


def test_prefer_return(client: httpx.Client) -> None:
    minimal = post(client, patient(), Prefer="return=minimal")
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["Location"]
    outcome = post(client, patient(), Prefer="return=OperationOutcome")
    assert outcome.status_code == 201
    assert outcome.json()["resourceType"] == "OperationOutcome"
    assert outcome.json()["issue"][0]["severity"] == "information"
    full = post(client, patient(), Prefer="return=representation")
    assert full.json()["resourceType"] == "Patient"


def test_update_makes_versions_and_vread_finds_each(client: httpx.Client) -> None:
    created = post(client, patient(gender="female")).json()
    rid = created["id"]
    second = put(client, patient(id=rid, gender="male"))
    assert second.status_code == 200, second.text
    assert second.json()["meta"]["versionId"] == "2"
    assert second.headers["ETag"] == 'W/"2"'
    assert client.get(f"/Patient/{rid}").json()["gender"] == "male"
    first = client.get(f"/Patient/{rid}/_history/1")
    assert first.status_code == 200 and first.json()["gender"] == "female"
    assert first.headers["ETag"] == 'W/"1"'
    assert client.get(f"/Patient/{rid}/_history/2").json()["gender"] == "male"
    assert_outcome(client.get(f"/Patient/{rid}/_history/3"), 404)
    assert_outcome(client.get(f"/Patient/{rid}/_history/abc"), 404)


def test_update_creates_with_client_id(client: httpx.Client) -> None:
    rid = f"client-{unique()}"
    response = put(client, patient(id=rid, gender="other"))
    assert response.status_code == 201, response.text
    assert response.json()["meta"]["versionId"] == "1"
    assert response.headers["Location"].endswith(f"/Patient/{rid}/_history/1")
    assert client.get(f"/Patient/{rid}").json()["gender"] == "other"


def test_if_match_on_update(client: httpx.Client) -> None:
    rid = post(client, patient()).json()["id"]
    assert put(client, patient(id=rid, active=True), **{"If-Match": 'W/"1"'}).status_code == 200
    assert_outcome(put(client, patient(id=rid, active=False), **{"If-Match": 'W/"1"'}), 412, "current version is 2")
    assert_outcome(put(client, patient(id=f"nope-{unique()}"), **{"If-Match": 'W/"1"'}), 412)
    assert_outcome(put(client, patient(id=rid), **{"If-Match": "banana"}), 400)
    assert client.get(f"/Patient/{rid}").json()["active"] is True


def test_conditional_read(client: httpx.Client) -> None:
    created = post(client, patient()).json()
    url = f"/Patient/{created['id']}"
    assert client.get(url, headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": 'W/"7"'}).status_code == 200
    modified = parsedate_to_datetime(client.get(url).headers["Last-Modified"])
    later = format_datetime(modified + timedelta(hours=1), usegmt=True)
    earlier = format_datetime(modified - timedelta(hours=1), usegmt=True)
    assert client.get(url, headers={"If-Modified-Since": later}).status_code == 304
    assert client.get(url, headers={"If-Modified-Since": earlier}).status_code == 200


def test_conditional_vread(client: httpx.Client) -> None:
    rid = post(client, patient()).json()["id"]
    url = f"/Patient/{rid}/_history/1"
    assert client.get(url, headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": 'W/"2"'}).status_code == 200


def test_prefer_on_update_patch_and_delete(client: httpx.Client) -> None:
    rid = post(client, patient()).json()["id"]
    minimal = put(client, patient(id=rid, active=True), Prefer="return=minimal")
    assert minimal.status_code == 200 and minimal.content == b"" and minimal.headers["ETag"] == 'W/"2"'
    outcome = put(client, patient(id=rid, active=False), Prefer="return=OperationOutcome")
    assert outcome.json()["resourceType"] == "OperationOutcome"
    patched = client.patch(f"/Patient/{rid}", json=[{"op": "remove", "path": "/active"}],
                           headers={"Content-Type": "application/json-patch+json", "Prefer": "return=minimal"})
    assert patched.status_code == 200 and patched.content == b""
    # RFC 7240: several preferences in one header; unknown ones are ignored, never an error.
    combined = put(client, patient(id=rid), Prefer="respond-async, return=minimal; x=y, handling=lenient")
    assert combined.status_code == 200 and combined.content == b""
    assert put(client, patient(id=rid), Prefer="return=sometimes").json()["resourceType"] == "Patient"
    assert client.delete(f"/Patient/{rid}", headers={"Prefer": "return=minimal"}).status_code == 204


def test_create_ignores_the_id_in_the_body(client: httpx.Client) -> None:
    for sent in ("bad id!", 5):
        response = post(client, patient(id=sent))
        assert response.status_code == 201 and response.json()["id"] != sent


def test_patch_applies_json_patch_and_validates(client: httpx.Client) -> None:
    rid = post(client, patient(gender="female", name=[{"family": "Old"}])).json()["id"]
    patch = [{"op": "replace", "path": "/name/0/family", "value": "New"}, {"op": "add", "path": "/active", "value": True}]
    response = client.patch(f"/Patient/{rid}", json=patch, headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 200, response.text
    assert response.json()["name"][0]["family"] == "New" and response.json()["active"] is True
    assert response.json()["meta"]["versionId"] == "2"
    headers = {"Content-Type": "application/json-patch+json"}
    bad_code = [{"op": "replace", "path": "/gender", "value": "robot"}]
    assert_outcome(client.patch(f"/Patient/{rid}", json=bad_code, headers=headers), 400, "gender")
    failed_test = [{"op": "test", "path": "/gender", "value": "male"}]
    assert_outcome(client.patch(f"/Patient/{rid}", json=failed_test, headers=headers), 422)
    missing_path = [{"op": "replace", "path": "/address/0/city", "value": "X"}]
    assert_outcome(client.patch(f"/Patient/{rid}", json=missing_path, headers=headers), 422)
    assert_outcome(client.patch(f"/Patient/{rid}", json={"op": "x"}, headers=headers), 400)
    stale = {**headers, "If-Match": 'W/"1"'}
    assert_outcome(client.patch(f"/Patient/{rid}", json=patch, headers=stale), 412)
    assert_outcome(client.patch(f"/Patient/{rid}", json=patch, headers={"Content-Type": FHIR_JSON}), 415)
    assert_outcome(client.patch(f"/Patient/missing-{unique()}", json=patch, headers=headers), 404)
    assert client.get(f"/Patient/{rid}").json()["meta"]["versionId"] == "2"


def test_delete_is_logical_and_history_keeps_it(client: httpx.Client) -> None:
    rid = post(client, patient(gender="male")).json()["id"]
    deleted = client.delete(f"/Patient/{rid}")
    assert deleted.status_code == 200
    assert deleted.json()["resourceType"] == "OperationOutcome"
    assert deleted.headers["ETag"] == 'W/"2"'
    assert_outcome(client.get(f"/Patient/{rid}"), 410)
    assert_outcome(client.get(f"/Patient/{rid}/_history/2"), 410)
    assert client.get(f"/Patient/{rid}/_history/1").json()["gender"] == "male"
    again = client.delete(f"/Patient/{rid}")
    assert again.status_code == 200 and "already deleted" in again.text
    assert client.delete(f"/Patient/{rid}", headers={"Prefer": "return=minimal"}).status_code == 204
    never = client.delete(f"/Patient/never-{unique()}")
    assert never.status_code == 200 and "does not exist" in never.text
    history = client.get(f"/Patient/{rid}/_history").json()
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    # An update brings it back as a new version.
    revived = put(client, patient(id=rid, gender="female"))
    assert revived.status_code == 201 and revived.json()["meta"]["versionId"] == "3"
    assert client.get(f"/Patient/{rid}").json()["gender"] == "female"


def test_delete_with_if_match(client: httpx.Client) -> None:
    rid = post(client, patient()).json()["id"]
    assert_outcome(client.delete(f"/Patient/{rid}", headers={"If-Match": 'W/"5"'}), 412)
    assert client.get(f"/Patient/{rid}").status_code == 200
    assert client.delete(f"/Patient/{rid}", headers={"If-Match": 'W/"1"'}).status_code == 200


def test_other_resource_types(client: httpx.Client) -> None:
    observation = {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"},
    }
    created = post(client, observation)
    assert created.status_code == 201, created.text
    assert client.get(f"/Observation/{created.json()['id']}").json()["valueQuantity"]["value"] == 72
    binary = post(client, {"resourceType": "Binary", "contentType": "text/plain", "data": "aGVsbG8="})
    assert binary.status_code == 201, binary.text


def test_every_code_of_a_required_value_set_is_accepted(client: httpx.Client) -> None:
    """The models list only some codes (`registered | preliminary | final | amended +`): the
    server checks against the whole R4 value set."""
    for status in ("registered", "cancelled", "entered-in-error", "corrected", "unknown"):
        body = {"resourceType": "Observation", "status": status, "code": {"text": "x"}}
        assert post(client, body).status_code == 201, status
    encounter = {"resourceType": "Encounter", "status": "entered-in-error", "class": {"code": "AMB"}}
    assert post(client, encounter).status_code == 201
    assert post(client, {"resourceType": "Task", "status": "on-hold", "intent": "order"}).status_code == 201


def test_decimals_keep_their_precision(client: httpx.Client) -> None:
    raw = (b'{"resourceType":"Observation","status":"final","code":{"text":"x"},'
           b'"valueQuantity":{"value":1.50,"unit":"mg"},"referenceRange":[{"low":{"value":0.000100},'
           b'"high":{"value":123456789012345678901234567890}}],"component":[{"code":{"text":"e"},"valueQuantity":{"value":1.0E+3}}]}')
    created = client.post("/Observation", content=raw, headers={"Content-Type": FHIR_JSON})
    assert created.status_code == 201, created.text
    for response in (created, client.get(f"/Observation/{created.json()['id']}"),
                     client.get(f"/Observation/{created.json()['id']}/_history")):
        assert b'"value":1.50,' in response.content
        assert b'"value":0.000100}' in response.content
        assert b'"value":123456789012345678901234567890}' in response.content
        assert b'"value":1.0E+3}' in response.content
    too_precise = raw.replace(b"1.50", b"1.0000000000000000000000000000000000001")
    assert_outcome(client.post("/Observation", content=too_precise, headers={"Content-Type": FHIR_JSON}), 400, "34 significant")
    huge_int = b'{"resourceType":"Patient","multipleBirthInteger":123456789012345678901234567890}'
    assert_outcome(client.post("/Patient", content=huge_int, headers={"Content-Type": FHIR_JSON}), 400)
    not_a_number = raw.replace(b"1.50", b"NaN")
    assert_outcome(client.post("/Observation", content=not_a_number, headers={"Content-Type": FHIR_JSON}), 400, "JSON")


def test_formats(client: httpx.Client) -> None:
    rid = post(client, patient(gender="male")).json()["id"]
    pretty = client.get(f"/Patient/{rid}", params={"_pretty": "true"})
    assert b"\n  " in pretty.content
    assert b"\n" not in client.get(f"/Patient/{rid}").content
    assert client.get(f"/Patient/{rid}", params={"_format": "json"}).status_code == 200
    as_json = client.get(f"/Patient/{rid}", headers={"Accept": "application/json"})
    assert as_json.headers["content-type"].startswith("application/json")
    browser = client.get(f"/Patient/{rid}", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert browser.status_code == 200
    assert_outcome(client.get(f"/Patient/{rid}", params={"_format": "xml"}), 406)
    assert_outcome(client.get(f"/Patient/{rid}", headers={"Accept": "application/fhir+xml"}), 406)
    as_json_body = client.post("/Patient", content=b'{"resourceType":"Patient"}', headers={"Content-Type": "application/json"})
    assert as_json_body.status_code == 201
