"""The patient assessment system's records to FHIR R4. Pure: no I/O.

Kinds, in import order (each may refer to records of the kinds before it):

- `practitioner` → `Practitioner`: the name as `text`, its last word as `family` and the words before
  it as `given` (so `name=` searches find either); email and phone as `telecom`; the title or
  qualification as `qualification.code.text`.
- `patient` → `Patient`: name as above, `birthDate`, `gender` = sex; contact as `telecom`
  (`email` when it has an `@`, else `phone`).
- `medication` → `MedicationStatement`: status active or stopped, `medicationCodeableConcept.text`
  = name, `effectivePeriod` = start_date – end_date, `dosage.text` = "<dose> <frequency>",
  `dosage.route.text` = route.
- `allergy` → `AllergyIntolerance`: `code.text` = substance, `reaction.manifestation.text` =
  reaction, `reaction.severity`; `clinicalStatus` = status (active, inactive, resolved) from
  `allergyintolerance-clinical`, `verificationStatus` confirmed from `allergyintolerance-verification`
  (the system lists the allergies its clinicians recorded, with no notion of suspected ones).
- `assessment` → a `QuestionnaireResponse` (status completed, `subject` = the Patient, `author` =
  the Practitioner, `authored` = date, one item per question with linkId `q1`, `q2`… in the
  record's order and `answer.valueString`), its `Questionnaire`, and `Observation`s of the scores.
  There is one Questionnaire per assessment type, canonical url `QUESTIONNAIRE_BASE` + the type's
  slug (`PHQ-9` → `…/Questionnaire/phq-9`), created conditionally on that url: the first assessment
  of a type imported defines its items (linkId by position, type string); later ones leave it as it
  is. Each scored item gives an Observation (code `item-score`, `code.text` = "<type>: <question>",
  identifier `<id>:item:<n>` for item `q<n>`), total_score one more (code `total-score`, `code.text`
  = "<type> total score", identifier `<id>:total`): category survey, `valueInteger`, `performer` = the
  Practitioner, `derivedFrom` = the QuestionnaireResponse. Codes from our CodeSystem
  `https://fhir-server.local/CodeSystem/assessment-observation`. A missing total_score is not
  computed from the items.

Every resource has the source record's id as identifier (`urn:fhir-server:source:assessment:<kind>`)
and is written by a conditional update on it (created, updated when the source changed, else
left as it is); records of earlier kinds are referenced by conditional
references on those identifiers (`Patient?identifier=urn:fhir-server:source:assessment:patient|P1`).

Source format: JSON `{"practitioner": [...], "patient": [...], ...}`, or a CSV file per kind (items
as JSON). Dates are YYYY-MM-DD; an assessment's date may have a time, then with its UTC offset.
"""

import re
import unicodedata
from datetime import date, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
)

from mappings import records
from mappings.schema import DATE, EMAIL, SourceRecord, Text, When, check_kind, iso_date, json_text

SYSTEM = "assessment"
QUESTIONNAIRE_BASE = "https://fhir-server.local/Questionnaire/"
OBSERVATION_CODES = "https://fhir-server.local/CodeSystem/assessment-observation"
CLINICAL_STATUS_SYSTEM = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
VERIFICATION_STATUS_SYSTEM = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"

SURVEY = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "survey",
            "display": "Survey",
        }
    ],
    "text": "Survey",
}
CLINICAL_STATUS = {"active": "Active", "inactive": "Inactive", "resolved": "Resolved"}
CONFIRMED = {"coding": [{"system": VERIFICATION_STATUS_SYSTEM, "code": "confirmed", "display": "Confirmed"}]}

CODE_SYSTEMS: list[dict[str, Any]] = [
    {
        "resourceType": "CodeSystem",
        "url": OBSERVATION_CODES,
        "version": "1",
        "name": "AssessmentObservation",
        "title": "Assessment observations",
        "status": "active",
        "experimental": False,
        "description": "Scores the patient assessment system records; the Observation's code.text names "
        "the assessment (and the question).",
        "caseSensitive": True,
        "content": "complete",
        "count": 2,
        "concept": [
            {
                "code": "item-score",
                "display": "Assessment item score",
                "definition": "The score the answer to one question of an assessment earned.",
            },
            {
                "code": "total-score",
                "display": "Assessment total score",
                "definition": "The total score of an assessment, as the assessment system recorded it.",
            },
        ],
    }
]

SCORE_DISPLAYS = {concept["code"]: concept["display"] for concept in CODE_SYSTEMS[0]["concept"]}

# --- the source schema --------------------------------------------------------------------------


