"""The small-practice EHR to FHIR R4. Pure: no I/O.

Kinds, in import order (`KINDS`), and what each record becomes (one transaction per record):

- doctor → `Practitioner` (name, work phone and email, the licence number as an identifier of
  type MD) and `PractitionerRole` (code doctor; one specialty per source specialty: the SNOMED CT
  code of the R4 practice-setting value set when `SPECIALTIES` knows the name, the name as text
  always).
- patient → `Patient` (name, gender, birthDate, telecom, address, the emergency contact as a
  contact of relationship C) and one social-history `Observation` per item recorded: smoking
  status (LOINC 72166-2, SNOMED CT answers of US Core's smoking-status value set), alcohol use
  (11331-6) and occupation (11341-5), the last two with the source's words as text.
- appointment → `Appointment` (status scheduled→booked, completed→fulfilled, cancelled,
  no_show→noshow; appointmentType from v2-0276 for follow_up, emergency and check_up, else from
  our CodeSystem `APPOINTMENT_TYPES`; patient and doctor as accepted participants) and, once
  completed, an `Encounter` (finished, class AMB or EMER, `appointment` → the Appointment). The
  server refuses double bookings: an appointment overlapping another booked one of the same
  doctor is rejected (409) like any other client's.
- laboratory_result → laboratory `Observation` (LOINC code when given, the test name as text;
  valueQuantity in UCUM for a number, valueString for text; referenceRange; interpretation
  N, A, H, L, and for critical HH or LL when the value is beyond the range, else AA; status
  final, or registered while pending).
- radiology_imaging → `Binary` (the file, its type judged by its first bytes: PNG, JPEG, GIF,
  BMP, TIFF or DICOM, at most `MAX_FILE_BYTES`) and `DocumentReference` (type 18748-4, the
  modality as a DICOM code in `context.event`, the date as `context.period.start` and the
  attachment's creation). A DICOM file instead goes to the DICOM node (`dicom_instances`: the
  importer C-STOREs it), whose mapping makes the `ImagingStudy`; before sending, its PatientID
  and IssuerOfPatientID are set to the record's patient (`urn:fhir-server:source:ehr:patient`
  and the source id, so that the node finds the imported Patient), and the record's date,
  description and modality become StudyDate (and StudyTime), StudyDescription and Modality
  where the header has none. The record then has no transaction entries of its own: the study
  is known by its Study Instance UID, not by the record's id.
- medical_history → `Condition` (category problem-list-item, clinicalStatus active or resolved).
- allergy → `AllergyIntolerance` (clinicalStatus active; reaction with its severity).
- prescription → `MedicationRequest` (intent order, dosage and frequency as the dosage text, the
  start and end dates as its bounds, the doctor as requester).

Every resource carries an identifier `urn:fhir-server:source:ehr:<kind>|<id>` (resources derived
from a record: `<id>:role`, `<id>:encounter`, `<id>:smoking-status`, …) and is written
by a conditional update on it (created, updated when the source changed, else left as it is); a
Binary has no identifier, so its `meta.source` is that URN and the update is conditional on
`_source`. Other records are referenced by conditional references on their
identifiers (`Patient?identifier=urn:fhir-server:source:ehr:patient|P001`), so they must have
been imported first.

Source formats: JSON `{kind: [records]}` or one CSV per kind (`patients.csv`,
`laboratory_results.csv`: the header names the fields; lists and objects are JSON text). Unknown
fields are refused; blank ones are absent. Times need their UTC offset (an instant without one
would be wrong by hours); a date alone is fine where FHIR takes a dateTime. A radiology image's
`file_path` is relative to the input file: the importer reads it (`FILES`) into `content` before
validation, at most `MAX_FILE_BYTES` + 1 bytes.
"""

import base64
import hashlib
import re
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PositiveInt,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mappings import records, schema
from mappings.schema import (
    DATE,
    EMAIL,
    NUMBER,
    check_kind,
    iso_date,
    json_text,
    no_control_characters,
    offset_checked,
)
from mappings.uploads import sniff

SYSTEM = "ehr"
MAX_FILE_BYTES = 10 * 1024 * 1024
# Fields naming a file relative to the input file: kind → (path field, content field). The importer
# reads the file into the content field before validating the record.
FILES = {"radiology_imaging": ("file_path", "content")}

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
TERMINOLOGY = "http://terminology.hl7.org/CodeSystem/"
APPOINTMENT_TYPES = "https://fhir-server.local/CodeSystem/ehr-appointment-type"

