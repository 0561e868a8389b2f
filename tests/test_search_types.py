"""Search parameter types, modifiers and prefixes against one fixed data set (FHIR R4 search.html).

Every search carries this module's `_tag`, so other modules' data never matches; ids are written
without the module's prefix (`p1` is `<RUN>-p1`).
"""

from collections.abc import Iterator

import httpx
import pytest
from conftest import ServerProcess, assert_outcome, put, unique

RUN = unique()
TAG = {"system": "urn:test", "code": RUN}
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
PROFILE = "http://example.org/fhir/StructureDefinition/vip-patient"
SOURCE = "http://example.org/source#abc"


def rid(key: str) -> str:
    return f"{RUN}-{key}"


def _res(resource_type: str, key: str, meta: dict | None = None, **fields: object) -> dict:
    return {"resourceType": resource_type, "id": rid(key), "meta": {"tag": [TAG], **(meta or {})}, **fields}


def _patient(key: str, meta: dict | None = None, **fields: object) -> dict:
    return _res("Patient", key, meta, **fields)


def _concept(code: str, display: str, text: str | None = None) -> dict:
    return {"coding": [{"system": LOINC, "code": code, "display": display}], **({"text": text} if text else {})}


def _qty(value: float, code: str) -> dict:
    return {"value": value, "unit": code, "system": UCUM, "code": code}


BP = _concept("85354-9", "Blood pressure panel with all children optional", "Blood pressure panel")
SYSTOLIC = _concept("8480-6", "Systolic blood pressure")
DIASTOLIC = _concept("8462-4", "Diastolic blood pressure")
HEIGHT = _concept("8302-2", "Body height")
GLUCOSE = _concept("2339-0", "Glucose [Mass/volume] in Blood")


def _obs(key: str, code: dict, patient: str | None, **fields: object) -> dict:
    ref = {"subject": {"reference": f"Patient/{rid(patient)}"}} if patient else {}
    return _res("Observation", key, status="final", code=code, **ref, **fields)


def _bp(key: str, patient: str, systolic: int, diastolic: int, effective: str) -> dict:
    components = [{"code": SYSTOLIC, "valueQuantity": _qty(systolic, "mm[Hg]")},
                  {"code": DIASTOLIC, "valueQuantity": _qty(diastolic, "mm[Hg]")}]
    return _obs(key, BP, patient, effectiveDateTime=effective, component=components)


def _risk(key: str, probability: float) -> dict:
    return _res("RiskAssessment", key, status="final", subject={"reference": f"Patient/{rid('p1')}"},
                prediction=[{"outcome": {"text": "Heart attack"}, "probabilityDecimal": probability}])


def _encounter(key: str, subject: str, status: str, period: dict) -> dict:
    klass = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}
    return _res("Encounter", key, status=status, subject={"reference": f"Patient/{rid(subject)}"},
                period=period, **{"class": klass})


