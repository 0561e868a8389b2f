"""`fhir-server import`: sample files of the replaced systems through a running server, twice."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import ServerProcess

DATA = Path(__file__).parent / "data"
INSURANCE = "urn:fhir-server:insurance-number"


def run_import(server: ServerProcess, system: str, *args: str) -> tuple[int, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "fhir_server", "import", system, *args, "--url", f"{server.url}/fhir", "--json"],
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
        assert status == 0 and not again["created"] and again["existing"]["Encounter"] == len(source), again
    assert total(client, "/Encounter", identifier="urn:fhir-server:source:interactions:interaction|") == len(source)


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
    assert summary["created"]["DocumentReference"] == len(source["radiology_imaging"])
    assert summary["created"]["Binary"] == len(source["radiology_imaging"])
    status, again = run_import(server, "ehr", str(folder / "ehr.json"))
    assert status == 0 and not again["created"], again
    first = source["radiology_imaging"][0]
    documents = client.get("/DocumentReference", params={
        "identifier": f"urn:fhir-server:source:ehr:radiology_imaging|{first['id']}"}).json()
    url = documents["entry"][0]["resource"]["content"][0]["attachment"]["url"]
    binary = client.get(f"/{url}").json()
    assert base64.b64decode(binary["data"]) == (folder / first["file_path"]).read_bytes()
