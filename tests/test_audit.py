"""The audit trail and X-Provenance, over HTTP and DICOM against a server with FHIR_AUTH on:
every interaction (reads, searches, writes, refusals with 401 and 403, DICOM associations,
C-STORE and C-FIND, DICOMweb, the token endpoint) leaves an AuditEvent with the right agent,
subtype, entity and outcome, which only administrators may search and nobody may change; a
write's X-Provenance is stored against the version written, and a bad one stops the write."""

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pymongo
import pytest
from conftest import FHIR_JSON, ServerProcess, ct_dataset, unique
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from fhir_server.auth.tokens import SigningKey, access_token
from fhir_server.storage.embedded import EmbeddedDatabase

DB = "fhir_audit_tests"
AET = "AUDITNODE"
CALLING = "TESTSCU"
LOCAL = "https://fhir-server.local/CodeSystem/audit-subtype"
INTERACTION = "http://hl7.org/fhir/restful-interaction"


class Audited:
    """The server, and tokens of its own issuer."""

    def __init__(self, server: ServerProcess, key: SigningKey) -> None:
        self.server, self.key = server, key
        self.base = f"{server.url}/fhir"

    def client(self, scope: str = "system/*.cruds", *, subject: str | None = None, fhir_user: str | None = None,
               roles: tuple[str, ...] = ()) -> httpx.Client:
        token, _ = access_token(self.key, issuer=f"{self.server.url}/auth", audience=self.base,
                                subject=subject or f"app-{unique()}", client_id="tests", scope=scope,
                                fhir_user=fhir_user, roles=roles)
        return httpx.Client(base_url=self.base, timeout=30,
                            headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON})

    def admin(self) -> httpx.Client:
        return self.client(subject="auditor", roles=("admin",))


