"""The retinal image manager's records as FHIR R4. Pure: no I/O.

Kinds, in import order:

- `site` → an `Organization` (the screening site) and a `Location` it manages (the place, with
  the site's address);
- `patient` → a `Patient`;
- `image` → an imaging record of the eye and an `Observation` grading it (components: image
  quality, visibility of the retinal anatomy, over-illumination). A DICOM file goes to the DICOM
  node (`dicom_instances`; the importer C-STOREs it), whose mapping makes the `ImagingStudy`
  (series laterality and bodySite from the header); any other image becomes a `Binary` and a
  `Media` describing it.

Choices the mapping makes:

- **Media, not DocumentReference**, for images that are not DICOM. R4 `Media` has what a retinal
  photograph needs and DocumentReference lacks: `bodySite`, `modality`, `operator`,
  `height`/`width`/`frames`, and the search parameters `site`, `modality`, `operator` and
  `created`. The file is a `Binary`, which `Media.content.url` points at (`Binary/<id>`); the
  content type is judged by the file's content, never its name.
- **DICOM files** are stored and indexed by the DICOM node, as a modality's would be: the
  ImagingStudy's id is the Study Instance UID, and the grading points at `ImagingStudy/<uid>`.
  Before sending, the file's PatientID and IssuerOfPatientID are set to the record's patient
  (`urn:fhir-server:source:retinal:patient` and the source id, so that the node finds the
  imported Patient by that identifier), and ImageLaterality and BodyPartExamined (`EYE`) are
  added when the header lacks them.
- **The eye**: `bodySite` is the SNOMED CT structure of that eye (8966001 left eye structure,
  18944008 right eye structure, so `Media?site=…|8966001` finds left eyes), with the laterality
  as an extension of `bodySite` holding the code of the R4 `bodysite-laterality` value set
  (419161000 unilateral left, 419465000 unilateral right), as `ImagingStudy.series.laterality`
  has it for DICOM studies (`mappings/dicom.py`). A DICOM file whose ImageLaterality (or
  Laterality) contradicts `eye_side` is refused.
- **The site** is the Media's `operator` and the grading Observation's `performer` (the
  Organization).
- **Grades**: one `Observation` per image, code `image-grading` of our CodeSystem
  `retinal-image-quality`, `derivedFrom` the Media or ImagingStudy, with three components: `image-quality` and
  `anatomy-score` with a value of that CodeSystem (one CodeSystem cannot hold the code
  `ACCEPTABLE` twice, so the values are `quality-…` and `anatomy-…`) and `over-illuminated` with
  the HL7 v2 yes/no code (table 0136), not a valueBoolean: R4 has no search parameter for
  booleans, and `component-code-value-concept=…|over-illuminated$…|Y` should work. One
  Observation with components rather than three: the source grades an image in one act (one
  record, one grader, one time), and `$ai-readiness` then reads a third of the documents with no
  join per image (about 0.5 s instead of 1 s for 2,100 images on the embedded database).
- **Dates**: an acquisition time with a zone is kept; a time without one keeps only its date
  (a guessed zone would be wrong by hours, as for DICOM times).
- **Re-import**: every resource is written by a conditional update on its source identifier
  (created, updated when the source changed, else left as it is); the Binary, which has no
  identifier, on its `meta.source` (`urn:fhir-server:source:retinal:image:<id>`,
  searched with `_source`); the grading Observation on `urn:fhir-server:source:retinal:grading`
  with the image's id.
- An image of an unknown patient or site fails its transaction (412: its conditional
  reference matches nothing); a file that is no image this module knows is refused here.

Source formats: JSON `{kind: [records]}` or one CSV per kind (`sites.csv`, `patients.csv`,
`images.csv`). Unknown fields are refused. An image's file is either inline, base64 in `image`
(as `retinal_generate` makes them), or named by `file_path`, relative to the input file, which
the importer reads (`FILES`) into `image` before validation, at most `MAX_FILE_BYTES` + 1 bytes.
"""

import base64
import binascii
import hashlib
import io
import struct
from datetime import date, datetime, timedelta
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import quote

