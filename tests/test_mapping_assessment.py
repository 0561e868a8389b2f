"""mappings.assessment: the assessment system's records to transaction entries, against golden files,
the server's validator and the R4B models; every way a record is refused.

Pure: no server, no database. `UPDATE_GOLDEN=1` writes the golden files again (review the diff).
"""

import json
import re
from pathlib import Path
from typing import Any

import pytest
from golden import PLACEHOLDER, assert_golden, code_systems_used, first_identifier, normalised, valid
from pydantic import ValidationError

from fhir_server import fhir_json
from mappings import assessment, records
from mappings.assessment import KINDS, bundle_entries

DATA = Path(__file__).parent / "data" / "assessment"
SOURCE = "urn:fhir-server:source:assessment"


def sample() -> dict[str, list[dict[str, Any]]]:
    return fhir_json.loads((DATA / "assessment.json").read_bytes())


def first(kind: str, **changes: Any) -> dict[str, Any]:
    """The sample's first record of `kind`; a change to None leaves the field out."""
    record = {**sample()[kind][0], **changes}
    return {key: value for key, value in record.items() if value is not None}


def entries_of(kind: str, source: dict[str, Any]) -> list[dict[str, Any]]:
    return bundle_entries(kind, KINDS[kind].model_validate(source))


def as_csv_row(source: dict[str, Any]) -> dict[str, str]:
    """A record as a CSV file of its kind gives it: every cell text, lists as JSON, blanks empty."""
    return {
        key: json.dumps(value) if isinstance(value, list) else "" if value is None else str(value)
        for key, value in source.items()
    }


def all_records() -> list[tuple[str, dict[str, Any]]]:
    return [(kind, source) for kind, sources in sample().items() for source in sources]


# --- golden ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_golden(kind: str) -> None:
    assert_golden(normalised(valid(entries_of(kind, first(kind)))), DATA / "golden" / f"{kind}.json")


def test_sample_file() -> None:
    data = sample()
    assert list(data) == list(KINDS)
    assert len(data["patient"]) >= 3 and len(data["assessment"]) >= 4


@pytest.mark.parametrize(("kind", "source"), all_records(), ids=[s["id"] for _, s in all_records()])
def test_every_record_validates_and_maps_alike_from_csv(kind: str, source: dict[str, Any]) -> None:
    entries = valid(entries_of(kind, source))
    assert normalised(valid(entries_of(kind, as_csv_row(source)))) == normalised(entries)


# --- the shape of every record's transaction ------------------------------------------------------


@pytest.mark.parametrize(("kind", "source"), all_records(), ids=[s["id"] for _, s in all_records()])
def test_conditional_creates_and_references_to_earlier_kinds(kind: str, source: dict[str, Any]) -> None:
    entries = entries_of(kind, source)
    full_urls = {entry["fullUrl"] for entry in entries}
    assert all(PLACEHOLDER.fullmatch(url) for url in full_urls) and len(full_urls) == len(entries)
    for entry in entries:
        resource = entry["resource"]
        if resource["resourceType"] == "Questionnaire":  # shared by the assessments of a type: made once
            assert entry["request"] == {"method": "POST", "url": "Questionnaire", "ifNoneExist": f"url={resource['url']}"}
            continue
        identifier = first_identifier(resource)
        assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}?{records.identifier_query(identifier)}"}
        assert identifier["system"].startswith(f"{SOURCE}:")
        assert identifier["value"].split(":")[0] == source["id"]
    earlier = list(KINDS)[: list(KINDS).index(kind)]
    for reference in re.findall(r'"reference":"([^"]+)"', fhir_json.dumps(entries).decode()):
        if reference.startswith("urn:uuid:"):
            assert reference in full_urls
        else:
            resource_type, query = reference.split("?")
            referred_kind = query.removeprefix(f"identifier={SOURCE}:").split("|")[0]
            assert referred_kind in earlier and resource_type == referred_kind.capitalize()


def test_mapping_is_deterministic() -> None:
    source = first("assessment")
    assert normalised(entries_of("assessment", source)) == normalised(entries_of("assessment", source))


def test_code_systems() -> None:
    mapped = [entries_of(kind, source) for kind, source in all_records()]
    used = code_systems_used(assessment.CODE_SYSTEMS, mapped)
    assert {code for _, code, _ in used} == {"item-score", "total-score"}


def test_a_record_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="Not a record"):
        bundle_entries("patient", KINDS["practitioner"].model_validate(first("practitioner")))


# --- practitioners and patients -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "human_name"),
    [
        ("Kim", {"text": "Kim", "family": "Kim"}),
        ("Jane  Marie Doe", {"text": "Jane  Marie Doe", "family": "Doe", "given": ["Jane", "Marie"]}),
    ],
)
def test_names(name: str, human_name: dict[str, Any]) -> None:
    [entry] = valid(entries_of("patient", first("patient", name=name)))
    assert entry["resource"]["name"] == [human_name]


