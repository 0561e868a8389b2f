"""Searches over a real Synthea R4 record, loaded resource by resource; every expectation is
computed from the bundle itself."""

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, put, unique

BUNDLE = (Path(__file__).parents[2] / "shared" / "synthea-r4"
          / "Chauncey_Johnston_f4673866-81fb-411a-8486-0c27f2a5b480.json")
RUN = unique()
TAG = {"system": "urn:test", "code": RUN}
LOINC = "http://loinc.org"

pytestmark = pytest.mark.skipif(not BUNDLE.exists(), reason=f"{BUNDLE} is not there")


def _rewrite(value: object, types: dict[str, str]) -> object:
    """`urn:uuid:<uuid>` references → `<Type>/<uuid>`."""
    if isinstance(value, dict):
        return {k: (f"{types[v[9:]]}/{v[9:]}" if k == "reference" and isinstance(v, str)
                    and v.startswith("urn:uuid:") else _rewrite(v, types)) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, types) for v in value]
    return value


def _prepared() -> list[dict]:
    entries = json.loads(BUNDLE.read_text())["entry"]
    types = {e["fullUrl"].removeprefix("urn:uuid:"): e["resource"]["resourceType"] for e in entries}
    resources = []
    for entry in entries:
        resource = _rewrite(entry["resource"], types)
        assert isinstance(resource, dict)
        resource["id"] = entry["fullUrl"].removeprefix("urn:uuid:")
        meta = resource.setdefault("meta", {})
        meta["tag"] = [*meta.get("tag", []), TAG]
        resources.append(resource)
    return resources


@pytest.fixture(scope="module")
def resources(server: ServerProcess) -> Iterator[list[dict]]:
    prepared = _prepared()
    with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as c:
        for resource in prepared:
            response = put(c, resource)
            assert response.status_code in (200, 201), response.text
    yield prepared


def of_type(resources: list[dict], resource_type: str) -> list[dict]:
    return [r for r in resources if r["resourceType"] == resource_type]


def the_patient(resources: list[dict]) -> dict:
    [found] = of_type(resources, "Patient")
    return found


def search(client: httpx.Client, path: str, params: list[tuple[str, str]]) -> dict:
    response = client.get(f"/{path}", params=[*params, ("_tag", f"urn:test|{RUN}")])
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


def matches(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def next_link(bundle: dict) -> str | None:
    urls = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    return urls[0] if urls else None


def test_heights_of_the_patient_newest_first(client: httpx.Client, resources: list[dict]) -> None:
    pid = the_patient(resources)["id"]
    heights = [o for o in of_type(resources, "Observation")
               if {"system": LOINC, "code": "8302-2"}.items() <= o["code"]["coding"][0].items()
               and o["subject"]["reference"] == f"Patient/{pid}"]
    moments = [datetime.fromisoformat(o["effectiveDateTime"]) for o in heights]
    assert len(heights) > 1 and len(set(moments)) == len(moments)
    expected = [o["id"] for _, o in sorted(zip(moments, heights, strict=True), key=lambda p: p[0], reverse=True)]
    params = [("patient", f"Patient/{pid}"), ("code", f"{LOINC}|8302-2"), ("_sort", "-date")]
    assert matches(search(client, "Observation", params)) == expected


def test_encounters_chained_on_the_patients_birth_date(client: httpx.Client, resources: list[dict]) -> None:
    person = the_patient(resources)
    born_before_1970 = int(person["birthDate"][:4]) < 1970
    hit, miss = ("lt1970", "ge1970") if born_before_1970 else ("ge1970", "lt1970")
    expected = {e["id"] for e in of_type(resources, "Encounter")
                if e["subject"]["reference"] == f"Patient/{person['id']}"}
    assert expected
    params = [("patient.birthdate", hit), ("_count", "1000")]
    assert set(matches(search(client, "Encounter", params))) == expected
    assert matches(search(client, "Encounter", [("patient.birthdate", miss)])) == []


def test_patients_with_a_condition(client: httpx.Client, resources: list[dict]) -> None:
    coding = of_type(resources, "Condition")[0]["code"]["coding"][0]
    found = search(client, "Patient", [("_has:Condition:patient:code", f"{coding['system']}|{coding['code']}")])
    assert matches(found) == [the_patient(resources)["id"]]
    absent = search(client, "Patient", [("_has:Condition:patient:code", f"{coding['system']}|not-a-code")])
    assert matches(absent) == []


def test_conditions_by_code(client: httpx.Client, resources: list[dict]) -> None:
    conditions = of_type(resources, "Condition")
    coding = conditions[-1]["code"]["coding"][0]
    wanted = (coding["system"], coding["code"])
    expected = {c["id"] for c in conditions if wanted in {(x["system"], x["code"]) for x in c["code"]["coding"]}}
    params = [("patient", the_patient(resources)["id"]), ("code", f"{coding['system']}|{coding['code']}")]
    assert set(matches(search(client, "Condition", params))) == expected


def _values(observations: list[dict]) -> list[float]:
    return sorted({o["valueQuantity"]["value"] for o in observations})


def test_values_above_a_threshold_include_the_patient_once(client: httpx.Client, resources: list[dict]) -> None:
    by_code: dict[tuple[str, str], list[dict]] = {}
    for o in of_type(resources, "Observation"):
        if "valueQuantity" in o:
            coding = o["code"]["coding"][0]
            by_code.setdefault((coding["system"], coding["code"]), []).append(o)
    # The code whose values differ most, and a threshold in the widest gap between two of them.
    (system, code), observations = max(by_code.items(), key=lambda item: len(_values(item[1])))
    values = [0.0, *_values(observations)]
    gaps = [(high - low, low, high) for low, high in zip(values, values[1:], strict=False)]
    _, low, high = max(gaps)
    threshold = f"{(low + high) / 2:.3f}"
    expected = {o["id"] for o in observations if o["valueQuantity"]["value"] > float(threshold)}
    assert expected
    params = [("code", f"{system}|{code}"), ("value-quantity", f"gt{threshold}"),
              ("_include", "Observation:patient")]
    bundle = search(client, "Observation", params)
    assert set(matches(bundle)) == expected
    includes = [e for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert [(e["resource"]["resourceType"], e["resource"]["id"]) for e in includes] == [
        ("Patient", the_patient(resources)["id"])]


def test_paging_through_the_encounters(client: httpx.Client, resources: list[dict]) -> None:
    pid = the_patient(resources)["id"]
    expected = {e["id"] for e in of_type(resources, "Encounter") if e["subject"]["reference"] == f"Patient/{pid}"}
    bundle = search(client, "Encounter", [("patient", pid), ("_count", "3")])
    assert bundle["total"] == len(expected)
    seen = matches(bundle)
    while (nxt := next_link(bundle)) is not None:
        bundle = client.get(nxt).json()
        page = matches(bundle)
        assert 0 < len(page) <= 3
        seen += page
    assert len(seen) == len(set(seen)) and set(seen) == expected