import pydicom
from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NaiveDatetime,
    StringConstraints,
    model_validator,
)

from mappings.dicom import DCM_SYSTEM, DICOM_UID_SYSTEM, LATERALITY, SNOMED_SYSTEM
from mappings.records import (
    DicomInstance,
    conditional_reference,
    dicom_instance,
    placeholder,
    source_identifier,
    source_system,
    upsert_entry,
)
from mappings.uploads import sniff

SYSTEM = "retinal"
CODE_SYSTEM = "https://fhir-server.local/CodeSystem/retinal-image-quality"
YES_NO_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0136"
LATERALITY_EXTENSION = "https://fhir-server.local/StructureDefinition/bodysite-laterality"
MEDIA_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/media-type"
ORGANIZATION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/organization-type"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"

# Observation codes: the grading, and its components.
GRADING = "image-grading"
IMAGE_QUALITY = "image-quality"
ANATOMY_SCORE = "anatomy-score"
OVER_ILLUMINATED = "over-illuminated"
GRADES = (IMAGE_QUALITY, ANATOMY_SCORE, OVER_ILLUMINATED)

# Source scores → our codes (and displays).
QUALITY = {"LOW": "quality-low", "ACCEPTABLE": "quality-acceptable", "HIGH": "quality-high"}
ANATOMY = {"POOR": "anatomy-poor", "ACCEPTABLE": "anatomy-acceptable", "GOOD": "anatomy-good"}
YES = {"system": YES_NO_SYSTEM, "code": "Y", "display": "Yes"}
NO = {"system": YES_NO_SYSTEM, "code": "N", "display": "No"}

CONCEPTS: tuple[tuple[str, str, str], ...] = (
    (GRADING, "Retinal image grading", "The grading of one retinal photograph at its site: quality, anatomy "
                                       "visibility and over-illumination, as components."),
    (IMAGE_QUALITY, "Retinal image quality", "Overall technical quality of a retinal photograph, graded at the site."),
    (ANATOMY_SCORE, "Retinal anatomy visibility", "How well the retinal landmarks (optic disc, macula, vessels) are shown."),
    (OVER_ILLUMINATED, "Over-illuminated retinal image", "Whether the photograph is over-exposed (value: HL7 v2 table 0136 Y/N)."),
    ("quality-low", "Low", "Image quality: too poor to grade."),
    ("quality-acceptable", "Acceptable", "Image quality: gradable with limitations."),
    ("quality-high", "High", "Image quality: fully gradable."),
    ("anatomy-poor", "Poor", "Retinal anatomy: landmarks missing or not discernible."),
    ("anatomy-acceptable", "Acceptable", "Retinal anatomy: landmarks partly shown."),
    ("anatomy-good", "Good", "Retinal anatomy: optic disc, macula and vessels clearly shown."),
    ("ai-ready", "AI-ready retinal images", "Images fit for automated (AI) grading: the $ai-readiness measure."),
    ("assessed-patients", "Patients with graded images", "Patients with at least one graded retinal image."),
)
DISPLAY = {code: display for code, display, _ in CONCEPTS}

CODE_SYSTEMS: list[dict[str, Any]] = [{
    "resourceType": "CodeSystem",
    "url": CODE_SYSTEM,
    "version": "1",
    "name": "RetinalImageQuality",
    "title": "Retinal image quality assessment",
    "status": "active",
    "experimental": False,
    "publisher": "fhir-server",
    "description": "Grades of retinal photographs from the retinal image manager: the Observation codes "
                   "(image quality, anatomy visibility, over-illumination), the values of the two scores, "
                   "and the codes of the AI-readiness measure.",
    "caseSensitive": True,
    "content": "complete",
    "count": len(CONCEPTS),
    "concept": [{"code": code, "display": display, "definition": definition} for code, display, definition in CONCEPTS],
}]

