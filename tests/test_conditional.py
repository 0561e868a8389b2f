"""Conditional create, update and delete: the spec's outcomes for 0, 1 and many matches."""

import httpx

from conftest import FHIR_JSON, assert_outcome, patient, post, unique


def _with_identifier(value: str, system: str = "urn:mrn", **fields: object) -> dict:
    return patient(identifier=[{"system": system, "value": value}], **fields)


def test_search_by_identifier_and_id(client: httpx.Client) -> None:
    value = unique()
    created = post(client, _with_identifier(value)).json()
    post(client, _with_identifier(value, system="urn:other"))
    for query, expected in [
        (f"urn:mrn|{value}", 1), (value, 2), (f"|{value}", 0), ("urn:other|", None), (f"urn:mrn|{value},urn:other|{value}", 2),
    ]:
        bundle = client.get("/Patient", params={"identifier": query}).json()
        assert bundle["type"] == "searchset"
        if expected is not None:
            assert bundle["total"] == expected, query
    bundle = client.get("/Patient", params={"_id": created["id"]}).json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == [created["id"]]


def test_conditional_create(client: httpx.Client) -> None:
    value = unique()
    query = f"identifier=urn:mrn|{value}"
    first = post(client, _with_identifier(value), **{"If-None-Exist": query})
    assert first.status_code == 201
    again = post(client, _with_identifier(value, gender="male"), **{"If-None-Exist": query})
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert "gender" not in client.get(f"/Patient/{first.json()['id']}").json()
    post(client, _with_identifier(value))  # a second match, made unconditionally
    assert_outcome(post(client, _with_identifier(value), **{"If-None-Exist": query}), 412)
    assert_outcome(post(client, patient(), **{"If-None-Exist": "name=x"}), 400, "Unsupported search parameter")


def test_conditional_create_with_criteria_in_the_query_string(client: httpx.Client) -> None:
    """fhirpy sends a conditional create as POST /Patient?identifier=…: never ignore criteria."""
    value = unique()
    body = _with_identifier(value)
    first = client.post("/Patient", params={"identifier": f"urn:mrn|{value}"}, json=body, headers={"Content-Type": FHIR_JSON})
    again = client.post("/Patient", params={"identifier": f"urn:mrn|{value}"}, json=body, headers={"Content-Type": FHIR_JSON})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    pretty_only = client.post("/Patient", params={"_pretty": "true"}, json=body, headers={"Content-Type": FHIR_JSON})
    assert pretty_only.status_code == 201  # not a condition
    unknown = client.post("/Patient", params={"name": "x"}, json=body, headers={"Content-Type": FHIR_JSON})
    assert_outcome(unknown, 400, "Unsupported search parameter")


def test_conditional_update(client: httpx.Client) -> None:
    value = unique()
    url = f"/Patient?identifier=urn:mrn|{value}"
    created = client.put(url, json=_with_identifier(value, gender="female"), headers={"Content-Type": FHIR_JSON})
    assert created.status_code == 201
    rid = created.json()["id"]
    updated = client.put(url, json=_with_identifier(value, gender="male"), headers={"Content-Type": FHIR_JSON})
    assert updated.status_code == 200
    assert updated.json()["id"] == rid and updated.json()["meta"]["versionId"] == "2"
    wrong_id = client.put(url, json={**_with_identifier(value), "id": "someone-else"}, headers={"Content-Type": FHIR_JSON})
    assert_outcome(wrong_id, 400)
    post(client, _with_identifier(value))
    assert_outcome(client.put(url, json=_with_identifier(value), headers={"Content-Type": FHIR_JSON}), 412)
    assert_outcome(client.put("/Patient", json=patient(), headers={"Content-Type": FHIR_JSON}), 400)


def test_conditional_delete(client: httpx.Client) -> None:
    value = unique()
    url = f"/Patient?identifier=urn:mrn|{value}"
    none = client.delete(url)
    assert none.status_code == 200 and "nothing to delete" in none.text
    rid = post(client, _with_identifier(value)).json()["id"]
    assert client.delete(url).status_code == 200
    assert_outcome(client.get(f"/Patient/{rid}"), 410)
    post(client, _with_identifier(value))
    post(client, _with_identifier(value))
    assert_outcome(client.delete(url), 412)