MEDICAL_LICENSE = {"coding": [{"system": TERMINOLOGY + "v2-0203", "code": "MD", "display": "Medical License number"}]}
DOCTOR_ROLE = {"coding": [{"system": TERMINOLOGY + "practitioner-role", "code": "doctor", "display": "Doctor"}]}
EMERGENCY_CONTACT = {"coding": [{"system": TERMINOLOGY + "v2-0131", "code": "C", "display": "Emergency Contact"}]}


def _category(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": TERMINOLOGY + system, "code": code, "display": display}]}


SOCIAL_HISTORY = _category("observation-category", "social-history", "Social History")
LABORATORY = _category("observation-category", "laboratory", "Laboratory")
PROBLEM_LIST_ITEM = _category("condition-category", "problem-list-item", "Problem List Item")

# Source specialty (lower case, single spaces) → SNOMED CT code and display of the R4 value set
# c80-practice-codes (pediatrics: 394537008 Pediatric specialty, which that value set lacks).
SPECIALTIES: dict[str, tuple[str, str]] = {
    "anesthesiology": ("394577000", "Anesthetics"),
    "anaesthetics": ("394577000", "Anesthetics"),
    "cardiology": ("394579002", "Cardiology"),
    "cardiac surgery": ("408466002", "Surgery-Cardiac surgery"),
    "dermatology": ("394582007", "Dermatology"),
    "emergency medicine": ("394576009", "Surgical-Accident & emergency"),
    "endocrinology": ("394583002", "Endocrinology"),
    "ent": ("418960008", "Otolaryngology"),
    "otolaryngology": ("418960008", "Otolaryngology"),
    "family medicine": ("419772000", "Family practice"),
    "family practice": ("419772000", "Family practice"),
    "gastroenterology": ("394584008", "Gastroenterology"),
    "general practice": ("394814009", "General practice"),
    "general medicine": ("394802001", "General medicine"),
    "general surgery": ("394609007", "Surgery-general"),
    "surgery": ("394609007", "Surgery-general"),
    "geriatrics": ("394811001", "Geriatric medicine"),
    "geriatric medicine": ("394811001", "Geriatric medicine"),
    "gynecology": ("394586005", "Gynecology"),
    "hematology": ("394803006", "Clinical hematology"),
    "infectious diseases": ("394807007", "Infectious diseases"),
    "internal medicine": ("419192003", "Internal medicine"),
    "nephrology": ("394589003", "Nephrology"),
    "neurology": ("394591006", "Neurology"),
    "neurosurgery": ("394610002", "Surgery-Neurosurgery"),
    "obstetrics": ("408470005", "Obstetrics"),
    "obstetrics and gynecology": ("394585009", "Obstetrics and gynecology"),
    "oncology": ("394593009", "Medical oncology"),
    "ophthalmology": ("394594003", "Ophthalmology"),
    "orthopedics": ("394801008", "Surgery-Trauma and orthopedics"),
    "orthopaedics": ("394801008", "Surgery-Trauma and orthopedics"),
    "palliative medicine": ("394806003", "Palliative medicine"),
    "pathology": ("394915009", "General pathology"),
    "pediatrics": ("394537008", "Pediatric specialty"),
    "paediatrics": ("394537008", "Pediatric specialty"),
    "plastic surgery": ("394611003", "Surgery-Plastic surgery"),
    "psychiatry": ("394587001", "Psychiatry"),
    "pulmonology": ("418112009", "Pulmonary medicine"),
    "radiology": ("394914008", "Radiology"),
    "rheumatology": ("394810000", "Rheumatology"),
    "urology": ("394612005", "Urology"),
    "vascular surgery": ("408463005", "Surgery-Vascular"),
}

# US Core smoking-status answers (SNOMED CT).
SMOKING_STATUS = {
    "never": ("266919005", "Never smoked tobacco"),
    "former": ("8517006", "Ex-smoker"),
    "current": ("77176002", "Smoker"),
}
SOCIAL_CODES = {
    "smoking-status": ("72166-2", "Tobacco smoking status"),
    "alcohol-use": ("11331-6", "History of Alcohol use"),
    "occupation": ("11341-5", "History of Occupation"),
}

APPOINTMENT_STATUS = {"scheduled": "booked", "completed": "fulfilled", "cancelled": "cancelled", "no_show": "noshow"}
# Source type → (system, code, display): v2-0276 where one fits, else our CodeSystem.
APPOINTMENT_TYPE = {
    "follow_up": (TERMINOLOGY + "v2-0276", "FOLLOWUP", "A follow up visit from a previous appointment"),
    "emergency": (TERMINOLOGY + "v2-0276", "EMERGENCY", "Emergency appointment"),
    "check_up": (TERMINOLOGY + "v2-0276", "CHECKUP", "A routine check-up, such as an annual physical"),
    "consultation": (APPOINTMENT_TYPES, "consultation", "Consultation"),
    "surgery": (APPOINTMENT_TYPES, "surgery", "Surgery"),
    "procedure": (APPOINTMENT_TYPES, "procedure", "Procedure"),
}
EMERGENCY_CLASS = {"system": TERMINOLOGY + "v3-ActCode", "code": "EMER", "display": "emergency"}
AMBULATORY_CLASS = {"system": TERMINOLOGY + "v3-ActCode", "code": "AMB", "display": "ambulatory"}

INTERPRETATION = {
    "normal": ("N", "Normal"),
    "abnormal": ("A", "Abnormal"),
    "high": ("H", "High"),
    "low": ("L", "Low"),
    "critical": ("AA", "Critical abnormal"),
    "critical-high": ("HH", "Critical high"),
    "critical-low": ("LL", "Critical low"),
}

IMAGING_DOCUMENT = {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]}
# Modality as the source names it (lower case) → DICOM modality code (DICOM PS3.16 CID 29).
MODALITIES: dict[str, tuple[str, str]] = {
    "x-ray": ("DX", "Digital Radiography"),
    "xray": ("DX", "Digital Radiography"),
    "radiograph": ("DX", "Digital Radiography"),
    "dx": ("DX", "Digital Radiography"),
    "cr": ("CR", "Computed Radiography"),
    "ct": ("CT", "Computed Tomography"),
    "mri": ("MR", "Magnetic Resonance"),
    "mr": ("MR", "Magnetic Resonance"),
    "ultrasound": ("US", "Ultrasound"),
    "us": ("US", "Ultrasound"),
    "mammography": ("MG", "Mammography"),
    "mg": ("MG", "Mammography"),
    "pet": ("PT", "Positron emission tomography"),
    "pt": ("PT", "Positron emission tomography"),
    "nuclear medicine": ("NM", "Nuclear Medicine"),
    "nm": ("NM", "Nuclear Medicine"),
    "fluoroscopy": ("RF", "Radio Fluoroscopy"),
    "rf": ("RF", "Radio Fluoroscopy"),
    "angiography": ("XA", "X-Ray Angiography"),
    "xa": ("XA", "X-Ray Angiography"),
}

