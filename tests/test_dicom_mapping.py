"""mappings.dicom: DICOM headers to ImagingStudy, Patient and Endpoint, checked by the server's validator.

Pure unit tests on pydicom's bundled files and on hand-built datasets; no server, no database.
"""

import json
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from pydicom import Dataset
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from fhir_server.validation.resource import validate_resource
from mappings.dicom import (
    DICOM_UID_SYSTEM,
    endpoint_resource,
    imaging_study,
    instance_facts,
    patient_identifier,
    patient_resource,
)

# Hand-built datasets hold deliberately invalid values; pydicom warns about each.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
]

MODELS = {"ImagingStudy": ImagingStudy, "Patient": Patient, "Endpoint": Endpoint}
BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle_2frame.dcm",
    "rtdose.dcm",
    "examples_jpeg2k.dcm",
    "image_dfl.dcm",
    "liver_1frame.dcm",
    "reportsi.dcm",
    "waveform_ecg.dcm",
]
STUDY = "1.2.826.0.1.3680043.10.1"
SERIES_A = "1.2.826.0.1.3680043.10.1.1"
SERIES_B = "1.2.826.0.1.3680043.10.1.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SNOMED = "http://snomed.info/sct"
DEFAULT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.99"


def valid(resource: dict[str, Any], resource_type: str) -> dict[str, Any]:
    """`resource` after the server's own checks and the R4B model both accepted it."""
    json.dumps(resource)
    validate_resource(resource, resource_type, ignore_id=True)
    MODELS[resource_type].model_validate(resource)
    return resource


def read(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


def dataset(**attributes: Any) -> Dataset:
    """A CT instance of series A; an attribute given as None is left out."""
    ds = Dataset()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES_A
    ds.SOPInstanceUID = f"{SERIES_A}.1"
    ds.SOPClassUID = CT_IMAGE
    ds.Modality = "CT"
    for keyword, value in attributes.items():
        if value is None:
            ds.pop(keyword, None)
        else:
            setattr(ds, keyword, value)
    return ds


def facts(**attributes: Any) -> dict[str, Any]:
    return instance_facts(dataset(**attributes))


def study_of(*instances: dict[str, Any], existing: dict[str, Any] | None = None) -> dict[str, Any]:
    return valid(imaging_study(existing, "Patient/p1", list(instances), None), "ImagingStudy")


def instance(series: str, number: int | None, suffix: str, **attributes: Any) -> dict[str, Any]:
    return facts(
        SeriesInstanceUID=series, SOPInstanceUID=f"{series}.{suffix}", InstanceNumber=number, **attributes
    )


# --- pydicom's bundled files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_file_maps_to_valid_resources(name: str) -> None:
    ds = read(name)
    found = instance_facts(ds)
    json.dumps(found)
    study = valid(imaging_study(None, "Patient/p1", [found], "Endpoint/e1"), "ImagingStudy")
    assert study["identifier"][0] == {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{ds.StudyInstanceUID}"}
    assert study["status"] == "available"
    assert study["subject"] == {"reference": "Patient/p1"}
    assert study["endpoint"] == [{"reference": "Endpoint/e1"}]
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (1, 1)
    [series] = study["series"]
    assert series["uid"] == ds.SeriesInstanceUID
    assert series["modality"] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": ds.Modality,
    }
    assert study["modality"] == [series["modality"]]
    [only] = series["instance"]
    assert only["uid"] == ds.SOPInstanceUID
    assert only["sopClass"]["system"] == "urn:ietf:rfc:3986"
    assert only["sopClass"]["code"] == f"urn:oid:{ds.SOPClassUID}"
    valid(patient_resource(found, DEFAULT_SYSTEM), "Patient")


def test_bundled_ct_keeps_times_with_their_zone() -> None:
    study = study_of(instance_facts(read("CT_small.dcm")))
    assert study["started"] == "2004-01-19T07:27:30-05:00"
    assert study["description"] == "e+1"
    series = study["series"][0]
    assert series["started"] == "1997-04-30T11:27:49-05:00"
    assert series["instance"][0]["sopClass"]["display"] == "CT Image Storage"
    assert "referrer" not in study  # empty in the header
    patient = valid(patient_resource(instance_facts(read("CT_small.dcm")), DEFAULT_SYSTEM), "Patient")
    assert patient == {
        "resourceType": "Patient",
        "identifier": [{"system": DEFAULT_SYSTEM, "value": "1CT1"}],
        "name": [{"family": "CompressedSamples", "given": ["CT1"]}],
        "gender": "other",
    }


def test_bundled_files_without_zone_keep_the_date_only() -> None:
    ecg = study_of(instance_facts(read("waveform_ecg.dcm")))
    assert ecg["started"] == "2013-01-25"
    assert ecg["identifier"][1] == {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                    "code": "ACSN",
                    "display": "Accession ID",
                }
            ]
        },
        "value": "03028041970546",
    }
    assert ecg["referrer"] == {"display": "2721"}
    assert "number" not in ecg["series"][0]  # SeriesNumber is empty
    patient = valid(patient_resource(instance_facts(read("waveform_ecg.dcm")), DEFAULT_SYSTEM), "Patient")
    assert (patient["birthDate"], patient["gender"]) == ("1971-01-23", "female")