@pytest.fixture(scope="module")
def audited(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": DB, "FHIR_AUTH": "true", "FHIR_DICOM_AET": AET,
           "FHIR_DICOM_ALLOWED": CALLING}
    server = ServerProcess(tmp_path_factory.mktemp("audited"), env).start()
    with pymongo.MongoClient(database.uri) as mongo:
        stored = mongo[DB]["auth_keys"].find_one({"_id": "current"})
    assert stored is not None
    private = serialization.load_pem_private_key(stored["pem"].encode(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    yield Audited(server, SigningKey(stored["kid"], private))
    server.stop()


@pytest.fixture(scope="module")
def admin(audited: Audited) -> Iterator[httpx.Client]:
    with audited.admin() as client:
        yield client


def find(admin: httpx.Client, wanted: Callable[[dict[str, Any]], bool] = lambda e: True, at_least: int = 1,
         **params: str) -> list[dict[str, Any]]:
    """AuditEvents matching `params` and `wanted`, waiting briefly for `at_least` of them (a
    request's event is recorded as its answer goes out)."""
    deadline = time.monotonic() + 5
    while True:
        answer = admin.get("/AuditEvent", params={"_count": "100", **params})
        assert answer.status_code == 200, answer.text
        found = [e["resource"] for e in answer.json().get("entry", []) if wanted(e["resource"])]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def subtype(event: dict[str, Any]) -> str:
    return event["subtype"][0]["code"]


def references(event: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if "reference" in e.get("what", {})]


def queries(event: dict[str, Any]) -> list[str]:
    return [base64.b64decode(e["query"]).decode() for e in event.get("entity", []) if "query" in e]


def create_patient(client: httpx.Client) -> str:
    answer = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": f"Audit-{unique()}"}]})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


# -- FHIR interactions ----------------------------------------------------------------------------


def test_create_read_and_search_are_audited_with_their_agent_and_entities(audited: Audited, admin: httpx.Client) -> None:
    with audited.client(subject="alice", fhir_user="Practitioner/alice") as alice:
        patient = create_patient(alice)
        assert alice.get(f"/Patient/{patient}").status_code == 200
        assert alice.get("/Observation", params={"patient": patient, "status": "final"}).status_code == 200

    events = find(admin, at_least=3, patient=f"Patient/{patient}")
    by_subtype = {subtype(e): e for e in events}
    assert {"create", "read", "search-type"} <= set(by_subtype), [subtype(e) for e in events]
    for event in by_subtype.values():
        assert event["type"]["code"] == "rest"
        assert event["subtype"][0]["system"] == INTERACTION
        assert event["outcome"] == "0"
        agent = event["agent"][0]
        assert agent["requestor"] is True
        assert agent["altId"] == "alice"
        assert agent["who"]["reference"] == "Practitioner/alice"
        assert agent["network"]["address"] == "127.0.0.1"
        assert event["source"]["observer"]["display"].startswith("fhir-server")
    create, read, search = by_subtype["create"], by_subtype["read"], by_subtype["search-type"]
    assert (create["action"], read["action"], search["action"]) == ("C", "R", "R")
    assert create["outcomeDesc"].startswith("201")
    assert references(create) == [f"Patient/{patient}/_history/1"]
    assert references(read) == [f"Patient/{patient}/_history/1"]
    assert f"Patient/{patient}" in references(search)  # BALP's patient entity
    assert queries(search) == [f"Observation?patient={patient}&status=final"]

    # The ordinary search parameters find them; read and vread serve them.
    assert find(admin, entity=f"Patient/{patient}", subtype="create", agent="Practitioner/alice")
    assert find(admin, entity=f"Patient/{patient}", action="R", outcome="0", type="rest")
    assert find(admin, entity=f"Patient/{patient}", date=f"ge{create['recorded'][:10]}")
    one = admin.get(f"/AuditEvent/{create['id']}")
    assert one.status_code == 200 and one.json()["subtype"][0]["code"] == "create"
    assert admin.get(f"/AuditEvent/{create['id']}/_history/1").status_code == 200


def test_a_transaction_is_audited_as_one_whatever_its_keys_order(audited: Audited, admin: httpx.Client) -> None:
    """The Bundle's type as the server read it, not a guess from its first bytes: here the entries
    (more than 8 KiB) come before `"type": "transaction"`."""
    subject = f"bundler-{unique()}"
    entries = [{"fullUrl": f"urn:uuid:{uuid}", "resource": {"resourceType": "Patient", "name": [{"text": "x" * 300}]},
                "request": {"method": "POST", "url": "Patient"}} for uuid in (uuid4() for _ in range(30))]
    with audited.client(subject=subject) as client:
        answer = client.post("", json={"resourceType": "Bundle", "entry": entries, "type": "transaction"})
        assert answer.status_code == 200, answer.text
    events = find(admin, subtype="transaction", wanted=lambda e: e["agent"][0].get("altId") == subject)
    assert len(events) == 1 and events[0]["action"] == "E"


def test_refusals_are_audited_401_and_403(audited: Audited, admin: httpx.Client) -> None:
    patient = create_patient(admin)
    with audited.client("system/Observation.rs", subject="bob") as bob:
        assert bob.get(f"/Patient/{patient}").status_code == 403
    assert httpx.get(f"{audited.base}/Patient/{patient}").status_code == 401

    events = find(admin, at_least=2, entity=f"Patient/{patient}", subtype="read")
    assert len(events) == 2, events
    forbidden = next(e for e in events if e["agent"][0].get("altId") == "bob")
    assert forbidden["outcome"] == "4"
    assert forbidden["outcomeDesc"].startswith("403 Forbidden: ")
    anonymous = next(e for e in events if e is not forbidden)
    assert anonymous["outcome"] == "4"
    assert anonymous["outcomeDesc"].startswith("401 Unauthorized")
    assert anonymous["agent"][0]["name"] == "anonymous"
    assert anonymous["agent"][0]["network"]["address"] == "127.0.0.1"
    assert len(find(admin, entity=f"Patient/{patient}", outcome="4")) == 2


def test_only_administrators_read_audit_events_and_nobody_writes_them(audited: Audited, admin: httpx.Client) -> None:
    create_patient(admin)
    event = find(admin)[0]
    with audited.client("system/*.cruds") as user:
        assert user.get("/AuditEvent").status_code == 403
        assert user.get(f"/AuditEvent/{event['id']}").status_code == 403
    changed = {**event, "outcome": "8"}
    assert admin.put(f"/AuditEvent/{event['id']}", json=changed).status_code == 403
    assert admin.delete(f"/AuditEvent/{event['id']}").status_code == 403
    assert admin.post("/AuditEvent", json={k: v for k, v in event.items() if k not in ("id", "meta")}).status_code == 403
    assert admin.patch(f"/AuditEvent/{event['id']}", content=b'[{"op":"replace","path":"/outcome","value":"8"}]',
                       headers={"Content-Type": "application/json-patch+json"}).status_code == 403
    kept = admin.get(f"/AuditEvent/{event['id']}").json()
    assert kept["outcome"] == event["outcome"] and kept["meta"]["versionId"] == "1"


def test_token_requests_are_audited(audited: Audited, admin: httpx.Client) -> None:
    client_id = f"nobody-{unique()}"
    answer = httpx.post(f"{audited.server.url}/auth/token", data={"grant_type": "client_credentials", "client_id": client_id})
    assert answer.status_code >= 400
    events = find(admin, **{"agent-name": client_id})
    assert len(events) == 1
    assert events[0]["type"]["code"] == "110114"
    assert subtype(events[0]) == "110122"  # Login
    assert events[0]["outcome"] == "4"


# -- DICOM ----------------------------------------------------------------------------------------


def test_dicom_associations_stores_and_queries_are_audited(audited: Audited, admin: httpx.Client) -> None:
    port = audited.server.dicom_port
    ds = ct_dataset()
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0
        assert int(assoc.send_c_store(ds).Status) == 0
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", ds.PatientID, ds.StudyInstanceUID
        statuses = [int(status.Status) for status, _ in assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind)]
        assert statuses[-1] == 0
    finally:
        assoc.release()
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(Verification)
    assert not stranger.associate("127.0.0.1", port, ae_title=AET).is_established

    study = f"urn:dicom:uid|urn:oid:{ds.StudyInstanceUID}"
    stores = find(admin, **{"entity:identifier": study, "subtype": f"{LOCAL}|C-STORE"})
    assert len(stores) == 1
    store = stores[0]
    assert (store["type"]["code"], store["action"], store["outcome"]) == ("110104", "C", "0")
    assert store["agent"][0]["name"] == CALLING and store["agent"][0]["network"]["address"] == "127.0.0.1"
    assert store["source"]["observer"]["display"] == AET
    assert any(e["what"].get("identifier", {}).get("value") == ds.PatientID for e in store["entity"])
    finds = find(admin, **{"entity:identifier": study, "subtype": f"{LOCAL}|C-FIND"})
    assert len(finds) == 1 and finds[0]["type"]["code"] == "110112" and finds[0]["outcome"] == "0"
    associations = find(admin, **{"subtype": f"{LOCAL}|A-ASSOCIATE", "agent-name": CALLING})
    assert associations and all(e["outcome"] == "0" for e in associations)
    rejected = find(admin, **{"subtype": f"{LOCAL}|A-ASSOCIATE", "agent-name": "STRANGER"})
    assert len(rejected) == 1 and rejected[0]["outcome"] == "4"
    assert "rejected" in rejected[0]["outcomeDesc"]

    # DICOMweb: a QIDO-RS search is a DICOM Query event.
    with audited.client("system/*.rs") as reader:
        assert reader.get(f"{audited.server.url}/dicomweb/studies", params={"StudyInstanceUID": ds.StudyInstanceUID},
                          headers={"Accept": "application/dicom+json"}).status_code == 200
    qido = find(admin, **{"subtype": f"{LOCAL}|QIDO-RS"}, wanted=lambda e: ds.StudyInstanceUID in "".join(queries(e)))
    assert qido and qido[0]["type"]["code"] == "110112"


def test_retrieves_are_audited_with_their_study_and_outcome(audited: Audited, admin: httpx.Client) -> None:
    """A C-GET (its sub-operations counted) and a C-MOVE to an unknown destination (0xA801) are
    each an Instances Transferred event, action R, naming the study."""
    port = audited.server.dicom_port
    ds = ct_dataset()
    storer = AE(ae_title=CALLING)
    storer.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = storer.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established and int(assoc.send_c_store(ds).Status) == 0
    assoc.release()  # answered once the instance is indexed

    ae = AE(ae_title=CALLING)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    assoc = ae.associate("127.0.0.1", port, ae_title=AET, ext_neg=[build_role(ds.SOPClassUID, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
        got = [int(status.Status) for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
        assert got[-1] == 0 and received == [ds.SOPInstanceUID]
        moved = [int(status.Status) for status, _ in
                 assoc.send_c_move(query, "NOWHERE", StudyRootQueryRetrieveInformationModelMove)]
        assert moved[-1] == 0xA801
    finally:
        assoc.release()

    study = f"urn:dicom:uid|urn:oid:{ds.StudyInstanceUID}"
    gets = find(admin, **{"entity:identifier": study, "subtype": f"{LOCAL}|C-GET"})
    assert len(gets) == 1
    assert (gets[0]["type"]["code"], gets[0]["action"], gets[0]["outcome"]) == ("110104", "R", "0")
    assert "1 completed" in gets[0]["outcomeDesc"]
    moves = find(admin, **{"entity:identifier": study, "subtype": f"{LOCAL}|C-MOVE"})
    assert len(moves) == 1 and moves[0]["action"] == "R" and moves[0]["outcome"] == "4"
    assert "0xA801" in moves[0]["outcomeDesc"]


def test_an_open_association_defers_indexing_as_a_request_does(audited: Audited, database: EmbeddedDatabase) -> None:
    """The trail indexes in the process only when it serves nothing: an open DICOM connection
    counts, as an HTTP request does (indexing competed with the associations' threads)."""
    from fhir_server.audit.trail import BATCHES

    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    with pymongo.MongoClient(database.uri) as mongo:
        batches = mongo[DB][BATCHES]
        assoc = ae.associate("127.0.0.1", audited.server.dicom_port, ae_title=AET)
        assert assoc.is_established
        try:
            time.sleep(1.5)  # the acceptance's event stored (every 0.1 s), and more than the idle time
            assert batches.count_documents({}) >= 1
        finally:
            assoc.release()
        deadline = time.monotonic() + 10
        while batches.count_documents({}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert batches.count_documents({}) == 0


# -- X-Provenance ---------------------------------------------------------------------------------

PROVENANCE = {"resourceType": "Provenance", "agent": [{"who": {"display": "Dr. Example"}}],
              "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "UPDATE"}]}}


def provenances(client: httpx.Client, target: str) -> list[dict[str, Any]]:
    answer = client.get("/Provenance", params={"target": target})
    assert answer.status_code == 200, answer.text
    return [e["resource"] for e in answer.json().get("entry", [])]


def test_x_provenance_is_stored_against_the_version_written(audited: Audited, admin: httpx.Client) -> None:
    patient = create_patient(admin)
    body = {"resourceType": "Patient", "id": patient, "gender": "female"}
    answer = admin.put(f"/Patient/{patient}", json=body, headers={"X-Provenance": json.dumps(PROVENANCE)})
    assert answer.status_code == 200, answer.text
    assert answer.headers["etag"] == 'W/"2"'
    found = provenances(admin, f"Patient/{patient}")
    assert len(found) == 1
    assert found[0]["target"] == [{"reference": f"Patient/{patient}/_history/2"}]
    assert found[0]["agent"] == PROVENANCE["agent"] and "recorded" in found[0]

    # A create (base64 this time): the new resource's first version.
    encoded = base64.b64encode(json.dumps({**PROVENANCE, "recorded": "2024-01-02T03:04:05Z"}).encode()).decode()
    created = admin.post("/Patient", json={"resourceType": "Patient"}, headers={"X-Provenance": encoded})
    assert created.status_code == 201
    new = created.json()["id"]
    found = provenances(admin, f"Patient/{new}")
    assert [p["target"] for p in found] == [[{"reference": f"Patient/{new}/_history/1"}]]
    assert found[0]["recorded"] == "2024-01-02T03:04:05Z"

    # A conditional update: the version it wrote, though the request named no id.
    mark = {"system": "urn:tests:provenance", "value": unique()}
    made = admin.post("/Patient", json={"resourceType": "Patient", "identifier": [mark]})
    assert made.status_code == 201
    conditional = made.json()["id"]
    answer = admin.put(f"/Patient?identifier={mark['system']}|{mark['value']}", headers={"X-Provenance": json.dumps(PROVENANCE)},
                       json={"resourceType": "Patient", "identifier": [mark], "gender": "other"})
    assert answer.status_code == 200, answer.text
    found = provenances(admin, f"Patient/{conditional}")
    assert [p["target"] for p in found] == [[{"reference": f"Patient/{conditional}/_history/2"}]]


@pytest.mark.parametrize("header", [
    '{"resourceType": "Patient"}',  # not a Provenance
    '{"resourceType": "Provenance"',  # not JSON
    '{"resourceType": "Provenance", "recorded": "2024-01-01T00:00:00Z"}',  # no agent
    '{"resourceType": "Provenance", "agent": [{"who": {"display": "x"}}], "recorded": "yesterday"}',
])
def test_an_invalid_x_provenance_stops_the_write(audited: Audited, admin: httpx.Client, header: str) -> None:
    patient = create_patient(admin)
    answer = admin.put(f"/Patient/{patient}", json={"resourceType": "Patient", "id": patient, "gender": "male"},
                       headers={"X-Provenance": header})
    assert answer.status_code == 400, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert "X-Provenance" in answer.json()["issue"][0]["diagnostics"]
    assert admin.get(f"/Patient/{patient}").json()["meta"]["versionId"] == "1"
    assert provenances(admin, f"Patient/{patient}") == []


def test_x_provenance_needs_a_token_that_may_create_provenance(audited: Audited, admin: httpx.Client) -> None:
    patient = create_patient(admin)
    with audited.client("system/Patient.cruds") as writer:
        answer = writer.put(f"/Patient/{patient}", json={"resourceType": "Patient", "id": patient, "gender": "other"},
                            headers={"X-Provenance": json.dumps(PROVENANCE)})
    assert answer.status_code == 403, answer.text
    assert admin.get(f"/Patient/{patient}").json()["meta"]["versionId"] == "1"


def test_x_provenance_on_a_bundle_or_an_operation_is_refused(audited: Audited, admin: httpx.Client) -> None:
    """One Provenance cannot name the many writes of a Bundle (or an operation's): 400, and the
    Bundle is not run."""
    mark = {"system": "urn:tests:provenance-bundle", "value": unique()}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "identifier": [mark]}, "request": {"method": "POST", "url": "Patient"}}]}
    answer = admin.post("", json=bundle, headers={"X-Provenance": json.dumps(PROVENANCE)})
    assert answer.status_code == 400 and answer.json()["resourceType"] == "OperationOutcome"
    assert "one resource only" in answer.text
    found = admin.get("/Patient", params={"identifier": f"{mark['system']}|{mark['value']}", "_summary": "count"})
    assert found.json()["total"] == 0
    operation = admin.post("/Patient/$validate", json={"resourceType": "Patient"},
                           headers={"X-Provenance": json.dumps(PROVENANCE)})
    assert operation.status_code == 400


def sample_event(observer: str = "tests") -> dict[str, Any]:
    return {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2026-01-01T00:00:00Z",
            "agent": [{"requestor": True}], "source": {"observer": {"display": observer}}}


async def prepared(db: Any) -> Any:
    """A repository on `db`, its indexes made (ordered writes)."""
    from fhir_server.storage.repository import ResourceRepository

    repository = ResourceRepository(db)
    await repository.prepare("off")
    return repository


async def quiet_trail(repository: Any) -> Any:
    """A started trail that stores and indexes only when asked (flush, catch_up)."""
    from fhir_server.audit.trail import AuditTrail

    trail = AuditTrail(repository, observer="tests", dicom_observer="TESTS", flush_s=60, batch=10_000)
    await trail.start()
    return trail


def test_events_stored_at_shutdown_are_indexed_after_a_restart(database: EmbeddedDatabase) -> None:
    """Stopping stores what is recorded (not indexed yet); the next process indexes it, once."""
    from conftest import run_with_database

    from fhir_server.audit.trail import BATCHES, PAYLOADS

    async def scenario(db: Any) -> None:
        repository = await prepared(db)
        first = await quiet_trail(repository)
        for _ in range(30):
            first.record(sample_event())
        await first.stop()
        assert sum([b["n"] async for b in db[BATCHES].find()]) == 30
        second = await quiet_trail(repository)
        await second.catch_up()
        await second.catch_up()  # nothing left: nothing twice
        await second.stop()
        assert await repository.count("AuditEvent", {}) == 30
        assert await db[BATCHES].count_documents({}) == 0 and await db[PAYLOADS].count_documents({}) == 0

    run_with_database(database, scenario)


def test_a_batch_indexed_again_stores_its_events_once(database: EmbeddedDatabase) -> None:
    """An indexer that dies after storing a batch's events but before removing the batch leaves
    it to be claimed again (its lease lapses): the next indexer stores nothing twice. A batch
    stored before the events moved into its document (they were apart, in PAYLOADS) is indexed
    too."""
    from conftest import run_with_database

    from fhir_server.audit.trail import BATCHES, NEVER, PAYLOADS

    async def scenario(db: Any) -> None:
        repository = await prepared(db)
        trail = await quiet_trail(repository)
        for _ in range(12):
            trail.record(sample_event())
        await trail.flush()
        left = [b async for b in db[BATCHES].find()]
        assert left and all("events" in b for b in left) and await db[PAYLOADS].count_documents({}) == 0
        await trail.catch_up()
        assert await repository.count("AuditEvent", {}) == 12
        await db[BATCHES].insert_many([{**b, "lease": NEVER} for b in left])  # as a dead indexer left it
        await trail.catch_up()
        assert await repository.count("AuditEvent", {}) == 12
        # The same batches as stored before: the events apart.
        await db[BATCHES].insert_many([{k: v for k, v in b.items() if k != "events"} for b in left])
        await db[PAYLOADS].insert_many([{"_id": b["_id"], "events": b["events"]} for b in left])
        await trail.catch_up()
        await trail.stop()
        assert await repository.count("AuditEvent", {}) == 12
        assert await db["history"].count_documents({"t": "AuditEvent"}) == 12
        assert await db[BATCHES].count_documents({}) == 0 and await db[PAYLOADS].count_documents({}) == 0

    run_with_database(database, scenario)


def test_events_recorded_while_the_database_is_down_are_stored_once_it_is_back(tmp_path: Path) -> None:
    """A flush the database refuses keeps the events for the next one."""
    import asyncio

    from pymongo import AsyncMongoClient

    own = EmbeddedDatabase(tmp_path / "db").start()
    again = EmbeddedDatabase(tmp_path / "db", port=own.port)  # the same database, back on its port

    async def scenario() -> None:
        client: AsyncMongoClient = AsyncMongoClient(own.uri, tz_aware=True, serverSelectionTimeoutMS=500)
        try:
            repository = await prepared(client["fhir_outage"])
            trail = await quiet_trail(repository)
            await asyncio.to_thread(own.stop)
            for n in range(5):
                trail.record(sample_event(f"event {n}"))
            assert await trail.flush() is False
            await asyncio.to_thread(again.start)
            assert await trail.flush() is True
            await trail.catch_up()
            await trail.stop()
            found = [d["res"]["source"]["observer"]["display"] async for d in repository.db["AuditEvent"].find()]
            assert sorted(found) == [f"event {n}" for n in range(5)]
        finally:
            await client.close()

    try:
        asyncio.run(scenario())
    finally:
        again.stop()
        own.stop()


def test_only_requests_that_may_read_the_trail_wait_for_it_to_be_indexed() -> None:
    """The trail is indexed before a request that may read AuditEvents only when its requester
    may (an administrator, or anyone with authorization off): a request without a valid token
    does not make the process index and wait for an answer that is a 401."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from fhir_server.audit.http import AuditMiddleware
    from fhir_server.auth.tokens import InvalidToken
    from fhir_server.config import Settings

    class Trail:
        observer = None

        def __init__(self) -> None:
            self.catch_ups = 0

        async def catch_up(self) -> None:
            self.catch_ups += 1

        def serving(self) -> None: ...

        def served(self) -> None: ...

        def record(self, *args: Any, **kwargs: Any) -> None: ...

    class Validator:
        async def validate(self, token: str, *args: Any) -> Any:
            raise InvalidToken("forged")

    for auth, headers, expected in ((True, {}, 0), (True, {"Authorization": "Bearer forged"}, 0), (False, {}, 1)):
        app = FastAPI()
        app.add_middleware(AuditMiddleware)
        app.state.settings = Settings(auth=auth)
        app.state.audit = trail = Trail()
        app.state.auth = SimpleNamespace(validator=Validator())
        with TestClient(app) as client:
            client.get("/fhir/AuditEvent", headers=headers)
        assert trail.catch_ups == expected, (auth, headers)