CODE_SYSTEMS: list[dict[str, Any]] = [
    {
        "resourceType": "CodeSystem",
        "url": APPOINTMENT_TYPES,
        "version": "1",
        "name": "EhrAppointmentType",
        "title": "EHR appointment types",
        "status": "active",
        "experimental": False,
        "description": "The kinds of appointment the small-practice EHR books that HL7 v2 table 0276 "
        "(appointment reason codes) has no code for.",
        "caseSensitive": True,
        "content": "complete",
        "count": 3,
        "concept": [
            {"code": "consultation", "display": "Consultation",
             "definition": "A visit for the doctor's opinion or advice on a problem, often on referral."},
            {"code": "surgery", "display": "Surgery", "definition": "A surgical operation."},
            {"code": "procedure", "display": "Procedure",
             "definition": "A diagnostic or therapeutic procedure other than surgery."},
        ],
    }
]

_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}.*")  # with a T: no space, unlike schema.DATE_TIME
_PHONE = re.compile(r"\+?[0-9 ()./\-]{3,30}(\s*(x|ext\.?)\s*[0-9]{1,6})?")
_LOINC_CODE = re.compile(r"\d{1,7}-\d")
_UCUM_UNIT = re.compile(r"[!-~]{1,40}")  # UCUM case-sensitive codes: printable ASCII, no spaces


# --- the source schema --------------------------------------------------------------------------


def _number_as_text(value: object) -> object:
    """Ids may come as JSON numbers."""
    return str(value) if isinstance(value, int | Decimal) and not isinstance(value, bool) else value


# Not schema.Text, to keep the results as they were: a float is not text here, and with the number check
# first, min_length is checked before stripping (so text of spaces in a list becomes "").
Text = Annotated[
    str,
    BeforeValidator(_number_as_text),
    StringConstraints(strip_whitespace=True, min_length=1),
    AfterValidator(no_control_characters),
]
SourceId = Annotated[Text, StringConstraints(max_length=64)]


def _pattern(regex: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"'{value[:60]}' is not {what}")
        return value

    return AfterValidator(check)


