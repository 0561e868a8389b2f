"""Doctor–patient interactions to FHIR R4. Pure: no I/O.

One kind of record, `interaction`: a visit of a patient, known only by an insurance number, with
its ailment, symptoms, measurements, questions and answers, next steps, remarks and a label (a
category the old system filtered by). Each record becomes one transaction:

- `Patient`: only the insurance number, as an identifier of system `INSURANCE_SYSTEM` (type `MB`,
  member number), created conditionally on it: every interaction of one insurance number shares it.
- `Encounter`: status finished, class AMB, `reasonCode.text` = ailment, identifier = the
  interaction's id, `period.start` = interaction_date and `period.end` the same: the system records
  when a visit took place, not how long it took, and a period without an end is an ongoing one
  (which `date=2024-02` would not find).
- `Observation` per symptom: category `exam`, `code.text` = the symptom, `valueBoolean` true.
- `Observation` per metric. A vital sign it recognises (`VITAL_SIGNS`; names are compared in lower
  case with spaces and hyphens as underscores) gets its LOINC code, a UCUM quantity, category
  `vital-signs` and the R4 vital-sign profile in `meta.profile`; `blood_pressure` ("120/80") is the
  85354-9 panel with systolic and diastolic components. The system records metric units (°C, kg,
  cm, %, beats and breaths per minute). Any other metric, or a vital sign whose value is not a
  number (or "systolic/diastolic"), is kept as it came: `code.text` = the metric's name,
  `valueQuantity` without a unit for a number, `valueString`, or `valueBoolean`. Metrics without a
  value (null or blank) are left out.
- `Observation` for health_status: code `health-status` of our CodeSystem
  `https://fhir-server.local/CodeSystem/interaction-observation`, `valueString`.
- `QuestionnaireResponse` for the Q&A (R4 needs no Questionnaire): status completed, one item per
  question, linkId `q1`, `q2`… in the record's order, `answer.valueString`.
- `CarePlan` for next steps: status active, intent plan, one activity per step
  (`detail.status` not-started, `detail.description` = the step).
- remarks: a `ClinicalImpression` (status completed, `summary` = the remarks). R4's Encounter has
  no note, and remarks are the doctor's assessment of the visit whether or not there are next steps,
  so they get a resource of their own rather than `CarePlan.note`.

Every resource but the Patient references the Patient (`subject`) and the Encounter (`encounter`),
and carries the label in `meta.tag` (system `LABEL_SYSTEM`; labels are an open set, so no
CodeSystem of ours lists them). The Patient is shared by all labels and has no tag. Every resource
has an identifier from the interaction's id (`urn:fhir-server:source:interactions:<kind>`, value
`<id>`, `<id>:symptom:<symptom>`, `<id>:metric:<name>`, `<id>:health-status`), and is written by
a conditional update on it, so importing a record again creates nothing, and updates what changed.

Source formats: JSON `{"interaction": [records]}`; CSV with one row per record, where symptoms is
one comma-separated string (or a JSON array), metrics and qa are JSON, and next_steps is a JSON
array or one step per line. A time of day needs its UTC offset; without one, give the date alone.
"""

import re
from decimal import Decimal
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, PlainValidator

from mappings import records
from mappings.schema import (
    NUMBER,
    SourceRecord,
    Text,
    When,
    check_kind,
    json_text,
    no_control_characters,
    present,
)

SYSTEM = "interactions"
INSURANCE_SYSTEM = "urn:fhir-server:insurance-number"
LABEL_SYSTEM = "urn:fhir-server:interactions:label"
OBSERVATION_CODES = "https://fhir-server.local/CodeSystem/interaction-observation"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
PROFILE_BASE = "http://hl7.org/fhir/StructureDefinition/"

AMBULATORY = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
    "code": "AMB",
    "display": "ambulatory",
}
MEMBER_NUMBER = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB", "display": "Member Number"}
    ]
}
VITAL_SIGNS_CATEGORY = {
    "coding": [{"system": CATEGORY_SYSTEM, "code": "vital-signs", "display": "Vital Signs"}],
    "text": "Vital Signs",
}
EXAM_CATEGORY = {"coding": [{"system": CATEGORY_SYSTEM, "code": "exam", "display": "Exam"}], "text": "Exam"}
HEALTH_STATUS = {
    "coding": [{"system": OBSERVATION_CODES, "code": "health-status", "display": "Health status"}],
    "text": "Health status",
}


