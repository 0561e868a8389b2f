"""mappings.interactions: interaction records to transaction entries, against golden files, the
server's validator and the R4B models; every way a record is refused.

Pure: no server, no database. `UPDATE_GOLDEN=1` writes the golden files again (review the diff).
"""

import csv
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from golden import PLACEHOLDER, assert_golden, code_systems_used, first_identifier, normalised, valid
from pydantic import ValidationError

from fhir_server import fhir_json
from mappings import interactions, records
from mappings.interactions import INSURANCE_SYSTEM, LABEL_SYSTEM, Interaction, bundle_entries

DATA = Path(__file__).parent / "data" / "interactions"
LOINC = "http://loinc.org"
MINIMAL = {
    "insurance_no": "123",
    "id": "X-1",
    "ailment": "Cough",
    "interaction_date": "2024-03-05",
    "label": "general",
}


def json_records() -> list[dict[str, Any]]:
    return fhir_json.loads((DATA / "interactions.json").read_bytes())["interaction"]


def csv_records() -> list[dict[str, str]]:
    with open(DATA / "interactions.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def entries_of(source: dict[str, Any]) -> list[dict[str, Any]]:
    return bundle_entries("interaction", Interaction.model_validate(source))


def resources(entries: list[dict[str, Any]], resource_type: str) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in entries if entry["resource"]["resourceType"] == resource_type]


def by_identifier(entries: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    """The resource whose source identifier ends with `:<suffix>`."""
    for entry in entries:
        identifier = first_identifier(entry["resource"])
        if identifier and identifier["value"].endswith(f":{suffix}"):
            return entry["resource"]
    raise AssertionError(f"no resource with identifier …:{suffix}")


# --- golden ---------------------------------------------------------------------------------------


def test_golden_interaction() -> None:
    assert_golden(normalised(valid(entries_of(json_records()[0]))), DATA / "golden" / "interaction.json")


def test_sample_files() -> None:
    sources = json_records()
    assert len(sources) >= 12
    assert len({source["insurance_no"] for source in sources}) == 3
    assert len({source["label"] for source in sources}) == 3
    assert [row["id"] for row in csv_records()] == [source["id"] for source in sources]


@pytest.mark.parametrize("index", range(len(json_records())))
def test_json_and_csv_records_map_alike_and_validate(index: int) -> None:
    from_json = valid(entries_of(json_records()[index]))
    from_csv = valid(entries_of(csv_records()[index]))
    assert normalised(from_csv) == normalised(from_json)


# --- the shape of every record's transaction ------------------------------------------------------


@pytest.mark.parametrize("source", json_records(), ids=lambda source: source["id"])
def test_every_resource_is_conditional_linked_and_tagged(source: dict[str, Any]) -> None:
    entries = entries_of(source)
    full_urls = [entry["fullUrl"] for entry in entries]
    assert all(PLACEHOLDER.fullmatch(url) for url in full_urls) and len(set(full_urls)) == len(full_urls)
    patient, encounter = entries[0], entries[1]
    assert patient["resource"] == {
        "resourceType": "Patient",
        "identifier": [
            {
                "type": interactions.MEMBER_NUMBER,
                "system": INSURANCE_SYSTEM,
                "value": source["insurance_no"],
            }
        ],
    }
    assert patient["request"]["ifNoneExist"] == f"identifier={INSURANCE_SYSTEM}|{source['insurance_no']}"
    assert encounter["resource"]["resourceType"] == "Encounter"
    tag = {"system": LABEL_SYSTEM, "code": source["label"], "display": source["label"]}
    identifier_values = set()
    for entry in entries:
        resource = entry["resource"]
        identifier = first_identifier(resource)
        if resource["resourceType"] == "Patient":  # found or created by the insurance number, never changed
            assert entry["request"] == {"method": "POST", "url": "Patient", "ifNoneExist": records.identifier_query(identifier)}
        else:
            assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}?{records.identifier_query(identifier)}"}
        identifier_values.add((identifier["system"], identifier["value"]))
        if entry is patient:
            continue
        assert identifier["system"].startswith("urn:fhir-server:source:interactions:")
        assert identifier["value"].split(":")[0] == source["id"]
        assert resource["meta"]["tag"] == [tag]
        assert resource["subject"] == {"reference": patient["fullUrl"]}
        if entry is not encounter:
            assert resource["encounter"] == {"reference": encounter["fullUrl"]}
    assert len(identifier_values) == len(entries)


