"""Search features beyond single parameters: chains, _has, _include, _sort, paging, _summary and
_elements, POST _search, system and compartment search, lenient and strict handling, conditional
interactions on any criteria, and the search parameters in the CapabilityStatement.

Every search carries this module's `_tag`; ids are written without the module's prefix.
"""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from conftest import FHIR_JSON, ServerProcess, assert_outcome, patient, post, put, unique

from fhir_server.storage.embedded import EmbeddedDatabase

RUN = unique()
TAG = {"system": "urn:test", "code": RUN}
TAG_QUERY = f"urn:test|{RUN}"
CODES = "http://example.org/codes"
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
XHTML = '<div xmlns="http://www.w3.org/1999/xhtml">{}</div>'


def rid(key: str) -> str:
    return f"{RUN}-{key}"


def short(resource_id: str) -> str:
    return resource_id.removeprefix(f"{RUN}-")


def _res(resource_type: str, key: str, **fields: object) -> dict:
    return {"resourceType": resource_type, "id": rid(key), "meta": {"tag": [TAG]}, **fields}


def _ref(resource_type: str, key: str) -> dict:
    return {"reference": f"{resource_type}/{rid(key)}"}


def _person(key: str, family: str, given: str, gender: str, born: str, **fields: object) -> dict:
    name = [{"family": family, "given": [given]}]
    return _res("Patient", key, name=name, gender=gender, birthDate=born, **fields)


def _obs(key: str, subject: str, code: str, **fields: object) -> dict:
    return _res("Observation", key, status="final", code={"coding": [{"system": CODES, "code": code}]},
                subject=_ref("Patient", subject), **fields)


def _encounter(key: str, subject: str, provider: str) -> dict:
    klass = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}
    return _res("Encounter", key, status="finished", subject=_ref("Patient", subject),
                serviceProvider=_ref("Organization", provider), **{"class": klass})


def _resources() -> list[dict]:
    """Written in this order: `_sort=-_lastUpdated` relies on p1 to p5 being written one by one."""
    return [
        _res("Organization", "org1", name="Acme Health"),
        _res("Organization", "org2", name="Beacon Clinic"),
        _res("Practitioner", "pr1", name=[{"family": "Welby"}]),
        _person("p1", "Chalmers", "Peter", "male", "1965-04-02",
                text={"status": "generated", "div": XHTML.format("Peter Chalmers")},
                identifier=[{"system": "urn:mrn", "value": f"F1-{RUN}"}],
                managingOrganization=_ref("Organization", "org1"),
                generalPractitioner=[_ref("Practitioner", "pr1")],
                photo=[{"contentType": "image/png", "data": "iVBORw0KGgo="}],
                contact=[{"name": {"family": "Chalmers", "given": ["Jane"]}}],
                communication=[{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]}}]),
        _person("p2", "Smith", "Anna", "female", "1980-07-15", managingOrganization=_ref("Organization", "org2")),
        _person("p3", "Brown", "Carl", "male", "1975-01-01"),
        _person("p4", "Smith", "Beth", "female", "1990-02-02"),
        _person("p5", "Adams", "Dora", "female", "1970-05-05"),
        _encounter("en1", "p1", "org1"),
        _encounter("en2", "p2", "org2"),
        _obs("ob1", "p1", "1234-5", encounter=_ref("Encounter", "en1"), effectiveDateTime="2024-01-10T10:00:00Z",
             valueQuantity={"value": 10, "unit": "mg"}, text={"status": "generated", "div": XHTML.format("ten")}),
        _obs("ob2", "p1", "9999-9"),
        _obs("ob3", "p2", "1234-5", encounter=_ref("Encounter", "en2")),
        _obs("ob4", "p3", "5555-5"),
        _res("Provenance", "pv1", target=[_ref("Observation", "ob1")], recorded="2024-01-10T10:05:00Z",
             agent=[{"who": _ref("Practitioner", "pr1")}]),
    ]


@pytest.fixture(scope="module", autouse=True)
def stored(server: ServerProcess) -> Iterator[None]:
    with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as c:
        for resource in _resources():
            response = put(c, resource)
            assert response.status_code in (200, 201), response.text
    yield


def _pairs(query: str) -> list[tuple[str, str]]:
    return [(name, value) for name, _, value in (part.partition("=") for part in query.split("&"))]


def search(client: httpx.Client, path: str, query: str, tag: str = TAG_QUERY, **headers: str) -> httpx.Response:
    return client.get(f"/{path}", params=[*_pairs(query), ("_tag", tag)], headers=headers)