def _resources() -> list[dict]:
    """The data set; the order matters for `_lastUpdated` (patients first, p1 to p5)."""
    return [
        _patient(
            "p1", {"profile": [PROFILE]},
            name=[{"family": "Chalmers", "given": ["Peter", "James"], "prefix": ["Mr."]},
                  {"use": "nickname", "given": ["Jim"]}],
            gender="male", birthDate="1974-12-25", active=True,
            telecom=[{"system": "email", "value": "peter@example.org"}, {"system": "phone", "value": "555-0101"}],
            address=[{"line": ["123 Main St"], "city": "Boston", "state": "MA", "postalCode": "02111",
                      "country": "US"}],
            identifier=[{"system": "urn:mrn", "value": "A1"},
                        {"type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "system": "urn:hospital",
                         "value": "12345"}],
        ),
        _patient(
            "p2", {"security": [{"system": CONFIDENTIALITY, "code": "R"}]},
            name=[{"family": "Müller", "given": ["Anna"]}], gender="female", birthDate="1970-06-01", active=False,
            telecom=[{"system": "email", "value": "a@b.org"}],
            address=[{"line": ["Hauptstraße 5"], "city": "München", "district": "Oberbayern",
                      "postalCode": "80331", "country": "DE"}],
            identifier=[{"value": "A1"},
                        {"type": {"coding": [{"system": V2_0203, "code": "DL"}]}, "value": "12345"}],
        ),
        _patient("p3", {"source": SOURCE}, name=[{"family": "Smith", "given": ["Carla"]}], gender="female",
                 birthDate="1970", identifier=[{"system": "urn:other", "value": "A1"}]),
        _patient("p4"),  # no name, gender, birth date
        _patient("p5",
                 name=[{"text": "Dr. Zoë Ortega", "family": "Ortega", "given": ["Zoë"], "prefix": ["Dr."]}],
                 gender="other", birthDate="1980-01-01",
                 address=[{"text": "42 Harbour Road", "city": "Cambridge", "state": "MA"}]),
        _bp("o1", "p1", 150, 95, "2024-03-05T10:00:00+01:00"),  # = 09:00:00Z
        _bp("o2", "p2", 120, 150, "2024-03-05"),
        _obs("o3", SYSTOLIC, "p1", effectiveDateTime="2024-03-06T00:30:00Z", valueQuantity=_qty(100, "mm[Hg]")),
        _obs("o4", HEIGHT, "p2", effectivePeriod={"start": "2024-03-04T22:00:00Z", "end": "2024-03-05T02:00:00Z"},
             valueQuantity=_qty(100.4, "cm")),
        _obs("o5", HEIGHT, "p3", effectivePeriod={"start": "2024-03-05T12:00:00Z"},
             valueQuantity=_qty(100.6, "cm")),
        _obs("o6", GLUCOSE, "p1", effectiveDateTime="2023-12-31T23:30:00-02:00",  # = 2024-01-01T01:30Z
             valueQuantity=_qty(5.4, "mg")),
        _obs("o7", GLUCOSE, None, subject={"identifier": {"system": "urn:mrn", "value": "A1"}},
             effectiveDateTime="2024-03", valueQuantity={"value": 5.4, "unit": "mg"}),
        _obs("o8", HEIGHT, None, effectiveDateTime="2025-01-01T00:00:00Z", valueQuantity=_qty(95, "cm")),
        _encounter("e1", "p1", "finished", {"start": "2024-03-05T08:00:00Z", "end": "2024-03-05T09:00:00Z"}),
        _encounter("e2", "p2", "in-progress", {"start": "2024-03-04T20:00:00Z"}),
        _risk("r1", 0.25), _risk("r2", 0.254), _risk("r3", 0.256), _risk("r4", 0.8),
        _res("ValueSet", "vs1", status="active", url="http://example.org/fhir/vs/a"),
        _res("ValueSet", "vs2", status="active", url="http://example.org/fhir/vs/a/b/c"),
        _res("ValueSet", "vs3", status="active", url="http://other.org/vs/a"),
    ]


@pytest.fixture(scope="module", autouse=True)
def stored(server: ServerProcess) -> Iterator[dict[str, dict]]:
    """The data set, written once; the server's answers by short name."""
    answers = {}
    with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as c:
        for resource in _resources():
            response = put(c, resource)
            assert response.status_code in (200, 201), response.text
            answers[resource["id"].removeprefix(f"{RUN}-")] = response.json()
    yield answers


def _pairs(query: str) -> list[tuple[str, str]]:
    """`a=1&b=x|y` → pairs, split by hand so that `+`, `|`, `#` and `$` stay as written."""
    return [(name, value) for name, _, value in (part.partition("=") for part in query.split("&"))]


def search(client: httpx.Client, path: str, query: str) -> httpx.Response:
    return client.get(f"/{path}", params=[*_pairs(query), ("_tag", f"urn:test|{RUN}")])


