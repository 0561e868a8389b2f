"""DICOM headers to FHIR R4: ImagingStudy, Patient and Endpoint. Pure: no I/O.

Follows the FHIR ImagingStudy ↔ DICOM mapping (https://hl7.org/fhir/R4/imagingstudy-mappings.html).
The DICOM node reads `instance_facts` from each stored instance, then folds the facts of one study's
instances into its ImagingStudy with `imaging_study`. Facts are plain JSON, so they can be queued,
logged or compared; the study, series and instance parts are already FHIR-shaped, the patient part
keeps the DICOM strings for `patient_identifier` and `patient_resource`.

Choices the mapping leaves open:

- A FHIR dateTime with a time needs a time zone. Study and series times get the instance's
  TimezoneOffsetFromUTC; without it only the date is kept (a guessed zone would be wrong by hours).
  DICOM times without seconds are padded (`1010` → `10:10:00`); dates that are not a whole valid
  YYYYMMDD (`2024`, `20240230`) are left out.
- The patient identifier's system comes from the issuer: the Universal Entity ID of
  IssuerOfPatientIDQualifiersSequence, else IssuerOfPatientID; an OID becomes `urn:oid:…`, a UUID
  `urn:uuid:…`, a URI is kept. A local issuer name (`HOSP_A`) is kept as the system too
  (percent-encoded where a URI needs it), so patients of two issuers never share an identifier;
  `default_system` is used only when the header names no issuer.
- bodySite: the Anatomic Region Sequence code when present, else Body Part Examined through the
  SNOMED CT codes of DICOM PS3.16 Annex L (common terms), else a Coding with the term as display.
- laterality: Laterality, else ImageLaterality, else the frame laterality of an enhanced instance,
  as the SNOMED CT codes of the R4 `bodysite-laterality` value set; L and R across one series make
  it bilateral.
"""

import copy
import io
import json
import re
import struct
from calendar import monthrange
from typing import Any
from urllib.parse import quote

import pydicom
import pydicom.datadict
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_SYSTEM = "http://snomed.info/sct"
URI_SYSTEM = "urn:ietf:rfc:3986"
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
NAME_REPRESENTATION_URL = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"

ACCESSION_TYPE = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "ACSN", "display": "Accession ID"}]}

# Coding Scheme Designators (DICOM PS3.16 Table 8-1) with a FHIR system. "SRT" and its aliases
# carry SNOMED-RT style codes (T-D3000), not SNOMED CT concept ids.
CODING_SCHEMES = {
    "DCM": DCM_SYSTEM,
    "SCT": SNOMED_SYSTEM,
    "SRT": "http://snomed.info/srt",
    "SNM3": "http://snomed.info/srt",
    "99SDM": "http://snomed.info/srt",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "UMLS": "http://www.nlm.nih.gov/research/umls",
    "RADLEX": "http://www.radlex.org",
    "NCIt": "http://ncit.nci.nih.gov",
    "MDC": "urn:iso:std:iso:11073:10101",
    "FMA": "http://sig.biostr.washington.edu/projects/fm/AboutFM.html",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
}

# The R4 value set bodysite-laterality; the keys are DICOM's Laterality / ImageLaterality values.
LATERALITY = {
    "L": {"system": SNOMED_SYSTEM, "code": "419161000", "display": "Unilateral left"},
    "R": {"system": SNOMED_SYSTEM, "code": "419465000", "display": "Unilateral right"},
    "B": {"system": SNOMED_SYSTEM, "code": "51440002", "display": "Bilateral"},
}
LATERALITY_BY_CODE = {coding["code"]: letter for letter, coding in LATERALITY.items()}

