"""Bulk Data export ($export): kick-off, status, manifest and files at system, Patient and Group
level; the request's filters and errors; cancelling; consistency at the transaction time; the
API answering while an export runs; jobs surviving a killed server; expiry."""

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pymongo
import pytest
from conftest import FHIR_JSON, ServerProcess, assert_outcome, post

from fhir_server import fhir_json
from fhir_server.storage.embedded import EmbeddedDatabase
from fhir_server.validation.resource import validate_resource

ASYNC = {"Prefer": "respond-async", "Accept": FHIR_JSON}
NDJSON = "application/fhir+ndjson"
SLOW = {  # small batches with a pause: an export that lasts a few seconds
    "FHIR_EXPORT_BATCH_SIZE": "5",
    "FHIR_EXPORT_PAUSE_S": "0.05",
    "FHIR_EXPORT_LEASE_S": "2",
    "FHIR_EXPORT_POLL_S": "0.3",
    "FHIR_EXPORT_FILE_RESOURCES": "40",
}


# -- helpers -----------------------------------------------------------------------------------


def kick_off(client: httpx.Client, path: str, params: dict[str, str] | None = None, **headers: str) -> str:
    r = client.get(path, params=params, headers={**ASYNC, **headers})
    assert r.status_code == 202, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    return r.headers["content-location"]