def test_bundled_titles_body_part_and_empty_header() -> None:
    seg = study_of(instance_facts(read("liver_1frame.dcm")))["series"][0]
    assert seg["instance"][0]["title"] == "QIICR QIN IOWA"  # ContentLabel
    assert seg["description"] == "Liver Segmentation"
    sr = study_of(instance_facts(read("reportsi.dcm")))
    assert sr["series"][0]["instance"][0]["title"] == "Document Title"  # concept name's meaning
    assert sr["referrer"] == {"display": "First Name Last Name"}
    nm = study_of(instance_facts(read("JPEG2000.dcm")))["series"][0]
    assert nm["bodySite"] == {"system": SNOMED, "code": "38266002", "display": "Entire body"}  # "WHOLE BODY"
    # image_dfl: no dates, numbers, patient id, sex, and a PN of empty components.
    bare = instance_facts(read("image_dfl.dcm"))
    assert "started" not in study_of(bare)
    assert valid(patient_resource(bare, DEFAULT_SYSTEM), "Patient") == {"resourceType": "Patient"}
    assert patient_identifier(bare, DEFAULT_SYSTEM) is None


def test_non_ascii_names_are_decoded_with_their_character_set() -> None:
    japanese = instance_facts(pydicom.dcmread(get_charset_files("chrH31.dcm")[0]))  # ISO 2022 IR 87
    names = valid(patient_resource(japanese, DEFAULT_SYSTEM), "Patient")["name"]
    representation = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
    assert names == [
        {"family": "Yamada", "given": ["Tarou"]},
        {"extension": [{"url": representation, "valueCode": "IDE"}], "family": "山田", "given": ["太郎"]},
        {"extension": [{"url": representation, "valueCode": "SYL"}], "family": "やまだ", "given": ["たろう"]},
    ]
    french = instance_facts(pydicom.dcmread(get_charset_files("chrFren.dcm")[0]))  # ISO_IR 100
    assert patient_resource(french, DEFAULT_SYSTEM)["name"] == [{"family": "Buc", "given": ["Jérôme"]}]


# --- folding instances into a study --------------------------------------------------------------


