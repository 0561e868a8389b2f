"""Searches the server must refuse with a 400 OperationOutcome (never a 500), and odd but valid
values it must answer."""

import httpx
import pytest
from conftest import FHIR_JSON, assert_outcome, put, unique

RUN = unique()


@pytest.mark.parametrize(("path", "params"), [
    ("Observation", {"_include": "Observation:nothing"}),  # no such parameter
    ("Observation", {"_include": "Observation:code"}),  # not a reference parameter
    ("Observation", {"_include": "Encounter:subject"}),  # another type without :iterate
    ("Observation", {"_include": "Observation"}),
    ("Patient", {"_revinclude": "Nothing:patient"}),
    ("Patient", {"_revinclude": "*"}),
    ("Patient", {"_has:Observation:nothing:code": "1"}),
    ("Patient", {"_has:Observation:code:code": "1"}),  # `code` is not a reference
    ("Patient", {"_has:Observation": "1"}),
    ("Patient", {"_has:Observation:patient:nothing": "1"}),
    ("Observation", {"code.name": "x"}),  # chaining a token
    ("Observation", {"subject:Patient.nothing": "x"}),
    ("Observation", {"subject.subject.subject.subject.subject.name": "x"}),  # too deep
    ("Patient", {"birthdate:missing": "maybe"}),
    ("Observation", {"code-value-quantity": "http://loinc.org|8480-6"}),  # one part of two
    ("Patient", {"_summary": "bogus"}),
    ("Patient", {"_total": "bogus"}),
    ("Patient", {"_count": "abc"}),
    ("Patient", {"identifier:of-type": "a|b"}),
    ("Patient", {"family:text": "x"}),  # :text is for tokens
    ("Patient", {"_sort": "-"}),
    ("Observation", {"value-quantity": "5.4|||"}),
    ("Observation", {"date": "2024-02-30"}),
    ("Observation", {"date": "gt"}),
])
def test_refused_with_400(client: httpx.Client, path: str, params: dict[str, str]) -> None:
    assert_outcome(client.get(f"/{path}", params=params), 400)


def test_system_and_compartment_search_refusals(client: httpx.Client) -> None:
    assert_outcome(client.get("", params={"_type": "Patient", "_sort": "birthdate"}), 400)
    assert_outcome(client.get("", params={"_type": "Nothing"}), 404)
    assert_outcome(client.get("/Patient/x/Organization"), 400)  # not in the Patient compartment
    assert_outcome(client.get("/Patient/x/Observation", params={"_page": "x.0.y"}), 400)


def test_post_search_needs_a_form_body(client: httpx.Client) -> None:
    assert_outcome(client.post("/Patient/_search", json={"name": "x"}, headers={"Content-Type": FHIR_JSON}), 415)
    ok = client.post("/Patient/_search", params={"_id": "none"}, content=b"",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert ok.status_code == 200 and ok.json()["total"] == 0


def test_odd_but_valid_values(client: httpx.Client) -> None:
    family = f"O'Brien, Jr\\{RUN}"
    tag = {"system": "urn:test", "code": RUN}
    put(client, {"resourceType": "Patient", "id": f"{RUN}-odd", "meta": {"tag": [tag]},
                 "name": [{"family": family, "given": ["Zoë", "李"]}],
                 "identifier": [{"system": "urn:a|b", "value": "x$y,z"}]})

    def found(params: dict[str, str]) -> list[str]:
        response = client.get("/Patient", params={"_tag": f"urn:test|{RUN}", **params})
        assert response.status_code == 200, response.text
        return [e["resource"]["id"] for e in response.json().get("entry", [])]

    assert found({"family:exact": family.replace("\\", "\\\\").replace(",", "\\,")}) == [f"{RUN}-odd"]
    assert found({"given": "zoe"}) == [f"{RUN}-odd"]
    assert found({"given": "李"}) == [f"{RUN}-odd"]
    assert found({"identifier": "x$y\\,z"}) == [f"{RUN}-odd"]
    assert found({"birthdate": "9999-12-31"}) == []
    assert found({"birthdate": "gt0001-01-01"}) == []
    assert found({"_lastUpdated": "gt2000"}) == [f"{RUN}-odd"]
    assert found({"name": "x" * 500}) == []