def _day(value: object) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    text = value.strip() if isinstance(value, str) else None
    if text is None or not DATE.fullmatch(text):
        raise ValueError(f"{str(value)[:40]!r} is not a date (YYYY-MM-DD)")
    return iso_date(text)


Day = Annotated[date, PlainValidator(_day)]


def _email(value: str) -> str:
    if not EMAIL.fullmatch(value):
        raise ValueError(f"'{value[:80]}' is not an e-mail address")
    return value


def _contact(value: str) -> str:
    return _email(value) if "@" in value else value


def slug(text: str) -> str:
    """`PHQ-9` → `phq-9`: lower-case ASCII letters and digits, runs of anything else as one `-`."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def _has_slug(value: str) -> str:
    if not slug(value):
        raise ValueError(f"'{value[:80]}' has no letter or digit to name its Questionnaire by")
    return value


class Practitioner(SourceRecord):
    id: Text
    name: Text
    title: Text | None = None
    email: Annotated[Text, AfterValidator(_email)] | None = None
    phone: Text | None = None


class Patient(SourceRecord):
    id: Text
    name: Text
    birth_date: Day
    sex: Literal["male", "female", "other", "unknown"]
    contact: Annotated[Text, AfterValidator(_contact)] | None = None  # a phone number or an e-mail address


class Medication(SourceRecord):
    id: Text
    patient_id: Text
    name: Text
    dose: Text
    frequency: Text
    route: Text
    start_date: Day
    end_date: Day | None = None
    status: Literal["active", "stopped"]

    @field_validator("end_date")
    @classmethod
    def _not_before_start(cls, end: date | None, info: ValidationInfo) -> date | None:
        start = info.data.get("start_date")
        if end is not None and start is not None and end < start:
            raise ValueError(f"{end} is before start_date {start}")
        return end


class Allergy(SourceRecord):
    id: Text
    patient_id: Text
    substance: Text
    reaction: Text
    severity: Literal["mild", "moderate", "severe"]
    status: Literal["active", "inactive", "resolved"]


class AssessmentItem(SourceRecord):
    question: Text
    answer: Text
    score: int | None = None


class Assessment(SourceRecord):
    id: Text
    patient_id: Text
    practitioner_id: Text
    date: When
    type: Annotated[Text, AfterValidator(_has_slug)]
    items: Annotated[list[AssessmentItem], BeforeValidator(json_text), Field(min_length=1)]
    total_score: int | None = None


KINDS: dict[str, type[BaseModel]] = {
    "practitioner": Practitioner,
    "patient": Patient,
    "medication": Medication,
    "allergy": Allergy,
    "assessment": Assessment,
}


# --- FHIR ---------------------------------------------------------------------------------------


def bundle_entries(kind: str, record: BaseModel) -> list[dict[str, Any]]:
    """The transaction entries of one record."""
    check_kind(SYSTEM, KINDS, kind, record)
    if isinstance(record, Assessment):
        return _assessment_entries(record)
    resource = {
        "practitioner": _practitioner,
        "patient": _patient,
        "medication": _medication_statement,
        "allergy": _allergy_intolerance,
    }[kind](record)
    return [records.upsert_entry(resource, records.placeholder())]


def _identifier(kind: str, source_id: str) -> dict[str, str]:
    return records.source_identifier(SYSTEM, kind, source_id)


def _reference(resource_type: str, kind: str, source_id: str) -> dict[str, str]:
    """The resource an earlier record became."""
    return records.conditional_reference(resource_type, _identifier(kind, source_id))


def _human_name(name: str) -> dict[str, Any]:
    *given, family = name.split()
    return {"text": name, "family": family, "given": given} if given else {"text": name, "family": family}


def _compact(element: dict[str, Any]) -> dict[str, Any]:
    """`element` without None and empty lists (FHIR JSON has none)."""
    return {key: value for key, value in element.items() if value not in (None, [])}


def _practitioner(record: Practitioner) -> dict[str, Any]:
    telecom = [{"system": "email", "value": record.email}] if record.email else []
    telecom += [{"system": "phone", "value": record.phone}] if record.phone else []
    return _compact(
        {
            "resourceType": "Practitioner",
            "identifier": [_identifier("practitioner", record.id)],
            "name": [_human_name(record.name)],
            "telecom": telecom,
            "qualification": [{"code": {"text": record.title}}] if record.title else None,
        }
    )


def _patient(record: Patient) -> dict[str, Any]:
    contact = record.contact
    telecom = [{"system": "email" if "@" in contact else "phone", "value": contact}] if contact else None
    return _compact(
        {
            "resourceType": "Patient",
            "identifier": [_identifier("patient", record.id)],
            "name": [_human_name(record.name)],
            "telecom": telecom,
            "gender": record.sex,
            "birthDate": record.birth_date.isoformat(),
        }
    )


def _medication_statement(record: Medication) -> dict[str, Any]:
    period = {"start": record.start_date.isoformat()}
    if record.end_date:
        period["end"] = record.end_date.isoformat()
    return {
        "resourceType": "MedicationStatement",
        "identifier": [_identifier("medication", record.id)],
        "status": record.status,
        "medicationCodeableConcept": {"text": record.name},
        "subject": _reference("Patient", "patient", record.patient_id),
        "effectivePeriod": period,
        "dosage": [{"text": f"{record.dose} {record.frequency}", "route": {"text": record.route}}],
    }


def _allergy_intolerance(record: Allergy) -> dict[str, Any]:
    clinical = {
        "system": CLINICAL_STATUS_SYSTEM,
        "code": record.status,
        "display": CLINICAL_STATUS[record.status],
    }
    return {
        "resourceType": "AllergyIntolerance",
        "identifier": [_identifier("allergy", record.id)],
        "clinicalStatus": {"coding": [clinical]},
        "verificationStatus": CONFIRMED,
        "code": {"text": record.substance},
        "patient": _reference("Patient", "patient", record.patient_id),
        "reaction": [{"manifestation": [{"text": record.reaction}], "severity": record.severity}],
    }


def questionnaire_url(assessment_type: str) -> str:
    return QUESTIONNAIRE_BASE + slug(assessment_type)


def _assessment_entries(record: Assessment) -> list[dict[str, Any]]:
    """The Questionnaire of the assessment's type, the QuestionnaireResponse, the scores."""
    url = questionnaire_url(record.type)
    questionnaire = {
        "resourceType": "Questionnaire",
        "url": url,
        "name": _computable_name(record.type),
        "title": record.type,
        "status": "active",
        "subjectType": ["Patient"],
        "item": [
            {"linkId": f"q{n}", "text": item.question, "type": "string"}
            for n, item in enumerate(record.items, 1)
        ],
    }
    response_url = records.placeholder()
    response_identifier = _identifier("assessment", record.id)
    patient = _reference("Patient", "patient", record.patient_id)
    practitioner = _reference("Practitioner", "practitioner", record.practitioner_id)
    authored = record.date.isoformat()
    response = {
        "resourceType": "QuestionnaireResponse",
        "identifier": response_identifier,
        "questionnaire": url,
        "status": "completed",
        "subject": patient,
        "authored": authored,
        "author": practitioner,
        "item": [
            {"linkId": f"q{n}", "text": item.question, "answer": [{"valueString": item.answer}]}
            for n, item in enumerate(record.items, 1)
        ],
    }

    def score(key: str, code: str, text: str, value: int) -> dict[str, Any]:
        display = SCORE_DISPLAYS[code]
        return {
            "resourceType": "Observation",
            "identifier": [_identifier("observation", f"{record.id}:{key}")],
            "status": "final",
            "category": [SURVEY],
            "code": {
                "coding": [{"system": OBSERVATION_CODES, "code": code, "display": display}],
                "text": text,
            },
            "subject": patient,
            "effectiveDateTime": authored,
            "performer": [practitioner],
            "valueInteger": value,
            "derivedFrom": [{"reference": response_url}],
        }

    scores = [
        score(f"item:{n}", "item-score", f"{record.type}: {item.question}", item.score)
        for n, item in enumerate(record.items, 1)
        if item.score is not None
    ]
    if record.total_score is not None:
        scores.append(score("total", "total-score", f"{record.type} total score", record.total_score))
    return [
        {
            "fullUrl": records.placeholder(),
            "resource": questionnaire,
            "request": {
                "method": "POST",
                "url": "Questionnaire",
                "ifNoneExist": f"url={quote(url, safe=':/')}",
            },
        },
        records.upsert_entry(response, response_url, response_identifier),
        *(records.upsert_entry(observation, records.placeholder()) for observation in scores),
    ]


def _computable_name(assessment_type: str) -> str:
    """`PHQ-9` → `PHQ9`, `falls risk` → `FallsRisk`: a Questionnaire.name (starts with a capital)."""
    ascii_text = unicodedata.normalize("NFKD", assessment_type).encode("ascii", "ignore").decode()
    name = "".join(word[0].upper() + word[1:] for word in re.findall(r"[A-Za-z0-9]+", ascii_text))
    return name if name[:1].isalpha() else "Q" + name
