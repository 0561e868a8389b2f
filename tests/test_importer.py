"""`fhir-server import`: sample files of the replaced systems through a running server, twice."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pydicom
from conftest import ServerProcess, free_port, unique
from pydicom.data import get_testdata_file

DATA = Path(__file__).parent / "data"
INSURANCE = "urn:fhir-server:insurance-number"


def run_import(server: ServerProcess, system: str, *args: str) -> tuple[int, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "fhir_server", "import", system, *args, "--url", f"{server.url}/fhir",
         "--dicom", f"127.0.0.1:{server.dicom_port}", "--json"],
        capture_output=True, timeout=300,
    )
    lines = result.stdout.decode().strip().splitlines()
    assert lines, result.stderr.decode()
    return result.returncode, json.loads(lines[-1])


def total(client: httpx.Client, path: str, **params: str) -> int:
    response = client.get(path, params={**params, "_summary": "count"})
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


def test_interactions_import_round_trip_and_again(server: ServerProcess, client: httpx.Client) -> None:
    source = json.loads((DATA / "interactions" / "interactions.json").read_text())["interaction"]
    status, summary = run_import(server, "interactions", str(DATA / "interactions" / "interactions.json"))
    assert status == 0 and not summary["rejected"], summary
    assert summary["records"] == len(source) and summary["created"]["Encounter"] == len(source)
    assert summary["created"]["Patient"] == len({r["insurance_no"] for r in source})
    # The searches that replace the system's screens give back what was imported.
    for insurance in {r["insurance_no"] for r in source}:
        for label in {r["label"] for r in source if r["insurance_no"] == insurance}:
            expected = sum(1 for r in source if r["insurance_no"] == insurance and r["label"] == label)
            found = total(client, "/Encounter", **{"patient.identifier": f"{INSURANCE}|{insurance}",
                                                    "_tag": f"urn:fhir-server:interactions:label|{label}"})
            assert found == expected, (insurance, label)
    # Again, from the JSON and from the CSV of the same records: nothing new.
    for path in (DATA / "interactions" / "interactions.json", DATA / "interactions" / "interactions.csv"):
        status, again = run_import(server, "interactions", str(path))
        assert status == 0 and not again["created"] and not again["updated"], again
        assert again["unchanged"]["Encounter"] == len(source), again
    assert total(client, "/Encounter", identifier="urn:fhir-server:source:interactions:interaction|") == len(source)
    first = source[0]
    encounter = client.get("/Encounter", params={"identifier": f"urn:fhir-server:source:interactions:interaction|{first['id']}"})
    encounter_id = encounter.json()["entry"][0]["resource"]["id"]
    assert client.get(f"/Encounter/{encounter_id}/_history").json()["total"] == 1  # re-imports stored no new versions


def test_a_changed_source_record_updates_what_it_changed(server: ServerProcess, client: httpx.Client, tmp_path: Path) -> None:
    record = json.loads((DATA / "interactions" / "interactions.json").read_text())["interaction"][0]
    record = {**record, "id": f"changed-{unique()}"}
    path = tmp_path / "interactions.json"
    path.write_text(json.dumps({"interaction": [record]}))
    status, summary = run_import(server, "interactions", str(path))
    assert status == 0 and summary["created"]["Encounter"] == 1 and not summary["updated"], summary
    path.write_text(json.dumps({"interaction": [{**record, "remarks": "Seen again: better."}]}))
    status, again = run_import(server, "interactions", str(path))
    assert status == 0 and not again["created"] and again["updated"] == {"ClinicalImpression": 1}, again
    assert again["unchanged"]["Encounter"] == 1
    impression = client.get("/ClinicalImpression", params={
        "identifier": f"urn:fhir-server:source:interactions:clinical-impression|{record['id']}"}).json()["entry"][0]["resource"]
    assert impression["summary"] == "Seen again: better." and impression["meta"]["versionId"] == "2"


def test_assessment_import_links_records_to_earlier_ones(server: ServerProcess, client: httpx.Client) -> None:
    source = json.loads((DATA / "assessment" / "assessment.json").read_text())
    status, summary = run_import(server, "assessment", str(DATA / "assessment" / "assessment.json"))
    assert status == 0 and not summary["rejected"], summary
    assert summary["created"]["QuestionnaireResponse"] == len(source["assessment"])
    first = source["assessment"][0]
    responses = client.get("/QuestionnaireResponse", params={
        "patient.identifier": f"urn:fhir-server:source:assessment:patient|{first['patient_id']}",
        "_include": "QuestionnaireResponse:author"}).json()
    authors = [e for e in responses["entry"] if e["resource"]["resourceType"] == "Practitioner"]
    assert authors, responses


def test_rejected_records_are_reported_and_make_the_exit_status_fail(server: ServerProcess, tmp_path: Path) -> None:
    good = json.loads((DATA / "interactions" / "interactions.json").read_text())["interaction"][0]
    bad_date = {**good, "id": "BAD-1", "interaction_date": "not a date"}
    missing = {k: v for k, v in good.items() if k != "insurance_no"} | {"id": "BAD-2"}
    path = tmp_path / "interactions.json"
    path.write_text(json.dumps({"interaction": [good, bad_date, missing]}))
    status, summary = run_import(server, "interactions", str(path))
    assert status == 1
    reasons = {r["where"]: r["reason"] for r in summary["rejected"]}
    assert set(reasons) == {"interactions.json interaction #2", "interactions.json interaction #3"}
    assert "interaction_date" in reasons["interactions.json interaction #2"]
    assert "insurance_no" in reasons["interactions.json interaction #3"]
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("a,b\n1,2\n")
    result = subprocess.run([sys.executable, "-m", "fhir_server", "import", "interactions", str(unknown),
                             "--url", f"{server.url}/fhir"], capture_output=True, timeout=60)
    assert result.returncode != 0 and b"which kind" in result.stderr


def test_ehr_import_with_images_and_csv(server: ServerProcess, client: httpx.Client) -> None:
    folder = DATA / "ehr"
    source = json.loads((folder / "ehr.json").read_text())
    status, summary = run_import(server, "ehr", str(folder / "ehr.json"), str(folder / "patients.csv"),
                                 str(folder / "laboratory_results.csv"))
    assert status == 0 and not summary["rejected"], summary
    for kind in ("DocumentReference", "Binary"):  # created, or there from the EHR mapping's own tests
        assert summary["created"].get(kind, 0) + summary["unchanged"].get(kind, 0) == len(source["radiology_imaging"]), summary
    status, again = run_import(server, "ehr", str(folder / "ehr.json"))
    assert status == 0 and not again["created"] and not again["updated"], again
    first = source["radiology_imaging"][0]
    documents = client.get("/DocumentReference", params={
        "identifier": f"urn:fhir-server:source:ehr:radiology_imaging|{first['id']}"}).json()
    url = documents["entry"][0]["resource"]["content"][0]["attachment"]["url"]
    binary = client.get(f"/{url}").json()
    assert base64.b64decode(binary["data"]) == (folder / first["file_path"]).read_bytes()


def test_ehr_dicom_images_go_to_the_node_as_imaging_studies(server: ServerProcess, client: httpx.Client, tmp_path: Path) -> None:
    """A radiology record holding a DICOM file: C-STOREd to the node with the record's patient
    set, so the node's ImagingStudy belongs to the imported Patient; the description fills the
    StudyDescription the header lacks. Of an unknown patient, or with the node unreachable, the
    record is rejected and nothing is stored."""
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.StudyInstanceUID = pydicom.uid.generate_uid()
    ct.SeriesInstanceUID, ct.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    del ct.StudyDescription
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    insurance = unique()
    records = {
        "patient": [{"id": f"PD-{insurance}", "first_name": "Dora", "last_name": "Dicom", "birth_date": "1970-01-02",
                     "sex": "female"}],
        "radiology_imaging": [
            {"id": f"RD-{insurance}", "patient_id": f"PD-{insurance}", "date": "2024-05-06", "modality": "CT",
             "description": "CT of the head", "file_path": "ct.dcm"},
            {"id": f"RX-{insurance}", "patient_id": "no-such-patient", "date": "2024-05-06", "file_path": "ct.dcm"},
        ],
    }
    (tmp_path / "ehr.json").write_text(json.dumps(records))
    status, summary = run_import(server, "ehr", str(tmp_path / "ehr.json"))
    assert status == 1 and summary["dicom"] == 1, summary
    assert [r["where"] for r in summary["rejected"]] == ["ehr.json radiology_imaging #2"]
    assert "no-such-patient" in summary["rejected"][0]["reason"]
    patient = client.get("/Patient", params={"identifier": f"urn:fhir-server:source:ehr:patient|PD-{insurance}"}).json()
    [patient_id] = [e["resource"]["id"] for e in patient["entry"]]
    study = client.get(f"/ImagingStudy/{ct.StudyInstanceUID}").json()
    assert study["subject"] == {"reference": f"Patient/{patient_id}"}
    assert study["description"] == "CT of the head" and study["series"][0]["modality"]["code"] == "CT"
    assert total(client, "/Patient", identifier="no-such-patient") == 0
    assert total(client, "/DocumentReference", identifier=f"urn:fhir-server:source:ehr:radiology_imaging|RD-{insurance}") == 0

    result = subprocess.run(
        [sys.executable, "-m", "fhir_server", "import", "ehr", str(tmp_path / "ehr.json"), "--url", f"{server.url}/fhir",
         "--dicom", f"127.0.0.1:{free_port()}", "--json"], capture_output=True, timeout=300)
    summary = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert result.returncode == 1 and summary["dicom"] == 0
    assert "cannot be reached" in summary["rejected"][0]["reason"], summary