Email = Annotated[Text, _pattern(EMAIL, "an email address")]
Phone = Annotated[Text, _pattern(_PHONE, "a phone number")]
LoincCode = Annotated[Text, _pattern(_LOINC_CODE, "a LOINC code (such as 2345-7)")]
UcumUnit = Annotated[Text, _pattern(_UCUM_UNIT, "a UCUM unit code (such as mg/dL, no spaces)")]


def _lower(value: object) -> object:
    """Codes are compared in lower case, `-` and spaces as `_` (`No-Show` → no_show)."""
    return re.sub(r"[\s\-]+", "_", value.strip().lower()) if isinstance(value, str) else value


def _code(*codes: str) -> Any:
    return Annotated[Literal[codes], BeforeValidator(_lower)]  # type: ignore[valid-type]


def _instant(value: object) -> datetime:
    """A date and time with its UTC offset."""
    if isinstance(value, str):
        text = value.strip()
        if not _DATE_TIME.fullmatch(text):
            raise ValueError(f"'{text[:40]}' is not a date and time (YYYY-MM-DDThh:mm:ss+hh:mm)")
        try:
            value = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"'{text[:40]}' is not a date and time: {exc}") from None
    if not isinstance(value, datetime):
        raise ValueError("must be a date and time with its UTC offset (YYYY-MM-DDThh:mm:ss+hh:mm)")
    return offset_checked(value, "has no UTC offset (+hh:mm or Z): the instant would be a guess")


def _day(value: object) -> date:
    if isinstance(value, datetime):
        raise ValueError("must be a date (YYYY-MM-DD) without a time")
    if isinstance(value, str):
        text = value.strip()
        if not DATE.fullmatch(text):
            raise ValueError(f"'{text[:40]}' is not a date (YYYY-MM-DD)")
        return iso_date(text)
    if isinstance(value, date):
        return value
    raise ValueError("must be a date (YYYY-MM-DD)")


def _when(value: object) -> date | datetime:
    """A date, or a date and time with its UTC offset (what a FHIR dateTime holds)."""
    if isinstance(value, datetime) or (isinstance(value, str) and "T" in value):
        return _instant(value)
    return _day(value)


Instant = Annotated[datetime, PlainValidator(_instant)]
Day = Annotated[date, PlainValidator(_day)]
When = Annotated[date | datetime, PlainValidator(_when)]


def _decimal(value: object) -> Decimal:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, float):
        value = repr(value)  # the shortest text of the float: 5.4, not 5.4000000000000003…
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        if not NUMBER.fullmatch(value.strip()):
            raise ValueError(f"'{value[:40]}' is not a number")
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"'{value[:40]}' is not a number") from None
    if not isinstance(value, Decimal) or not value.is_finite():
        raise ValueError("must be a finite number")
    return value


def _number_or_text(value: object) -> Decimal | str:
    """A result: a number (JSON, or text that reads as one: CSV cells are text) or text."""
    if isinstance(value, str) and not NUMBER.fullmatch(value.strip()):
        text = no_control_characters(value.strip())
        if not text:
            raise ValueError("is blank")
        return text
    return _decimal(value)


Number = Annotated[Decimal, PlainValidator(_decimal)]
Result = Annotated[Decimal | str, PlainValidator(_number_or_text)]


def _json_text(value: object) -> object:
    """A list or object given as JSON text (a CSV cell); other text as it is (an address as written)."""
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        return json_text(value)
    return value


class SourceRecord(schema.SourceRecord):
    """As `schema.SourceRecord`, and frozen: a validated record is not changed."""

    model_config = ConfigDict(frozen=True)


class Record(SourceRecord):
    id: SourceId


class PatientRecord(Record):
    patient_id: SourceId


class Doctor(Record):
    first_name: Text
    last_name: Text
    specialties: Annotated[list[Text], BeforeValidator(_json_text)] = Field(default_factory=list)
    email: Email | None = None
    phone: Phone | None = None
    license_number: Text | None = None


class Address(SourceRecord):
    street: Text | None = None  # one line per line
    city: Text | None = None
    state: Text | None = None
    postal_code: Text | None = None
    country: Text | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> "Address":
        if not self.model_dump(exclude_none=True):
            raise ValueError("an address needs at least one of street, city, state, postal_code, country")
        return self


class EmergencyContact(SourceRecord):
    name: Text
    relationship: Text | None = None
    phone: Phone | None = None
    email: Email | None = None


class Patient(Record):
    first_name: Text
    last_name: Text
    birth_date: Day
    sex: _code("male", "female", "other")
    phone: Phone | None = None
    email: Email | None = None
    address: Annotated[Address | Text | None, BeforeValidator(_json_text)] = None  # text: as written
    emergency_contact: Annotated[EmergencyContact | None, BeforeValidator(_json_text)] = None
    smoking_status: _code("never", "former", "current") | None = None
    alcohol_use: Text | None = None
    occupation: Text | None = None