def test_practitioner_without_contact_or_title() -> None:
    [entry] = valid(entries_of("practitioner", {"id": "PR-9", "name": "Ann Lee"}))
    assert set(entry["resource"]) == {"resourceType", "identifier", "name"}


@pytest.mark.parametrize(
    ("contact", "telecom"),
    [
        ("+44 7700 900123", [{"system": "phone", "value": "+44 7700 900123"}]),
        ("omar@example.org", [{"system": "email", "value": "omar@example.org"}]),
        (None, None),
    ],
)
def test_patient_contact(contact: str | None, telecom: list[dict[str, str]] | None) -> None:
    [entry] = valid(entries_of("patient", first("patient", contact=contact)))
    assert entry["resource"].get("telecom") == telecom


# --- medications and allergies --------------------------------------------------------------------


def test_stopped_medication() -> None:
    source = sample()["medication"][1]
    [entry] = valid(entries_of("medication", source))
    statement = entry["resource"]
    assert statement["status"] == "stopped"
    assert statement["effectivePeriod"] == {"start": "2023-11-01", "end": "2023-12-15"}
    assert statement["dosage"] == [{"text": "3.75 mg at night when needed", "route": {"text": "oral"}}]


@pytest.mark.parametrize("status", ["active", "inactive", "resolved"])
@pytest.mark.parametrize("severity", ["mild", "moderate", "severe"])
def test_allergy_status_and_severity(status: str, severity: str) -> None:
    [entry] = valid(entries_of("allergy", first("allergy", status=status, severity=severity)))
    allergy = entry["resource"]
    assert allergy["clinicalStatus"]["coding"][0]["code"] == status
    assert allergy["clinicalStatus"]["coding"][0]["system"] == assessment.CLINICAL_STATUS_SYSTEM
    assert allergy["verificationStatus"] == assessment.CONFIRMED
    assert allergy["reaction"][0]["severity"] == severity


# --- assessments ----------------------------------------------------------------------------------


def test_assessment_types_share_one_questionnaire() -> None:
    urls = {}
    for source in sample()["assessment"]:
        questionnaire, response, *_ = entries_of("assessment", source)
        assert response["resource"]["questionnaire"] == questionnaire["resource"]["url"]
        urls.setdefault(source["type"], set()).add(questionnaire["resource"]["url"])
    assert urls == {
        "PHQ-2": {"https://fhir-server.local/Questionnaire/phq-2"},
        "GAD-7": {"https://fhir-server.local/Questionnaire/gad-7"},
        "Falls risk screening": {"https://fhir-server.local/Questionnaire/falls-risk-screening"},
    }


@pytest.mark.parametrize(
    ("assessment_type", "slug", "name"),
    [
        ("PHQ-9", "phq-9", "PHQ9"),
        ("  Mini-Mental State  Exam ", "mini-mental-state-exam", "MiniMentalStateExam"),
        ("Échelle de Borg", "echelle-de-borg", "EchelleDeBorg"),
        ("6-minute walk", "6-minute-walk", "Q6MinuteWalk"),
    ],
)
def test_questionnaire_url_and_name(assessment_type: str, slug: str, name: str) -> None:
    [questionnaire, *_] = valid(entries_of("assessment", first("assessment", type=assessment_type)))
    assert questionnaire["resource"]["url"] == f"https://fhir-server.local/Questionnaire/{slug}"
    assert questionnaire["resource"]["name"] == name
    assert questionnaire["resource"]["title"] == assessment_type.strip()


def test_scores_derive_from_the_response() -> None:
    source = sample()["assessment"][1]  # GAD-7, seven scored items and a total
    questionnaire, response, *scores = valid(entries_of("assessment", source))
    assert len(scores) == 8
    for n, (entry, item) in enumerate(zip(scores, source["items"], strict=False), 1):
        observation = entry["resource"]
        assert observation["valueInteger"] == item["score"]
        assert observation["code"]["text"] == f"GAD-7: {item['question']}"
        assert observation["identifier"][0]["value"] == f"ASM-002:item:{n}"
        assert observation["derivedFrom"] == [{"reference": response["fullUrl"]}]
    total = scores[-1]["resource"]
    assert (total["valueInteger"], total["code"]["coding"][0]["code"]) == (11, "total-score")
    assert total["identifier"][0]["value"] == "ASM-002:total"
    assert [item["linkId"] for item in response["resource"]["item"]] == [f"q{n}" for n in range(1, 8)]
    assert [item["linkId"] for item in questionnaire["resource"]["item"]] == [f"q{n}" for n in range(1, 8)]


