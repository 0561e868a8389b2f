"""Transactions without database transactions (the embedded database's mode) are all or nothing
across crashes: an acknowledged transaction survives `kill -9` of the database; a crash before
the commit point leaves nothing visible and is cleaned up; a crash after it is finished by the
next reader or by the next start-up.

Crashes are simulated by planting what a writer that died at that point leaves behind: the
history entries it claimed, marked with its commit record, and the record itself.
"""

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pymongo.database
from conftest import FHIR_JSON, ServerProcess, assert_outcome, free_port, patient, post, unique

from fhir_server.storage.embedded import EmbeddedDatabase


def _transaction(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def _post_entry(resource: dict, full_url: str | None = None) -> dict:
    entry = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def _plant(
    client: httpx.Client, mongo: pymongo.database.Database, state: str, lease: datetime
) -> tuple[str, str, str]:
    """A transaction that updated a Patient to version 2 and created an Observation, stopped
    after claiming both history entries: (tx id, patient id, observation id)."""
    rid = post(client, patient(gender="female")).json()["id"]
    first = mongo["history"].find_one({"_id": f"Patient/{rid}/{1:010d}"})
    assert first is not None
    tx = unique()
    second = copy.deepcopy(first)
    second.update(_id=f"Patient/{rid}/{2:010d}", v=2, m="PUT", tx=tx)
    second.pop("c", None)
    second["res"]["gender"] = "male"
    second["res"]["meta"]["versionId"] = "2"
    oid = unique()
    observation = {
        "_id": f"Observation/{oid}/{1:010d}", "t": "Observation", "i": oid, "v": 1, "ts": second["ts"], "m": "POST",
        "c": True, "tx": tx,
        "res": {"resourceType": "Observation", "id": oid, "meta": {"versionId": "1", "lastUpdated": "2026-01-01T00:00:00.000Z"},
                "status": "final", "code": {"text": "planted"}, "subject": {"reference": f"Patient/{rid}"}},
    }
    mongo["history"].insert_many([second, observation])
    mongo["transactions"].insert_one({"_id": tx, "state": state, "lease": lease, "claims": [second["_id"], observation["_id"]]})
    return tx, rid, oid


def test_claims_of_an_uncommitted_transaction_stay_invisible(client: httpx.Client, mongo: pymongo.database.Database) -> None:
    tx, rid, oid = _plant(client, mongo, "pending", datetime.now(UTC) + timedelta(minutes=5))  # its writer may still commit
    assert client.get(f"/Patient/{rid}").json()["gender"] == "female"
    assert_outcome(client.get(f"/Patient/{rid}/_history/2"), 404)
    assert [e["response"]["etag"] for e in client.get(f"/Patient/{rid}/_history").json()["entry"]] == ['W/"1"']
    assert_outcome(client.get(f"/Observation/{oid}"), 404)
    assert mongo["transactions"].find_one({"_id": tx})["state"] == "pending"


def test_an_abandoned_transaction_is_discarded_and_its_versions_freed(
    client: httpx.Client, mongo: pymongo.database.Database
) -> None:
    tx, rid, oid = _plant(client, mongo, "pending", datetime.now(UTC) - timedelta(seconds=1))  # its lease has ended
    assert client.get(f"/Patient/{rid}").json()["gender"] == "female"
    assert mongo["transactions"].find_one({"_id": tx})["state"] == "discarded"
    assert mongo["history"].count_documents({"tx": tx}) == 0
    update = client.put(f"/Patient/{rid}", json=patient(id=rid, gender="other"), headers={"Content-Type": FHIR_JSON})
    assert update.status_code == 200 and update.json()["meta"]["versionId"] == "2"  # version 2 is free again
    assert_outcome(client.get(f"/Observation/{oid}"), 404)


def test_a_writer_meeting_an_abandoned_claim_discards_it(client: httpx.Client, mongo: pymongo.database.Database) -> None:
    tx, rid, _ = _plant(client, mongo, "pending", datetime.now(UTC) - timedelta(seconds=1))
    bundle = _transaction({"resource": patient(id=rid, active=True), "request": {"method": "PUT", "url": f"Patient/{rid}"}})
    answer = client.post("", json=bundle, headers={"Content-Type": FHIR_JSON})
    assert answer.status_code == 200, answer.text
    assert answer.json()["entry"][0]["response"]["etag"] == 'W/"2"'
    assert client.get(f"/Patient/{rid}").json().get("active") is True


def test_a_committed_transaction_whose_writer_died_is_finished_by_a_reader(
    client: httpx.Client, mongo: pymongo.database.Database
) -> None:
    tx, rid, oid = _plant(client, mongo, "committed", datetime.now(UTC) - timedelta(seconds=1))
    read = client.get(f"/Patient/{rid}")  # the reader rolls the whole committed transaction forward
    assert read.json()["gender"] == "male" and read.headers["ETag"] == 'W/"2"'
    assert mongo["transactions"].find_one({"_id": tx})["state"] == "applied"
    found = client.get("/Observation", params={"subject": f"Patient/{rid}"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [oid]


def test_start_up_finishes_committed_transactions(
    client: httpx.Client, mongo: pymongo.database.Database, tmp_path: Path
) -> None:
    tx, rid, oid = _plant(client, mongo, "committed", datetime.now(UTC) + timedelta(minutes=5))
    assert mongo["Observation"].find_one({"_id": oid}) is None
    host, port = mongo.client.address
    restarted = ServerProcess(tmp_path, {"MONGODB_URI": f"mongodb://{host}:{port}/?directConnection=true",
                                         "FHIR_MONGODB_DB": mongo.name}).start()
    try:
        assert mongo["transactions"].find_one({"_id": tx})["state"] == "applied"
        assert client.get(f"/Observation/{oid}/_history/1").json()["code"]["text"] == "planted"
        found = client.get("/Observation", params={"subject": f"Patient/{rid}"}).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [oid]
        assert mongo["Patient"].find_one({"_id": rid})["v"] == 2
    finally:
        restarted.stop()


def test_an_acknowledged_transaction_survives_kill_9_of_the_database(tmp_path: Path) -> None:
    database = EmbeddedDatabase(tmp_path / "db", port=free_port()).start()
    server = ServerProcess(tmp_path / "server", {"MONGODB_URI": database.uri}).start()
    try:
        with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as client:
            bundle = _transaction(
                _post_entry(patient(name=[{"family": "Durable"}]), "urn:uuid:0b0e7c2e-4a51-4c1b-9d3e-2f7c1c1e0001"),
                *[_post_entry({"resourceType": "Observation", "status": "final", "code": {"text": f"o{i}"},
                               "subject": {"reference": "urn:uuid:0b0e7c2e-4a51-4c1b-9d3e-2f7c1c1e0001"}})
                  for i in range(20)],
            )
            answer = client.post("", json=bundle, headers={"Content-Type": FHIR_JSON, "Prefer": "return=representation"})
            assert answer.status_code == 200, answer.text
            stored = [e["resource"] for e in answer.json()["entry"]]
            database.kill()  # SIGKILL: no checkpoint, no clean close
            database.start()
            for resource in stored:
                assert client.get(f"/{resource['resourceType']}/{resource['id']}").json() == resource
            count = client.get("/Observation", params={"subject": f"Patient/{stored[0]['id']}", "_summary": "count"})
            assert count.json()["total"] == 20
    finally:
        server.stop()
        database.stop()


def test_history_pages_skip_uncommitted_claims_without_ending_early(
    client: httpx.Client, mongo: pymongo.database.Database
) -> None:
    rid = post(client, patient(gender="female")).json()["id"]
    client.put(f"/Patient/{rid}", json=patient(id=rid, gender="other"), headers={"Content-Type": FHIR_JSON})
    second = mongo["history"].find_one({"_id": f"Patient/{rid}/{2:010d}"})
    claim = {**copy.deepcopy(second), "_id": f"Patient/{rid}/{3:010d}", "v": 3, "tx": unique()}
    mongo["history"].insert_one(claim)
    mongo["transactions"].insert_one({"_id": claim["tx"], "state": "pending", "ts": claim["ts"],
                                      "lease": datetime.now(UTC) + timedelta(minutes=5), "claims": [claim["_id"]]})
    page = client.get(f"/Patient/{rid}/_history", params={"_count": 1}).json()
    assert [e["response"]["etag"] for e in page["entry"]] == ['W/"2"']
    following = next(link["url"] for link in page["link"] if link["relation"] == "next")
    assert [e["response"]["etag"] for e in httpx.get(following).json()["entry"]] == ['W/"1"']