def ids(client: httpx.Client, path: str, query: str) -> set[str]:
    """Short ids of the resources matched by `path?query` in this module's data."""
    response = search(client, path, query)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert not any(link["relation"] == "next" for link in bundle["link"])
    return {e["resource"]["id"].removeprefix(f"{RUN}-") for e in bundle.get("entry", [])
            if e["search"]["mode"] == "match"}


def _cases(*cases: tuple[str, set[str]]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("query", "expected"), cases, ids=[q for q, _ in cases])


@_cases(
    ("name=pet", {"p1"}), ("name=PETER", {"p1"}), ("name=chalm", {"p1"}), ("name=jim", {"p1"}),
    ("name=james", {"p1"}), ("name=mr", {"p1"}), ("name=eter", set()), ("name=zoe", {"p5"}),
    ("name=ZOË", {"p5"}), ("name=dr", {"p5"}), ("name=ortega", {"p5"}), ("name=anna", {"p2"}),
    ("given=pet", {"p1"}), ("given=chalm", set()), ("family=chalm", {"p1"}), ("family=pet", set()),
    ("family=müll", {"p2"}), ("family=mull", {"p2"}), ("family=MÜLL", {"p2"}),
)
def test_string_is_a_case_and_accent_insensitive_prefix_of_any_name_part(
    client: httpx.Client, query: str, expected: set[str]
) -> None:
    assert ids(client, "Patient", query) == expected


@_cases(
    ("family:exact=Müller", {"p2"}), ("family:exact=müller", set()), ("family:exact=Müll", set()),
    ("family:exact=Muller", set()), ("family:contains=ULL", {"p2"}), ("family:contains=alm", {"p1"}),
    ("name:contains=eter", {"p1"}), ("family:contains=xyz", set()),
)
def test_string_exact_and_contains(client: httpx.Client, query: str, expected: set[str]) -> None:
    assert ids(client, "Patient", query) == expected


@_cases(
    ("address-city=boston", {"p1"}), ("address-city=BOS", {"p1"}), ("address-city=munchen", {"p2"}),
    ("address=123", {"p1"}), ("address=main", set()), ("address:contains=main", {"p1"}),
    ("address=02111", {"p1"}), ("address-postalcode=803", {"p2"}), ("address=ober", {"p2"}),
    ("address=42", {"p5"}), ("address=cambridge", {"p5"}), ("address=haupt", {"p2"}), ("address=us", {"p1"}),
    ("address-state=ma", {"p1", "p5"}), ("address-country=de", {"p2"}),
)
def test_string_on_address_parts(client: httpx.Client, query: str, expected: set[str]) -> None:
    assert ids(client, "Patient", query) == expected


@_cases(
    ("gender=male", {"p1"}), ("gender=female", {"p2", "p3"}), ("gender:not=male", {"p2", "p3", "p4", "p5"}),
    ("identifier=urn:mrn|A1", {"p1"}), ("identifier=A1", {"p1", "p2", "p3"}), ("identifier=|A1", {"p2"}),
    ("identifier=urn:other|", {"p3"}), ("identifier=12345", {"p1", "p2"}),
    (f"identifier:of-type={V2_0203}|MR|12345", {"p1"}), (f"identifier:of-type={V2_0203}|DL|12345", {"p2"}),
    (f"identifier:of-type={V2_0203}|MR|A1", set()),
    ("active=true", {"p1"}), ("active=false", {"p2"}),
    ("email=a@b.org", {"p2"}), ("email=peter@example.org", {"p1"}), ("phone=555-0101", {"p1"}),
    ("telecom=555-0101", {"p1"}), ("telecom=a@b.org", {"p2"}), ("email=555-0101", set()),
)
def test_token_on_patient(client: httpx.Client, query: str, expected: set[str]) -> None:
    assert ids(client, "Patient", query) == expected


@_cases(
    (f"code={LOINC}|8480-6", {"o3"}), ("code=8480-6", {"o3"}), ("code=http://snomed.info/sct|8480-6", set()),
    ("code:text=systolic", {"o3"}), ("code:text=SYSTOLIC", {"o3"}), ("code:text=blood", {"o1", "o2"}),
    (f"code={LOINC}|8302-2,{LOINC}|2339-0", {"o4", "o5", "o6", "o7", "o8"}),
)
def test_token_on_codeable_concept(client: httpx.Client, query: str, expected: set[str]) -> None:
    assert ids(client, "Observation", query) == expected