def test_unscored_assessment_has_no_observations() -> None:
    source = sample()["assessment"][3]  # falls risk screening: answers only
    entries = valid(entries_of("assessment", source))
    assert [entry["resource"]["resourceType"] for entry in entries] == [
        "Questionnaire",
        "QuestionnaireResponse",
    ]


def test_only_scored_items_give_observations() -> None:
    items = [{"question": "A", "answer": "yes", "score": 2}, {"question": "B", "answer": "no"}]
    entries = valid(entries_of("assessment", first("assessment", items=items, total_score=None)))
    assert [entry["resource"]["identifier"][0]["value"] for entry in entries[2:]] == ["ASM-001:item:1"]


@pytest.mark.parametrize(
    ("given", "fhir"),
    [("2024-03-06", "2024-03-06"), ("2024-01-10T10:30:00Z", "2024-01-10T10:30:00+00:00")],
)
def test_assessment_dates(given: str, fhir: str) -> None:
    _, response, *scores = valid(entries_of("assessment", first("assessment", date=given)))
    assert response["resource"]["authored"] == fhir
    assert {entry["resource"]["effectiveDateTime"] for entry in scores} == {fhir}


# --- rejections -----------------------------------------------------------------------------------

REJECTIONS = [
    ("practitioner", {"id": None}, ("id",), "Field required"),
    ("practitioner", {"name": " "}, ("name",), "Field required"),
    ("practitioner", {"email": "okafor at clinic"}, ("email",), "not an e-mail address"),
    ("practitioner", {"speciality": "psychiatry"}, ("speciality",), "Extra inputs"),
    ("patient", {"name": None}, ("name",), "Field required"),
    ("patient", {"birth_date": None}, ("birth_date",), "Field required"),
    ("patient", {"birth_date": "1980-02-30"}, ("birth_date",), "day is out of range"),
    ("patient", {"birth_date": "29/02/1980"}, ("birth_date",), "not a date (YYYY-MM-DD)"),
    ("patient", {"birth_date": "1980-02-29T00:00:00Z"}, ("birth_date",), "not a date (YYYY-MM-DD)"),
    ("patient", {"sex": "F"}, ("sex",), "'male', 'female', 'other' or 'unknown'"),
    ("patient", {"contact": "jane@"}, ("contact",), "not an e-mail address"),
    ("medication", {"patient_id": None}, ("patient_id",), "Field required"),
    ("medication", {"dose": None}, ("dose",), "Field required"),
    ("medication", {"status": "paused"}, ("status",), "'active' or 'stopped'"),
    ("medication", {"start_date": "2024-13-01"}, ("start_date",), "month must be in 1..12"),
    ("medication", {"end_date": "2024-01-09"}, ("end_date",), "before start_date 2024-01-10"),
    ("allergy", {"substance": None}, ("substance",), "Field required"),
    ("allergy", {"severity": "life-threatening"}, ("severity",), "'mild', 'moderate' or 'severe'"),
    ("allergy", {"status": "confirmed"}, ("status",), "'active', 'inactive' or 'resolved'"),
    ("assessment", {"practitioner_id": None}, ("practitioner_id",), "Field required"),
    ("assessment", {"date": "2024-01-10T10:30:00"}, ("date",), "no UTC offset"),
    ("assessment", {"date": "yesterday"}, ("date",), "not a date"),
    ("assessment", {"type": "--"}, ("type",), "no letter or digit"),
    ("assessment", {"items": None}, ("items",), "Field required"),
    ("assessment", {"items": "[]"}, ("items",), "at least 1 item"),
    (
        "assessment",
        {"items": '[{"question": "A", "answer": "yes", "score": 1}'},
        ("items",),
        "not valid JSON",
    ),
    ("assessment", {"items": '[{"question": "A", "score": 1}]'}, ("items", 0, "answer"), "Field required"),
    (
        "assessment",
        {"items": '[{"question": "A", "answer": "yes", "score": "high"}]'},
        ("items", 0, "score"),
        "valid integer",
    ),
    ("assessment", {"total_score": "5.5"}, ("total_score",), "valid integer"),
]


@pytest.mark.parametrize(
    ("kind", "change", "loc", "message"), REJECTIONS, ids=[f"{r[0]}-{r[1]}"[:60] for r in REJECTIONS]
)
def test_rejections_name_the_field(
    kind: str, change: dict[str, Any], loc: tuple[Any, ...], message: str
) -> None:
    source = {**first(kind), **change}
    source = {key: value for key, value in source.items() if value is not None}
    with pytest.raises(ValidationError) as caught:
        KINDS[kind].model_validate(source)
    [error] = caught.value.errors()
    assert error["loc"] == loc
    assert message in error["msg"]
    assert str(loc[0]) in str(caught.value)
