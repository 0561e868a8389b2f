"""The small-practice EHR's mapping (`mappings/ehr.py`): one record of each kind against its
expected FHIR JSON (`tests/data/ehr/golden/<kind>.json`), every sample resource valid (the
server's validation and the R4B models), CSV rows mapped as their JSON twins, every rejection
naming its field, and the sample imported through the server as one transaction per record.

Set UPDATE_GOLDEN=1 to rewrite the golden files from the mapping (then read the diff).
"""

import csv
import io
from pathlib import Path
from typing import Any

import golden
import httpx
import pydicom
import pytest
from conftest import FHIR_JSON, assert_outcome
from golden import assert_golden, valid_resource
from pydantic import BaseModel, ValidationError
from pydicom.data import get_testdata_file

from fhir_server import fhir_json
from mappings import ehr, records

DATA = Path(__file__).parent / "data" / "ehr"
GOLDEN = DATA / "golden"
SAMPLE: dict[str, list[dict[str, Any]]] = fhir_json.loads((DATA / "ehr.json").read_bytes())
GOLDEN_RECORDS = {
    "doctor": "D001",
    "patient": "P001",
    "appointment": "A002",
    "laboratory_result": "L005",
    "radiology_imaging": "R001",
    "medical_history": "H003",
    "allergy": "G001",
    "prescription": "RX002",
}
SOURCE = "urn:fhir-server:source:ehr"


# -- helpers ------------------------------------------------------------------------------------


def with_files(kind: str, data: dict[str, Any], base: Path = DATA) -> dict[str, Any]:
    """The record as the importer hands it over: files named by it read into its content field."""
    if kind not in ehr.FILES or ehr.FILES[kind][0] not in data:
        return data
    path_field, content_field = ehr.FILES[kind]
    with (base / data[path_field]).open("rb") as handle:
        return {**data, content_field: handle.read(ehr.MAX_FILE_BYTES + 1)}


def record(kind: str, source_id: str) -> dict[str, Any]:
    return next(r for r in SAMPLE[kind] if r["id"] == source_id)


def validated(kind: str, data: dict[str, Any]) -> BaseModel:
    return ehr.KINDS[kind].model_validate(with_files(kind, data))


def entries_of(kind: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    return ehr.bundle_entries(kind, validated(kind, data))


def normalised(value: Any) -> Any:
    """`urn:uuid:` placeholders as urn:uuid:placeholder-1, -2… in order of first appearance."""
    return golden.normalised(value, "urn:uuid:placeholder-{}")


def resources(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in entries]


def transaction(client: httpx.Client, entries: list[dict[str, Any]]) -> httpx.Response:
    body = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return client.post("", content=fhir_json.dumps(body), headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"})


def rejection(kind: str, data: dict[str, Any]) -> str:
    """The message of the error a record is rejected with (validation or mapping)."""
    with pytest.raises((ValidationError, ValueError)) as caught:
        ehr.bundle_entries(kind, ehr.KINDS[kind].model_validate(data))
    return str(caught.value)


# -- interface ----------------------------------------------------------------------------------


def test_kinds_are_in_import_order() -> None:
    assert list(ehr.KINDS) == [
        "doctor", "patient", "appointment", "laboratory_result", "radiology_imaging", "medical_history",
        "allergy", "prescription",
    ]
    assert set(SAMPLE) == set(ehr.KINDS)


def test_a_record_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="Not a record"):
        ehr.bundle_entries("patient", validated("doctor", record("doctor", "D001")))
    with pytest.raises(ValueError, match="Not a record"):
        ehr.bundle_entries("visit", validated("doctor", record("doctor", "D001")))


# -- golden files -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(GOLDEN_RECORDS))
def test_golden(kind: str) -> None:
    assert_golden(normalised(entries_of(kind, record(kind, GOLDEN_RECORDS[kind]))), GOLDEN / f"{kind}.json")


# -- validity and coverage of the sample --------------------------------------------------------


def sample_entries() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (kind, data["id"], entry)
        for kind in ehr.KINDS
        for data in SAMPLE[kind]
        for entry in entries_of(kind, data)
    ]


def test_every_resource_is_valid() -> None:
    checked = 0
    for kind, source_id, entry in sample_entries():
        resource = entry["resource"]
        try:
            valid_resource(resource)
        except Exception as exc:  # noqa: BLE001 - name the record in the failure
            pytest.fail(f"{kind} {source_id}: {resource['resourceType']} is not valid: {exc}")
        assert entry["request"]["method"] == "PUT" and "?" in entry["request"]["url"], entry["request"]
        checked += 1
    for code_system in ehr.CODE_SYSTEMS:
        valid_resource(code_system)
    assert checked == 61


