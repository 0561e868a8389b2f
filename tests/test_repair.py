"""A crash between a write's two steps (history entry, then current version) is repaired on read.

The server here writes in order, without transactions (the embedded database's mode); the
crash is simulated by planting the history entry a crashed writer would have left.
"""

import copy

import httpx
import pymongo.database
from conftest import patient, post, unique


def _plant_next_version(mongo: pymongo.database.Database, rid: str, **changes: object) -> None:
    """The history entry of version 2, as if its writer died before updating the current one."""
    first = mongo["history"].find_one({"_id": f"Patient/{rid}/{1:010d}"})
    assert first is not None
    second = copy.deepcopy(first)
    second.update(_id=f"Patient/{rid}/{2:010d}", v=2, m="PUT")
    second.pop("c", None)
    second["res"].update(changes)
    second["res"]["meta"]["versionId"] = "2"
    mongo["history"].insert_one(second)


def test_read_rolls_an_interrupted_update_forward(client: httpx.Client, mongo: pymongo.database.Database) -> None:
    value = unique()
    rid = post(client, patient(identifier=[{"system": "urn:repair", "value": value}], gender="female")).json()["id"]
    _plant_next_version(mongo, rid, gender="male")
    assert mongo["Patient"].find_one({"_id": rid})["v"] == 1  # the crash left the current one behind

    read = client.get(f"/Patient/{rid}")
    assert read.json()["gender"] == "male" and read.headers["ETag"] == 'W/"2"'
    assert mongo["Patient"].find_one({"_id": rid})["v"] == 2  # repaired, so searches see it too
    found = client.get("/Patient", params={"identifier": f"urn:repair|{value}"}).json()
    assert found["entry"][0]["resource"]["meta"]["versionId"] == "2"
    update = client.put(f"/Patient/{rid}", json=patient(id=rid, gender="other"), headers={"Content-Type": "application/fhir+json"})
    assert update.json()["meta"]["versionId"] == "3"


def test_writer_rolls_an_interrupted_update_forward(client: httpx.Client, mongo: pymongo.database.Database) -> None:
    rid = post(client, patient(gender="female")).json()["id"]
    _plant_next_version(mongo, rid, gender="male")
    update = client.put(f"/Patient/{rid}", json=patient(id=rid, active=True), headers={"Content-Type": "application/fhir+json"})
    assert update.status_code == 200 and update.json()["meta"]["versionId"] == "3"
    history = client.get(f"/Patient/{rid}/_history").json()
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"3"', 'W/"2"', 'W/"1"']


def test_read_finds_a_create_whose_current_write_never_happened(client: httpx.Client, mongo: pymongo.database.Database) -> None:
    rid = post(client, patient(gender="female")).json()["id"]
    mongo["Patient"].delete_one({"_id": rid})  # as if the create stopped after its history entry
    read = client.get(f"/Patient/{rid}")
    assert read.status_code == 200 and read.json()["gender"] == "female"
    assert mongo["Patient"].find_one({"_id": rid}) is not None