def test_instances_of_two_series_are_counted_and_sorted() -> None:
    batch = [
        instance(SERIES_B, 2, "2", SeriesNumber=1, Modality="MR"),
        instance(SERIES_A, 10, "10", SeriesNumber=2),
        instance(SERIES_A, 2, "2", SeriesNumber=2),
        instance(SERIES_A, None, "9", SeriesNumber=2),
    ]
    study = study_of(*batch)
    later = study_of(instance(SERIES_B, 1, "1", SeriesNumber=1, Modality="MR"), existing=study)
    assert (later["numberOfSeries"], later["numberOfInstances"]) == (2, 5)
    assert [s["uid"] for s in later["series"]] == [SERIES_B, SERIES_A]  # by series number
    assert [s["numberOfInstances"] for s in later["series"]] == [2, 3]
    assert [i.get("number") for i in later["series"][1]["instance"]] == [2, 10, None]
    assert [i["number"] for i in later["series"][0]["instance"]] == [1, 2]
    assert [m["code"] for m in later["modality"]] == ["MR", "CT"]
    # The same instances in another order and other batches give the same study.
    assert study_of(*reversed([*batch, instance(SERIES_B, 1, "1", SeriesNumber=1, Modality="MR")])) == later


def test_series_and_instances_without_number_sort_by_uid() -> None:
    study = study_of(
        instance(SERIES_B, None, "2"), instance(SERIES_B, None, "10"), instance(SERIES_A, None, "1")
    )
    assert [s["uid"] for s in study["series"]] == [SERIES_A, SERIES_B]
    assert [i["uid"] for i in study["series"][1]["instance"]] == [f"{SERIES_B}.10", f"{SERIES_B}.2"]


def test_adding_an_instance_again_replaces_it() -> None:
    first = study_of(instance(SERIES_A, 1, "1"), instance(SERIES_A, 2, "2"))
    again = study_of(instance(SERIES_A, 1, "1"), existing=first)
    assert again == first
    renamed = study_of(instance(SERIES_A, 1, "1", ContentLabel="FIXED"), existing=first)
    assert renamed["numberOfInstances"] == 2
    assert [i.get("title") for i in renamed["series"][0]["instance"]] == ["FIXED", None]
    twice_in_one_batch = study_of(instance(SERIES_A, 1, "1"), instance(SERIES_A, 1, "1"))
    assert twice_in_one_batch["numberOfInstances"] == 1


def test_existing_elements_the_headers_do_not_speak_to_are_kept() -> None:
    other = {"system": "urn:example:ris", "value": "R-1"}
    existing = {
        "resourceType": "ImagingStudy",
        "id": "s1",
        "meta": {"versionId": "3"},
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{STUDY}"}, other],
        "status": "registered",
        "subject": {"reference": "Patient/old"},
        "note": [{"text": "call the referrer"}],
        "description": "old description",
        "endpoint": [{"reference": "Endpoint/e0"}],
    }
    study = imaging_study(existing, "Patient/p1", [facts(AccessionNumber="A-7")], "Endpoint/e1")
    valid(study, "ImagingStudy")
    assert (study["id"], study["meta"], study["note"]) == ("s1", {"versionId": "3"}, existing["note"])
    assert [i["value"] for i in study["identifier"]] == [f"urn:oid:{STUDY}", "A-7", "R-1"]
    assert study["status"] == "available"
    assert study["subject"] == {"reference": "Patient/p1"}
    assert study["description"] == "old description"  # the instance has none
    assert study["endpoint"] == [{"reference": "Endpoint/e0"}, {"reference": "Endpoint/e1"}]
    assert existing["status"] == "registered"  # not changed in place
    newer = imaging_study(study, "Patient/p1", [facts(AccessionNumber="A-8")], "Endpoint/e1")
    assert [i["value"] for i in newer["identifier"]] == [f"urn:oid:{STUDY}", "A-8", "R-1"]
    assert newer["endpoint"] == study["endpoint"]


def test_an_instance_of_another_study_is_refused() -> None:
    study = study_of(facts())
    with pytest.raises(ValueError, match="1.2.826.0.1.3680043.10.2"):
        imaging_study(study, "Patient/p1", [facts(StudyInstanceUID="1.2.826.0.1.3680043.10.2")], None)
    with pytest.raises(ValueError):
        imaging_study(None, "Patient/p1", [facts(), facts(StudyInstanceUID="1.2.826.0.1.3680043.10.2")], None)