@_cases(
    ("birthdate=1970", {"p2", "p3"}), ("birthdate=1970-06", {"p2"}), ("birthdate=1970-06-01", {"p2"}),
    ("birthdate=1974-12-25", {"p1"}), ("birthdate=ge1974-12-25", {"p1", "p5"}),
    ("birthdate=gt1974-12-25", {"p5"}), ("birthdate=le1974-12-25", {"p1", "p2", "p3"}),
    ("birthdate=lt1974-12-25", {"p2", "p3"}), ("birthdate=lt1970-06-01", {"p3"}),
    ("birthdate=gt1970-06-01", {"p1", "p3", "p5"}), ("birthdate=ge1980-01-01", {"p5"}),
    ("birthdate=le1979-12-31", {"p1", "p2", "p3"}), ("birthdate=sa1974", {"p5"}),
    ("birthdate=eb1971", {"p2", "p3"}), ("birthdate=ge1970&birthdate=lt1980", {"p1", "p2", "p3"}),
)
def test_date_precision_on_birthdate(client: httpx.Client, query: str, expected: set[str]) -> None:
    """`1970` is a whole year: inside the search year, but not inside the day 1970-06-01."""
    assert ids(client, "Patient", query) == expected


def test_date_ne_excludes_values_inside_the_range(client: httpx.Client) -> None:
    # p4 has no birth date: whether `ne` matches a missing value is left open.
    assert ids(client, "Patient", "birthdate=ne1970") - {"p4"} == {"p1", "p5"}


@_cases(
    ("date=2024-03-05", {"o1", "o2"}), ("date=eq2024-03-05", {"o1", "o2"}),
    ("date=gt2024-03-05", {"o3", "o5", "o7", "o8"}), ("date=lt2024-03-05", {"o4", "o6", "o7"}),
    ("date=ge2024-03-05", {"o1", "o2", "o3", "o5", "o7", "o8"}),
    ("date=le2024-03-05", {"o1", "o2", "o4", "o6", "o7"}),
    ("date=sa2024-03-05", {"o3", "o8"}), ("date=eb2024-03-05", {"o6"}),
    ("date=ne2024-03-05", {"o3", "o4", "o5", "o6", "o7", "o8"}), ("date=ne2024", {"o5", "o8"}),
    ("date=2024-03-05T09:00:00Z", {"o1"}), ("date=2024-03-05T10:00:00Z", set()),
    ("date=2024-03-05T10:00:00+01:00", {"o1"}), ("date=2024-03-05T09:00Z", {"o1"}),
    ("date=2024-01-01", {"o6"}), ("date=2023", set()),
)
def test_date_ranges_periods_and_time_zones_on_observation(
    client: httpx.Client, query: str, expected: set[str]
) -> None:
    """o1 10:00+01:00; o2 the day; o3 the next day 00:30Z; o4 a period 22:00Z the day before to 02:00Z;
    o5 from 12:00Z with no end; o6 2023-12-31T23:30-02:00 (2024 in UTC); o7 the month; o8 in 2025."""
    assert ids(client, "Observation", query) == expected


def test_date_approximately(client: httpx.Client) -> None:
    found = ids(client, "Observation", "date=ap2024-03-05")
    assert {"o1", "o2", "o4", "o7"} <= found
    assert "o8" not in found  # ten months later


@_cases(
    ("date=2024-03-05", {"e1"}), ("date=lt2024-03-05", {"e2"}), ("date=gt2024-03-05", {"e2"}),
    ("date=ge2024-03-05", {"e1", "e2"}), ("date=eb2024-03-06", {"e1"}), ("date=sa2024-03-04", {"e1"}),
)
def test_date_on_encounter_period(client: httpx.Client, query: str, expected: set[str]) -> None:
    """e1 08:00Z-09:00Z on the day; e2 from 20:00Z the day before, still open."""
    assert ids(client, "Encounter", query) == expected


