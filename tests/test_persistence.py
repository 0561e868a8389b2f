"""Nothing acknowledged is lost: across a server restart, and across `kill -9` of the database."""

from pathlib import Path

import httpx
from conftest import FHIR_JSON, ServerProcess, assert_outcome, free_port

from fhir_server.storage.embedded import EmbeddedDatabase


def _create(base: str, n: int) -> list[dict]:
    with httpx.Client(base_url=f"{base}/fhir", timeout=60) as client:
        created = []
        for i in range(n):
            r = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": f"P{i}"}]},
                            headers={"Content-Type": FHIR_JSON})
            assert r.status_code == 201
            created.append(r.json())
        return created


def test_restart_on_the_same_data_folder_keeps_everything(tmp_path: Path) -> None:
    """The default set-up: no MONGODB_URI, so `serve` runs the embedded database in --data-dir."""
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    try:
        created = _create(first.url, 5)
        with httpx.Client(base_url=f"{first.url}/fhir") as client:
            rid = created[0]["id"]
            client.put(f"/Patient/{rid}", json={**created[0], "gender": "female"}, headers={"Content-Type": FHIR_JSON})
            client.delete(f"/Patient/{created[1]['id']}")
    finally:
        first.stop()
    assert (data / "db").is_dir()

    second = ServerProcess(data).start()
    try:
        with httpx.Client(base_url=f"{second.url}/fhir") as client:
            for resource in created[2:]:
                assert client.get(f"/Patient/{resource['id']}").json() == resource
            assert client.get(f"/Patient/{rid}").json()["gender"] == "female"
            assert client.get(f"/Patient/{rid}/_history").json()["total"] == 2
            assert_outcome(client.get(f"/Patient/{created[1]['id']}"), 410)
            assert client.get("/_history").json()["total"] == 7
    finally:
        second.stop()


def test_acknowledged_writes_survive_kill_9_of_the_database(tmp_path: Path) -> None:
    database = EmbeddedDatabase(tmp_path / "db", port=free_port()).start()
    server = ServerProcess(tmp_path / "server", {"MONGODB_URI": database.uri}).start()
    try:
        created = _create(server.url, 20)
        database.kill()  # SIGKILL: no checkpoint, no clean close
        with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as client:
            down = client.get(f"/Patient/{created[0]['id']}")
            assert_outcome(down, 503)
            database.start()  # same port, same files: the journal is replayed
            for resource in created:
                assert client.get(f"/Patient/{resource['id']}").json() == resource
            # And the server goes on writing.
            assert client.post("/Patient", json={"resourceType": "Patient"}, headers={"Content-Type": FHIR_JSON}).status_code == 201
    finally:
        server.stop()
        database.stop()