class Appointment(PatientRecord):
    doctor_id: SourceId
    start: Instant
    end: Instant | None = None
    duration_minutes: PositiveInt | None = None
    status: _code("scheduled", "completed", "cancelled", "no_show")
    type: _code("consultation", "follow_up", "emergency", "check_up", "surgery", "procedure")
    reason: Text | None = None
    notes: Text | None = None

    @model_validator(mode="after")
    def _has_an_end(self) -> "Appointment":
        if self.end is None and self.duration_minutes is None:
            raise ValueError("end or duration_minutes is required")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end {self.end.isoformat()} is not after start {self.start.isoformat()}")
        if self.duration_minutes is not None and self.ends != self.start + timedelta(minutes=self.duration_minutes):
            raise ValueError(f"duration_minutes {self.duration_minutes} does not agree with start and end")
        return self

    @property
    def ends(self) -> datetime:
        if self.end is not None:
            return self.end
        assert self.duration_minutes is not None
        return self.start + timedelta(minutes=self.duration_minutes)


class LaboratoryResult(PatientRecord):
    doctor_id: SourceId | None = None
    test_name: Text
    loinc_code: LoincCode | None = None
    date: When
    value: Result | None = None
    unit: UcumUnit | None = None
    reference_low: Number | None = None
    reference_high: Number | None = None
    reference_text: Text | None = None
    status: _code("normal", "abnormal", "high", "low", "critical", "pending")

    @model_validator(mode="after")
    def _consistent(self) -> "LaboratoryResult":
        if self.value is None and self.status != "pending":
            raise ValueError(f"value is required for a result with status {self.status}")
        if isinstance(self.value, str) and self.unit is not None:
            raise ValueError(f"unit {self.unit} is given for the text value '{self.value[:40]}'")
        low, high = self.reference_low, self.reference_high
        if low is not None and high is not None and low > high:
            raise ValueError(f"reference_low {low} is above reference_high {high}")
        return self


class RadiologyImaging(PatientRecord):
    date: When
    modality: Text | None = None
    description: Text | None = None
    content: bytes | None = Field(default=None, repr=False)  # the file, read by the importer (FILES)
    file_path: Text

    @field_validator("file_path")
    @classmethod
    def _file(cls, path: str, info: ValidationInfo) -> str:
        """The file must have been read, and be an image of an accepted type and size."""
        content = info.data.get("content")
        if content is None:
            raise ValueError(f"'{path}' was not read: the importer puts the file's bytes in `content`")
        if not content:
            raise ValueError(f"'{path}' is empty")
        if len(content) > MAX_FILE_BYTES:
            raise ValueError(f"'{path}' is larger than {MAX_FILE_BYTES} bytes ({MAX_FILE_BYTES // 2**20} MiB)")
        if sniff(content) is None:
            raise ValueError(f"'{path}' is not a PNG, JPEG, GIF, BMP, TIFF or DICOM file (judged by its content)")
        return path

    @property
    def media_type(self) -> str:
        assert self.content is not None
        found = sniff(self.content)
        assert found is not None
        return found


class MedicalHistory(PatientRecord):
    condition: Text
    onset_date: Day | None = None
    status: _code("active", "resolved")


class Allergy(PatientRecord):
    substance: Text
    reaction: Text | None = None
    severity: _code("mild", "moderate", "severe") | None = None

    @model_validator(mode="after")
    def _severity_of_a_reaction(self) -> "Allergy":
        if self.severity is not None and self.reaction is None:
            raise ValueError("severity is the severity of a reaction: reaction is required with it")
        return self


class Prescription(PatientRecord):
    doctor_id: SourceId
    medication: Text
    dosage: Text
    frequency: Text | None = None
    start_date: Day
    end_date: Day | None = None
    status: _code("active", "completed", "cancelled")

    @model_validator(mode="after")
    def _ends_after_start(self) -> "Prescription":
        if self.end_date is not None and self.end_date < self.start_date:
            raise ValueError(f"end_date {self.end_date} is before start_date {self.start_date}")
        return self


KINDS: dict[str, type[BaseModel]] = {
    "doctor": Doctor,
    "patient": Patient,
    "appointment": Appointment,
    "laboratory_result": LaboratoryResult,
    "radiology_imaging": RadiologyImaging,
    "medical_history": MedicalHistory,
    "allergy": Allergy,
    "prescription": Prescription,
}


# --- FHIR ---------------------------------------------------------------------------------------