@_cases(
    ("probability=0.25", {"r1", "r2"}), ("probability=0.256", {"r3"}), ("probability=0.8", {"r4"}),
    ("probability=gt0.25", {"r2", "r3", "r4"}), ("probability=ge0.25", {"r1", "r2", "r3", "r4"}),
    ("probability=lt0.256", {"r1", "r2"}), ("probability=le0.254", {"r1", "r2"}),
    ("probability=ne0.25", {"r3", "r4"}),
)
def test_number_precision_and_prefixes(client: httpx.Client, query: str, expected: set[str]) -> None:
    """`0.25` means [0.245, 0.255); with gt/ge/lt/le the value is exact."""
    assert ids(client, "RiskAssessment", query) == expected


@_cases(
    ("value-quantity=100", {"o3", "o4"}), ("value-quantity=100.4", {"o4"}),
    ("value-quantity=gt100", {"o4", "o5"}), ("value-quantity=ge100", {"o3", "o4", "o5"}),
    ("value-quantity=lt100", {"o6", "o7", "o8"}), ("value-quantity=le100", {"o3", "o6", "o7", "o8"}),
    (f"value-quantity=5.4|{UCUM}|mg", {"o6"}), ("value-quantity=5.4||mg", {"o6", "o7"}),
    (f"value-quantity=100|{UCUM}|cm", {"o4"}), ("value-quantity=100||mm[Hg]", {"o3"}),
    (f"value-quantity=gt100|{UCUM}|cm", {"o4", "o5"}), ("value-quantity:missing=true", {"o1", "o2"}),
)
def test_quantity(client: httpx.Client, query: str, expected: set[str]) -> None:
    """o3 100 mm[Hg], o4 100.4 cm, o5 100.6 cm, o6 5.4 mg (UCUM), o7 5.4 unit "mg" only, o8 95 cm."""
    assert ids(client, "Observation", query) == expected


def test_quantity_ne(client: httpx.Client) -> None:
    # o1 and o2 have components but no value: whether `ne` matches a missing value is left open.
    assert ids(client, "Observation", "value-quantity=ne100") - {"o1", "o2"} == {"o5", "o6", "o7", "o8"}


@_cases(
    ("subject=Patient/{RUN}-p1", {"o1", "o3", "o6"}), ("subject={RUN}-p1", {"o1", "o3", "o6"}),
    ("subject={BASE}/Patient/{RUN}-p1", {"o1", "o3", "o6"}), ("subject:Patient={RUN}-p1", {"o1", "o3", "o6"}),
    ("patient=Patient/{RUN}-p1", {"o1", "o3", "o6"}), ("patient={RUN}-p1", {"o1", "o3", "o6"}),
    ("subject:Group={RUN}-p1", set()), ("subject=Patient/{RUN}-p1,Patient/{RUN}-p3", {"o1", "o3", "o5", "o6"}),
    ("subject:identifier=urn:mrn|A1", {"o7"}), ("subject:missing=true&_id={RUN}-o3,{RUN}-o8", {"o8"}),
    ("subject:missing=false&_id={RUN}-o3,{RUN}-o8", {"o3"}),
)
def test_reference(client: httpx.Client, server: ServerProcess, query: str, expected: set[str]) -> None:
    assert ids(client, "Observation", query.format(RUN=RUN, BASE=f"{server.url}/fhir")) == expected


def test_reference_on_other_types(client: httpx.Client) -> None:
    assert ids(client, "Encounter", f"patient={rid('p2')}") == {"e2"}
    assert ids(client, "Encounter", f"subject=Patient/{rid('p1')}") == {"e1"}