def test_every_resource_is_written_conditionally_on_its_own_source() -> None:
    seen: set[str] = set()
    for _, _, entry in sample_entries():
        resource, request = entry["resource"], entry["request"]
        assert request["method"] == "PUT"
        if resource["resourceType"] == "Binary":
            assert request["url"] == "Binary?_source=" + resource["meta"]["source"]
        else:
            identifier = resource["identifier"][0]
            assert identifier["system"].startswith(SOURCE + ":")
            assert request["url"] == f"{resource['resourceType']}?identifier={identifier['system']}|{identifier['value']}"
        key = request["url"]
        assert key not in seen, key
        seen.add(key)


def test_the_sample_covers_every_status_and_type() -> None:
    appointments = SAMPLE["appointment"]
    assert {a["status"] for a in appointments} == {"scheduled", "completed", "cancelled", "no_show"}
    assert {a["type"] for a in appointments} == set(ehr.APPOINTMENT_TYPE)
    assert {r["status"] for r in SAMPLE["laboratory_result"]} == {
        "normal", "abnormal", "high", "low", "critical", "pending"
    }
    counts = {kind: len(SAMPLE[kind]) for kind in ehr.KINDS}
    assert counts["doctor"] >= 3 and counts["patient"] == 5 and counts["appointment"] == 10
    assert counts["laboratory_result"] == 10 and counts["radiology_imaging"] == 2


@pytest.mark.parametrize(
    ("name", "kind"), [("patients.csv", "patient"), ("laboratory_results.csv", "laboratory_result")]
)
def test_csv_rows_map_as_their_json_twins(name: str, kind: str) -> None:
    with (DATA / name).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [f for f in ehr.KINDS[kind].model_fields if f != "content"]  # header = field names
    assert len(rows) == len(SAMPLE[kind])
    for row in rows:
        found = normalised(entries_of(kind, row))  # blank cells are absent
        assert found == normalised(entries_of(kind, record(kind, row["id"]))), row["id"]


# -- choices ------------------------------------------------------------------------------------


def codes(concept: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for c in concept.get("coding", [])]


def test_appointment_statuses_types_and_encounters() -> None:
    expected = {"scheduled": "booked", "completed": "fulfilled", "cancelled": "cancelled", "no_show": "noshow"}
    for data in SAMPLE["appointment"]:
        found = resources(entries_of("appointment", data))
        assert found[0]["status"] == expected[data["status"]]
        assert [p["status"] for p in found[0]["participant"]] == ["accepted", "accepted"]
        system, code, _ = ehr.APPOINTMENT_TYPE[data["type"]]
        assert codes(found[0]["appointmentType"]) == [(system, code)]
        if data["status"] == "completed":
            encounter = found[1]
            assert encounter["status"] == "finished"
            assert encounter["class"]["code"] == ("EMER" if data["type"] == "emergency" else "AMB")
            assert encounter["period"] == {"start": found[0]["start"], "end": found[0]["end"]}
        else:
            assert len(found) == 1
    by_type = {t: ehr.APPOINTMENT_TYPE[t][1] for t in ("follow_up", "emergency", "check_up")}
    assert by_type == {"follow_up": "FOLLOWUP", "emergency": "EMERGENCY", "check_up": "CHECKUP"}
    assert {c["code"] for c in ehr.CODE_SYSTEMS[0]["concept"]} == {"consultation", "surgery", "procedure"}


def test_laboratory_values_ranges_and_interpretations() -> None:
    found = {data["id"]: resources(entries_of("laboratory_result", data))[0] for data in SAMPLE["laboratory_result"]}
    interpretation = {
        i: codes(r["interpretation"][0])[0][1] if "interpretation" in r else None for i, r in found.items()
    }
    assert interpretation == {
        "L001": "N", "L002": "N", "L003": "H", "L004": "L", "L005": "HH", "L006": "LL", "L007": "A", "L008": "N",
        "L009": "N", "L010": None,
    }
    tsh = found["L008"]
    assert str(tsh["valueQuantity"]["value"]) == "2.10"  # the precision as written
    assert tsh["valueQuantity"] == {"value": tsh["valueQuantity"]["value"], "unit": "m[IU]/L",
                                    "system": "http://unitsofmeasure.org", "code": "m[IU]/L"}
    assert [str(tsh["referenceRange"][0][k]["value"]) for k in ("low", "high")] == ["0.40", "4.00"]
    assert found["L007"]["valueString"].startswith("Escherichia coli")
    assert found["L007"]["referenceRange"] == [{"text": "No growth"}]
    assert found["L007"]["code"] == {"text": "Urine culture"}  # no LOINC code given
    assert found["L010"]["status"] == "registered" and "valueQuantity" not in found["L010"]
    assert all(r["status"] == "final" for i, r in found.items() if i != "L010")
    assert found["L003"]["effectiveDateTime"] == "2024-03-04T10:40:00+01:00"
    critical_text = {**record("laboratory_result", "L007"), "status": "critical"}
    assert codes(resources(entries_of("laboratory_result", critical_text))[0]["interpretation"][0])[0][1] == "AA"
    within = {**record("laboratory_result", "L005"), "value": 4.2}
    assert codes(resources(entries_of("laboratory_result", within))[0]["interpretation"][0])[0][1] == "AA"