# The eye photographed: SNOMED CT structure, and the R4 bodysite-laterality code.
EYES = {
    "LEFT": ({"system": SNOMED_SYSTEM, "code": "8966001", "display": "Left eye structure"}, LATERALITY["L"], "L"),
    "RIGHT": ({"system": SNOMED_SYSTEM, "code": "18944008", "display": "Right eye structure"}, LATERALITY["R"], "R"),
}
OPHTHALMIC_PHOTOGRAPHY = {"system": DCM_SYSTEM, "code": "OP", "display": "Ophthalmic photography"}
IMAGE_TYPE = {"system": MEDIA_TYPE_SYSTEM, "code": "image", "display": "Image"}
PROVIDER = {"system": ORGANIZATION_TYPE_SYSTEM, "code": "prov", "display": "Healthcare Provider"}
IMAGING = {"system": CATEGORY_SYSTEM, "code": "imaging", "display": "Imaging"}
GENDERS = {"MALE": "male", "FEMALE": "female", "OTHER": "other"}
MAX_FILE_BYTES = 10 * 1024 * 1024

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
SourceId = Annotated[int, Field(ge=0)] | Text


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Site(Record):
    id: SourceId
    name: Text
    location: Text | None = Field(default=None, validation_alias=AliasChoices("location", "address"))


class Patient(Record):
    id: SourceId
    birth_date: date
    sex: Literal["MALE", "FEMALE", "OTHER"]


def _content(value: Any) -> Any:
    """The file: bytes as the importer read them, or base64 text inline in JSON or CSV."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("image: not base64 text") from exc
    return value


class Image(Record):
    id: SourceId
    patient_id: SourceId
    site_id: SourceId
    eye_side: Literal["LEFT", "RIGHT"]
    quality_score: Literal["LOW", "ACCEPTABLE", "HIGH"]
    anatomy_score: Literal["POOR", "ACCEPTABLE", "GOOD"]
    over_illuminated: bool
    acquisition_date: AwareDatetime | date | NaiveDatetime
    # The file: inline (base64 in JSON and CSV), or named by `file_path` (relative to the input
    # file) and read by the importer (`FILES`) into `image`.
    image: Annotated[bytes | None, BeforeValidator(_content)] = Field(default=None, repr=False)
    file_path: Text | None = None
    file_name: Text | None = None

    @model_validator(mode="after")
    def _file(self) -> "Image":
        where = f"'{self.file_path}'" if self.file_path else "image"
        if self.image is None:
            raise ValueError(f"{where}: no file: give `image` (base64) or `file_path`")
        if not self.image:
            raise ValueError(f"{where}: the file is empty")
        if len(self.image) > MAX_FILE_BYTES:
            raise ValueError(f"{where}: the file is larger than {MAX_FILE_BYTES} bytes ({MAX_FILE_BYTES // 2**20} MiB)")
        return self

    @property
    def title(self) -> str | None:
        """The file's name, for `Attachment.title`."""
        return self.file_name or (PurePosixPath(self.file_path.replace("\\", "/")).name if self.file_path else None)


KINDS: dict[str, type[Record]] = {"site": Site, "patient": Patient, "image": Image}
FILES = {"image": ("file_path", "image")}  # the importer reads `file_path` into `image`



def bundle_entries(kind: str, record: BaseModel) -> list[dict[str, Any]]:
    """The transaction entries of one validated record (ValueError: a record that cannot be
    mapped, such as a file that is not an image)."""
    if isinstance(record, Site) and kind == "site":
        return _site(record)
    if isinstance(record, Patient) and kind == "patient":
        return _patient(record)
    if isinstance(record, Image) and kind == "image":
        return _image(record)
    raise ValueError(f"not a retinal {kind} record: {type(record).__name__}")


def _identifier(kind: str, source_id: object) -> dict[str, str]:
    return source_identifier(SYSTEM, kind, source_id)


def site_reference(site_id: object) -> dict[str, str]:
    return conditional_reference("Organization", _identifier("site", site_id))


def patient_reference(patient_id: object) -> dict[str, str]:
    return conditional_reference("Patient", _identifier("patient", patient_id))


