"""Bad input never crashes the server: every error is an OperationOutcome with the right status."""

import hashlib
from datetime import UTC, datetime, timedelta

import httpx
import pymongo.database
from conftest import FHIR_JSON, assert_outcome, patient, post, put, unique

from fhir_server.search.criteria import lock_key, parse_query_string


def _issue_expressions(body: dict) -> list[str]:
    return [e for issue in body["issue"] for e in issue.get("expression", [])]


def test_invalid_resources_name_the_element(client: httpx.Client) -> None:
    body = assert_outcome(post(client, patient(birthDate="1999-13-45")), 400)
    assert "Patient.birthDate" in _issue_expressions(body)
    body = assert_outcome(post(client, patient(gender="robot")), 400, "robot")
    assert "Patient.gender" in _issue_expressions(body)
    body = assert_outcome(post(client, patient(colour="blue")), 400, "Unknown element")
    assert "Patient.colour" in _issue_expressions(body)
    body = assert_outcome(post(client, patient(contact=[{"gender": "robot"}])), 400)
    assert "Patient.contact[0].gender" in _issue_expressions(body)
    body = assert_outcome(post(client, {"resourceType": "Observation", "code": {"text": "x"}}), 400)
    assert "Observation.status" in _issue_expressions(body)
    body = assert_outcome(post(client, {"resourceType": "Observation", "status": "guess", "code": {"text": "x"}}), 400)
    assert "Observation.status" in _issue_expressions(body)
    odd_comparator = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "valueQuantity": {"value": 1, "comparator": "~"}}
    body = assert_outcome(post(client, odd_comparator), 400)
    assert "Observation.valueQuantity.comparator" in _issue_expressions(body)
    body = assert_outcome(post(client, patient(name=[{"given": ["Ann", ""]}])), 400)
    assert "Patient.name[0].given[1]" in _issue_expressions(body)
    body = assert_outcome(post(client, patient(gender=None)), 400, "null")
    assert_outcome(post(client, patient(name=[])), 400, "Empty")


def test_json_types_are_checked_not_coerced(client: httpx.Client) -> None:
    for fields, expression in [
        ({"active": "true"}, "Patient.active"),
        ({"active": 1}, "Patient.active"),
        ({"multipleBirthInteger": "2"}, "Patient.multipleBirthInteger"),
        ({"name": [{"family": "x"}], "deceasedBoolean": "false"}, "Patient.deceasedBoolean"),
    ]:
        body = assert_outcome(post(client, patient(**fields)), 400, "must be a JSON")
        assert expression in _issue_expressions(body)
    decimal_as_string = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                         "valueQuantity": {"value": "1.5"}}
    assert_outcome(post(client, decimal_as_string), 400, "must be a JSON number")
    whole_decimal = client.post("/Patient", content=b'{"resourceType":"Patient","multipleBirthInteger":2.0}',
                                headers={"Content-Type": FHIR_JSON})
    assert_outcome(whole_decimal, 400, "must be a JSON integer")


def test_nested_resources_of_unknown_type(client: httpx.Client) -> None:
    for nested in ({"resourceType": "NotAType"}, {"resourceType": "MedicinalProduct"}, {"resourceType": ["x"]}):
        assert_outcome(post(client, patient(contained=[nested])), 400, "resource type")
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "NotAType"}}]}
    assert_outcome(post(client, bundle), 400)


def test_hostile_json_is_refused_not_crashed_on(client: httpx.Client) -> None:
    nested: dict = {"url": "urn:x", "valueString": "v"}
    for _ in range(400):
        nested = {"url": "urn:x", "extension": [nested]}
    assert_outcome(post(client, patient(extension=[nested])), 400, "Nested more than")
    lists = b'{"resourceType":"Patient","extension":' + b"[" * 900 + b"]" * 900 + b"}"
    assert_outcome(client.post("/Patient", content=lists, headers={"Content-Type": FHIR_JSON}), 400)
    body = assert_outcome(post(client, patient(identifier=[{"value": "a\u0000b"}])), 400, "Control characters")
    assert "Patient.identifier[0].value" in _issue_expressions(body)
    assert_outcome(post(client, patient(**{"$where": "1"})), 400, "Unknown element")
    multiline = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">a\nb\tc</div>'}
    assert post(client, patient(text=multiline)).status_code == 201
    assert client.get("/metadata").status_code == 200


def test_resource_type_and_id_must_match_the_url(client: httpx.Client) -> None:
    wrong_type = client.post("/Patient", json={"resourceType": "Observation"}, headers={"Content-Type": FHIR_JSON})
    assert_outcome(wrong_type, 400, "does not match")
    assert_outcome(client.post("/Patient", json=["not", "an", "object"], headers={"Content-Type": FHIR_JSON}), 400)
    rid = f"a-{unique()}"
    mismatch = client.put(f"/Patient/{rid}", json=patient(id="other"), headers={"Content-Type": FHIR_JSON})
    assert_outcome(mismatch, 400, "does not match")
    no_id = client.put(f"/Patient/{rid}", json=patient(), headers={"Content-Type": FHIR_JSON})
    assert_outcome(no_id, 400, "id")
    assert_outcome(put(client, patient(id="bad_id!")), 400, "Invalid id")
    assert_outcome(put(client, patient(id="x" * 65)), 400, "Invalid id")
    assert_outcome(client.get("/Patient/bad_id!"), 400, "Invalid id")