def bundle_of(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


def matches(bundle: dict) -> list[str]:
    """Short ids of the matches, in order."""
    return [short(e["resource"]["id"]) for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def included(bundle: dict) -> list[str]:
    """`Type/short-id` of the included resources, in order."""
    return [f"{e['resource']['resourceType']}/{short(e['resource']['id'])}"
            for e in bundle.get("entry", []) if e["search"]["mode"] == "include"]


def ids(client: httpx.Client, path: str, query: str) -> set[str]:
    bundle = bundle_of(search(client, path, query))
    assert link(bundle, "next") is None
    return set(matches(bundle))


def link(bundle: dict, relation: str) -> str | None:
    urls = [lk["url"] for lk in bundle["link"] if lk["relation"] == relation]
    return urls[0] if urls else None


def follow(client: httpx.Client, url: str) -> dict:
    return bundle_of(client.get(url))  # paging links are absolute


def all_pages(client: httpx.Client, first: dict) -> list[list[str]]:
    pages, bundle = [matches(first)], first
    while (nxt := link(bundle, "next")) is not None:
        bundle = follow(client, nxt)
        pages.append(matches(bundle))
    return pages


@pytest.mark.parametrize(("path", "query", "expected"), [
    ("Observation", "subject:Patient.name=peter", {"ob1", "ob2"}),
    ("Observation", "patient.birthdate=lt1970", {"ob1", "ob2"}),
    ("Observation", "patient.birthdate=ge1975", {"ob3", "ob4"}),
    ("Observation", "encounter.service-provider.name=acme", {"ob1"}),
    ("Encounter", "subject:Patient.organization.name=beacon", {"en2"}),
    ("Patient", "_has:Observation:patient:code=1234-5", {"p1", "p2"}),
    ("Patient", f"_has:Observation:patient:code={CODES}|5555-5", {"p3"}),
    ("Patient", "_has:Observation:patient:code=1234-5&gender=female", {"p2"}),
    ("Patient", "_has:Observation:patient:_has:Provenance:target:agent=Practitioner/{RUN}-pr1", {"p1"}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_chains_and_reverse_chains(client: httpx.Client, path: str, query: str, expected: set[str]) -> None:
    assert ids(client, path, query.format(RUN=RUN)) == expected


def test_include_adds_each_referenced_resource_once(client: httpx.Client) -> None:
    for include in ("Observation:patient", "Observation:subject:Patient"):
        bundle = bundle_of(search(client, "Observation", f"code=1234-5,9999-9&_include={include}"))
        assert sorted(matches(bundle)) == ["ob1", "ob2", "ob3"], include
        assert sorted(included(bundle)) == ["Patient/p1", "Patient/p2"], include
        assert bundle["total"] == 3  # matches only
        full_urls = [e["fullUrl"] for e in bundle["entry"]]
        assert len(full_urls) == len(set(full_urls))


def test_revinclude(client: httpx.Client) -> None:
    bundle = bundle_of(search(client, "Patient", f"_id={rid('p1')}&_revinclude=Observation:patient"))
    assert matches(bundle) == ["p1"]
    assert sorted(included(bundle)) == ["Observation/ob1", "Observation/ob2"]


def test_include_iterate_follows_included_resources(client: httpx.Client) -> None:
    query = f"_id={rid('ob1')}&_include=Observation:encounter&_include:iterate=Encounter:service-provider"
    bundle = bundle_of(search(client, "Observation", query))
    assert matches(bundle) == ["ob1"]
    assert sorted(included(bundle)) == ["Encounter/en1", "Organization/org1"]


@pytest.mark.parametrize(("sort", "expected"), [
    ("birthdate", ["p1", "p5", "p3", "p2", "p4"]),
    ("-birthdate", ["p4", "p2", "p3", "p5", "p1"]),
    ("family,-birthdate", ["p5", "p3", "p1", "p4", "p2"]),
    ("_id", ["p1", "p2", "p3", "p4", "p5"]),
    ("-_lastUpdated", ["p5", "p4", "p3", "p2", "p1"]),
])
def test_sort(client: httpx.Client, sort: str, expected: list[str]) -> None:
    assert matches(bundle_of(search(client, "Patient", f"_sort={sort}"))) == expected


def test_sort_ties_are_broken_the_same_way_every_time_and_across_pages(client: httpx.Client) -> None:
    whole = matches(bundle_of(search(client, "Patient", "_sort=gender")))
    assert set(whole[:3]) == {"p2", "p4", "p5"} and set(whole[3:]) == {"p1", "p3"}
    assert matches(bundle_of(search(client, "Patient", "_sort=gender"))) == whole
    paged = all_pages(client, bundle_of(search(client, "Patient", "_sort=gender&_count=2")))
    assert [i for page in paged for i in page] == whole


def test_paging_links(client: httpx.Client) -> None:
    first = bundle_of(search(client, "Patient", "_sort=_id&_count=2"))
    assert first["total"] == 5 and matches(first) == ["p1", "p2"]
    assert link(first, "self") and link(first, "previous") is None
    second = follow(client, link(first, "next"))
    assert matches(second) == ["p3", "p4"] and link(second, "self")
    assert matches(follow(client, link(second, "previous"))) == ["p1", "p2"]
    assert matches(follow(client, link(second, "first"))) == ["p1", "p2"]
    last = follow(client, link(second, "next"))
    assert matches(last) == ["p5"] and link(last, "next") is None
    assert matches(follow(client, link(last, "previous"))) == ["p3", "p4"]


@pytest.mark.parametrize("sort", [None, "_id", "-_lastUpdated"])
def test_paging_is_stable_under_concurrent_inserts(client: httpx.Client, sort: str | None) -> None:
    tag = unique()
    tagged = {"meta": {"tag": [{"system": "urn:test", "code": tag}]}}
    original = {f"{tag}-b{n:02d}" for n in range(10)}
    for rid_ in sorted(original):
        assert put(client, patient(id=rid_, **tagged)).status_code == 201
    query = "_count=3" + (f"&_sort={sort}" if sort else "")
    first = bundle_of(search(client, "Patient", query, tag=f"urn:test|{tag}"))
    for rid_ in [f"{tag}-a{n}" for n in range(3)] + [f"{tag}-c{n}" for n in range(2)]:
        assert put(client, patient(id=rid_, **tagged)).status_code == 201
    seen = [i for page in all_pages(client, first) for i in page]
    assert len(seen) == len(set(seen))
    assert original <= set(seen)


def test_forged_page_token_is_400(client: httpx.Client) -> None:
    nxt = link(bundle_of(search(client, "Patient", "_count=2")), "next")
    assert nxt is not None
    parts = urlsplit(nxt)
    params = parse_qsl(parts.query, keep_blank_values=True)
    token = dict(params)["_page"]
    middle = len(token) // 2
    forged = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1:]
    query = urlencode([(k, forged if k == "_page" else v) for k, v in params])
    assert_outcome(client.get(urlunsplit(parts._replace(query=query))), 400)


def test_expired_page_token_is_410(database: EmbeddedDatabase, tmp_path: Path) -> None:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_tests_paging", "FHIR_PAGE_TTL_S": "1"}
    proc = ServerProcess(tmp_path, env=env).start()
    try:
        with httpx.Client(base_url=f"{proc.url}/fhir", timeout=60) as c:
            family = f"Ttl{unique()}"
            for _ in range(3):
                assert post(c, patient(name=[{"family": family}])).status_code == 201
            nxt = link(bundle_of(c.get("/Patient", params={"family": family, "_count": 1})), "next")
            assert nxt is not None
            time.sleep(2.5)  # past the one-second page lifetime
            assert_outcome(c.get(nxt), 410)
    finally:
        proc.stop()


def test_count_zero_and_summary_count_give_the_total_only(client: httpx.Client) -> None:
    for query in ("_count=0", "_summary=count"):
        bundle = bundle_of(search(client, "Patient", query))
        assert bundle["total"] == 5 and "entry" not in bundle, query


def test_total_none_and_accurate(client: httpx.Client) -> None:
    assert "total" not in bundle_of(search(client, "Patient", "_total=none"))
    assert bundle_of(search(client, "Patient", "_total=accurate"))["total"] == 5


def test_count_above_the_maximum_is_capped(client: httpx.Client) -> None:
    bundle = bundle_of(search(client, "Patient", "_count=5000"))
    assert len(matches(bundle)) == 5 and link(bundle, "next") is None


def _only(bundle: dict) -> dict:
    [resource] = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    return resource


def test_summary_true(client: httpx.Client) -> None:
    resource = _only(bundle_of(search(client, "Patient", f"_id={rid('p1')}&_summary=true")))
    assert {"id", "meta", "name", "gender", "birthDate", "identifier", "managingOrganization"} <= resource.keys()
    assert not {"text", "photo", "contact", "communication", "generalPractitioner"} & resource.keys()
    assert SUBSETTED in resource["meta"]["tag"] and TAG in resource["meta"]["tag"]


def test_summary_text_keeps_text_and_mandatory_elements(client: httpx.Client) -> None:
    resource = _only(bundle_of(search(client, "Observation", f"_id={rid('ob1')}&_summary=text")))
    assert {"id", "meta", "text", "status", "code"} <= resource.keys()
    assert not {"subject", "encounter", "effectiveDateTime", "valueQuantity"} & resource.keys()


def test_summary_data_removes_the_text_only(client: httpx.Client) -> None:
    resource = _only(bundle_of(search(client, "Patient", f"_id={rid('p1')}&_summary=data")))
    assert "text" not in resource
    assert {"photo", "contact", "communication", "generalPractitioner", "name"} <= resource.keys()


def test_elements(client: httpx.Client) -> None:
    resource = _only(bundle_of(search(client, "Patient", f"_id={rid('p1')}&_elements=name,gender")))
    assert set(resource) == {"resourceType", "id", "meta", "name", "gender"}
    assert SUBSETTED in resource["meta"]["tag"]


def test_contained_is_not_supported(client: httpx.Client) -> None:
    assert_outcome(search(client, "Patient", "_contained=true"), 400)


def test_post_search_with_a_form_body(client: httpx.Client) -> None:
    response = client.post("/Patient/_search", data={"name": "smith", "_tag": TAG_QUERY})
    assert set(matches(bundle_of(response))) == ids(client, "Patient", "name=smith") == {"p2", "p4"}


def test_system_search_over_several_types(client: httpx.Client, server: ServerProcess) -> None:
    params = {"_type": "Patient,Observation", "_tag": TAG_QUERY}
    bundle = bundle_of(client.get(f"{server.url}/fhir", params=params))
    found = {f"{e['resource']['resourceType']}/{short(e['resource']['id'])}" for e in bundle["entry"]}
    assert found == {f"Patient/p{n}" for n in range(1, 6)} | {f"Observation/ob{n}" for n in range(1, 5)}


def test_compartment_search(client: httpx.Client) -> None:
    assert ids(client, f"Patient/{rid('p1')}/Observation", "_count=50") == {"ob1", "ob2"}
    assert ids(client, f"Patient/{rid('p1')}/Observation", f"code={CODES}|1234-5") == {"ob1"}
    assert ids(client, f"Patient/{rid('p2')}/Observation", "_count=50") == {"ob3"}


def test_unknown_parameter_is_reported_and_left_out_of_self(client: httpx.Client) -> None:
    bundle = bundle_of(search(client, "Patient", "foo=bar"))
    assert len(matches(bundle)) == 5
    outcomes = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert len(outcomes) == 1 and outcomes[0]["resourceType"] == "OperationOutcome"
    assert "foo" in json.dumps(outcomes[0])
    assert "foo" not in link(bundle, "self")


def test_unknown_parameter_with_strict_handling_is_400(client: httpx.Client) -> None:
    assert_outcome(search(client, "Patient", "foo=bar", Prefer="handling=strict"), 400, "foo")


def test_unknown_sort_parameter_is_400(client: httpx.Client) -> None:
    assert_outcome(search(client, "Patient", "_sort=foo"), 400)


def test_conditional_create_on_any_criteria(client: httpx.Client) -> None:
    family = f"Cond{unique()}"
    body = patient(name=[{"family": family}], birthDate="1999-09-09")
    condition = {"If-None-Exist": f"name={family.lower()}&birthdate=1999-09-09"}
    first = post(client, body, **condition)
    again = post(client, body, **condition)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


def test_conditional_update_on_any_criteria(client: httpx.Client) -> None:
    family = f"Cond{unique()}"
    url = f"/Patient?family={family}&birthdate=1999-09-09"
    headers = {"Content-Type": FHIR_JSON}
    created = client.put(url, json=patient(name=[{"family": family}], birthDate="1999-09-09"), headers=headers)
    assert created.status_code == 201
    body = patient(name=[{"family": family}], birthDate="1999-09-09", gender="female")
    updated = client.put(url, json=body, headers=headers)
    assert updated.status_code == 200
    assert updated.json()["id"] == created.json()["id"] and updated.json()["meta"]["versionId"] == "2"


def test_conditional_delete_on_any_criteria(client: httpx.Client) -> None:
    family = f"Cond{unique()}"
    rid_ = post(client, patient(name=[{"family": family}])).json()["id"]
    assert client.delete(f"/Patient?name={family}").status_code in (200, 204)
    assert_outcome(client.get(f"/Patient/{rid_}"), 410)


def test_capability_statement_lists_search_parameters(client: httpx.Client) -> None:
    rest = client.get("/metadata").json()["rest"][0]
    by_type = {r["type"]: {p["name"]: p for p in r.get("searchParam", [])} for r in rest["resource"]}
    for name, kind in [("name", "string"), ("birthdate", "date"), ("general-practitioner", "reference")]:
        assert by_type["Patient"][name]["type"] == kind
        assert by_type["Patient"][name]["documentation"]
    assert by_type["Observation"]["code-value-quantity"]["type"] == "composite"