def test_mapping_is_deterministic() -> None:
    source = json_records()[0]
    assert normalised(entries_of(source)) == normalised(entries_of(source))


def test_optional_parts_left_out() -> None:
    entries = valid(entries_of(MINIMAL))
    assert [entry["resource"]["resourceType"] for entry in entries] == ["Patient", "Encounter"]
    assert entries[1]["resource"]["period"] == {"start": "2024-03-05", "end": "2024-03-05"}
    assert entries[1]["resource"]["reasonCode"] == [{"text": "Cough"}]


def test_resources_by_part_of_the_record() -> None:
    entries = valid(entries_of(json_records()[0]))
    counts = {
        kind: len(resources(entries, kind))
        for kind in ("QuestionnaireResponse", "CarePlan", "ClinicalImpression")
    }
    assert counts == {"QuestionnaireResponse": 1, "CarePlan": 1, "ClinicalImpression": 1}
    assert len(resources(entries, "Observation")) == 2 + 10 + 1  # symptoms, metrics, health status


# --- symptoms and metrics -------------------------------------------------------------------------


def test_symptoms_as_comma_separated_text_or_json_without_repeats() -> None:
    for symptoms in ("fever, Cough ,, fever", '["fever", "Cough", "Fever"]', ["fever", "Cough", "FEVER"]):
        entries = valid(entries_of({**MINIMAL, "symptoms": symptoms}))
        observations = resources(entries, "Observation")
        assert [o["code"] for o in observations] == [{"text": "fever"}, {"text": "Cough"}]
        assert all(
            o["valueBoolean"] is True and o["category"] == [interactions.EXAM_CATEGORY] for o in observations
        )
        assert [o["identifier"][0]["value"] for o in observations] == [
            "X-1:symptom:fever",
            "X-1:symptom:cough",
        ]


VITALS = [
    ("heart_rate", 72, ["8867-4"], "/min", "heartrate"),
    ("Heart Rate", 72, ["8867-4"], "/min", "heartrate"),
    ("pulse", 61, ["8867-4"], "/min", "heartrate"),
    ("respiratory_rate", 16, ["9279-1"], "/min", "resprate"),
    ("temperature", Decimal("37.20"), ["8310-5"], "Cel", "bodytemp"),
    ("body-temperature", "38.5", ["8310-5"], "Cel", "bodytemp"),
    ("weight", 70, ["29463-7"], "kg", "bodyweight"),
    ("height", 175, ["8302-2"], "cm", "bodyheight"),
    ("spo2", 98, ["2708-6", "59408-5"], "%", "oxygensat"),
    ("oxygen_saturation", 97, ["2708-6", "59408-5"], "%", "oxygensat"),
    ("bmi", Decimal("22.9"), ["39156-5"], "kg/m2", "bmi"),
]


@pytest.mark.parametrize(("name", "value", "codes", "ucum", "profile"), VITALS)
def test_vital_signs(name: str, value: object, codes: list[str], ucum: str, profile: str) -> None:
    [observation] = resources(valid(entries_of({**MINIMAL, "metrics": {name: value}})), "Observation")
    assert [coding["code"] for coding in observation["code"]["coding"]] == codes
    assert {coding["system"] for coding in observation["code"]["coding"]} == {LOINC}
    assert observation["category"] == [interactions.VITAL_SIGNS_CATEGORY]
    assert observation["meta"]["profile"] == [f"http://hl7.org/fhir/StructureDefinition/{profile}"]
    quantity = observation["valueQuantity"]
    expected = Decimal(value) if isinstance(value, str) else value
    assert (quantity["value"], quantity["system"], quantity["code"]) == (
        expected,
        "http://unitsofmeasure.org",
        ucum,
    )
    assert observation["identifier"] == [
        records.source_identifier("interactions", "observation", f"X-1:metric:{name}")
    ]
    assert observation["effectiveDateTime"] == "2024-03-05"


def test_decimals_keep_their_digits_from_csv_json() -> None:
    [observation] = resources(entries_of({**MINIMAL, "metrics": '{"temperature": 37.20}'}), "Observation")
    assert fhir_json.dumps(observation["valueQuantity"]["value"]) == b"37.20"