# Body Part Examined defined terms and their SNOMED CT codes (DICOM PS3.16 Annex L, current codes);
# the common terms only: any other term keeps its text as the Coding's display.
BODY_PARTS = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ADRENAL": ("23451007", "Adrenal gland"),
    "ANKLE": ("70258002", "Ankle joint"),
    "AORTA": ("15825003", "Aorta"),
    "ARM": ("40983000", "Arm"),
    "AXILLA": ("91470000", "Axilla"),
    "BACK": ("77568009", "Back"),
    "BILEDUCT": ("28273000", "Bile duct"),
    "BLADDER": ("89837001", "Bladder"),
    "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"),
    "BRONCHUS": ("955009", "Bronchus"),
    "BUTTOCK": ("46862004", "Buttock"),
    "CALCANEUS": ("80144004", "Calcaneus"),
    "CALF": ("53840002", "Calf of leg"),
    "CAROTID": ("69105007", "Carotid Artery"),
    "CEREBELLUM": ("113305005", "Cerebellum"),
    "CERVIX": ("71252005", "Cervix"),
    "CHEEK": ("60819002", "Cheek"),
    "CHEST": ("816094009", "Chest"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "CIRCLEOFWILLIS": ("11279006", "Circle of Willis"),
    "CLAVICLE": ("51299004", "Clavicle"),
    "COCCYX": ("64688005", "Coccyx"),
    "COLON": ("71854001", "Colon"),
    "CORONARYARTERY": ("41801008", "Coronary artery"),
    "CSPINE": ("122494005", "Cervical spine"),
    "CTSPINE": ("1217257000", "Cervico-thoracic spine"),
    "DUODENUM": ("38848004", "Duodenum"),
    "EAR": ("117590005", "Ear"),
    "ELBOW": ("16953009", "Elbow joint"),
    "ESOPHAGUS": ("32849002", "Esophagus"),
    "EXTREMITY": ("66019005", "Extremity"),
    "EYE": ("81745001", "Eye"),
    "FACE": ("89545001", "Face"),
    "FEMUR": ("71341001", "Femur"),
    "FIBULA": ("87342007", "Fibula"),
    "FINGER": ("7569003", "Finger"),
    "FOOT": ("56459004", "Foot"),
    "FOREARM": ("14975008", "Forearm"),
    "GALLBLADDER": ("28231008", "Gallbladder"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("24136001", "Hip joint"),
    "HUMERUS": ("85050009", "Humerus"),
    "ILEUM": ("34516001", "Ileum"),
    "ILIUM": ("22356005", "Ilium"),
    "JAW": ("661005", "Jaw region"),
    "JEJUNUM": ("21306003", "Jejunum"),
    "KIDNEY": ("64033007", "Kidney"),
    "KNEE": ("72696002", "Knee"),
    "LARYNX": ("4596009", "Larynx"),
    "LEG": ("30021000", "Lower leg"),
    "LIVER": ("10200004", "Liver"),
    "LOWERLEG": ("30021000", "Lower leg"),
    "LOWERLIMB": ("61685007", "Lower limb"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "LSSPINE": ("1217253001", "Lumbo-sacral spine"),
    "LUNG": ("39607008", "Lung"),
    "MANDIBLE": ("91609006", "Mandible"),
    "MAXILLA": ("70925003", "Maxilla"),
    "MEDIASTINUM": ("72410000", "Mediastinum"),
    "MOUTH": ("123851003", "Mouth"),
    "NECK": ("45048000", "Neck"),
    "NECKCHEST": ("417437006", "Neck and Chest"),
    "NECKCHESTABDOMEN": ("416152001", "Neck, Chest and Abdomen"),
    "NECKCHESTABDPELV": ("416319003", "Neck, Chest, Abdomen and Pelvis"),
    "NOSE": ("45206002", "Nose"),
    "ORBIT": ("363654007", "Orbital structure"),
    "OVARY": ("15497006", "Ovary"),
    "PANCREAS": ("15776009", "Pancreas"),
    "PAROTID": ("45289007", "Parotid gland"),
    "PATELLA": ("64234005", "Patella"),
    "PELVIS": ("816092008", "Pelvis"),
    "PENIS": ("18911002", "Penis"),
    "PHARYNX": ("54066008", "Pharynx"),
    "PROSTATE": ("41216001", "Prostate"),
    "RECTUM": ("34402009", "Rectum"),
    "RIB": ("113197003", "Rib"),
    "SCAPULA": ("79601000", "Scapula"),
    "SCROTUM": ("20233005", "Scrotum"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SKULL": ("89546000", "Skull"),
    "SPINE": ("421060004", "Spine"),
    "SPLEEN": ("78961009", "Spleen"),
    "SSPINE": ("54735007", "Sacrum"),
    "STERNUM": ("56873002", "Sternum"),
    "STOMACH": ("69695003", "Stomach"),
    "TESTIS": ("40689003", "Testis"),
    "THIGH": ("68367000", "Thigh"),
    "THUMB": ("76505004", "Thumb"),
    "THYROID": ("69748006", "Thyroid"),
    "TIBIA": ("12611008", "Tibia"),
    "TLSPINE": ("1217256009", "Thoraco-lumbar spine"),
    "TMJ": ("53620006", "Temporomandibular joint"),
    "TOE": ("29707007", "Toe"),
    "TRACHEA": ("44567001", "Trachea"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "UPPERLIMB": ("53120007", "Upper limb"),
    "URETER": ("87953007", "Ureter"),
    "URETHRA": ("13648007", "Urethra"),
    "UTERUS": ("35039007", "Uterus"),
    "VAGINA": ("76784001", "Vagina"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist joint"),
    "ZYGOMA": ("13881006", "Zygoma"),
}

GENDERS = {"M": "male", "F": "female", "O": "other"}

# Element order of the R4 definitions, so that the JSON reads like the specification's examples.
STUDY_ORDER = (
    "resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
    "modifierExtension", "identifier", "status", "modality", "subject", "encounter", "started", "basedOn",
    "referrer", "interpreter", "endpoint", "numberOfSeries", "numberOfInstances", "procedureReference",
    "procedureCode", "location", "reasonCode", "reasonReference", "note", "description", "series",
)
SERIES_ORDER = (
    "id", "extension", "modifierExtension", "uid", "number", "modality", "description", "numberOfInstances",
    "endpoint", "bodySite", "laterality", "specimen", "started", "performer", "instance",
)

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")
_ZONE = re.compile(r"([+-])(\d{2})(\d{2})")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# What a URI cannot hold unescaped, besides what `quote` escapes itself.
_URI_SAFE = "!#$&'()*+,/:;=?@[]~%"


def instance_facts(ds: pydicom.Dataset) -> dict[str, Any]:
    """JSON-able facts of one instance, everything its study's ImagingStudy and Patient need.

    Raises ValueError naming the attribute when a Study, Series or SOP Instance UID or the SOP Class
    UID is missing or not a valid UID: without them the instance cannot be placed in a study.
    Any other attribute that is missing, empty or malformed is left out. `dicom` holds what the
    query/retrieve catalog keeps (`catalog_attributes`).
    """
    study_uid = _uid(ds, "StudyInstanceUID")
    series_uid = _uid(ds, "SeriesInstanceUID")
    instance_uid = _uid(ds, "SOPInstanceUID")
    sop_class = _uid(ds, "SOPClassUID")
    zone = _zone(_text(ds, "TimezoneOffsetFromUTC"))
    return {
        "study": _compact(
            {
                "uid": study_uid,
                "started": _date_time(_text(ds, "StudyDate"), _text(ds, "StudyTime"), zone),
                "description": _text(ds, "StudyDescription"),
                "accession": _accession(ds),
                "referrer": _person_display(_text(ds, "ReferringPhysicianName")),
                "procedureCode": _procedure_codes(ds),
                "reasonCode": _reason_codes(ds),
            }
        ),
        "series": _compact(
            {
                "uid": series_uid,
                "number": _number(ds, "SeriesNumber"),
                "modality": _text(ds, "Modality"),
                "description": _text(ds, "SeriesDescription"),
                "bodySite": _body_site(ds),
                "laterality": _laterality(ds),
                "started": _date_time(_text(ds, "SeriesDate"), _text(ds, "SeriesTime"), zone),
            }
        ),
        "instance": _compact(
            {
                "uid": instance_uid,
                "sopClass": sop_class,
                "number": _number(ds, "InstanceNumber"),
                "title": _instance_title(ds),
            }
        ),
        "patient": _compact(
            {
                "id": _text(ds, "PatientID"),
                "issuer": _text(ds, "IssuerOfPatientID"),
                "issuerUniversal": _universal_entity(_first_item(ds, "IssuerOfPatientIDQualifiersSequence")),
                "name": _text(ds, "PatientName"),
                "birthDate": _text(ds, "PatientBirthDate"),
                "sex": _text(ds, "PatientSex"),
            }
        ),
        "dicom": catalog_attributes(ds),
    }


# --- the query/retrieve catalog's attributes ----------------------------------------------------

# The header attributes the catalog keeps per query/retrieve level (PS3.4 C.6.1.1 and C.6.2.1 keys,
# and what QIDO-RS returns by default), so that C-FIND and QIDO-RS never open a file. Any other
# attribute is an unsupported optional key: returned empty, never matched.
PATIENT_ATTRIBUTES = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "OtherPatientNames",
    "EthnicGroup", "PatientComments", "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "ResponsiblePerson", "ResponsiblePersonRole",
    "ResponsibleOrganization", "PatientIdentityRemoved", "DeidentificationMethod", "PatientBirthName",
    "PatientMotherBirthName", "MedicalRecordLocator", "QualityControlSubject", "StrainDescription",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
)
STUDY_ATTRIBUTES = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "AnatomicRegionsInStudyCodeSequence", "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence",
    "StudyDescription", "ProcedureCodeSequence", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "ReferencedStudySequence", "PatientAge",
    "PatientSize", "PatientWeight", "Occupation", "AdditionalPatientHistory", "PatientSexNeutered", "MedicalAlerts",
    "Allergies", "SmokingStatus", "PregnancyStatus", "OtherStudyNumbers", "TimezoneOffsetFromUTC", "AdmissionID",
    "IssuerOfAdmissionIDSequence", "ReasonForPerformedProcedureCodeSequence", "RequestingService",
    "ConsultingPhysicianName", "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
)
SERIES_ATTRIBUTES = (
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDescriptionCodeSequence",
    "SeriesDate", "SeriesTime", "BodyPartExamined", "Laterality", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    "PerformedProtocolCodeSequence", "RequestAttributesSequence", "ReferencedPerformedProcedureStepSequence",
    "InstitutionName", "InstitutionalDepartmentName", "StationName", "PerformingPhysicianName", "OperatorsName",
    "ProtocolName", "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions",
    "FrameOfReferenceUID", "PatientPosition", "AnatomicalOrientationType", "ClinicalTrialCoordinatingCenterName",
    "ClinicalTrialSeriesID", "ClinicalTrialSeriesDescription", "RelatedSeriesSequence", "SeriesType",
)
INSTANCE_ATTRIBUTES = (
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation", "ImageType",
    "ContentDate", "ContentTime", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "AcquisitionNumber",
    "InstanceCreationDate", "InstanceCreationTime", "ImageComments", "ImageLaterality", "SliceLocation",
    "SliceThickness", "PixelSpacing", "WindowCenter", "WindowWidth", "ContentLabel", "ContentDescription",
    "ContentCreatorName", "ConceptNameCodeSequence", "CompletionFlag", "VerificationFlag", "ObservationDateTime",
    "DocumentTitle", "LossyImageCompression", "BurnedInAnnotation", "PresentationCreationDate",
    "PresentationCreationTime", "TemporalPositionIdentifier", "EchoNumbers", "ImagePositionPatient",
    "ImageOrientationPatient",
)
_LEVEL_OF_TAG = {
    pydicom.datadict.tag_for_keyword(keyword): level
    for level, keywords in (("patient", PATIENT_ATTRIBUTES), ("study", STUDY_ATTRIBUTES),
                            ("series", SERIES_ATTRIBUTES), ("instance", INSTANCE_ATTRIBUTES))
    for keyword in keywords
}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
_LONG_VRS = {"SQ", "LT", "UT", "UC", "UR", "ST"}  # the VRs whose JSON may pass MAX_CATALOG_ELEMENT
MAX_CATALOG_ELEMENT = 16384  # characters of DICOM JSON: a larger element is left out of the catalog


def catalog_attributes(ds: pydicom.Dataset) -> dict[str, Any]:
    """The catalog's part of the facts: per level, the kept attributes as DICOM JSON (PS3.18
    F.2, keyed by tag), and the file's transfer syntax. An attribute pydicom cannot convert, or
    too large, is left out (as absent as a malformed optional attribute elsewhere)."""
    levels: dict[str, Any] = {"patient": {}, "study": {}, "series": {}, "instance": {}}
    for tag in sorted(ds.keys() & _LEVEL_OF_TAG.keys()):
        converted = _json_element(ds, tag)
        if converted is not None:
            levels[_LEVEL_OF_TAG[tag]][f"{tag:08X}"] = converted
    meta = getattr(ds, "file_meta", None)
    levels["transferSyntax"] = _clean(meta.get("TransferSyntaxUID")) if meta is not None else None
    return levels


def _json_element(ds: pydicom.Dataset, tag: int) -> dict[str, Any] | None:
    try:
        element = ds[tag]
        if element.VR in _BINARY_VRS:
            return None
        if element.VR in _TEXT_VRS:  # pydicom's to_json_dict, 4 times faster for plain strings
            values = [element.value] if isinstance(element.value, str) else list(element.value or ())
            converted: dict[str, Any] = {"vr": element.VR}
            if any(values):
                converted["Value"] = [str(value) if value not in (None, "") else None for value in values]
        else:
            converted = element.to_json_dict(None, 1024)
    except Exception:  # noqa: BLE001 - a malformed optional attribute is as good as absent
        return None
    if element.VR in _LONG_VRS and len(json.dumps(converted, ensure_ascii=False)) > MAX_CATALOG_ELEMENT:
        return None
    return converted


def patient_identifier(facts: dict[str, Any], default_system: str) -> dict[str, str] | None:
    """The Patient identifier the header gives (PatientID in its issuer's namespace); None without one.

    The issuer decides the system (see the module docstring); `default_system`, the node's own
    namespace, is used only when the header names no issuer.
    """
    patient = facts.get("patient", {})
    value = patient.get("id")
    if not value:
        return None
    universal = patient.get("issuerUniversal")
    system = _entity_uri(universal["id"], universal.get("type")) if universal else None
    if system is None and patient.get("issuer"):
        issuer = patient["issuer"]
        system = _entity_uri(issuer, None) or quote(issuer, safe=_URI_SAFE)
    return {"system": system or default_system, "value": value}


def patient_resource(facts: dict[str, Any], default_system: str) -> dict[str, Any]:
    """A FHIR R4 Patient (no id) from the header: identifier, name, birthDate, gender."""
    patient = facts.get("patient", {})
    identifier = patient_identifier(facts, default_system)
    sex = (patient.get("sex") or "").upper()
    return _compact(
        {
            "resourceType": "Patient",
            "identifier": [identifier] if identifier else None,
            "name": _human_names(patient.get("name")),
            # An unrecognised sex is "unknown"; an empty one says nothing.
            "gender": GENDERS.get(sex, "unknown") if sex else None,
            "birthDate": _date(patient.get("birthDate")),
        }
    )


def imaging_study(
    existing: dict[str, Any] | None,
    patient_reference: str,
    instances: list[dict[str, Any]],
    endpoint_reference: str | None,
) -> dict[str, Any]:
    """The ImagingStudy after adding `instances` (facts from `instance_facts`) to `existing`.

    `existing` None starts a new study. Idempotent: an instance already present (same SOP Instance
    UID) is replaced. Study and series elements take the latest instance's value where it has one;
    procedure and reason codes accumulate; counts are computed, never copied from headers. Elements
    the instances do not speak to (id, meta, other identifiers, notes...) are kept. Raises
    ValueError when an instance belongs to another study.
    """
    study = copy.deepcopy(existing) if existing else {"resourceType": "ImagingStudy"}
    instances = copy.deepcopy(instances)
    study_uid = _study_uid(study)
    for facts in instances:
        uid = facts["study"]["uid"]
        if study_uid is None:
            study_uid = uid
        elif uid != study_uid:
            raise ValueError(f"Instance of study {uid} cannot be added to study {study_uid}")

    series_by_uid = {series["uid"]: series for series in study.get("series", []) if "uid" in series}
    accession = None
    for facts in instances:
        accession = _merge_study(study, facts["study"]) or accession
        series = series_by_uid.setdefault(facts["series"]["uid"], {"uid": facts["series"]["uid"]})
        _merge_series(series, facts["series"])
        instance = _instance(facts["instance"])
        series["instance"] = [i for i in series.get("instance", []) if i.get("uid") != instance["uid"]]
        series["instance"].append(instance)

    all_series = sorted(series_by_uid.values(), key=_by_number)
    for series in all_series:
        series.setdefault("modality", {"system": DCM_SYSTEM, "code": "OT"})  # Type 1, yet seen missing
        series["instance"] = sorted(series.get("instance", []), key=_by_number)
        series["numberOfInstances"] = len(series["instance"])
    if study_uid is not None:
        study["identifier"] = _study_identifiers(study.get("identifier", []), study_uid, accession)
    if all_series:
        study["series"] = [_ordered(series, SERIES_ORDER) for series in all_series]
        study["status"] = "available"
        study["numberOfSeries"] = len(all_series)
        study["numberOfInstances"] = sum(series["numberOfInstances"] for series in all_series)
        modalities = {series["modality"].get("code"): series["modality"] for series in all_series}
        study["modality"] = [coding for code, coding in modalities.items() if code]
    study.setdefault("status", "registered")
    study["subject"] = {"reference": patient_reference}
    if endpoint_reference:
        endpoints = study.get("endpoint", [])
        if not any(ref.get("reference") == endpoint_reference for ref in endpoints):
            study["endpoint"] = [*endpoints, {"reference": endpoint_reference}]
    return _compact(_ordered(study, STUDY_ORDER))


def without_instances(existing: dict[str, Any], placed: dict[str, str | None]) -> dict[str, Any]:
    """The ImagingStudy without the instances of `placed` where they no longer are: each SOP
    Instance UID maps to the series of this study it now belongs to (None: it left the study),
    and is removed from every other series. A series left without instances goes; counts and
    modalities are computed again; the other elements are kept. `existing` itself when nothing
    changes (no copy); a study left without any series has no `series`, counts or modality
    (the caller decides what becomes of it)."""
    def stays(instance: dict[str, Any], series_uid: str | None) -> bool:
        uid = instance.get("uid")
        return uid not in placed or placed[uid] == series_uid

    if all(stays(i, series.get("uid")) for series in existing.get("series", []) for i in series.get("instance", [])):
        return existing
    study = copy.deepcopy(existing)
    remaining = []
    for series in study.get("series", []):
        kept = [i for i in series.get("instance", []) if stays(i, series.get("uid"))]
        if series.get("instance") and not kept:
            continue
        series["instance"] = kept
        series["numberOfInstances"] = len(kept)
        remaining.append(series)
    for key in ("series", "numberOfSeries", "numberOfInstances", "modality"):
        study.pop(key, None)
    if remaining:
        study["series"] = remaining
        study["numberOfSeries"] = len(remaining)
        study["numberOfInstances"] = sum(series["numberOfInstances"] for series in remaining)
        modalities = {series["modality"].get("code"): series["modality"] for series in remaining if "modality" in series}
        study["modality"] = [coding for code, coding in modalities.items() if code]
    return _compact(_ordered(study, STUDY_ORDER))


def endpoint_resource(address: str) -> dict[str, Any]:
    """The Endpoint (DICOMweb WADO-RS at `address`) that the node's studies are retrieved through."""
    return {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {
            "system": CONNECTION_TYPE_SYSTEM,
            "code": "dicom-wado-rs",
            "display": "DICOM WADO-RS",
        },
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }


# --- reading the header -------------------------------------------------------------------------


def coerced(data: bytes, replace: dict[str, str], fill: dict[str, str]) -> bytes:
    """A Part 10 file with the attributes of `replace` set (when they differ) and those of
    `fill` added where the header has none: what a sender that knows better than the header
    (an importer holding the patient of the record) corrects before storing, as a PACS coerces
    attributes on import. The bytes unchanged when there is nothing to do. ValueError for bytes
    that are not a readable DICOM file."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError, struct.error) as exc:
        raise ValueError(f"the DICOM file cannot be read: {exc}") from exc
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not _text(ds, k)]
    if missing:
        raise ValueError(f"the DICOM file cannot be stored: it has no {', '.join(missing)}")
    changes = {k: v for k, v in replace.items() if str(ds.get(k, "")) != v}
    changes.update({k: v for k, v in fill.items() if not _text(ds, k)})
    qualifiers = "IssuerOfPatientID" in replace and "IssuerOfPatientIDQualifiersSequence" in ds
    if qualifiers:
        del ds.IssuerOfPatientIDQualifiersSequence  # its Universal Entity ID would name another issuer
    if not changes and not qualifiers:
        return data
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    meta = ds.file_meta  # completed from the dataset where a writer left it short
    for meta_keyword, keyword in (("MediaStorageSOPClassUID", "SOPClassUID"), ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        if not meta.get(meta_keyword) and ds.get(keyword):
            setattr(meta, meta_keyword, ds.get(keyword))
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except (AttributeError, ValueError, TypeError, struct.error) as exc:
        raise ValueError(f"the DICOM file cannot be written again: {exc}") from exc
    return buffer.getvalue()


def _value(ds: pydicom.Dataset, keyword: str) -> Any:
    """The value of `keyword`, None when absent or when pydicom cannot convert it."""
    try:
        return ds.get(keyword)
    except Exception:  # a malformed optional attribute is as good as absent
        return None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """The attribute as clean text (the first non-empty value of several); None when empty."""
    return _clean(_value(ds, keyword))


def _clean(value: Any) -> str | None:
    if value is None or isinstance(value, bytes | Sequence):
        return None
    if isinstance(value, list | tuple | MultiValue):
        return next((text for text in map(_clean, value) if text), None)
    text = _CONTROL.sub("", str(value)).strip()
    return text or None


def _items(ds: pydicom.Dataset, keyword: str) -> list[pydicom.Dataset]:
    value = _value(ds, keyword)
    return list(value) if isinstance(value, Sequence) else []


def _first_item(ds: pydicom.Dataset, keyword: str) -> pydicom.Dataset | None:
    items = _items(ds, keyword)
    return items[0] if items else None


def _uid(ds: pydicom.Dataset, keyword: str) -> str:
    value = _value(ds, keyword)
    if isinstance(value, MultiValue):
        raise ValueError(f"{keyword} has several values")
    text = _clean(value)
    if text is None:
        raise ValueError(f"{keyword} is missing")
    if len(text) > 64 or not _OID.fullmatch(text):
        raise ValueError(f"{keyword} '{text[:80]}' is not a valid UID")
    return text


UNSIGNED_INT_MAX = 2_147_483_647  # FHIR's unsignedInt is a 32-bit signed integer's range


def _number(ds: pydicom.Dataset, keyword: str) -> int | None:
    """An IS attribute as a FHIR unsignedInt; None when absent, malformed or out of its range."""
    text = _text(ds, keyword)
    try:
        number = int(text) if text is not None else None
    except ValueError:
        return None
    return number if number is not None and 0 <= number <= UNSIGNED_INT_MAX else None


# --- dates and times ----------------------------------------------------------------------------


def _date(text: str | None) -> str | None:
    """DICOM DA (YYYYMMDD; ACR-NEMA's YYYY.MM.DD) → FHIR date; None unless a whole valid date."""
    match = _DATE.fullmatch(re.sub(r"[.\-]", "", text)) if text else None
    if not match:
        return None
    year, month, day = (int(part) for part in match.groups())
    if year < 1 or not 1 <= month <= 12 or not 1 <= day <= monthrange(year, month)[1]:
        return None
    return f"{year:04d}-{month:02d}-{day:02d}"


def _time(text: str | None) -> str | None:
    """DICOM TM (HH, HHMM, HHMMSS, HHMMSS.FFFFFF, or ACR-NEMA's HH:MM:SS) → HH:MM:SS[.F]."""
    match = _TIME.fullmatch(text.replace(":", "")) if text else None
    if not match:
        return None
    hours, minutes, seconds, fraction = match.groups()
    if fraction and not seconds:
        return None
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 59:
        return None
    return f"{hours}:{minutes or '00'}:{seconds or '00'}{fraction or ''}"


def _zone(text: str | None) -> str | None:
    """TimezoneOffsetFromUTC (+HHMM / -HHMM) → a FHIR zone (+HH:MM), None unless within ±14:00."""
    match = _ZONE.fullmatch(text) if text else None
    if not match:
        return None
    sign, hours, minutes = match.groups()
    if int(minutes) > 59 or int(hours) > 14 or (int(hours) == 14 and minutes != "00"):
        return None
    return f"{sign}{hours}:{minutes}"


def _date_time(date: str | None, time: str | None, zone: str | None) -> str | None:
    """A FHIR dateTime: the date with its time when the zone is known, else the date alone."""
    day = _date(date)
    clock = _time(time)
    if day and clock and zone:
        return f"{day}T{clock}{zone}"
    return day


# --- codes, names, issuers ----------------------------------------------------------------------


def _coding(system: str | None, code: str | None, display: str | None = None) -> dict[str, Any]:
    code = " ".join(code.split()) if code else None  # a FHIR code has no runs of whitespace
    return _compact({"system": system, "code": code, "display": display})


def _concept(item: pydicom.Dataset) -> dict[str, Any] | None:
    """A DICOM code sequence item → CodeableConcept; the code meaning is also the text."""
    coding = _code_item_coding(item)
    if coding is None:
        return None
    return _compact({"coding": [coding], "text": coding.get("display")})


def _code_item_coding(item: pydicom.Dataset) -> dict[str, Any] | None:
    meaning = _text(item, "CodeMeaning")
    code = _text(item, "CodeValue") or _text(item, "LongCodeValue")
    urn = _text(item, "URNCodeValue")
    if code:
        designator = _text(item, "CodingSchemeDesignator")
        scheme_uid = _text(item, "CodingSchemeUID")
        system = CODING_SCHEMES.get(designator or "")
        if system is None and scheme_uid and _OID.fullmatch(scheme_uid):
            system = f"urn:oid:{scheme_uid}"
        # A private scheme (99...) without a UID has no system: the code stays, its meaning unknown.
        coding = _coding(system, code, meaning)
        if version := _text(item, "CodingSchemeVersion"):
            coding["version"] = version
        return coding
    if urn:
        return _coding(URI_SYSTEM, urn, meaning)
    return {"display": meaning} if meaning else None


def _concepts(items: list[pydicom.Dataset]) -> list[dict[str, Any]]:
    return [concept for concept in map(_concept, items) if concept]


def _request_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The instance itself and each Request Attributes item: both may carry the order's attributes."""
    return [ds, *_items(ds, "RequestAttributesSequence")]


def _procedure_codes(ds: pydicom.Dataset) -> list[dict[str, Any]] | None:
    """Procedure Code Sequence; else the requested procedure's codes or description."""
    concepts = _concepts(_items(ds, "ProcedureCodeSequence"))
    for item in _request_items(ds):
        if not concepts:
            concepts = _concepts(_items(item, "RequestedProcedureCodeSequence"))
        if not concepts and (description := _text(item, "RequestedProcedureDescription")):
            concepts = [{"text": description}]
    return _unique(concepts) or None


def _reason_codes(ds: pydicom.Dataset) -> list[dict[str, Any]] | None:
    concepts: list[dict[str, Any]] = []
    for item in _request_items(ds):
        concepts += _concepts(_items(item, "ReasonForRequestedProcedureCodeSequence"))
        if reason := _text(item, "ReasonForTheRequestedProcedure"):
            concepts.append({"text": reason})
    return _unique(concepts) or None


def _accession(ds: pydicom.Dataset) -> dict[str, Any] | None:
    """The accession number as an ACSN identifier, in its issuer's namespace when that is universal."""
    value = _text(ds, "AccessionNumber")
    if value is None:
        return None
    issuer = _first_item(ds, "IssuerOfAccessionNumberSequence")
    universal = _universal_entity(issuer)
    local = _text(issuer, "LocalNamespaceEntityID") if issuer is not None else None
    return _compact(
        {
            "type": ACCESSION_TYPE,
            "system": _entity_uri(universal["id"], universal.get("type")) if universal else None,
            "value": value,
            "assigner": {"display": local} if local else None,
        }
    )


def _universal_entity(item: pydicom.Dataset | None) -> dict[str, str] | None:
    """UniversalEntityID with its type (ISO, UUID, URI, DNS...) from an HL7v2 HD-like item."""
    if item is None:
        return None
    entity = _text(item, "UniversalEntityID")
    return _compact({"id": entity, "type": _text(item, "UniversalEntityIDType")}) if entity else None


def _entity_uri(entity: str, kind: str | None) -> str | None:
    """An issuer as a URI: an OID → urn:oid:, a UUID → urn:uuid:, a URI as is; None otherwise."""
    if entity.startswith(("urn:oid:", "urn:uuid:")):
        return entity
    if kind in (None, "ISO") and _OID.fullmatch(entity):
        return f"urn:oid:{entity}"
    if kind in (None, "UUID") and _UUID.fullmatch(entity):
        return f"urn:uuid:{entity.lower()}"
    if kind in (None, "URI") and _URI.fullmatch(entity):
        return entity
    return None


def _name_groups(pn: str | None) -> list[list[str]]:
    """A DICOM PN → its alphabetic, ideographic and phonetic groups as 5 components each."""
    if not pn:
        return []
    groups = []
    for group in pn.split("=")[:3]:
        parts = [part.strip() for part in group.split("^")[:5]]
        groups.append(parts + [""] * (5 - len(parts)))
    return groups


def _human_names(pn: str | None) -> list[dict[str, Any]] | None:
    """family^given^middle^prefix^suffix → HumanName; the ideographic and phonetic groups become
    names of their own, marked with the iso21090-EN-representation extension (IDE, SYL)."""
    names = []
    for index, (family, given, middle, prefix, suffix) in enumerate(_name_groups(pn)):
        name = _compact(
            {
                "family": family,
                "given": [part for part in (given, middle) if part],
                "prefix": [prefix] if prefix else None,
                "suffix": [suffix] if suffix else None,
            }
        )
        if name and index:
            name = {
                "extension": [{"url": NAME_REPRESENTATION_URL, "valueCode": ("IDE", "SYL")[index - 1]}],
                **name,
            }
        if name:
            names.append(name)
    return names or None


def _person_display(pn: str | None) -> str | None:
    """A PN as one readable line ("Dr James Moriarty") from its first non-empty group."""
    for family, given, middle, prefix, suffix in _name_groups(pn):
        words = [part for part in (prefix, given, middle, family, suffix) if part]
        if words:
            return " ".join(words)
    return None


# --- series and instance ------------------------------------------------------------------------


def _frame_anatomy(ds: pydicom.Dataset) -> pydicom.Dataset | None:
    """The Frame Anatomy item an enhanced multi-frame instance shares across its frames."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    return _first_item(shared, "FrameAnatomySequence") if shared is not None else None


def _body_site(ds: pydicom.Dataset) -> dict[str, Any] | None:
    anatomy = _frame_anatomy(ds)
    for holder in (ds, anatomy):
        region = _first_item(holder, "AnatomicRegionSequence") if holder is not None else None
        coding = _code_item_coding(region) if region is not None else None
        if coding:
            return coding
    term = _text(ds, "BodyPartExamined")
    if term is None:
        return None
    known = BODY_PARTS.get(re.sub(r"[\s_\-]", "", term.upper()))
    return _coding(SNOMED_SYSTEM, *known) if known else {"display": term}


def _laterality(ds: pydicom.Dataset) -> str | None:
    """R, L or B (both); U (unpaired) and anything else say nothing."""
    anatomy = _frame_anatomy(ds)
    candidates = [_text(ds, "Laterality"), _text(ds, "ImageLaterality")]
    if anatomy is not None:
        candidates.append(_text(anatomy, "FrameLaterality"))
    return next((value.upper() for value in candidates if value and value.upper() in LATERALITY), None)


def _instance_title(ds: pydicom.Dataset) -> str | None:
    concept_name = _first_item(ds, "ConceptNameCodeSequence")
    return (
        _text(ds, "DocumentTitle")
        or (_text(concept_name, "CodeMeaning") if concept_name is not None else None)
        or _text(ds, "ContentLabel")
    )


# --- folding facts into the ImagingStudy --------------------------------------------------------


def _study_uid(study: dict[str, Any]) -> str | None:
    for identifier in study.get("identifier", []):
        value = identifier.get("value", "")
        if identifier.get("system") == DICOM_UID_SYSTEM and value.startswith("urn:oid:"):
            return value.removeprefix("urn:oid:")
    return None


def _is_accession(identifier: dict[str, Any]) -> bool:
    codings = identifier.get("type", {}).get("coding", [])
    return any(c.get("system") == IDENTIFIER_TYPE_SYSTEM and c.get("code") == "ACSN" for c in codings)


def _study_identifiers(
    existing: list[dict[str, Any]], study_uid: str, accession: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The Study Instance UID, the accession number (the latest instance's, else the existing one),
    then every other identifier already there."""
    uid_identifier = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}
    others = [i for i in existing if i.get("system") != DICOM_UID_SYSTEM and not _is_accession(i)]
    accessions = [accession] if accession else [i for i in existing if _is_accession(i)]
    return [uid_identifier, *accessions, *others]


def _merge_study(study: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any] | None:
    """Study-level facts into `study`; returns the accession identifier for the identifier list."""
    for key in ("started", "description"):
        if key in facts:
            study[key] = facts[key]
    if "referrer" in facts:
        study["referrer"] = {"display": facts["referrer"]}
    for key in ("procedureCode", "reasonCode"):
        if key in facts:
            study[key] = _unique([*study.get(key, []), *facts[key]])
    return facts.get("accession")


def _merge_series(series: dict[str, Any], facts: dict[str, Any]) -> None:
    for key in ("number", "description", "bodySite", "started"):
        if key in facts:
            series[key] = facts[key]
    if "modality" in facts:
        series["modality"] = _coding(DCM_SYSTEM, facts["modality"])
    if "laterality" in facts:
        known = LATERALITY_BY_CODE.get(series.get("laterality", {}).get("code", ""))
        sides = {known, facts["laterality"]} - {None}
        both = "B" in sides or sides >= {"L", "R"}
        series["laterality"] = dict(LATERALITY["B" if both else facts["laterality"]])


def _instance(facts: dict[str, Any]) -> dict[str, Any]:
    sop_class = UID(facts["sopClass"])
    display = sop_class.name if sop_class.name != sop_class else None  # pydicom names the standard classes
    return _compact(
        {
            "uid": facts["uid"],
            "sopClass": _coding(URI_SYSTEM, f"urn:oid:{sop_class}", display),
            "number": facts.get("number"),
            "title": facts.get("title"),
        }
    )


def _by_number(element: dict[str, Any]) -> tuple[bool, int, str]:
    """Series and instances by number, those without one last, then by UID."""
    number = element.get("number")
    return (number is None, number or 0, element.get("uid", ""))


# --- JSON helpers -------------------------------------------------------------------------------


def _compact(element: dict[str, Any]) -> dict[str, Any]:
    """`element` without None, empty strings, empty lists and empty objects (FHIR JSON has none)."""
    return {key: value for key, value in element.items() if value not in (None, "", [], {})}


def _ordered(element: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    known = {key: element[key] for key in order if key in element}
    return {**known, **{key: value for key, value in element.items() if key not in known}}


def _unique(elements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    unique: list[dict[str, Any]] = []
    for element in elements:
        if element not in unique:
            unique.append(element)
    return unique