@_cases(
    ("birthdate:missing=true", {"p4"}), ("birthdate:missing=false", {"p1", "p2", "p3", "p5"}),
    ("name:missing=true", {"p4"}), ("name:missing=false", {"p1", "p2", "p3", "p5"}),
    ("gender:missing=true", {"p4"}),
)
def test_missing(client: httpx.Client, query: str, expected: set[str]) -> None:
    assert ids(client, "Patient", query) == expected


@_cases(
    ("url=http://example.org/fhir/vs/a", {"vs1"}), ("url=http://example.org/fhir/vs", set()),
    ("url:below=http://example.org/fhir", {"vs1", "vs2"}), ("url:above=http://example.org/fhir/vs/a/b", {"vs1"}),
    ("url:above=http://example.org/fhir/vs/a/b/c/d", {"vs1", "vs2"}), ("url:below=http://other.org", {"vs3"}),
)
def test_uri(client: httpx.Client, query: str, expected: set[str]) -> None:
    assert ids(client, "ValueSet", query) == expected


@_cases(
    (f"component-code-value-quantity={LOINC}|8480-6$gt140", {"o1"}),
    (f"component-code-value-quantity={LOINC}|8462-4$gt140", {"o2"}),
    ("component-code-value-quantity=8480-6$lt130", {"o2"}),
    (f"code-value-quantity={LOINC}|8302-2$lt100", {"o8"}),
    (f"code-value-quantity={LOINC}|8302-2$gt100", {"o4", "o5"}),
    (f"code-value-quantity={LOINC}|8480-6$gt140", set()),
)
def test_composite_binds_both_parts_to_one_element(client: httpx.Client, query: str, expected: set[str]) -> None:
    """o1 is 150/95 and o2 120/150: o2 has a value over 140, but not on its systolic component."""
    assert ids(client, "Observation", query) == expected


def test_id_tag_profile_security_source(client: httpx.Client) -> None:
    assert ids(client, "Patient", f"_id={rid('p1')},{rid('p2')}") == {"p1", "p2"}
    assert ids(client, "Patient", f"_tag={RUN}") == {"p1", "p2", "p3", "p4", "p5"}
    assert ids(client, "Patient", "_tag=urn:test|not-this-run") == set()
    assert ids(client, "Patient", f"_profile={PROFILE}") == {"p1"}
    assert ids(client, "Patient", f"_security={CONFIDENTIALITY}|R") == {"p2"}
    assert ids(client, "Patient", "_security=R") == {"p2"}
    assert ids(client, "Patient", f"_source={SOURCE}") == {"p3"}


def test_last_updated(client: httpx.Client, stored: dict[str, dict]) -> None:
    """Patients were written one after the other, p1 first; instants have milliseconds."""
    third = stored["p3"]["meta"]["lastUpdated"]
    assert ids(client, "Patient", f"_lastUpdated=gt{third}") == {"p4", "p5"}
    assert ids(client, "Patient", f"_lastUpdated=le{third}") == {"p1", "p2", "p3"}
    assert ids(client, "Patient", f"_lastUpdated={third}") == {"p3"}
    assert ids(client, "Patient", f"_lastUpdated=ge{third[:4]}") == {"p1", "p2", "p3", "p4", "p5"}


@_cases(
    ("gender=male,female", {"p1", "p2", "p3"}), ("name=pet&gender=female", set()),
    ("name=pet,anna&gender=female", {"p2"}), ("gender=female&birthdate=1970-06-01", {"p2"}),
)
def test_comma_is_or_and_repetition_is_and(client: httpx.Client, query: str, expected: set[str]) -> None:
    assert ids(client, "Patient", query) == expected


@pytest.mark.parametrize(("path", "query"), [
    ("Patient", "birthdate=notadate"), ("Patient", "birthdate=zz2024"), ("Observation", "date=2024-13-01"),
    ("Observation", "value-quantity=gtabc"), ("RiskAssessment", "probability=abc"),
    ("Patient", "gender:sounds=male"),
])
def test_invalid_values_are_400(client: httpx.Client, path: str, query: str) -> None:
    assert_outcome(search(client, path, query), 400)