# --- laterality and body site --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "code"),
    [
        ({"Laterality": "R"}, "419465000"),
        ({"Laterality": "L", "ImageLaterality": "R"}, "419161000"),  # the series attribute first
        ({"ImageLaterality": "L"}, "419161000"),
        ({"ImageLaterality": "B"}, "51440002"),
        ({"ImageLaterality": "U"}, None),  # unpaired
        ({"Laterality": ""}, None),
    ],
)
def test_laterality(attributes: dict[str, str], code: str | None) -> None:
    series = study_of(facts(**attributes))["series"][0]
    assert series.get("laterality", {}).get("code") == code
    if code:
        assert series["laterality"]["system"] == SNOMED


def test_left_and_right_in_one_series_make_it_bilateral() -> None:
    left = instance(SERIES_A, 1, "1", ImageLaterality="L")
    right = instance(SERIES_A, 2, "2", ImageLaterality="R")
    study = study_of(left, right)
    assert study["series"][0]["laterality"] == {"system": SNOMED, "code": "51440002", "display": "Bilateral"}
    assert study_of(left, existing=study_of(left))["series"][0]["laterality"]["code"] == "419161000"


def test_enhanced_instance_laterality_and_region_from_shared_frame_anatomy() -> None:
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "76752008", "SCT", "Breast"
    anatomy = Dataset()
    anatomy.FrameLaterality = "R"
    anatomy.AnatomicRegionSequence = [region]
    shared = Dataset()
    shared.FrameAnatomySequence = [anatomy]
    series = study_of(facts(SharedFunctionalGroupsSequence=[shared]))["series"][0]
    assert series["laterality"]["code"] == "419465000"
    assert series["bodySite"] == {"system": SNOMED, "code": "76752008", "display": "Breast"}


@pytest.mark.parametrize(
    ("body_part", "body_site"),
    [
        ("CHEST", {"system": SNOMED, "code": "816094009", "display": "Chest"}),
        ("l spine", {"system": SNOMED, "code": "122496007", "display": "Lumbar spine"}),
        ("Whole_Body", {"system": SNOMED, "code": "38266002", "display": "Entire body"}),
        ("LEFT PINKY", {"display": "LEFT PINKY"}),
    ],
)
def test_body_part_examined(body_part: str, body_site: dict[str, str]) -> None:
    assert study_of(facts(BodyPartExamined=body_part))["series"][0]["bodySite"] == body_site


def test_anatomic_region_sequence_wins_over_body_part() -> None:
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-D3000", "SRT", "Chest"
    series = study_of(facts(BodyPartExamined="HEAD", AnatomicRegionSequence=[region]))["series"][0]
    assert series["bodySite"] == {"system": "http://snomed.info/srt", "code": "T-D3000", "display": "Chest"}


# --- patient -------------------------------------------------------------------------------------


def qualifiers(entity: str, kind: str) -> list[Dataset]:
    item = Dataset()
    item.UniversalEntityID, item.UniversalEntityIDType = entity, kind
    return [item]


@pytest.mark.parametrize(
    ("attributes", "system"),
    [
        ({}, DEFAULT_SYSTEM),
        ({"IssuerOfPatientID": "2.16.840.1.113883.3.72"}, "urn:oid:2.16.840.1.113883.3.72"),
        ({"IssuerOfPatientID": "https://hospital.example/mrn"}, "https://hospital.example/mrn"),
        ({"IssuerOfPatientID": "urn:oid:1.2.3"}, "urn:oid:1.2.3"),
        (
            {"IssuerOfPatientID": "6F9619FF-8B86-D011-B42D-00C04FC964FF"},
            "urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
        ),
        ({"IssuerOfPatientID": "HOSP_A"}, "HOSP_A"),  # a local name is kept
        ({"IssuerOfPatientID": "General Hospital"}, "General%20Hospital"),
        (
            {
                "IssuerOfPatientID": "HOSP_A",
                "IssuerOfPatientIDQualifiersSequence": qualifiers("1.2.3.4", "ISO"),
            },
            "urn:oid:1.2.3.4",
        ),
        (
            {
                "IssuerOfPatientID": "HOSP_A",
                "IssuerOfPatientIDQualifiersSequence": qualifiers("hosp.example", "DNS"),
            },
            "HOSP_A",
        ),
    ],
)
def test_patient_identifier_system_from_the_issuer(attributes: dict[str, Any], system: str) -> None:
    found = facts(PatientID=" 12345 ", **attributes)
    identifier = patient_identifier(found, DEFAULT_SYSTEM)
    assert identifier == {"system": system, "value": "12345"}
    assert valid(patient_resource(found, DEFAULT_SYSTEM), "Patient")["identifier"] == [identifier]


