"""Edge cases of search semantics: several dates in one element, escaped separators, `_id:not`,
`_elements` names, `ne` on resources without a value, `uri:below` boundaries, paging past the
snapshot limit, and inputs that must get a 400 or an answer, never a 500."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import FHIR_JSON, ServerProcess, put, unique

from fhir_server.storage.embedded import EmbeddedDatabase

RUN = unique()
TAG = {"system": "urn:test", "code": RUN}
CODE = {"coding": [{"system": "http://example.org", "code": "c"}]}


def _obs(key: str, **fields: object) -> dict:
    return {"resourceType": "Observation", "id": f"{RUN}-{key}", "meta": {"tag": [TAG]},
            "status": "final", "code": CODE, **fields}


@pytest.fixture(scope="module", autouse=True)
def data(server: ServerProcess) -> None:
    resources = [
        _obs("multi", effectiveTiming={"event": ["2020-01-01", "2025-06-01"]}),
        _obs("single", effectiveDateTime="2023-05-05"),
        _obs("none", valueCodeableConcept={"text": "no date, no quantity"}),
        _obs("five", valueQuantity={"value": 5}),
        _obs("seven", valueQuantity={"value": 7}),
        _obs("dollar", valueString="x$y"),
        _obs("period", valuePeriod={"start": "2019-06-01", "end": "2020-06-01"}),
        _obs("precise", valueQuantity={"value": 1}),
        {"resourceType": "Patient", "id": f"{RUN}-pt", "meta": {"tag": [TAG]}, "gender": "male",
         "birthDate": "1970-01-01", "_birthDate": {"extension": [{"url": "urn:x", "valueString": "s"}]},
         "maritalStatus": {"text": "married"}, "identifier": [{"system": "urn:x", "value": "a|b$c,d"}]},
        {"resourceType": "Patient", "id": f"{RUN}-pt2", "meta": {"tag": [TAG]},
         "identifier": [{"value": "urn:y|b"}, {"system": "urn:z", "value": "CORP\\jsmith"}]},
        {"resourceType": "Patient", "id": f"{RUN}-pt3", "meta": {"tag": [TAG]}, "identifier": [{"system": "urn:y", "value": "b"}]},
        {"resourceType": "ValueSet", "id": f"{RUN}-vs1", "meta": {"tag": [TAG]}, "status": "active",
         "url": f"http://example.org/{RUN}/fhir/vs"},
        {"resourceType": "ValueSet", "id": f"{RUN}-vs2", "meta": {"tag": [TAG]}, "status": "active",
         "url": f"http://example.org/{RUN}/fhirx/vs"},
        {"resourceType": "ValueSet", "id": f"{RUN}-vs3", "meta": {"tag": [TAG]}, "status": "active",
         "url": f"http://example.org/{RUN}/fhir"},
        {"resourceType": "ValueSet", "id": f"{RUN}-vs4", "meta": {"tag": [TAG]}, "status": "active",
         "url": f"http://example.org/{RUN}/fhir/"},
    ]
    with httpx.Client(base_url=f"{server.url}/fhir", timeout=30) as client:
        for resource in resources:
            assert put(client, resource).status_code in (200, 201), resource


def ids(client: httpx.Client, resource_type: str, params: dict[str, str]) -> set[str]:
    response = client.get(f"/{resource_type}", params={"_tag": f"urn:test|{RUN}", **params})
    assert response.status_code == 200, response.text
    return {e["resource"]["id"].removeprefix(f"{RUN}-") for e in response.json().get("entry", [])}


@pytest.mark.parametrize(("params", "expected"), [
    ({"date": "2023"}, {"single"}),
    ({"date": "2025-06-01"}, {"multi"}),
    ({"date": "ge2023"}, {"single", "multi"}),  # the 2025 event
    ({"date": "le2021"}, {"multi"}),  # the 2020 event
    ({"date": ["ge2024", "le2021"]}, {"multi"}),  # each criterion by another event
    ({"date": "gt2024"}, {"multi"}),
    ({"date": "lt2021"}, {"multi"}),
    ({"date": "sa2024"}, {"multi"}),
    ({"date": "eb2021"}, {"multi"}),
    ({"date": "ne2023"}, {"multi"}),  # has dates, none in 2023; resources without a date do not match
    ({"date": "2020,2023"}, {"multi", "single"}),
])
def test_several_dates_in_one_element(client: httpx.Client, params: dict, expected: set[str]) -> None:
    assert ids(client, "Observation", params) == expected


def test_ne_needs_a_value(client: httpx.Client) -> None:
    assert ids(client, "Observation", {"value-quantity": "ne5"}) == {"seven", "precise"}


@pytest.mark.parametrize(("value", "expected"), [
    ("ge2020", set()), ("le2019", set()), ("ge2019", {"period"}), ("le2020", {"period"}),
    ("gt2019", {"period"}), ("lt2020", {"period"}), ("ne2020", {"period"}), ("2019-06-01", set()),
    ("ap2019-12", {"period"}), ("sa2020", set()), ("eb2021", {"period"}),
])
def test_a_date_inside_a_composite(client: httpx.Client, value: str, expected: set[str]) -> None:
    """[2019-06-01, 2020-06-01] against the R4 rules, as `value-date` answers them too."""
    assert ids(client, "Observation", {"code-value-date": f"http://example.org|c${value}"}) == expected
    assert ids(client, "Observation", {"value-date": value}) == expected


def test_number_precision_beyond_28_digits(client: httpx.Client) -> None:
    assert ids(client, "Observation", {"value-quantity": "1.00000000000000000000000000000"}) == {"precise"}
    assert ids(client, "Observation", {"value-quantity": "5|"}) == {"five"}


def test_id_not(client: httpx.Client) -> None:
    found = ids(client, "Observation", {"_id:not": f"{RUN}-multi,{RUN}-single"})
    assert found == {"none", "five", "seven", "dollar", "period", "precise"}


def test_escaped_separators(client: httpx.Client) -> None:
    assert ids(client, "Patient", {"identifier": "urn:y\\|b"}) == {"pt2"}  # a value with a bar, any system
    assert ids(client, "Patient", {"identifier": "urn:y|b"}) == {"pt3"}
    assert ids(client, "Patient", {"identifier": "urn:z|CORP\\jsmith"}) == {"pt2"}  # a lone backslash stays
    assert ids(client, "Patient", {"identifier": "urn:x|a\\|b\\$c\\,d"}) == {"pt"}
    assert ids(client, "Patient", {"identifier": "a\\|b\\$c\\,d"}) == {"pt"}
    assert ids(client, "Patient", {"identifier": "urn:x|a"}) == set()
    assert ids(client, "Observation", {"code-value-string": "http://example.org|c$x\\$y"}) == {"dollar"}


def test_elements_by_element_name(client: httpx.Client) -> None:
    bundle = client.get("/Patient", params={"_tag": f"urn:test|{RUN}", "_elements": "birthDate,maritalStatus"}).json()
    resource = bundle["entry"][0]["resource"]
    assert {"birthDate", "_birthDate", "maritalStatus"} <= set(resource)
    assert "gender" not in resource and "identifier" not in resource


def test_uri_below_stops_at_a_path_segment(client: httpx.Client) -> None:
    assert ids(client, "ValueSet", {"url:below": f"http://example.org/{RUN}/fhir"}) == {"vs1", "vs3", "vs4"}
    assert ids(client, "ValueSet", {"url:below": f"http://example.org/{RUN}/fhir/"}) == {"vs1", "vs4"}
    assert ids(client, "ValueSet", {"url:above": f"http://example.org/{RUN}/fhir/vs/1"}) == {"vs1", "vs3"}


@pytest.mark.parametrize("params", [
    {"_lastUpdated": "9999"}, {"_lastUpdated": "gt9999-12"}, {"_lastUpdated": "le9999-12-31"},
    {"value-quantity": "1e1000000"}, {"value-quantity": "ap1e-1000000"}, {"_count": "\u00b2"},
    {"_count": "9" * 5000}, {"code:text": "\U0010ffff"}, {"_page": "a.\u00b2.b"}, {"code:text": "x\x00y"},
    {"date": "ap0001-01-01"}, {"date": "ap9999-12-31"},
])
def test_never_a_500(client: httpx.Client, params: dict[str, str]) -> None:
    response = client.get("/Observation", params=params)
    assert response.status_code in (200, 400), response.text


@pytest.fixture
def small_snapshots(database: EmbeddedDatabase, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": f"fhir_snap_{unique()}", "FHIR_MAX_SEARCH_RESULTS": "5",
           "FHIR_BASE_URL": "https://fhir.example.org/r4"}
    server = ServerProcess(tmp_path, env).start()
    yield server
    server.stop()


def test_paging_stops_at_the_snapshot_limit_and_the_total_stays_exact(small_snapshots: ServerProcess) -> None:
    with httpx.Client(base_url=f"{small_snapshots.url}/fhir", timeout=30) as client:
        for _ in range(8):
            created = client.post("/Patient", json={"resourceType": "Patient", "gender": "male"},
                                  headers={"Content-Type": FHIR_JSON})
            assert created.status_code == 201
        url: str | None = "/Patient?gender=male&_count=2"
        seen, pages = [], 0
        while url and pages < 10:
            bundle = client.get(url).json()
            assert bundle["total"] == 8
            seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
            url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
            url = url.replace("https://fhir.example.org/r4", "") if url else None  # the public base
            pages += 1
        assert pages == 3 and len(seen) == len(set(seen)) == 5


def test_a_sorted_search_past_the_snapshot_limit_keeps_the_first_in_order(small_snapshots: ServerProcess) -> None:
    """Eight matches, five kept: the five latest birth dates, in order (the server sorts what
    fits in the snapshot itself, the database what does not)."""
    with httpx.Client(base_url=f"{small_snapshots.url}/fhir", timeout=30) as client:
        family = f"Sorted{unique()}"
        for year in (1971, 1958, 1990, 1964, 1983, 1949, 1977, 1995):
            created = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": family}],
                                                    "birthDate": f"{year}-01-01"}, headers={"Content-Type": FHIR_JSON})
            assert created.status_code == 201
        url: str | None = f"/Patient?family={family}&_sort=-birthdate&_count=2"
        years = []
        while url:
            bundle = client.get(url).json()
            assert bundle["total"] == 8
            years += [int(e["resource"]["birthDate"][:4]) for e in bundle.get("entry", [])]
            url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
            url = url.replace("https://fhir.example.org/r4", "") if url else None
        assert years == [1995, 1990, 1983, 1977, 1971]
        under = client.get(f"/Patient?family={family}&birthdate=lt1975&_sort=birthdate").json()  # 4 fit: sorted here
        assert [e["resource"]["birthDate"][:4] for e in under["entry"]] == ["1949", "1958", "1964", "1971"]


def test_absolute_references_to_this_server_are_local(small_snapshots: ServerProcess) -> None:
    """With FHIR_BASE_URL set, `https://fhir.example.org/r4/Patient/1` is indexed as `Patient/1`."""
    with httpx.Client(base_url=f"{small_snapshots.url}/fhir", timeout=30) as client:
        put(client, {"resourceType": "Patient", "id": "abs1"})
        put(client, _obs("abs", subject={"reference": "https://fhir.example.org/r4/Patient/abs1"}))
        for value in ("Patient/abs1", "abs1", "https://fhir.example.org/r4/Patient/abs1"):
            bundle = client.get("/Observation", params={"subject": value, "_include": "Observation:subject"}).json()
            assert [(e["resource"]["id"], e["search"]["mode"]) for e in bundle["entry"]] == [
                (f"{RUN}-abs", "match"), ("abs1", "include")], value
        absolute = "subject=https://fhir.example.org/r4/Patient/abs1"
        again = client.post("/Observation", json=_obs("abs2"), headers={"Content-Type": FHIR_JSON, "If-None-Exist": absolute})
        assert again.status_code == 200 and again.json()["id"] == f"{RUN}-abs"  # the match, not a new one


def test_a_chain_whose_target_matches_nothing_finds_nothing(client: httpx.Client) -> None:
    """The chain's inner search finds no Patient: an empty answer, not an error."""
    answer = client.get("/Encounter", params={"patient.identifier": f"urn:none|{unique()}"})
    assert answer.status_code == 200 and answer.json()["total"] == 0