def _site(site: Site) -> list[dict[str, Any]]:
    identifier = _identifier("site", site.id)
    organization: dict[str, Any] = {
        "resourceType": "Organization",
        "identifier": [identifier],
        "active": True,
        "type": [{"coding": [PROVIDER]}],
        "name": site.name,
    }
    location: dict[str, Any] = {
        "resourceType": "Location",
        "identifier": [identifier],
        "status": "active",
        "name": site.name,
        "mode": "instance",
    }
    if site.location:
        organization["address"] = [{"text": site.location}]
        location["address"] = {"text": site.location}
    organization_url = placeholder()
    location["managingOrganization"] = {"reference": organization_url}
    return [upsert_entry(organization, organization_url), upsert_entry(location, placeholder())]


def _patient(patient: Patient) -> list[dict[str, Any]]:
    resource = {
        "resourceType": "Patient",
        "identifier": [_identifier("patient", patient.id)],
        "gender": GENDERS[patient.sex],
        "birthDate": patient.birth_date.isoformat(),
    }
    return [upsert_entry(resource, placeholder())]


def fhir_datetime(value: date | datetime) -> str:
    """A FHIR dateTime: with its zone (`Z` for UTC), or the date alone when there is none."""
    if not isinstance(value, datetime):
        return value.isoformat()
    if value.tzinfo is None or value.utcoffset() is None:
        return value.date().isoformat()
    text = value.isoformat(timespec="milliseconds" if value.microsecond else "seconds")
    return text[:-6] + "Z" if value.utcoffset() == timedelta(0) else text


def image_facts(data: bytes) -> dict[str, Any]:
    """What the file's content says: `contentType`, and when known `width`, `height`, `frames`,
    `laterality` (DICOM `L`/`R`/`B`) and, for DICOM, the `study` (Study Instance UID).
    ValueError for a file that is not an image."""
    content_type = sniff(data)
    if content_type is None:
        raise ValueError("image: the file is not a PNG, JPEG, GIF, BMP, TIFF or DICOM image (judged by its content)")
    facts: dict[str, Any] = {"contentType": content_type}
    if content_type == "image/png" and data[12:16] == b"IHDR":
        facts["width"], facts["height"] = struct.unpack(">II", data[16:24])
    elif content_type == "application/dicom":
        try:
            facts.update(_dicom_facts(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)))
        except Exception as exc:  # noqa: BLE001 - whatever pydicom makes of a malformed header is a refusal
            reason = str(exc)
            raise ValueError(reason if reason.startswith("image:") else f"image: the DICOM file cannot be read: {reason}") from exc
    return {k: v for k, v in facts.items() if not isinstance(v, int) or v > 0}


def _dicom_facts(ds: pydicom.Dataset) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for key, keyword in (("height", "Rows"), ("width", "Columns"), ("frames", "NumberOfFrames")):
        value = ds.get(keyword)
        if value not in (None, ""):
            facts[key] = int(value)
    side = str(ds.get("ImageLaterality") or ds.get("Laterality") or "").strip().upper()
    if side in ("L", "R", "B"):
        facts["laterality"] = side
    for key, keyword in (("study", "StudyInstanceUID"), ("sop", "SOPInstanceUID")):
        uid = str(ds.get(keyword) or "").strip()
        if not uid or len(uid) > 64 or not set(uid) <= set("0123456789."):
            raise ValueError(f"image: the DICOM file has no valid {keyword}")
        facts[key] = uid
    return facts


def _checked_facts(image: Image) -> dict[str, Any]:
    assert image.image is not None
    facts = image_facts(image.image)
    letter = EYES[image.eye_side][2]
    if facts.get("laterality", letter) != letter:
        raise ValueError(f"eye_side is {image.eye_side} but the DICOM file shows laterality {facts['laterality']}")
    return facts


def dicom_instances(kind: str, record: BaseModel) -> list[DicomInstance]:
    """The DICOM file of an image record, for the DICOM node (the importer C-STOREs it before
    the record's transaction): its patient set to the record's (PatientID in the namespace of
    our patient identifiers, so that the node finds the imported Patient), and the eye and body
    part added where the header lacks them, so that the ImagingStudy's series has its
    laterality and bodySite."""
    if not isinstance(record, Image) or kind != "image" or _checked_facts(record)["contentType"] != "application/dicom":
        return []
    assert record.image is not None
    fill = {"ImageLaterality": EYES[record.eye_side][2], "BodyPartExamined": "EYE"}
    return [dicom_instance(record.image, _identifier("patient", record.patient_id), fill)]


