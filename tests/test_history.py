"""History at instance, type and system level, with `_count` paging, `_since` and `_at`."""

import time
from urllib.parse import urlsplit

import httpx
import pymongo.database
from conftest import patient, post, put, unique

from fhir_server.storage.repository import _versions_of


def _entries(bundle: dict) -> list[dict]:
    return bundle.get("entry", [])


def _follow(client: httpx.Client, bundle: dict) -> dict | None:
    nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    if not nxt:
        return None
    parts = urlsplit(nxt[0])
    return client.get(parts.path.removeprefix("/fhir") + "?" + parts.query).json()


def test_instance_history_newest_first_with_request_and_response(client: httpx.Client) -> None:
    rid = post(client, patient(gender="female")).json()["id"]
    put(client, patient(id=rid, gender="male"))
    client.delete(f"/Patient/{rid}")
    bundle = client.get(f"/Patient/{rid}/_history").json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history"
    assert bundle["total"] == 3
    entries = _entries(bundle)
    assert [e["request"]["method"] for e in entries] == ["DELETE", "PUT", "POST"]
    assert [e["response"]["etag"] for e in entries] == ['W/"3"', 'W/"2"', 'W/"1"']
    assert "resource" not in entries[0]
    assert entries[1]["resource"]["gender"] == "male"
    assert entries[2]["request"]["url"] == "Patient"
    assert entries[1]["request"]["url"] == f"Patient/{rid}"
    assert entries[2]["response"]["status"].startswith("201")
    assert entries[1]["fullUrl"].endswith(f"/fhir/Patient/{rid}")
    assert all(e["response"]["lastModified"] for e in entries)


def test_paging_with_count_visits_every_version_once(client: httpx.Client) -> None:
    rid = post(client, patient()).json()["id"]
    for n in range(6):
        put(client, patient(id=rid, birthDate=f"200{n}-01-01"))
    bundle = client.get(f"/Patient/{rid}/_history", params={"_count": 3}).json()
    seen = []
    pages = 0
    while bundle is not None:
        pages += 1
        assert len(_entries(bundle)) <= 3
        seen += [e["response"]["etag"] for e in _entries(bundle)]
        bundle = _follow(client, bundle)
    assert pages == 3
    assert seen == [f'W/"{v}"' for v in range(7, 0, -1)]


def test_type_and_system_history(client: httpx.Client) -> None:
    marker = unique()
    org = post(client, {"resourceType": "Organization", "name": f"Org {marker}"}).json()
    pat = post(client, patient(name=[{"family": marker}])).json()
    types = client.get("/Organization/_history", params={"_count": 50}).json()
    assert {e["resource"]["resourceType"] for e in _entries(types) if "resource" in e} == {"Organization"}
    assert any(e["resource"]["id"] == org["id"] for e in _entries(types))
    system = client.get("/_history", params={"_count": 2}).json()
    assert [e["resource"]["id"] for e in _entries(system)] == [pat["id"], org["id"]]
    assert any(link["relation"] == "next" for link in system["link"])


def test_since_and_at(client: httpx.Client) -> None:
    rid = post(client, patient(gender="female")).json()["id"]
    first_time = client.get(f"/Patient/{rid}").json()["meta"]["lastUpdated"]
    time.sleep(1.1)
    second = put(client, patient(id=rid, gender="male")).json()
    second_time = second["meta"]["lastUpdated"]
    time.sleep(1.1)
    put(client, patient(id=rid, gender="other"))

    since = client.get(f"/Patient/{rid}/_history", params={"_since": second_time}).json()
    assert [e["response"]["etag"] for e in _entries(since)] == ['W/"3"', 'W/"2"']

    # _at a moment between version 1 and 2: only version 1 was current then.
    at_first = client.get(f"/Patient/{rid}/_history", params={"_at": first_time}).json()
    assert [e["response"]["etag"] for e in _entries(at_first)] == ['W/"1"']
    at_second = client.get(f"/Patient/{rid}/_history", params={"_at": second_time}).json()
    assert [e["response"]["etag"] for e in _entries(at_second)] == ['W/"2"']
    # A whole year: every version was current at some point of it.
    year = second_time[:4]
    at_year = client.get(f"/Patient/{rid}/_history", params={"_at": year}).json()
    assert len(_entries(at_year)) == 3
    before = client.get(f"/Patient/{rid}/_history", params={"_at": "2001"}).json()
    assert _entries(before) == []


def test_one_resources_versions_are_found_by_an_index(client: httpx.Client, mongo: pymongo.database.Database) -> None:
    """A read of an unknown id (which looks in the history for a create whose current write was
    interrupted) and an instance's history ask for one resource's versions by an index: the
    embedded database answered the `_id` range they used by reading the whole history (200 ms
    for 4,000 entries, on every 404)."""
    rid = post(client, patient()).json()["id"]
    assert client.get(f"/Patient/{rid}/_history").json()["total"] == 1
    assert client.get(f"/Patient/unknown-{unique()}").status_code == 404
    for query in (_versions_of("Patient", rid), _versions_of("Patient", f"unknown-{unique()}")):
        plan = str(mongo["history"].find(query).sort("_id", -1).limit(1).explain()["queryPlanner"]["winningPlan"])
        assert "IXSCAN" in plan and "COLLSCAN" not in plan, plan