def test_no_patient_id_no_identifier() -> None:
    for header in (facts(), facts(PatientID=""), facts(PatientID="  ", IssuerOfPatientID="HOSP_A")):
        assert patient_identifier(header, DEFAULT_SYSTEM) is None
        assert "identifier" not in valid(patient_resource(header, DEFAULT_SYSTEM), "Patient")


@pytest.mark.parametrize(
    ("pn", "names"),
    [
        (
            "Doe^Jane^Ann^Dr^III",
            [{"family": "Doe", "given": ["Jane", "Ann"], "prefix": ["Dr"], "suffix": ["III"]}],
        ),
        ("Doe", [{"family": "Doe"}]),
        ("^Jane", [{"given": ["Jane"]}]),
        ("Müller^Jürgen", [{"family": "Müller", "given": ["Jürgen"]}]),
        ("^^^^", None),
        ("", None),
    ],
)
def test_patient_name_parts(pn: str, names: list[dict[str, Any]] | None) -> None:
    patient = valid(
        patient_resource(facts(SpecificCharacterSet="ISO_IR 192", PatientName=pn), DEFAULT_SYSTEM), "Patient"
    )
    assert patient.get("name") == names


@pytest.mark.parametrize(
    ("sex", "gender"), [("M", "male"), ("F", "female"), ("O", "other"), ("X", "unknown"), ("", None)]
)
def test_patient_gender(sex: str, gender: str | None) -> None:
    assert valid(patient_resource(facts(PatientSex=sex), DEFAULT_SYSTEM), "Patient").get("gender") == gender


@pytest.mark.parametrize(
    ("birth", "date"),
    [
        ("19710123", "1971-01-23"),
        ("1971.01.23", "1971-01-23"),  # ACR-NEMA
        ("20000229", "2000-02-29"),
        ("19000229", None),
        ("1971", None),
        ("197101", None),
        ("", None),
        ("19711301", None),
        ("abcdefgh", None),
    ],
)
def test_patient_birth_date(birth: str, date: str | None) -> None:
    patient = valid(patient_resource(facts(PatientBirthDate=birth), DEFAULT_SYSTEM), "Patient")
    assert patient.get("birthDate") == date


# --- dates, times, odd values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("date", "time", "offset", "started"),
    [
        ("20240305", "101010.123456", "+0100", "2024-03-05T10:10:10.123456+01:00"),
        ("20240305", "1010", "-0530", "2024-03-05T10:10:00-05:30"),
        ("20240305", "10", "+1400", "2024-03-05T10:00:00+14:00"),
        ("20240305", "10:10:10", "+0000", "2024-03-05T10:10:10+00:00"),
        ("20240305", "101010", None, "2024-03-05"),  # no zone: the date alone
        ("20240305", "101010", "+2500", "2024-03-05"),
        ("20240305", "256000", "+0100", "2024-03-05"),
        ("20240305", "", "+0100", "2024-03-05"),
        ("2024", "101010", "+0100", None),
        ("", "101010", "+0100", None),
        ("20241305", "101010", "+0100", None),
    ],
)
def test_study_and_series_started(date: str, time: str, offset: str | None, started: str | None) -> None:
    header = facts(
        StudyDate=date, StudyTime=time, SeriesDate=date, SeriesTime=time, TimezoneOffsetFromUTC=offset
    )
    study = study_of(header)
    assert study.get("started") == started
    assert study["series"][0].get("started") == started