def _image(image: Image) -> list[dict[str, Any]]:
    data = image.image
    assert data is not None
    facts = _checked_facts(image)
    structure, laterality, _ = EYES[image.eye_side]
    when = fhir_datetime(image.acquisition_date)
    patient = patient_reference(image.patient_id)
    site = site_reference(image.site_id)
    body_site = {
        "extension": [{"url": LATERALITY_EXTENSION, "valueCoding": laterality}],
        "coding": [structure],
        "text": f"{image.eye_side.capitalize()} eye (retina)",
    }

    if facts["contentType"] == "application/dicom":  # the node makes its ImagingStudy (dicom_instances)
        # The study, and the image in it (R4 cannot reference an instance: its UID is the
        # Reference's identifier, so that two graded images of one study stay two).
        instance = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{facts['sop']}"}
        grading = _grading(image, patient, site, body_site, when, {"reference": f"ImagingStudy/{facts['study']}",
                                                                   "identifier": instance})
        return [upsert_entry(grading, placeholder())]

    binary_url = placeholder()
    source = f"{source_system(SYSTEM, 'image')}:{quote(str(image.id), safe='')}"
    binary = {
        "resourceType": "Binary",
        "meta": {"source": source},
        "contentType": facts["contentType"],
        "securityContext": patient,
        "data": base64.b64encode(data).decode(),
    }
    attachment: dict[str, Any] = {
        "contentType": facts["contentType"],
        "url": binary_url,
        "size": len(data),
        "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(),  # noqa: S324 - Attachment.hash is SHA-1
    }
    if image.title:
        attachment["title"] = image.title
    attachment["creation"] = when
    media: dict[str, Any] = {
        "resourceType": "Media",
        "identifier": [_identifier("image", image.id)],
        "status": "completed",
        "type": {"coding": [IMAGE_TYPE]},
        "modality": {"coding": [OPHTHALMIC_PHOTOGRAPHY]},
        "subject": patient,
        "createdDateTime": when,
        "operator": site,
        "bodySite": body_site,
    }
    for key in ("height", "width", "frames"):
        if key in facts:
            media[key] = facts[key]
    media["content"] = attachment
    media_url = placeholder()
    grading = _grading(image, patient, site, body_site, when, {"reference": media_url})
    source_query = "_source=" + quote(source, safe=":/")
    return [
        upsert_entry(binary, binary_url, query=source_query),
        upsert_entry(media, media_url),
        upsert_entry(grading, placeholder()),
    ]


def _grading(
    image: Image, patient: dict[str, str], site: dict[str, str], body_site: dict[str, Any], when: str,
    derived_from: dict[str, Any],
) -> dict[str, Any]:
    """The grading Observation of an image, `derived_from` the imaging record (Media or ImagingStudy)."""

    def score(code: str) -> dict[str, str]:
        return {"system": CODE_SYSTEM, "code": code, "display": DISPLAY[code]}

    def component(code: str, value: dict[str, str]) -> dict[str, Any]:
        return {"code": {"coding": [score(code)]}, "valueCodeableConcept": {"coding": [value]}}

    return {
        "resourceType": "Observation",
        "identifier": [_identifier("grading", image.id)],
        "status": "final",
        "category": [{"coding": [IMAGING]}],
        "code": {"coding": [score(GRADING)]},
        "subject": patient,
        "effectiveDateTime": when,
        "performer": [site],
        "bodySite": body_site,
        "derivedFrom": [derived_from],
        "component": [
            component(IMAGE_QUALITY, score(QUALITY[image.quality_score])),
            component(ANATOMY_SCORE, score(ANATOMY[image.anatomy_score])),
            component(OVER_ILLUMINATED, YES if image.over_illuminated else NO),
        ],
    }