def test_body_problems(client: httpx.Client) -> None:
    assert_outcome(client.post("/Patient", content=b"{not json", headers={"Content-Type": FHIR_JSON}), 400, "JSON")
    assert_outcome(client.post("/Patient", content=b"", headers={"Content-Type": FHIR_JSON}), 400)
    xml = b'<Patient xmlns="http://hl7.org/fhir"/>'
    assert_outcome(client.post("/Patient", content=xml, headers={"Content-Type": "application/fhir+xml"}), 415)
    form = client.post("/Patient", content=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_outcome(form, 415)


def test_body_too_large(client: httpx.Client) -> None:
    big = patient(name=[{"family": "x" * 1_100_000}])
    assert_outcome(post(client, big), 413)
    chunks = iter([b'{"resourceType":"Patient","name":[{"family":"', b"y" * 1_100_000, b'"}]}'])
    streamed = client.post("/Patient", content=chunks, headers={"Content-Type": FHIR_JSON})
    assert_outcome(streamed, 413)  # no Content-Length: the limit still holds


def test_unknown_things(client: httpx.Client) -> None:
    assert_outcome(client.get("/NotAType/1"), 404, "Unknown resource type")
    assert_outcome(client.post("/NotAType", json={"resourceType": "NotAType"}, headers={"Content-Type": FHIR_JSON}), 404)
    assert_outcome(client.get("/MedicinalProduct/1"), 404)  # R4 type without an R4B model
    assert_outcome(client.get(f"/Patient/missing-{unique()}"), 404, "not known")
    assert_outcome(client.get("/Patient/x/_history", params={"_since": "yesterday"}), 400)
    assert_outcome(client.get("/Patient/_history", params={"_count": "-1"}), 400)
    assert_outcome(client.get("/Patient/_history", params={"_count": "\u00b2"}), 400)
    late = client.get("/Patient/_history", params={"_since": "9999-12-31T23:59:59Z"})
    assert late.status_code == 200 and late.json()["total"] == 0  # valid, and nothing is that new
    assert client.get("/Patient/_history", params={"_at": "9999-12-31"}).status_code == 200
    assert_outcome(client.get("/Patient/_history", params={"_since": "0000-01-01"}), 400)
    assert_outcome(client.get("/Patient/_history", params={"_cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OTo"}), 400)
    assert_outcome(client.get("/Patient/x/_history/\u00b2"), 404)
    assert_outcome(client.get("/Patient", params={"_count": "-3"}), 400)
    assert_outcome(client.get("/Patient", params={"_page": "forged.0.token"}), 400)
    assert_outcome(client.put("/Patient/x", json=patient(id="x"), headers={"Content-Type": FHIR_JSON, "If-Match": 'W/"\u00b2"'.encode()}), 400)


def test_method_not_allowed(client: httpx.Client) -> None:
    assert_outcome(client.post("/Patient/123", json=patient(), headers={"Content-Type": FHIR_JSON}), 405)
    assert_outcome(client.patch("/Patient", json=[]), 405)


def test_not_acceptable(client: httpx.Client) -> None:
    assert_outcome(client.get("/metadata", params={"_format": "xml"}), 406)
    assert_outcome(client.get("/metadata", headers={"Accept": "application/fhir+xml"}), 406)


def test_conflict_when_a_conditional_create_cannot_get_its_turn(
    client: httpx.Client, mongo: pymongo.database.Database
) -> None:
    """A concurrent conditional request on the same criteria that never finishes → 409, not a hang."""
    value = unique()
    query = f"identifier=urn:test|{value}"
    digest = hashlib.sha256(lock_key("Patient", parse_query_string("Patient", query)).encode()).hexdigest()
    mongo["locks"].insert_one(
        {"_id": f"conditional:Patient:{digest}", "owner": "someone", "expires": datetime.now(UTC) + timedelta(minutes=5)}
    )
    try:
        response = post(client, patient(identifier=[{"system": "urn:test", "value": value}]), **{"If-None-Exist": query})
        assert_outcome(response, 409)
    finally:
        mongo["locks"].delete_many({"owner": "someone"})
    assert post(client, patient(), **{"If-None-Exist": query}).status_code == 201


def test_broken_stored_data_gives_500_without_a_stack_trace(
    client: httpx.Client, mongo: pymongo.database.Database
) -> None:
    rid = f"broken-{unique()}"
    mongo["Patient"].insert_one({"_id": rid, "v": 1, "del": False})  # no timestamp: unreadable
    try:
        body = assert_outcome(client.get(f"/Patient/{rid}"), 500)
        assert body["issue"][0]["code"] == "exception"
        assert client.get("/metadata").status_code == 200  # still serving
    finally:  # other modules search all Patients of this database
        mongo["Patient"].delete_one({"_id": rid})