def test_social_history_and_specialties() -> None:
    patient = resources(entries_of("patient", record("patient", "P003")))
    observations = {o["code"]["coding"][0]["code"]: o for o in patient[1:]}
    assert set(observations) == {"72166-2", "11331-6", "11341-5"}
    assert all(o["category"][0]["coding"][0]["code"] == "social-history" for o in observations.values())
    assert codes(observations["72166-2"]["valueCodeableConcept"]) == [("http://snomed.info/sct", "77176002")]
    assert observations["11341-5"]["valueCodeableConcept"] == {"text": "Software developer"}
    assert patient[0]["address"] == [{"use": "home", "text": "45 Queen St W, Toronto, ON M5H 2M9, Canada"}]
    assert len(resources(entries_of("patient", record("patient", "P004")))) == 1  # nothing recorded, nothing made
    role = resources(entries_of("doctor", record("doctor", "D003")))[1]
    assert role["specialty"] == [
        {"coding": [{"system": "http://snomed.info/sct", "code": "394582007", "display": "Dermatology"}],
         "text": "Dermatology"},
        {"text": "Sports Medicine"},  # no code known: the name alone
    ]


def test_images_get_their_type_from_their_content() -> None:
    png, jpeg = (resources(entries_of("radiology_imaging", data)) for data in SAMPLE["radiology_imaging"])
    assert [r["contentType"] for r in (png[0], jpeg[0])] == ["image/png", "image/jpeg"]
    attachment = jpeg[1]["content"][0]["attachment"]
    assert attachment["contentType"] == "image/jpeg" and attachment["size"] == (DATA / "images/knee-mri.jpg").stat().st_size
    entries = entries_of("radiology_imaging", record("radiology_imaging", "R002"))
    assert entries[1]["resource"]["content"][0]["attachment"]["url"] == entries[0]["fullUrl"]  # → the Binary
    assert codes(jpeg[1]["context"]["event"][0]) == [("http://dicom.nema.org/resources/ontology/DCM", "MR")]


def test_a_dicom_image_goes_to_the_node() -> None:
    """No Binary or DocumentReference: the file goes to the DICOM node, its patient set to the
    record's and its description filling the StudyDescription the header lacks."""
    original = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    data = {**record("radiology_imaging", "R001"), "file_path": "images/ct.dcm", "content": original}
    model = ehr.RadiologyImaging.model_validate(data)
    assert original[:4] == b"II*\0" and model.media_type == "application/dicom"  # its preamble is a TIFF header
    assert ehr.bundle_entries("radiology_imaging", model) == []
    [instance] = ehr.dicom_instances("radiology_imaging", model)
    assert instance.patient == {"system": "urn:fhir-server:source:ehr:patient", "value": "P001"}
    sent = pydicom.dcmread(io.BytesIO(instance.data))
    assert (sent.PatientID, sent.IssuerOfPatientID) == ("P001", "urn:fhir-server:source:ehr:patient")
    assert sent.StudyDescription == "e+1"  # the header's own is kept
    assert sent.PixelData == pydicom.dcmread(io.BytesIO(original)).PixelData
    fake = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00"  # looks like DICOM, is not
    with pytest.raises(ValueError, match="it has no SOPClassUID, SOPInstanceUID, StudyInstanceUID"):
        ehr.dicom_instances("radiology_imaging", ehr.RadiologyImaging.model_validate({**data, "content": fake}))
    assert ehr.dicom_instances("radiology_imaging", validated("radiology_imaging", record("radiology_imaging", "R001"))) == []


# -- rejections ---------------------------------------------------------------------------------