class VitalSign(NamedTuple):
    codes: tuple[tuple[str, str], ...]  # LOINC (code, display); the first is the profile's
    unit: str
    ucum: str
    profile: str


HEART_RATE = VitalSign((("8867-4", "Heart rate"),), "beats/min", "/min", "heartrate")
RESPIRATORY_RATE = VitalSign((("9279-1", "Respiratory rate"),), "breaths/min", "/min", "resprate")
BODY_TEMPERATURE = VitalSign((("8310-5", "Body temperature"),), "°C", "Cel", "bodytemp")
BODY_WEIGHT = VitalSign((("29463-7", "Body weight"),), "kg", "kg", "bodyweight")
BODY_HEIGHT = VitalSign((("8302-2", "Body height"),), "cm", "cm", "bodyheight")
# As R4's oxygensat profile and its pulse-oximetry example: 2708-6, and 59408-5 for the method.
OXYGEN_SATURATION = VitalSign(
    (
        ("2708-6", "Oxygen saturation in Arterial blood"),
        ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
    ),
    "%",
    "%",
    "oxygensat",
)
BMI = VitalSign((("39156-5", "Body mass index (BMI) [Ratio]"),), "kg/m2", "kg/m2", "bmi")

# Metric names (lower case, `_` for spaces and hyphens) → vital sign.
VITAL_SIGNS = {
    "heart_rate": HEART_RATE,
    "pulse": HEART_RATE,
    "respiratory_rate": RESPIRATORY_RATE,
    "temperature": BODY_TEMPERATURE,
    "body_temperature": BODY_TEMPERATURE,
    "weight": BODY_WEIGHT,
    "body_weight": BODY_WEIGHT,
    "height": BODY_HEIGHT,
    "body_height": BODY_HEIGHT,
    "spo2": OXYGEN_SATURATION,
    "oxygen_saturation": OXYGEN_SATURATION,
    "bmi": BMI,
}
BLOOD_PRESSURE_NAMES = ("blood_pressure", "bp")
BLOOD_PRESSURE_PANEL = ("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = ("8480-6", "Systolic blood pressure")
DIASTOLIC = ("8462-4", "Diastolic blood pressure")

CODE_SYSTEMS: list[dict[str, Any]] = [
    {
        "resourceType": "CodeSystem",
        "url": OBSERVATION_CODES,
        "version": "1",
        "name": "InteractionObservation",
        "title": "Interaction observations",
        "status": "active",
        "experimental": False,
        "description": "What the doctor–patient interaction system records about a visit that no "
        "standard terminology codes.",
        "caseSensitive": True,
        "content": "complete",
        "count": 1,
        "concept": [
            {
                "code": "health-status",
                "display": "Health status",
                "definition": "The patient's overall state of health as the doctor described it at the "
                "interaction, in the doctor's words.",
            }
        ],
    }
]

_PRESSURE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")


# --- the source schema --------------------------------------------------------------------------


def _symptom_list(value: object) -> object:
    """A JSON array, or one comma-separated string."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return json_text(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _step_list(value: object) -> object:
    """A JSON array, or one step per line."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return json_text(value)
        return [line.strip() for line in value.splitlines() if line.strip()]
    return value


def _recorded_metrics(value: object) -> object:
    """JSON text of an object; metrics without a value (null, blank) are not recorded ones."""
    value = json_text(value)
    return present(value) if isinstance(value, dict) else value


def _distinct(values: list[str]) -> list[str]:
    """Repeats (ignoring case) left out: each value becomes a resource with an identifier of its own."""
    distinct: dict[str, str] = {}
    for value in values:
        distinct.setdefault(value.casefold(), value)
    return list(distinct.values())


def _single_spaces(value: str) -> str:
    """The label becomes a tag's code, and a FHIR code has no runs of whitespace."""
    return " ".join(value.split())


def _metric_value(value: object) -> bool | int | Decimal | str:
    """A number (a fraction becomes a Decimal, as the server holds FHIR decimals), text or a boolean."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        value = Decimal(repr(value))  # the shortest text of the float: 37.2, not 37.2000000000000028…
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("must be a finite number")
        return value
    if isinstance(value, str):
        return no_control_characters(value.strip())
    raise ValueError(f"must be a number, a string or a boolean, not {type(value).__name__}")


MetricValue = Annotated[bool | int | Decimal | str, PlainValidator(_metric_value)]


class QuestionAnswer(SourceRecord):
    question: Text
    answer: Text


class Interaction(SourceRecord):
    insurance_no: Text
    id: Text
    ailment: Text
    interaction_date: When
    label: Annotated[Text, AfterValidator(_single_spaces)]
    symptoms: Annotated[list[Text], BeforeValidator(_symptom_list), AfterValidator(_distinct)] = Field(
        default_factory=list
    )
    metrics: Annotated[dict[Text, MetricValue], BeforeValidator(_recorded_metrics)] = Field(
        default_factory=dict
    )
    health_status: Text | None = None
    remarks: Text | None = None
    qa: Annotated[list[QuestionAnswer], BeforeValidator(json_text)] = Field(default_factory=list)
    next_steps: Annotated[list[Text], BeforeValidator(_step_list)] = Field(default_factory=list)


KINDS: dict[str, type[BaseModel]] = {"interaction": Interaction}


# --- FHIR ---------------------------------------------------------------------------------------


def bundle_entries(kind: str, record: BaseModel) -> list[dict[str, Any]]:
    """The transaction entries of one interaction: Patient, Encounter, then what the visit recorded."""
    check_kind(SYSTEM, KINDS, kind, record)
    assert isinstance(record, Interaction)
    patient_url, encounter_url = records.placeholder(), records.placeholder()
    visit = _Visit(record, {"reference": patient_url}, {"reference": encounter_url})
    entries = [
        records.create_entry(_patient(record), patient_url),
        records.upsert_entry(visit.encounter(), encounter_url),
    ]
    resources = [visit.symptom(symptom) for symptom in record.symptoms]
    resources += [visit.metric(name, value) for name, value in record.metrics.items()]
    if record.health_status:
        resources.append(
            visit.observation("health-status", HEALTH_STATUS, {"valueString": record.health_status})
        )
    if record.qa:
        resources.append(visit.questionnaire_response())
    if record.next_steps:
        resources.append(visit.care_plan())
    if record.remarks:
        resources.append(visit.clinical_impression())
    for resource in resources:
        identifier = resource["identifier"]  # QuestionnaireResponse has one Identifier, not a list
        identifier = identifier if isinstance(identifier, dict) else identifier[0]
        entries.append(records.upsert_entry(resource, records.placeholder(), identifier))
    return entries


def _patient(record: Interaction) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"type": MEMBER_NUMBER, "system": INSURANCE_SYSTEM, "value": record.insurance_no}],
    }


class _Visit:
    """One interaction's resources: each references the Patient and the Encounter and has the tag."""

    def __init__(self, record: Interaction, patient: dict[str, str], encounter: dict[str, str]) -> None:
        self.record = record
        self.patient = patient
        self.encounter_reference = encounter
        self.when = record.interaction_date.isoformat()
        self.tag = {"system": LABEL_SYSTEM, "code": record.label, "display": record.label}

    def identifier(self, kind: str, suffix: str | None = None) -> dict[str, str]:
        value = self.record.id if suffix is None else f"{self.record.id}:{suffix}"
        return records.source_identifier(SYSTEM, kind, value)

    def meta(self, profile: str | None = None) -> dict[str, Any]:
        return {"profile": [profile], "tag": [self.tag]} if profile else {"tag": [self.tag]}

    def encounter(self) -> dict[str, Any]:
        return {
            "resourceType": "Encounter",
            "meta": self.meta(),
            "identifier": [self.identifier("interaction")],
            "status": "finished",
            "class": AMBULATORY,
            "subject": self.patient,
            "period": {"start": self.when, "end": self.when},
            "reasonCode": [{"text": self.record.ailment}],
        }

    def observation(
        self,
        key: str,
        code: dict[str, Any],
        value: dict[str, Any],
        category: dict[str, Any] | None = None,
        profile: str | None = None,
    ) -> dict[str, Any]:
        """`value`: the value[x] element, or `component` for a panel."""
        return {
            "resourceType": "Observation",
            "meta": self.meta(profile),
            "identifier": [self.identifier("observation", key)],
            "status": "final",
            **({"category": [category]} if category else {}),
            "code": code,
            "subject": self.patient,
            "encounter": self.encounter_reference,
            "effectiveDateTime": self.when,
            **value,
        }

    def symptom(self, symptom: str) -> dict[str, Any]:
        return self.observation(
            f"symptom:{symptom.casefold()}", {"text": symptom}, {"valueBoolean": True}, EXAM_CATEGORY
        )

    def metric(self, name: str, value: bool | int | Decimal | str) -> dict[str, Any]:
        key = f"metric:{name}"
        known = re.sub(r"[\s\-]+", "_", name.lower())
        number = _number(value)
        vital = VITAL_SIGNS.get(known)
        if vital is not None and number is not None:
            code = _loinc(*vital.codes)
            quantity = {"valueQuantity": _quantity(number, vital.unit, vital.ucum)}
            return self.observation(key, code, quantity, VITAL_SIGNS_CATEGORY, PROFILE_BASE + vital.profile)
        pressure = _PRESSURE.fullmatch(value) if isinstance(value, str) else None
        if known in BLOOD_PRESSURE_NAMES and pressure:
            systolic, diastolic = (_number(part) for part in pressure.groups())
            components = {
                "component": [
                    {"code": _loinc(SYSTOLIC), "valueQuantity": _quantity(systolic, "mmHg", "mm[Hg]")},
                    {"code": _loinc(DIASTOLIC), "valueQuantity": _quantity(diastolic, "mmHg", "mm[Hg]")},
                ]
            }
            return self.observation(
                key, _loinc(BLOOD_PRESSURE_PANEL), components, VITAL_SIGNS_CATEGORY, PROFILE_BASE + "bp"
            )
        if isinstance(value, bool):
            as_given: dict[str, Any] = {"valueBoolean": value}
        elif isinstance(value, int | Decimal):
            as_given = {"valueQuantity": {"value": value}}
        else:
            as_given = {"valueString": value}
        return self.observation(key, {"text": name}, as_given)

    def questionnaire_response(self) -> dict[str, Any]:
        return {
            "resourceType": "QuestionnaireResponse",
            "meta": self.meta(),
            "identifier": self.identifier("questionnaire-response"),
            "status": "completed",
            "subject": self.patient,
            "encounter": self.encounter_reference,
            "authored": self.when,
            "item": [
                {"linkId": f"q{n}", "text": qa.question, "answer": [{"valueString": qa.answer}]}
                for n, qa in enumerate(self.record.qa, 1)
            ],
        }

    def care_plan(self) -> dict[str, Any]:
        return {
            "resourceType": "CarePlan",
            "meta": self.meta(),
            "identifier": [self.identifier("care-plan")],
            "status": "active",
            "intent": "plan",
            "title": "Next steps",
            "subject": self.patient,
            "encounter": self.encounter_reference,
            "created": self.when,
            "activity": [
                {"detail": {"status": "not-started", "description": step}} for step in self.record.next_steps
            ],
        }

    def clinical_impression(self) -> dict[str, Any]:
        return {
            "resourceType": "ClinicalImpression",
            "meta": self.meta(),
            "identifier": [self.identifier("clinical-impression")],
            "status": "completed",
            "subject": self.patient,
            "encounter": self.encounter_reference,
            "effectiveDateTime": self.when,
            "summary": self.record.remarks,
        }


def _number(value: object) -> int | Decimal | None:
    """A number, or a string holding one; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        return value
    if isinstance(value, str) and NUMBER.fullmatch(text := value.strip()):
        return int(text) if text.lstrip("+-").isdigit() else Decimal(text)
    return None


def _loinc(*codes: tuple[str, str]) -> dict[str, Any]:
    return {
        "coding": [{"system": LOINC, "code": code, "display": display} for code, display in codes],
        "text": codes[0][1],
    }


def _quantity(value: int | Decimal | None, unit: str, ucum: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": ucum}