def test_empty_multi_valued_private_and_malformed_values() -> None:
    ds = dataset(
        StudyDescription=["", "Second value wins over an empty first"],
        SeriesDescription="  ",
        ReferringPhysicianName="",
        AccessionNumber="",
        BodyPartExamined="",
        SeriesNumber="-3",
        ContentLabel="LABEL\x01",
    )
    ds.add_new(0x00091010, "LO", "not a standard attribute")
    ds.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "LO", "private")
    ds._dict[Tag(0x00200013)] = RawDataElement(Tag(0x00200013), "IS", 3, b"abc", 0, True, True)
    study = study_of(instance_facts(ds))
    assert study["description"] == "Second value wins over an empty first"
    assert [i["value"] for i in study["identifier"]] == [f"urn:oid:{STUDY}"]
    assert "referrer" not in study
    series = study["series"][0]
    assert set(series) == {"uid", "modality", "numberOfInstances", "instance"}
    assert series["instance"][0] == {
        "uid": f"{SERIES_A}.1",
        "sopClass": {
            "system": "urn:ietf:rfc:3986",
            "code": f"urn:oid:{CT_IMAGE}",
            "display": "CT Image Storage",
        },
        "title": "LABEL",
    }


def test_missing_modality_falls_back_to_other() -> None:
    study = study_of(facts(Modality=None))
    assert study["series"][0]["modality"]["code"] == "OT"


def test_codes_reasons_and_accession_issuer() -> None:
    procedure = Dataset()
    procedure.CodeValue, procedure.CodingSchemeDesignator, procedure.CodeMeaning = "24627-2", "LN", "CT Chest"
    private = Dataset()
    private.CodeValue, private.CodingSchemeDesignator, private.CodeMeaning = "X1", "99LOCAL", "Local code"
    reason = Dataset()
    reason.CodeValue, reason.CodingSchemeDesignator, reason.CodeMeaning = "233604007", "SCT", "Pneumonia"
    request = Dataset()
    request.ReasonForRequestedProcedureCodeSequence = [reason]
    request.ReasonForTheRequestedProcedure = "Cough for three weeks"
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS"
    issuer.UniversalEntityID, issuer.UniversalEntityIDType = "1.2.826.0.1.3680043.10.5", "ISO"
    study = study_of(
        facts(
            ProcedureCodeSequence=[procedure, private],
            RequestAttributesSequence=[request],
            AccessionNumber="A-1",
            IssuerOfAccessionNumberSequence=[issuer],
        )
    )
    assert study["procedureCode"] == [
        {
            "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}],
            "text": "CT Chest",
        },
        {"coding": [{"code": "X1", "display": "Local code"}], "text": "Local code"},
    ]
    assert study["reasonCode"] == [
        {"coding": [{"system": SNOMED, "code": "233604007", "display": "Pneumonia"}], "text": "Pneumonia"},
        {"text": "Cough for three weeks"},
    ]
    assert study["identifier"][1]["system"] == "urn:oid:1.2.826.0.1.3680043.10.5"
    assert study["identifier"][1]["assigner"] == {"display": "RIS"}
    described = study_of(facts(RequestedProcedureDescription="CT chest without contrast"))
    assert described["procedureCode"] == [{"text": "CT chest without contrast"}]


@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
)
@pytest.mark.parametrize("value", [None, "", "1.2.abc", "1.02.3", "9.1.2", "1." + "2" * 70])
def test_missing_or_invalid_uids_are_refused(keyword: str, value: str | None) -> None:
    with pytest.raises(ValueError, match=keyword):
        facts(**{keyword: value})


def test_endpoint_resource() -> None:
    endpoint = valid(endpoint_resource("https://pacs.example/dicomweb"), "Endpoint")
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["payloadMimeType"] == ["application/dicom"]
    assert endpoint["address"] == "https://pacs.example/dicomweb"
