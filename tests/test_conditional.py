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
        (f"urn:mrn|{value}", 1), (value, 2), (f"|{value}", 0), (f"urn:mrn|{value},urn:other|{value}", 2),
    ]:
        bundle = client.get("/Patient", params={"identifier": query}).json()
        assert bundle["type"] == "searchset"
        assert bundle["total"] == expected, query
    system_only = client.get("/Patient", params={"identifier": "urn:other|", "_count": 1000}).json()
    assert system_only["total"] >= 1
    assert all(any(i["system"] == "urn:other" for i in e["resource"]["identifier"]) for e in system_only["entry"])
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
    assert_outcome(post(client, patient(), **{"If-None-Exist": "nickname=x"}), 400, "Unknown search parameter")


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
    unknown = client.post("/Patient", params={"nickname": "x"}, json=body, headers={"Content-Type": FHIR_JSON})
    assert_outcome(unknown, 400, "Unknown search parameter")


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


def test_search_paging_count_zero_and_unknown_parameters(client: httpx.Client) -> None:
    value = unique()
    ids = {post(client, _with_identifier(value)).json()["id"] for _ in range(5)}
    page = client.get("/Patient", params={"identifier": value, "_count": 2}).json()
    seen = set()
    while True:
        seen |= {e["resource"]["id"] for e in page["entry"]}
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        page = client.get(nxt[0].split("/fhir", 1)[1]).json()
    assert seen == ids
    only_total = client.get("/Patient", params={"identifier": value, "_count": 0}).json()
    assert only_total["total"] == 5 and "entry" not in only_total
    nothing = client.get("/Patient", params={"identifier": unique()}).json()
    assert nothing["total"] == 0 and "entry" not in nothing  # no empty arrays in FHIR JSON
    lenient = client.get("/Patient", params={"identifier": value, "colour": "blue"}).json()
    assert lenient["total"] == 5
    assert "colour" not in lenient["link"][0]["url"] and "identifier" in lenient["link"][0]["url"]
    strict = client.get("/Patient", params={"identifier": value, "colour": "blue"}, headers={"Prefer": "handling=strict"})
    assert_outcome(strict, 400, "colour")


def test_conditional_update_will_not_take_over_an_unrelated_id(client: httpx.Client) -> None:
    other = post(client, patient(gender="male")).json()
    body = {**_with_identifier(unique()), "id": other["id"]}
    response = client.put(f"/Patient?identifier=urn:mrn|{body['identifier'][0]['value']}", json=body,
                          headers={"Content-Type": FHIR_JSON})
    assert_outcome(response, 409, "does not match")
    assert client.get(f"/Patient/{other['id']}").json()["gender"] == "male"


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