def wait(status_url: str, timeout: float = 30.0) -> dict:
    """Poll until the manifest; every answer before it is 202 with progress."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(status_url, timeout=30)
        if r.status_code == 200:
            assert r.headers["content-type"].startswith("application/json")
            assert "expires" in r.headers
            manifest = r.json()
            assert manifest["requiresAccessToken"] is False
            assert "/$export" in manifest["request"]
            assert all(not f["url"].endswith(".part") for f in manifest["output"] + manifest["error"])
            return manifest
        assert r.status_code == 202, r.text
        assert r.headers["x-progress"] and 0 < len(r.headers["x-progress"]) < 100
        assert int(r.headers["retry-after"]) > 0
        assert time.monotonic() < deadline, "export did not finish"
        time.sleep(0.1)


def download(manifest: dict) -> dict[str, list[dict]]:
    """Every output file, each line parsed and validated; type → resources."""
    found: dict[str, list[dict]] = {}
    for item in manifest["output"]:
        r = httpx.get(item["url"], headers={"Accept": NDJSON}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith(NDJSON)
        assert r.content.endswith(b"\n")
        lines = r.content.splitlines()
        assert len(lines) == item["count"]
        for line in lines:
            resource = fhir_json.loads(line)
            assert resource["resourceType"] == item["type"]
            validate_resource(resource, item["type"])
            found.setdefault(item["type"], []).append(resource)
    for resources in found.values():
        assert len({r["id"] for r in resources}) == len(resources)  # no resource twice
    return found


def errors(manifest: dict) -> list[str]:
    texts = []
    for item in manifest["error"]:
        for line in httpx.get(item["url"]).content.splitlines():
            texts.extend(i["diagnostics"] for i in fhir_json.loads(line)["issue"])
    return texts


def count(client: httpx.Client, path: str, **params: str) -> int:
    r = client.get(path, params={**params, "_summary": "count"})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def create(client: httpx.Client, resource: dict) -> dict:
    r = post(client, resource)
    assert r.status_code == 201, r.text
    return r.json()


def observation(patient_id: str | None = None) -> dict:
    obs: dict = {"resourceType": "Observation", "status": "final", "code": {"text": "export"}}
    if patient_id:
        obs["subject"] = {"reference": f"Patient/{patient_id}"}
    return obs


def ids(resources: list[dict]) -> set[str]:
    return {r["id"] for r in resources}


# -- on the shared server ----------------------------------------------------------------------


def test_system_export_has_every_resource_as_stored(client: httpx.Client) -> None:
    patient = create(client, {"resourceType": "Patient", "name": [{"family": "Export"}], "gender": "other"})
    create(client, {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                    "valueQuantity": {"value": 1.50, "unit": "mg"}, "subject": {"reference": f"Patient/{patient['id']}"}})
    create(client, {"resourceType": "Practitioner", "name": [{"family": "Doc"}]})
    manifest = wait(kick_off(client, "/$export"))
    exported = download(manifest)
    assert {"Patient", "Observation", "Practitioner"} <= set(exported)
    for resource_type, resources in exported.items():
        # The audit trail grows with every request (the export's own among them): as it was then.
        at_export = {"_lastUpdated": f"le{manifest['transactionTime']}"} if resource_type == "AuditEvent" else {}
        assert len(resources) == count(client, f"/{resource_type}", **at_export), resource_type
    assert patient in exported["Patient"]  # exactly the stored JSON
    assert all(i["type"] in exported for i in manifest["output"])
    assert manifest["error"] == []
    assert datetime.fromisoformat(manifest["transactionTime"]) <= datetime.now(UTC)


def test_type_and_since(client: httpx.Client) -> None:
    first = create(client, {"resourceType": "Patient", "gender": "female"})
    since = first["meta"]["lastUpdated"]
    created = [first] + [create(client, {"resourceType": "Patient", "gender": "male"}) for _ in range(3)]
    created += [create(client, observation(first["id"])) for _ in range(2)]
    create(client, {"resourceType": "Practitioner"})
    manifest = wait(kick_off(client, "/$export", {"_type": "Patient,Observation", "_since": since}))
    exported = download(manifest)
    assert set(exported) == {"Patient", "Observation"}
    for resource_type in exported:
        assert len(exported[resource_type]) == count(client, f"/{resource_type}", _lastUpdated=f"ge{since}")
    assert sorted(exported["Patient"] + exported["Observation"], key=lambda r: r["id"]) == sorted(
        created, key=lambda r: r["id"]
    )
    # A _since after every change: nothing, and an empty output.
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert wait(kick_off(client, "/$export", {"_type": "Patient", "_since": later}))["output"] == []


def test_patient_level_exports_every_patients_compartment(client: httpx.Client) -> None:
    one = create(client, {"resourceType": "Patient"})
    since = one["meta"]["lastUpdated"]
    two = create(client, {"resourceType": "Patient"})
    mine = [create(client, observation(p["id"])) for p in (one, two, two)]
    create(client, observation())  # in no patient's compartment
    create(client, {"resourceType": "Practitioner"})  # a type outside the compartment
    params = {"_since": since, "_type": "Patient,Observation,Practitioner"}
    manifest = wait(kick_off(client, "/Patient/$export", params))
    exported = download(manifest)
    assert set(exported) == {"Patient", "Observation"}
    assert any("Practitioner is not in the Patient compartment" in t for t in errors(manifest))
    assert ids(exported["Patient"]) == {one["id"], two["id"]}
    assert ids(exported["Observation"]) == ids(mine)
    in_compartments = sum(count(client, f"/Patient/{p['id']}/Observation") for p in (one, two))
    assert len(exported["Observation"]) == in_compartments


def test_group_level_exports_its_members_compartments(client: httpx.Client) -> None:
    one, two, three = (create(client, {"resourceType": "Patient"}) for _ in range(3))
    obs = {p["id"]: create(client, observation(p["id"])) for p in (one, two, three)}
    encounter = create(client, {"resourceType": "Encounter", "status": "finished",
                                "class": {"code": "AMB"}, "subject": {"reference": f"Patient/{one['id']}"}})
    group = create(client, {"resourceType": "Group", "type": "person", "actual": True, "member": [
        {"entity": {"reference": f"Patient/{one['id']}"}},
        {"entity": {"reference": f"Patient/{two['id']}"}},
        {"entity": {"reference": f"Patient/{three['id']}"}, "inactive": True},
    ]})
    manifest = wait(kick_off(client, f"/Group/{group['id']}/$export"))
    exported = download(manifest)
    assert ids(exported["Patient"]) == {one["id"], two["id"]}
    assert ids(exported["Observation"]) == {obs[one["id"]]["id"], obs[two["id"]]["id"]}
    assert ids(exported["Encounter"]) == {encounter["id"]}
    assert ids(exported["Group"]) == {group["id"]}  # in its members' compartments (Group.member)
    assert manifest["request"].endswith(f"/Group/{group['id']}/$export")

    # `patient` (POST, Parameters) narrows to some members; a non-member is reported, not exported.
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Observation"},
        {"name": "patient", "valueReference": {"reference": f"Patient/{two['id']}"}},
        {"name": "patient", "valueReference": {"reference": f"Patient/{three['id']}"}},
    ]}
    r = client.post(f"/Group/{group['id']}/$export", json=parameters, headers={**ASYNC, "Content-Type": FHIR_JSON})
    assert r.status_code == 202, r.text
    manifest = wait(r.headers["content-location"])
    assert ids(download(manifest)["Observation"]) == {obs[two["id"]]["id"]}
    assert any("is not a member" in text for text in errors(manifest))

    assert_outcome(client.get("/Group/unknown-group/$export", headers=ASYNC), 404)


def test_kick_off_errors(client: httpx.Client) -> None:
    assert_outcome(client.get("/$export"), 400, "respond-async")
    assert_outcome(client.get("/$export", params={"_outputFormat": "text/csv"}, headers=ASYNC), 400, "_outputFormat")
    assert_outcome(client.get("/$export", params={"_type": "Patient,Nonsense"}, headers=ASYNC), 400, "Nonsense")
    assert_outcome(client.get("/$export", params={"_since": "yesterday"}, headers=ASYNC), 400, "_since")
    assert_outcome(client.get("/$export", params={"_since": "2024-01-01"}, headers=ASYNC), 400, "instant")
    strict = {**ASYNC, "Prefer": "respond-async, handling=strict"}
    assert_outcome(client.get("/$export", params={"_typeFilter": "Patient?gender=male"}, headers=strict), 400,
                   "_typeFilter")
    assert_outcome(client.get("/$export", params={"patient": "Patient/1"}, headers=ASYNC), 400, "patient")
    assert_outcome(client.get("/Patient/$export", params={"patient": "Observation/1"}, headers=ASYNC), 400)
    assert_outcome(client.get("/$export", headers={**ASYNC, "Accept": "application/fhir+xml"}), 406)
    assert_outcome(client.post("/$export", json={"resourceType": "Patient"},
                               headers={**ASYNC, "Content-Type": FHIR_JSON}), 400, "Parameters")
    for parameters in ([{"name": "_type"}], [{"name": 5, "valueString": "Patient"}], 5, {"name": "_type"}):
        assert_outcome(client.post("/$export", json={"resourceType": "Parameters", "parameter": parameters},
                                   headers={**ASYNC, "Content-Type": FHIR_JSON}), 400)
    assert_outcome(client.get("/Group/bad id!/$export", headers=ASYNC), 400)
    for path in ("/$export-status/unknown", f"/$export-status/{'0' * 32}", f"/$export-file/{'0' * 32}/Patient-1.ndjson"):
        assert_outcome(client.get(path), 404)
    assert_outcome(client.delete(f"/$export-status/{'0' * 32}"), 404)

    assert_outcome(client.get("/$export", params={"_typeFilter": "Patient?gender=male"}, headers=ASYNC), 400)
    # Lenient: the parameters this server does not apply are reported and ignored.
    status = kick_off(client, "/$export", {"_type": "Patient", "_typeFilter": "Patient?gender=male", "_elements": "id"},
                      Prefer="respond-async, handling=lenient")
    manifest = wait(status)
    texts = errors(manifest)
    assert any("_typeFilter" in t for t in texts) and any("_elements" in t for t in texts)
    # Only files of the manifest are served.
    job = status.rsplit("/", 1)[1]
    assert_outcome(client.get(f"/$export-file/{job}/..%2F..%2Fsecret"), 404)
    assert_outcome(client.get(f"/$export-file/{job}/Patient-1.ndjson.part"), 404)


def test_delete_cancels_and_removes_the_files(client: httpx.Client, server: ServerProcess) -> None:
    create(client, {"resourceType": "Patient"})
    running = kick_off(client, "/$export")
    assert client.delete(running).status_code == 202
    assert_outcome(client.get(running), 404)
    assert_outcome(client.delete(running), 404)

    done = kick_off(client, "/$export", {"_type": "Patient"})
    manifest = wait(done)
    folder = server.data_dir / "exports" / done.rsplit("/", 1)[1]
    assert folder.is_dir()
    assert client.delete(done).status_code == 202  # the client is done with the files
    assert not folder.exists()
    assert_outcome(client.get(manifest["output"][0]["url"]), 404)
    time.sleep(1.5)  # the cancelled job's worker has stopped, and left nothing behind
    assert not (server.data_dir / "exports" / running.rsplit("/", 1)[1]).exists()


# -- on a server whose exports run slowly ------------------------------------------------------


@pytest.fixture(scope="module")
def slow(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_export_slow", **SLOW}
    proc = ServerProcess(tmp_path_factory.mktemp("export_slow"), env).start()
    yield proc
    proc.stop()


@pytest.fixture
def slow_client(slow: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{slow.url}/fhir", timeout=60) as c:
        yield c


def test_export_holds_resources_as_at_the_transaction_time(slow_client: httpx.Client) -> None:
    client = slow_client
    kept, changed, deleted = (create(client, {"resourceType": "Patient", "gender": "male"}) for _ in range(3))
    status = kick_off(client, "/$export", {"_type": "Patient", "_since": kept["meta"]["lastUpdated"]})
    # After the transaction time: an update, a deletion and a creation, none of them exported.
    r = client.put(f"/Patient/{changed['id']}", json={**changed, "gender": "female"}, headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 200
    assert client.delete(f"/Patient/{deleted['id']}").status_code == 200
    create(client, {"resourceType": "Patient"})
    exported = download(wait(status))["Patient"]
    assert sorted(exported, key=lambda p: p["id"]) == sorted([kept, changed, deleted], key=lambda p: p["id"])


def test_api_answers_while_an_export_runs(slow_client: httpx.Client) -> None:
    client = slow_client
    first = create(client, {"resourceType": "Patient"})
    for _ in range(119):
        create(client, observation(first["id"]))
    status = kick_off(client, "/$export", {"_type": "Observation", "_since": first["meta"]["lastUpdated"]})
    answered, progress = 0, set()
    while (r := httpx.get(status)).status_code == 202:
        progress.add(r.headers["x-progress"])
        started = time.monotonic()
        assert client.get(f"/Patient/{first['id']}").status_code == 200
        assert count(client, "/Observation", subject=f"Patient/{first['id']}") == 119
        create(client, {"resourceType": "Practitioner"})
        assert time.monotonic() - started < 1.0
        answered += 1
        time.sleep(0.05)
    assert answered >= 5, progress
    assert any("Observation: " in p for p in progress), progress
    manifest = r.json()
    assert [f["count"] for f in manifest["output"]] == [40, 40, 39]  # split at 40 per file
    assert len(download(manifest)["Observation"]) == 119


def test_cancel_stops_a_running_export(slow_client: httpx.Client, slow: ServerProcess) -> None:
    for _ in range(30):
        create(slow_client, observation())
    status = kick_off(slow_client, "/$export", {"_type": "Observation"})
    while "Observation: " not in httpx.get(status).headers.get("x-progress", ""):
        time.sleep(0.05)
    folder = slow.data_dir / "exports" / status.rsplit("/", 1)[1]
    assert slow_client.delete(status).status_code == 202
    assert_outcome(httpx.get(status), 404)
    time.sleep(0.5)
    assert not folder.exists()


def test_jobs_expire(slow_client: httpx.Client, slow: ServerProcess, database: EmbeddedDatabase) -> None:
    status = kick_off(slow_client, "/$export", {"_type": "Patient"})
    manifest = wait(status)
    job_id = status.rsplit("/", 1)[1]
    folder = slow.data_dir / "exports" / job_id
    assert folder.is_dir()
    with pymongo.MongoClient(database.uri) as mongo:
        mongo["fhir_export_slow"]["exports"].update_one(
            {"_id": job_id}, {"$set": {"expires": datetime.now(UTC) - timedelta(seconds=1)}}
        )
    assert_outcome(httpx.get(status), 404)
    assert_outcome(httpx.get(manifest["output"][0]["url"]), 404)
    deadline = time.monotonic() + 5
    while folder.exists():
        assert time.monotonic() < deadline, "the expired job's files were not removed"
        time.sleep(0.1)


def test_a_job_interrupted_too_often_fails(slow: ServerProcess, database: EmbeddedDatabase) -> None:
    now = datetime.now(UTC)
    job_id = "f" * 32
    with pymongo.MongoClient(database.uri) as mongo:
        mongo["fhir_export_slow"]["exports"].insert_one({
            "_id": job_id, "status": "running", "lease": now - timedelta(seconds=5), "attempts": 3,
            "owner": "gone", "request": "x", "level": "system", "types": ["Patient"], "since": None,
            "transactionTime": now, "members": None, "warnings": [], "done": {}, "created": now,
        })
    status = f"{slow.url}/fhir/$export-status/{job_id}"
    deadline = time.monotonic() + 5
    while (r := httpx.get(status)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert_outcome(r, 500, "interrupted")


# -- restarts ----------------------------------------------------------------------------------


def _job(mongo: pymongo.MongoClient, job_id: str) -> dict:
    return mongo["fhir_export_restart"]["exports"].find_one({"_id": job_id}) or {}


def test_export_survives_kill_9_and_restart(database: EmbeddedDatabase, tmp_path: Path) -> None:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_export_restart", **SLOW,
           "FHIR_EXPORT_PAUSE_S": "0.1"}
    first = ServerProcess(tmp_path, env).start()
    mongo: pymongo.MongoClient = pymongo.MongoClient(database.uri)
    try:
        with httpx.Client(base_url=f"{first.url}/fhir", timeout=60) as client:
            patient = create(client, {"resourceType": "Patient"})
            for _ in range(59):
                create(client, {"resourceType": "Patient"})
            for _ in range(50):
                create(client, observation(patient["id"]))
            status = kick_off(client, "/$export")
        job_id = status.rsplit("/", 1)[1]
        folder = tmp_path / "exports" / job_id
        deadline = time.monotonic() + 20
        while "Observation" not in _job(mongo, job_id).get("done", {}):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert first.process is not None
        first.process.kill()  # mid-export: Observation recorded, Patient being written
        first.process.wait()
        assert _job(mongo, job_id)["status"] == "running"
        kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("Observation-*")}
        assert sorted(kept) == ["Observation-1.ndjson", "Observation-2.ndjson"]

        second = ServerProcess(tmp_path, env).start()
        try:
            status = status.replace(first.url, second.url)
            manifest = wait(status, timeout=30)  # once the dead worker's lease lapses
            assert _job(mongo, job_id)["attempts"] == 2
            assert {p.name: p.stat().st_mtime_ns for p in folder.glob("Observation-*")} == kept  # not redone
            assert not list(folder.glob("*.part"))
            exported = download(manifest)
            assert len(exported["Patient"]) == 60 and len(exported["Observation"]) == 50

            # A job queued before a clean stop runs after the next start.
            with httpx.Client(base_url=f"{second.url}/fhir", timeout=60) as client:
                queued = kick_off(client, "/$export", {"_type": "Patient"})
        finally:
            second.stop()
        third = ServerProcess(tmp_path, env).start()
        try:
            manifest = wait(queued.replace(second.url, third.url), timeout=30)
            assert len(download(manifest)["Patient"]) == 60
        finally:
            third.stop()
    finally:
        first.stop()
        mongo.close()