def bundle_entries(kind: str, record: BaseModel) -> list[dict[str, Any]]:
    """The transaction entries of one validated record (a model of `KINDS[kind]`)."""
    check_kind(SYSTEM, KINDS, kind, record)
    return _MAPPERS[kind](record)


def dicom_instances(kind: str, record: BaseModel) -> list[records.DicomInstance]:
    """A radiology DICOM file, for the DICOM node (see the module docstring)."""
    if not isinstance(record, RadiologyImaging) or kind != "radiology_imaging" or record.media_type != "application/dicom":
        return []
    assert record.content is not None
    fill = {"StudyDate": record.date.strftime("%Y%m%d")}
    if isinstance(record.date, datetime):
        fill["StudyTime"] = record.date.strftime("%H%M%S")
    if record.description:
        fill["StudyDescription"] = record.description
    if record.modality and (known := MODALITIES.get(" ".join(record.modality.lower().split()))):
        fill["Modality"] = known[0]
    return [records.dicom_instance(record.content, records.source_identifier(SYSTEM, "patient", record.patient_id), fill)]


def _identifier(kind: str, record: Record, suffix: str = "") -> dict[str, str]:
    return records.source_identifier(SYSTEM, kind, f"{record.id}:{suffix}" if suffix else record.id)


def _reference(resource_type: str, kind: str, source_id: str) -> dict[str, str]:
    return records.conditional_reference(resource_type, records.source_identifier(SYSTEM, kind, source_id))


def _patient_reference(record: PatientRecord) -> dict[str, str]:
    return _reference("Patient", "patient", record.patient_id)


def _doctor_reference(doctor_id: str) -> dict[str, str]:
    return _reference("Practitioner", "doctor", doctor_id)


def _entries(*resources: tuple[dict[str, Any], str]) -> list[dict[str, Any]]:
    return [records.upsert_entry(resource, url) for resource, url in resources]


def _compact(element: dict[str, Any]) -> dict[str, Any]:
    """`element` without None, empty lists and empty objects (FHIR JSON has none)."""
    return {key: value for key, value in element.items() if value not in (None, "", [], {})}


def _moment(value: date | datetime) -> str:
    return value.isoformat()


def _telecom(phone: str | None, email: str | None, use: str | None = None) -> list[dict[str, str]]:
    points = [("phone", phone), ("email", email)]
    return [_compact({"system": system, "value": value, "use": use}) for system, value in points if value]


def _doctor(record: Doctor) -> list[dict[str, Any]]:
    practitioner_url, role_url = records.placeholder(), records.placeholder()
    identifiers = [_identifier("doctor", record)]
    if record.license_number:
        identifiers.append({"use": "official", "type": MEDICAL_LICENSE, "value": record.license_number})
    practitioner = _compact({
        "resourceType": "Practitioner",
        "identifier": identifiers,
        "active": True,
        "name": [{"use": "official", "family": record.last_name, "given": [record.first_name]}],
        "telecom": _telecom(record.phone, record.email, "work"),
    })
    role = _compact({
        "resourceType": "PractitionerRole",
        "identifier": [_identifier("doctor", record, "role")],
        "active": True,
        "practitioner": {"reference": practitioner_url},
        "code": [DOCTOR_ROLE],
        "specialty": [_specialty(name) for name in record.specialties],
    })
    return _entries((practitioner, practitioner_url), (role, role_url))


def _specialty(name: str) -> dict[str, Any]:
    known = SPECIALTIES.get(" ".join(name.lower().replace("&", "and").split()))
    if known is None:
        return {"text": name}
    return {"coding": [{"system": SNOMED, "code": known[0], "display": known[1]}], "text": name}


def _patient(record: Patient) -> list[dict[str, Any]]:
    patient_url = records.placeholder()
    patient = _compact({
        "resourceType": "Patient",
        "identifier": [_identifier("patient", record)],
        "active": True,
        "name": [{"use": "official", "family": record.last_name, "given": [record.first_name]}],
        "telecom": _telecom(record.phone, record.email),
        "gender": record.sex,
        "birthDate": record.birth_date.isoformat(),
        "address": [_address(record.address)] if record.address else None,
        "contact": [_emergency_contact(record.emergency_contact)] if record.emergency_contact else None,
    })
    entries = _entries((patient, patient_url))
    subject = {"reference": patient_url}
    social = [
        ("smoking-status", _smoking_status(record.smoking_status)),
        ("alcohol-use", {"text": record.alcohol_use} if record.alcohol_use else None),
        ("occupation", {"text": record.occupation} if record.occupation else None),
    ]
    for item, value in social:
        if value is not None:
            code, display = SOCIAL_CODES[item]
            observation = {
                "resourceType": "Observation",
                "identifier": [_identifier("patient", record, item)],
                "status": "final",
                "category": [SOCIAL_HISTORY],
                "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
                "subject": subject,
                "valueCodeableConcept": value,
            }
            entries += _entries((observation, records.placeholder()))
    return entries


