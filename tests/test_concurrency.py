"""Concurrent writers never lose an update, and racing conditional creates never both create:
with ordered writes (the embedded database's mode) and in transactions (MongoDB's)."""

import asyncio

import httpx
from conftest import FHIR_JSON, ServerProcess, patient, post, unique

WRITERS = 50


async def _gather(server: ServerProcess, requests: list) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=WRITERS)
    async with httpx.AsyncClient(base_url=f"{server.url}/fhir", timeout=120, limits=limits) as client:
        return await asyncio.gather(*(request(client) for request in requests))


def _client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/fhir", timeout=60)


def test_simultaneous_updates_give_consecutive_versions(writer: ServerProcess) -> None:
    server, client = writer, _client(writer)
    rid = post(client, patient()).json()["id"]

    def update(n: int):
        body = patient(id=rid, name=[{"family": f"writer-{n}"}])
        return lambda c: c.put(f"/Patient/{rid}", json=body, headers={"Content-Type": FHIR_JSON})

    responses = asyncio.run(_gather(server, [update(n) for n in range(WRITERS)]))
    assert [r.status_code for r in responses] == [200] * WRITERS, [r.text for r in responses if r.status_code != 200]
    versions = sorted(int(r.json()["meta"]["versionId"]) for r in responses)
    assert versions == list(range(2, WRITERS + 2))
    history = client.get(f"/Patient/{rid}/_history", params={"_count": 100}).json()
    assert history["total"] == WRITERS + 1
    writers = {e["resource"]["name"][0]["family"] for e in history["entry"] if "name" in e["resource"]}
    assert writers == {f"writer-{n}" for n in range(WRITERS)}  # every update is in the history
    current = client.get(f"/Patient/{rid}").json()
    assert current["meta"]["versionId"] == str(WRITERS + 1)


def test_simultaneous_updates_with_if_match_have_one_winner(writer: ServerProcess) -> None:
    server, client = writer, _client(writer)
    rid = post(client, patient()).json()["id"]

    def update(n: int):
        body = patient(id=rid, name=[{"family": f"writer-{n}"}])
        headers = {"Content-Type": FHIR_JSON, "If-Match": 'W/"1"'}
        return lambda c: c.put(f"/Patient/{rid}", json=body, headers=headers)

    responses = asyncio.run(_gather(server, [update(n) for n in range(WRITERS)]))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [412] * (WRITERS - 1)
    assert client.get(f"/Patient/{rid}").json()["meta"]["versionId"] == "2"


def test_racing_conditional_creates_written_differently_create_once(writer: ServerProcess) -> None:
    """`identifier=v` and `identifier=system|v` can match the same patient: they serialise too."""
    server, client = writer, _client(writer)
    value = unique()
    body = patient(identifier=[{"system": "urn:race", "value": value}])
    forms = [f"identifier=urn:race|{value}", f"identifier={value}"]
    racers = [
        (lambda form: lambda c: c.post("/Patient", json=body, headers={"Content-Type": FHIR_JSON, "If-None-Exist": form}))(forms[n % 2])
        for n in range(10)
    ]
    responses = asyncio.run(_gather(server, racers))
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
    assert client.get("/Patient", params={"identifier": value}).json()["total"] == 1


def test_racing_conditional_creates_create_once(writer: ServerProcess) -> None:
    server, client = writer, _client(writer)
    value = unique()
    body = patient(identifier=[{"system": "urn:race", "value": value}])
    headers = {"Content-Type": FHIR_JSON, "If-None-Exist": f"identifier=urn:race|{value}"}
    racers = [lambda c: c.post("/Patient", json=body, headers=headers) for _ in range(20)]
    responses = asyncio.run(_gather(server, racers))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 19 + [201], statuses
    assert len({r.json()["id"] for r in responses}) == 1
    found = client.get("/Patient", params={"identifier": f"urn:race|{value}"}).json()
    assert found["total"] == 1


def test_interactions_in_transaction_mode(server_in_transactions: ServerProcess) -> None:
    client = _client(server_in_transactions)
    created = post(client, patient(gender="female")).json()
    rid = created["id"]
    assert client.put(f"/Patient/{rid}", json=patient(id=rid, gender="male"), headers={"Content-Type": FHIR_JSON}).status_code == 200
    patched = client.patch(f"/Patient/{rid}", json=[{"op": "add", "path": "/active", "value": True}],
                           headers={"Content-Type": "application/json-patch+json"})
    assert patched.json()["meta"]["versionId"] == "3"
    assert client.put(f"/Patient/{rid}", json=patient(id=rid), headers={"Content-Type": FHIR_JSON, "If-Match": 'W/"1"'}).status_code == 412
    assert client.delete(f"/Patient/{rid}").status_code == 200
    assert client.get(f"/Patient/{rid}").status_code == 410
    revived = client.put(f"/Patient/{rid}", json=patient(id=rid), headers={"Content-Type": FHIR_JSON})
    assert revived.status_code == 201 and revived.json()["meta"]["versionId"] == "5"
    history = client.get(f"/Patient/{rid}/_history").json()
    assert [e["request"]["method"] for e in history["entry"]] == ["PUT", "DELETE", "PATCH", "PUT", "POST"]
    assert [e["response"]["status"][:3] for e in history["entry"]] == ["201", "200", "200", "200", "201"]
    client_id = f"tx-{unique()}"
    assert client.put(f"/Patient/{client_id}", json=patient(id=client_id), headers={"Content-Type": FHIR_JSON}).status_code == 201