def test_blood_pressure_panel() -> None:
    [observation] = resources(
        valid(entries_of({**MINIMAL, "metrics": {"blood_pressure": " 120 / 80 "}})), "Observation"
    )
    assert observation["code"]["coding"][0]["code"] == "85354-9"
    assert not any(key.startswith("value") for key in observation)
    mm_hg = {"unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
    assert [(c["code"]["coding"][0]["code"], c["valueQuantity"]) for c in observation["component"]] == [
        ("8480-6", {"value": 120, **mm_hg}),
        ("8462-4", {"value": 80, **mm_hg}),
    ]
    assert observation["meta"]["profile"] == ["http://hl7.org/fhir/StructureDefinition/bp"]


@pytest.mark.parametrize(
    ("name", "value", "element"),
    [
        ("pain_score", 2, {"valueQuantity": {"value": 2}}),
        ("cholesterol_total", Decimal("6.4"), {"valueQuantity": {"value": Decimal("6.4")}}),
        ("mood", "anxious", {"valueString": "anxious"}),
        ("smoker", False, {"valueBoolean": False}),
        ("blood_pressure", "high", {"valueString": "high"}),  # not systolic/diastolic: kept as it came
        ("blood_pressure", 120, {"valueQuantity": {"value": 120}}),
        ("temperature", "normal", {"valueString": "normal"}),  # a vital sign without a number
        ("heart_rate", True, {"valueBoolean": True}),
    ],
)
def test_other_metrics_kept_as_they_came(name: str, value: object, element: dict[str, Any]) -> None:
    [observation] = resources(valid(entries_of({**MINIMAL, "metrics": {name: value}})), "Observation")
    assert observation["code"] == {"text": name}
    assert "category" not in observation and "profile" not in observation["meta"]
    assert {key: v for key, v in observation.items() if key.startswith("value")} == element


def test_metrics_without_a_value_are_left_out() -> None:
    entries = entries_of({**MINIMAL, "metrics": '{"weight": null, "height": " ", "spo2": 98}'})
    assert [o["identifier"][0]["value"] for o in resources(entries, "Observation")] == ["X-1:metric:spo2"]


# --- health status, Q&A, next steps, remarks ------------------------------------------------------


def test_health_status() -> None:
    [observation] = resources(valid(entries_of({**MINIMAL, "health_status": "improving"})), "Observation")
    assert observation["code"]["coding"] == [
        {"system": interactions.OBSERVATION_CODES, "code": "health-status", "display": "Health status"}
    ]
    assert observation["valueString"] == "improving"
    assert observation["identifier"][0]["value"] == "X-1:health-status"


def test_questions_and_answers() -> None:
    qa = [{"question": "Pain?", "answer": 3}, {"question": "Where?", "answer": "Left knee"}]
    [response] = resources(valid(entries_of({**MINIMAL, "qa": qa})), "QuestionnaireResponse")
    assert response["status"] == "completed" and "questionnaire" not in response
    assert response["identifier"] == records.source_identifier(
        "interactions", "questionnaire-response", "X-1"
    )
    assert response["item"] == [
        {"linkId": "q1", "text": "Pain?", "answer": [{"valueString": "3"}]},
        {"linkId": "q2", "text": "Where?", "answer": [{"valueString": "Left knee"}]},
    ]


@pytest.mark.parametrize(
    ("next_steps", "steps"),
    [
        ("Recheck in 3 months", ["Recheck in 3 months"]),
        ("Rest\n\n  Fluids  \n", ["Rest", "Fluids"]),
        ('["Rest", "Fluids"]', ["Rest", "Fluids"]),
        (["Rest", "Fluids"], ["Rest", "Fluids"]),
    ],
)
def test_next_steps(next_steps: object, steps: list[str]) -> None:
    [plan] = resources(valid(entries_of({**MINIMAL, "next_steps": next_steps})), "CarePlan")
    assert (plan["status"], plan["intent"], plan["created"]) == ("active", "plan", "2024-03-05")
    assert plan["activity"] == [{"detail": {"status": "not-started", "description": step}} for step in steps]


def test_remarks() -> None:
    [impression] = resources(
        valid(entries_of({**MINIMAL, "remarks": "Line one.\nLine two."})), "ClinicalImpression"
    )
    assert (impression["status"], impression["summary"]) == ("completed", "Line one.\nLine two.")
    assert impression["effectiveDateTime"] == "2024-03-05"


@pytest.mark.parametrize(
    ("given", "fhir"),
    [
        ("2024-03-05", "2024-03-05"),
        ("2024-03-05T09:30:00+01:00", "2024-03-05T09:30:00+01:00"),
        ("2024-03-05T09:30Z", "2024-03-05T09:30:00+00:00"),
        ("2024-03-05 09:30:15.250-05:00", "2024-03-05T09:30:15.250000-05:00"),
    ],
)
def test_dates(given: str, fhir: str) -> None:
    [_, encounter] = valid(entries_of({**MINIMAL, "interaction_date": given}))
    assert encounter["resource"]["period"] == {"start": fhir, "end": fhir}


def test_label_whitespace_collapsed_for_the_tag_code() -> None:
    [_, encounter] = valid(entries_of({**MINIMAL, "label": "  follow   up "}))
    assert encounter["resource"]["meta"]["tag"] == [
        {"system": LABEL_SYSTEM, "code": "follow up", "display": "follow up"}
    ]


def test_code_systems() -> None:
    assert code_systems_used(interactions.CODE_SYSTEMS, [entries_of(source) for source in json_records()])


def test_a_record_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="Not a record"):
        bundle_entries("assessment", Interaction.model_validate(MINIMAL))