def _address(address: Address | str) -> dict[str, Any]:
    if isinstance(address, str):
        return {"use": "home", "text": address}
    return _compact({
        "use": "home",
        "line": [line.strip() for line in (address.street or "").splitlines() if line.strip()],
        "city": address.city,
        "state": address.state,
        "postalCode": address.postal_code,
        "country": address.country,
    })


def _emergency_contact(contact: EmergencyContact) -> dict[str, Any]:
    relationship = [EMERGENCY_CONTACT]
    if contact.relationship:
        relationship.append({"text": contact.relationship})
    return _compact({
        "relationship": relationship,
        "name": {"text": contact.name},
        "telecom": _telecom(contact.phone, contact.email),
    })


def _smoking_status(status: str | None) -> dict[str, Any] | None:
    if status is None:
        return None
    code, display = SMOKING_STATUS[status]
    return {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display}


def _appointment(record: Appointment) -> list[dict[str, Any]]:
    appointment_url = records.placeholder()
    system, code, display = APPOINTMENT_TYPE[record.type]
    patient, doctor = _patient_reference(record), _doctor_reference(record.doctor_id)
    appointment = _compact({
        "resourceType": "Appointment",
        "identifier": [_identifier("appointment", record)],
        "status": APPOINTMENT_STATUS[record.status],
        "appointmentType": {"coding": [{"system": system, "code": code, "display": display}]},
        "reasonCode": [{"text": record.reason}] if record.reason else None,
        "start": _moment(record.start),
        "end": _moment(record.ends),
        "minutesDuration": record.duration_minutes,
        "comment": record.notes,
        "participant": [
            {"actor": patient, "required": "required", "status": "accepted"},
            {"actor": doctor, "required": "required", "status": "accepted"},
        ],
    })
    entries = _entries((appointment, appointment_url))
    if record.status == "completed":
        encounter = _compact({
            "resourceType": "Encounter",
            "identifier": [_identifier("appointment", record, "encounter")],
            "status": "finished",
            "class": EMERGENCY_CLASS if record.type == "emergency" else AMBULATORY_CLASS,
            "type": [appointment["appointmentType"]],
            "subject": patient,
            "participant": [{"individual": doctor}],
            "appointment": [{"reference": appointment_url}],
            "period": {"start": appointment["start"], "end": appointment["end"]},
            "reasonCode": appointment.get("reasonCode"),
        })
        entries += _entries((encounter, records.placeholder()))
    return entries


def _laboratory_result(record: LaboratoryResult) -> list[dict[str, Any]]:
    code: dict[str, Any] = {"text": record.test_name}
    if record.loinc_code:
        code = {"coding": [{"system": LOINC, "code": record.loinc_code}], **code}
    value: dict[str, Any] = {}
    if isinstance(record.value, Decimal):
        value["valueQuantity"] = _quantity(record.value, record.unit)
    elif record.value is not None:
        value["valueString"] = record.value
    reference_range = _compact({
        "low": _quantity(record.reference_low, record.unit) if record.reference_low is not None else None,
        "high": _quantity(record.reference_high, record.unit) if record.reference_high is not None else None,
        "text": record.reference_text,
    })
    interpretation = _interpretation(record)
    observation = _compact({
        "resourceType": "Observation",
        "identifier": [_identifier("laboratory_result", record)],
        "status": "registered" if record.status == "pending" else "final",
        "category": [LABORATORY],
        "code": code,
        "subject": _patient_reference(record),
        "effectiveDateTime": _moment(record.date),
        "performer": [_doctor_reference(record.doctor_id)] if record.doctor_id else None,
        **value,
        "interpretation": [interpretation] if interpretation else None,
        "referenceRange": [reference_range] if reference_range else None,
    })
    return _entries((observation, records.placeholder()))


def _quantity(value: Decimal, unit: str | None) -> dict[str, Any]:
    if unit is None:
        return {"value": value}
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _interpretation(record: LaboratoryResult) -> dict[str, Any] | None:
    """v3-ObservationInterpretation; a critical number beyond its range is critical high or low."""
    if record.status == "pending":
        return None
    key: str = record.status
    if key == "critical" and isinstance(record.value, Decimal):
        if record.reference_high is not None and record.value > record.reference_high:
            key = "critical-high"
        elif record.reference_low is not None and record.value < record.reference_low:
            key = "critical-low"
    code, display = INTERPRETATION[key]
    return {"coding": [{"system": TERMINOLOGY + "v3-ObservationInterpretation", "code": code, "display": display}]}


