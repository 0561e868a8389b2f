"""`fhir-server reindex`: resources indexed by another version become findable again, and the
server says at start-up when the stored index is stale."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pymongo
from conftest import FHIR_JSON, ServerProcess, unique

from fhir_server.storage.embedded import EmbeddedDatabase

STALE_WARNING = "run `fhir-server reindex`"


def _reindex(database: EmbeddedDatabase, db_name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MONGODB_URI": database.uri, "FHIR_MONGODB_DB": db_name}
    return subprocess.run(
        [sys.executable, "-m", "fhir_server", "reindex", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def _names(client: httpx.Client, family: str) -> list[str]:
    bundle = client.get("/Patient", params={"family": family}).json()
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def test_reindex_restores_a_stale_index(database: EmbeddedDatabase, tmp_path: Path) -> None:
    db_name = f"fhir_reindex_{unique()}"
    family = f"Stale{unique()}"
    # Without the audit trail, whose AuditEvents `reindex --all` would count too.
    server = ServerProcess(tmp_path, {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": db_name, "FHIR_AUDIT": "false"}).start()
    try:
        assert STALE_WARNING not in server.log()  # a new database is current from the start
        with httpx.Client(base_url=f"{server.url}/fhir", timeout=30) as client:
            created = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": family}]},
                                  headers={"Content-Type": FHIR_JSON}).json()
            assert _names(client, family) == [created["id"]]
            with pymongo.MongoClient(database.uri) as mongo:  # as an older version would have left it
                db = mongo[db_name]
                db.Patient.update_one({"_id": created["id"]}, {"$set": {"ix": [], "p": {}, "ixv": "older"}})
                db.server.update_one({"_id": "search-index"}, {"$set": {"fingerprint": "older"}})
            assert _names(client, family) == []
            done = _reindex(database, db_name)
            assert done.returncode == 0, done.stderr
            assert "1 resources to index" in done.stdout
            assert _names(client, family) == [created["id"]]
            again = _reindex(database, db_name)
            assert "0 resources to index" in again.stdout
            everything = _reindex(database, db_name, "--all")
            assert "1 resources to index" in everything.stdout
    finally:
        server.stop()


def test_start_up_warns_about_a_stale_index(database: EmbeddedDatabase, tmp_path: Path) -> None:
    db_name = f"fhir_reindex_{unique()}"
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": db_name}
    with pymongo.MongoClient(database.uri) as mongo:
        mongo[db_name].Patient.insert_one({"_id": "old", "v": 1, "del": True})
        mongo[db_name].server.insert_one({"_id": "search-index", "fingerprint": "older"})
    stale = ServerProcess(tmp_path / "a", env).start()
    stale.stop()
    assert STALE_WARNING in stale.log()
    assert _reindex(database, db_name).returncode == 0
    current = ServerProcess(tmp_path / "b", env).start()
    current.stop()
    assert STALE_WARNING not in current.log()