# --- rejections -----------------------------------------------------------------------------------

REJECTIONS = [
    ({"insurance_no": None}, ("insurance_no",), "Field required"),
    ({"id": None}, ("id",), "Field required"),
    ({"ailment": None}, ("ailment",), "Field required"),
    ({"interaction_date": None}, ("interaction_date",), "Field required"),
    ({"label": None}, ("label",), "Field required"),
    ({"label": "   "}, ("label",), "Field required"),  # a blank CSV cell is no value
    ({"insurance_no": ["123"]}, ("insurance_no",), "valid string"),
    ({"colour": "blue"}, ("colour",), "Extra inputs"),
    ({"remarks": "bell\x07"}, ("remarks",), "control characters"),
    ({"interaction_date": "2024-02-30"}, ("interaction_date",), "day is out of range"),
    ({"interaction_date": "05/03/2024"}, ("interaction_date",), "not a date"),
    ({"interaction_date": "2024-03-05T09:30:00"}, ("interaction_date",), "no UTC offset"),
    ({"interaction_date": "2024-03-05T25:30:00Z"}, ("interaction_date",), "not a date"),
    ({"interaction_date": "2024-03-05T09:30:00+15:00"}, ("interaction_date",), "±14:00"),
    ({"interaction_date": 20240305}, ("interaction_date",), "must be a date"),
    ({"metrics": '{"heart_rate": 72,}'}, ("metrics",), "not valid JSON"),
    ({"metrics": "[72]"}, ("metrics",), "valid dictionary"),
    ({"metrics": '{"heart_rate": NaN}'}, ("metrics", "heart_rate"), "finite"),
    ({"metrics": {"heart_rate": [72]}}, ("metrics", "heart_rate"), "a number, a string or a boolean"),
    ({"qa": '[{"question": "Pain?", "answer": "no"]'}, ("qa",), "not valid JSON"),
    ({"qa": '[{"question": "Pain?"}]'}, ("qa", 0, "answer"), "Field required"),
    ({"qa": '[{"question": "Pain?", "answer": "no", "note": "x"}]'}, ("qa", 0, "note"), "Extra inputs"),
    ({"next_steps": '["Rest", '}, ("next_steps",), "not valid JSON"),
    ({"next_steps": [""]}, ("next_steps", 0), "at least 1 character"),
    ({"symptoms": '["fever"'}, ("symptoms",), "not valid JSON"),
    ({"symptoms": {"fever": True}}, ("symptoms",), "valid list"),
]


@pytest.mark.parametrize(("change", "loc", "message"), REJECTIONS, ids=[str(r[0])[:50] for r in REJECTIONS])
def test_rejections_name_the_field(change: dict[str, Any], loc: tuple[Any, ...], message: str) -> None:
    source = {**MINIMAL, **change}
    source = {key: value for key, value in source.items() if value is not None}
    with pytest.raises(ValidationError) as caught:
        Interaction.model_validate(source)
    [error] = caught.value.errors()
    assert error["loc"] == loc
    assert message in error["msg"]
    assert str(loc[0]) in str(caught.value)