TOO_LARGE = (b"\x89PNG\r\n\x1a\n" + b"\0" * ehr.MAX_FILE_BYTES)[: ehr.MAX_FILE_BYTES + 1]  # one byte too many
REJECTIONS = [
    # (kind, record id, changes (None: field removed), field the error names)
    ("doctor", "D001", {"last_name": None}, "last_name"),
    ("doctor", "D001", {"email": "not an address"}, "email"),
    ("doctor", "D001", {"specialties": "[\"Cardiology\""}, "specialties"),
    ("doctor", "D001", {"speciality": "Cardiology"}, "speciality"),  # unknown field
    ("patient", "P001", {"sex": "robot"}, "sex"),
    ("patient", "P001", {"birth_date": "1965-02-30"}, "birth_date"),
    ("patient", "P001", {"birth_date": "12/04/1965"}, "birth_date"),
    ("patient", "P001", {"smoking_status": "sometimes"}, "smoking_status"),
    ("patient", "P001", {"first_name": "   "}, "first_name"),
    ("patient", "P001", {"emergency_contact": {"relationship": "Spouse"}}, "emergency_contact"),
    ("appointment", "A001", {"patient_id": None}, "patient_id"),
    ("appointment", "A001", {"status": "postponed"}, "status"),
    ("appointment", "A001", {"type": "house_call"}, "type"),
    ("appointment", "A001", {"start": "2024-03-04T09:00:00"}, "start"),  # no UTC offset
    ("appointment", "A001", {"start": "2024-03-04T25:00:00+01:00"}, "start"),
    ("appointment", "A001", {"end": "2024-03-04T08:00:00+01:00"}, "end"),
    ("appointment", "A001", {"end": None}, "end or duration_minutes"),
    ("appointment", "A002", {"duration_minutes": 0}, "duration_minutes"),
    ("appointment", "A002", {"end": "2024-03-04T11:00:00+01:00"}, "duration_minutes"),
    ("laboratory_result", "L001", {"date": "2024-13-01"}, "date"),
    ("laboratory_result", "L001", {"status": "borderline"}, "status"),
    ("laboratory_result", "L001", {"value": None}, "value"),
    ("laboratory_result", "L001", {"unit": "mg per dL"}, "unit"),
    ("laboratory_result", "L001", {"loinc_code": "glucose"}, "loinc_code"),
    ("laboratory_result", "L001", {"reference_low": "low"}, "reference_low"),
    ("laboratory_result", "L001", {"reference_low": 120}, "reference_low"),
    ("laboratory_result", "L007", {"unit": "mg/dL"}, "unit"),
    ("radiology_imaging", "R001", {"content": TOO_LARGE}, "file_path"),
    ("radiology_imaging", "R001", {"content": b"<html>not an image</html>"}, "file_path"),  # a .png name
    ("radiology_imaging", "R001", {"content": b""}, "file_path"),
    ("radiology_imaging", "R001", {"date": "yesterday"}, "date"),
    ("medical_history", "H001", {"status": "chronic"}, "status"),
    ("medical_history", "H001", {"condition": None}, "condition"),
    ("allergy", "G001", {"severity": "fatal"}, "severity"),
    ("allergy", "G001", {"reaction": None}, "reaction"),
    ("prescription", "RX002", {"end_date": "2024-01-01"}, "end_date"),
    ("prescription", "RX002", {"status": "on-hold"}, "status"),
    ("prescription", "RX002", {"doctor_id": None}, "doctor_id"),
]


@pytest.mark.parametrize(("kind", "source_id", "changes", "field"), REJECTIONS,
                         ids=[f"{r[0]}-{r[3]}-{i}" for i, r in enumerate(REJECTIONS)])
def test_rejections_name_the_field(kind: str, source_id: str, changes: dict[str, Any], field: str) -> None:
    data = with_files(kind, record(kind, source_id))
    data = {k: v for k, v in {**data, **changes}.items() if v is not None}
    message = rejection(kind, data)
    assert field in message, message
    assert len(message) < 5000  # a large file is not repeated in the message


def test_an_image_the_importer_did_not_read_is_refused() -> None:
    data = record("radiology_imaging", "R001")
    with pytest.raises(ValidationError) as caught:
        ehr.RadiologyImaging.model_validate(data)
    assert caught.value.errors()[0]["loc"] == ("file_path",)
    assert "was not read" in str(caught.value)


def test_a_file_of_the_largest_size_is_accepted() -> None:
    data = {**record("radiology_imaging", "R001"), "content": TOO_LARGE[:-1]}
    binary = resources(ehr.bundle_entries("radiology_imaging", ehr.RadiologyImaging.model_validate(data)))[0]
    assert binary["contentType"] == "image/png"


# -- through the server -------------------------------------------------------------------------