def _radiology_imaging(record: RadiologyImaging) -> list[dict[str, Any]]:
    assert record.content is not None
    if record.media_type == "application/dicom":
        return []  # the DICOM node makes its ImagingStudy (dicom_instances)
    binary_url, document_url = records.placeholder(), records.placeholder()
    patient = _patient_reference(record)
    source = f"{records.source_system(SYSTEM, 'radiology_imaging')}:{quote(record.id, safe='')}"
    binary = {
        "resourceType": "Binary",
        "meta": {"source": source},
        "contentType": record.media_type,
        "securityContext": patient,
        "data": base64.b64encode(record.content).decode("ascii"),
    }
    attachment = _compact({
        "contentType": record.media_type,
        "url": binary_url,
        "size": len(record.content),
        "hash": base64.b64encode(hashlib.sha1(record.content).digest()).decode("ascii"),  # noqa: S324 - FHIR's Attachment.hash is SHA-1
        "title": PurePosixPath(record.file_path.replace("\\", "/")).name,
        "creation": _moment(record.date),
    })
    document = _compact({
        "resourceType": "DocumentReference",
        "identifier": [_identifier("radiology_imaging", record)],
        "status": "current",
        "type": IMAGING_DOCUMENT,
        "subject": patient,
        "description": record.description,
        "content": [{"attachment": attachment}],
        "context": _compact({
            "event": [_modality(record.modality)] if record.modality else None,
            "period": {"start": _moment(record.date)},
        }),
    })
    binary_entry = records.upsert_entry(binary, binary_url, query="_source=" + quote(source, safe=":/"))
    return [binary_entry, records.upsert_entry(document, document_url)]


def _modality(modality: str) -> dict[str, Any]:
    known = MODALITIES.get(" ".join(modality.lower().split()))
    if known is None:
        return {"text": modality}
    return {"coding": [{"system": DCM, "code": known[0], "display": known[1]}], "text": modality}


def _medical_history(record: MedicalHistory) -> list[dict[str, Any]]:
    status = record.status.capitalize()
    condition = _compact({
        "resourceType": "Condition",
        "identifier": [_identifier("medical_history", record)],
        "clinicalStatus": {"coding": [{"system": TERMINOLOGY + "condition-clinical", "code": record.status,
                                       "display": status}]},
        "category": [PROBLEM_LIST_ITEM],
        "code": {"text": record.condition},
        "subject": _patient_reference(record),
        "onsetDateTime": record.onset_date.isoformat() if record.onset_date else None,
    })
    return _entries((condition, records.placeholder()))


def _allergy(record: Allergy) -> list[dict[str, Any]]:
    reaction = None
    if record.reaction:
        reaction = [_compact({"manifestation": [{"text": record.reaction}], "severity": record.severity})]
    allergy = _compact({
        "resourceType": "AllergyIntolerance",
        "identifier": [_identifier("allergy", record)],
        "clinicalStatus": {"coding": [{"system": TERMINOLOGY + "allergyintolerance-clinical", "code": "active",
                                       "display": "Active"}]},
        "code": {"text": record.substance},
        "patient": _patient_reference(record),
        "reaction": reaction,
    })
    return _entries((allergy, records.placeholder()))


def _prescription(record: Prescription) -> list[dict[str, Any]]:
    bounds = _compact({"start": record.start_date.isoformat(),
                       "end": record.end_date.isoformat() if record.end_date else None})
    request = {
        "resourceType": "MedicationRequest",
        "identifier": [_identifier("prescription", record)],
        "status": record.status,
        "intent": "order",
        "medicationCodeableConcept": {"text": record.medication},
        "subject": _patient_reference(record),
        "authoredOn": record.start_date.isoformat(),
        "requester": _doctor_reference(record.doctor_id),
        "dosageInstruction": [{
            "text": ", ".join(part for part in (record.dosage, record.frequency) if part),
            "timing": {"repeat": {"boundsPeriod": bounds}},
        }],
    }
    return _entries((request, records.placeholder()))


_MAPPERS: dict[str, Any] = {
    "doctor": _doctor,
    "patient": _patient,
    "appointment": _appointment,
    "laboratory_result": _laboratory_result,
    "radiology_imaging": _radiology_imaging,
    "medical_history": _medical_history,
    "allergy": _allergy,
    "prescription": _prescription,
}