def test_the_sample_imports_once_and_serves_the_ehrs_screens(client: httpx.Client) -> None:
    all_entries = [entries_of(kind, data) for kind in ehr.KINDS for data in SAMPLE[kind]]
    code_systems = [records.code_system_entry(cs) for cs in ehr.CODE_SYSTEMS]
    assert transaction(client, code_systems).status_code == 200
    for entries in all_entries:
        response = transaction(client, entries)
        assert response.status_code == 200, response.text
    for entries in all_entries:  # again: nothing new
        response = transaction(client, entries)
        assert response.status_code == 200, response.text
        assert {e["response"]["status"] for e in response.json()["entry"]} == {"200 OK"}

    def search(path: str, **params: str | list[str]) -> dict[str, Any]:
        response = client.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    patient = search("/Patient", identifier=f"{SOURCE}:patient|P001")["entry"][0]["resource"]
    other = search("/Patient", identifier=f"{SOURCE}:patient|P002")["entry"][0]["resource"]
    labs = search("/Observation", patient=f"Patient/{other['id']}", category="laboratory", _sort="date")
    assert [e["resource"]["identifier"][0]["value"] for e in labs["entry"]] == ["L004", "L003"]  # a day, then 10:40
    booked = search("/Appointment", identifier=f"{SOURCE}:appointment|", status="booked", _summary="count")
    assert booked["total"] == 3
    document = search("/DocumentReference", identifier=f"{SOURCE}:radiology_imaging|R001")["entry"][0]["resource"]
    binary_ref = document["content"][0]["attachment"]["url"]
    assert binary_ref.startswith("Binary/")
    binary = client.get(f"/{binary_ref}").json()
    assert binary["contentType"] == "image/png" and binary["securityContext"] == {"reference": f"Patient/{patient['id']}"}
    counts = {status: search("/Appointment", identifier=f"{SOURCE}:appointment|", status=status, _summary="count")["total"]
              for status in ("fulfilled", "cancelled", "noshow")}
    assert counts == {"fulfilled": 5, "cancelled": 1, "noshow": 1}
    doctor = search("/Practitioner", identifier=f"{SOURCE}:doctor|D001")["entry"][0]["resource"]
    day = search("/Appointment", practitioner=f"Practitioner/{doctor['id']}", date=["ge2026-09-16", "lt2026-09-17"],
                 status="booked", _sort="date", _include="Appointment:patient")
    matched = [e["resource"] for e in day["entry"] if e["search"]["mode"] == "match"]
    included = [e["resource"] for e in day["entry"] if e["search"]["mode"] == "include"]
    assert [a["identifier"][0]["value"] for a in matched] == ["A010"]
    assert [p["name"][0]["family"] for p in included] == ["O'Brien"]
    chart = f"Patient/{patient['id']}"
    problems = search("/Condition", patient=chart, category="problem-list-item", **{"clinical-status": "active"})
    assert [e["resource"]["code"]["text"] for e in problems["entry"]] == ["Type 2 diabetes mellitus"]
    medications = search("/MedicationRequest", patient=chart, status="active", _include="MedicationRequest:requester")
    assert {e["resource"]["resourceType"] for e in medications["entry"]} == {"MedicationRequest", "Practitioner"}
    allergies = search("/AllergyIntolerance", patient=chart, **{"clinical-status": "active"})
    assert [e["resource"]["code"]["text"] for e in allergies["entry"]] == ["Penicillin"]
    smoking = search("/Observation", patient=chart, code="http://loinc.org|72166-2")
    assert smoking["entry"][0]["resource"]["valueCodeableConcept"]["text"] == "Ex-smoker"
    images = search("/DocumentReference", patient=chart, _sort="-period")
    assert [e["resource"]["identifier"][0]["value"] for e in images["entry"]] == ["R001"]
    cardiologists = search("/PractitionerRole", specialty="http://snomed.info/sct|394579002",
                           _include="PractitionerRole:practitioner")
    assert {e["resource"]["resourceType"] for e in cardiologists["entry"]} == {"PractitionerRole", "Practitioner"}
    visits = search("/Encounter", patient=chart, _sort="-date")
    assert [e["resource"]["identifier"][0]["value"] for e in visits["entry"]] == ["A006:encounter", "A001:encounter"]
    # the EHR's double bookings are refused like any client's: D001 is booked 10:00-10:20 (A010)
    overlapping = {**record("appointment", "A010"), "id": "A011", "patient_id": "P002", "duration_minutes": 30}
    assert_outcome(transaction(client, entries_of("appointment", overlapping)), 409, "Double booking")
