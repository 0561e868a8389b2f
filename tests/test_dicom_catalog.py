"""The DICOM catalog in-process, against the embedded database: what a real server cannot be
made to do on cue (a write failing halfway), and how queries reach the database."""

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from bson.errors import BSONError
from conftest import unique
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.collection import Collection
from pymongo.errors import OperationFailure
from pynetdicom import service_class
from pynetdicom.dsutils import encode as pynetdicom_encode
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicom_node import catalog as catalog_module
from dicom_node import encoding
from dicom_node.catalog import Catalog
from dicom_node.query import FindService
from dicom_node.retrieve import RetrieveService
from fhir_server.config import Settings
from fhir_server.errors import install_error_handlers
from fhir_server.routes import dicomweb
from fhir_server.storage.client import CODEC_OPTIONS
from fhir_server.storage.embedded import EmbeddedDatabase
from mappings.dicom import instance_facts


def facts_of(study: str, series: str, **attributes: object) -> dict[str, Any]:
    """The facts the indexer hands the catalog for a new CT instance of `study`/`series`."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return {**instance_facts(ds), "path": f"{study}/{series}/{ds.SOPInstanceUID}.dcm", "size": 1}


def run(database: EmbeddedDatabase, scenario: Callable[[Catalog], Coroutine[Any, Any, None]]) -> None:
    """`scenario` on a catalog in a database of its own."""

    async def main() -> None:
        client: AsyncMongoClient = AsyncMongoClient(database.uri)
        reader: MongoClient = MongoClient(database.uri)
        name = f"fhir_catalog_{unique()}"
        try:
            await scenario(Catalog(client.get_database(name, codec_options=CODEC_OPTIONS), reader[name]))
        finally:
            await client.close()
            reader.close()

    asyncio.run(main())


def fail_once(monkeypatch: pytest.MonkeyPatch, method: str, collection: str) -> None:
    """The next `method` call on `collection` fails, as a write interrupted there would."""
    original = getattr(AsyncCollection, method)
    failed: list[bool] = []

    async def failing(self: AsyncCollection, *args: Any, **kwargs: Any) -> Any:
        if self.name == collection and not failed:
            failed.append(True)
            raise OperationFailure("interrupted for the test")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncCollection, method, failing)


@pytest.mark.parametrize(("method", "collection"), [
    ("update_one", "dicom_series"), ("find_one_and_update", "dicom_studies")])
def test_counts_are_right_after_a_write_failed_halfway(
    database: EmbeddedDatabase, monkeypatch: pytest.MonkeyPatch, method: str, collection: str
) -> None:
    """The instances' upsert succeeded, the series' or study's update did not: recording the
    same instances again (the indexer's retries) leaves every count right."""
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    batch = [facts_of(study, first), facts_of(study, first), facts_of(study, second, Modality="MR")]

    async def scenario(catalog: Catalog) -> None:
        await catalog.prepare()
        fail_once(monkeypatch, method, collection)
        with pytest.raises(OperationFailure):
            await catalog.record(batch)
        await catalog.record(batch)
        found = await catalog.studies.find_one({"_id": study})
        assert found is not None
        assert (found["NumberOfStudyRelatedSeries"], found["NumberOfStudyRelatedInstances"]) == (2, 3)
        assert sorted(found["ModalitiesInStudy"]) == ["CT", "MR"]
        counts = {d["_id"]: d["NumberOfSeriesRelatedInstances"] async for d in catalog.series.find({"StudyInstanceUID": study})}
        assert counts == {first: 2, second: 1}
        await catalog.record(batch[:1])  # sent again: nothing changes
        again = await catalog.studies.find_one({"_id": study})
        assert again is not None and again["NumberOfStudyRelatedInstances"] == 3

    run(database, scenario)




def record_finds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every (collection, filter) the catalog's queries ask MongoDB for from now on."""
    asked: list[tuple[str, dict[str, Any]]] = []
    original = Collection.find

    def find(self: Collection, *args: Any, **kwargs: Any) -> Any:
        asked.append((self.name, dict(args[0] if args else kwargs.get("filter") or {})))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Collection, "find", find)
    return asked


def longest_in(asked: list[tuple[str, dict[str, Any]]]) -> int:
    return max((len(c["$in"]) for _, f in asked for c in f.values() if isinstance(c, dict) and "$in" in c), default=0)


def matches(catalog: Catalog, level: str, query: Dataset) -> list[Dataset]:
    """The catalog's response identifiers for `query`, as Datasets."""
    return [Dataset.from_json(item) for item in catalog.find_json(level, query)]


def identifier(**keys: object) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_relational_queries_send_no_large_in_and_scoped_ones_read_their_study(
    database: EmbeddedDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys of a parent level: up to MAX_IN matching parents go to MongoDB as one `$in`, more are
    checked per candidate (3 here, for 5 studies), with the same matches; a query naming its
    study reads that study alone, never every study."""
    tag = unique()
    studies = [generate_uid() for _ in range(5)]

    async def scenario(catalog: Catalog) -> None:
        await catalog.prepare()
        for study in studies:
            await catalog.record([facts_of(study, generate_uid(), StudyDescription=f"wide {tag}")])
        asked = record_finds(monkeypatch)
        queries = {"SERIES": identifier(StudyDescription=f"wide {tag}", SeriesInstanceUID=""),
                   "IMAGE": identifier(StudyDescription=f"*{tag}", Modality="CT", SOPInstanceUID="")}
        for cap, longest in ((3, 3), (1000, 5)):
            monkeypatch.setattr(catalog_module, "MAX_IN", cap, raising=False)
            for level, query in queries.items():
                asked.clear()
                found = matches(catalog, level, query)
                assert {ds.StudyInstanceUID for ds in found} == set(studies), (cap, level)
                assert longest_in(asked) <= longest, (cap, level)
        asked.clear()
        scoped = identifier(StudyInstanceUID=studies[0], StudyDescription=f"*{tag}*", SeriesInstanceUID="")
        assert [ds.StudyInstanceUID for ds in matches(catalog, "SERIES", scoped)] == [studies[0]]
        read = [f for name, f in asked if name == "dicom_studies"]
        assert read and all(f.get("_id") in ({"$in": [studies[0]]}, studies[0]) for f in read), read

    run(database, scenario)


def test_wildcards_are_narrowed_in_the_database_with_the_same_matches(
    database: EmbeddedDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wildcard on a name reaches MongoDB as a regular expression and one on a PatientID as
    an index range, so that only candidates come back; matching still decides (PN: any case,
    spaces around the separators; `?` one character)."""
    names = {"Doe^Jane": "P-10", "DOE ^ JANE": "P-11", "Doe^Janet": "P-2", "Roe^Jane": "P-3"}
    uids = {name: generate_uid() for name in names}

    async def scenario(catalog: Catalog) -> None:
        await catalog.prepare()
        for name, patient in names.items():
            await catalog.record([facts_of(uids[name], generate_uid(), PatientName=name, PatientID=patient)])
        asked = record_finds(monkeypatch)
        cases = [
            ({"PatientName": "doe^jan?"}, {"Doe^Jane", "DOE ^ JANE"}, "PatientName"),
            ({"PatientName": "*^JANE*"}, set(names), "PatientName"),
            ({"PatientName": "R*e^*"}, {"Roe^Jane"}, "PatientName"),
            ({"PatientID": "P-1*"}, {"Doe^Jane", "DOE ^ JANE"}, "PatientID"),
        ]
        for keys, expected, field in cases:
            asked.clear()
            found = matches(catalog, "STUDY", identifier(StudyInstanceUID="", **keys))
            assert {ds.StudyInstanceUID for ds in found} == {uids[n] for n in expected}, keys
            [(collection, sent)] = asked
            assert collection == "dicom_studies" and ({"$regex", "$gte"} & set(sent[field])), (keys, sent)

    run(database, scenario)


class BrokenCatalog:
    """A catalog whose every query is larger than a database document."""

    def find_json(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        raise BSONError("document too large")
        yield  # a generator, as the catalog's

    def instances(self, **criteria: Any) -> list[Any]:
        raise BSONError("document too large")


def test_c_find_reads_the_catalog_without_the_event_loop(database: EmbeddedDatabase) -> None:
    """The C-FIND handler reads the catalog in the association's thread: it answers while the
    event loop that writes the catalog is blocked (through the loop, it would wait forever)."""
    tag, studies = unique(), [generate_uid() for _ in range(3)]

    async def scenario(catalog: Catalog) -> None:
        for study in studies:
            await catalog.record([facts_of(study, generate_uid(), StudyDescription=f"thread {tag}")])
        query = identifier(QueryRetrieveLevel="STUDY", StudyDescription=f"thread {tag}", StudyInstanceUID="")
        event = SimpleNamespace(identifier=query, request=SimpleNamespace(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind),
                                context=SimpleNamespace(transfer_syntax=encoding.IMPLICIT_LE), is_cancelled=False)
        answers: list[Any] = []
        association = threading.Thread(target=lambda: answers.extend(FindService(catalog).handle(event)))
        association.start()
        association.join(20)  # the loop is blocked meanwhile: this coroutine does not yield
        assert not association.is_alive()
        assert [status for status, _ in answers] == [0xFF00] * 3
        assert {match.json["0020000D"]["Value"][0] for _, match in answers} == set(studies)

    run(database, scenario)


def test_a_query_too_large_for_the_database_is_a_failure_status() -> None:
    """bson.errors.BSONError (not a PyMongoError) is answered as a database error is: C-FIND
    and C-GET 0xA700, QIDO-RS a 400 too-costly OperationOutcome; never an exception."""
    event = SimpleNamespace(identifier=identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=generate_uid()),
                            request=SimpleNamespace(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind),
                            context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2"), is_cancelled=False)
    catalog: Any = BrokenCatalog()
    assert list(FindService(catalog).handle(event)) == [(0xA700, None)]
    event.request.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelGet
    assert list(RetrieveService(catalog, {}).handle_get(event)) == [1, (0xA700, None)]

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(dicomweb.router)
    app.state.dicom = SimpleNamespace(catalog=catalog)
    app.state.settings = Settings(base_url=None)
    with TestClient(app) as http:
        response = http.get("/dicomweb/studies", params={"PatientID": "123"})
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["code"] == "too-costly"


def test_qido_answers_from_the_catalogs_json(database: EmbeddedDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    """QIDO-RS takes the catalog's DICOM JSON as it is (`find_json`): no pydicom Dataset made
    and converted back per match, which was most of a search's time."""
    tag, studies = unique(), [generate_uid() for _ in range(3)]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client: AsyncMongoClient = AsyncMongoClient(database.uri)
        reader: MongoClient = MongoClient(database.uri)
        catalog = Catalog(client.get_database(f"fhir_catalog_{tag}", codec_options=CODEC_OPTIONS), reader[f"fhir_catalog_{tag}"])
        for study in studies:
            await catalog.record([facts_of(study, generate_uid(), StudyDescription=f"json {tag}")])
        app.state.dicom = SimpleNamespace(catalog=catalog)
        yield
        await client.close()
        reader.close()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(dicomweb.router)
    app.state.settings = Settings(base_url=None)
    made: list[object] = []
    from_json = Dataset.from_json.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Dataset, "from_json", classmethod(lambda cls, *a, **k: made.append(a) or from_json(cls, *a, **k)))
    with TestClient(app, base_url="http://qido.test") as http:
        response = http.get("/dicomweb/studies", params={"StudyDescription": f"json {tag}"})
    assert response.status_code == 200, response.text
    found = {item["0020000D"]["Value"][0]: item for item in response.json()}
    assert set(found) == set(studies)
    assert all(item["00081190"]["Value"] == [f"http://qido.test/dicomweb/studies/{uid}"] for uid, item in found.items())
    assert all("00080052" not in item for item in found.values())  # C-FIND's QueryRetrieveLevel, not QIDO-RS's
    assert made == []


@pytest.mark.parametrize("syntax", [encoding.IMPLICIT_LE, encoding.EXPLICIT_LE])
def test_c_find_identifiers_are_encoded_as_pydicom_encodes_them(syntax: str) -> None:
    """The C-FIND answer's own encoding of a match gives pydicom's bytes, for both syntaxes;
    what it does not encode (a sequence, a DS number, another character set) goes to pydicom."""
    matches = [
        {"00080020": {"vr": "DA", "Value": ["20230101"]}, "00080030": {"vr": "TM"}, "00080052": {"vr": "CS", "Value": ["STUDY"]},
         "00080061": {"vr": "CS", "Value": ["CT", "MR"]}, "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
         "0020000D": {"vr": "UI", "Value": ["1.2.3.45"]}, "00201208": {"vr": "IS", "Value": [12]}},
        {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}, "00080052": {"vr": "CS", "Value": ["PATIENT"]},
         "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jörg", "Ideographic": "ミュラー"}]}},
    ]
    implicit = syntax == encoding.IMPLICIT_LE
    encoding.install()  # as the C-FIND service does
    for match in matches:
        expected = pynetdicom_encode(Dataset.from_json(match), implicit, True)
        assert encoding.encode(match, syntax) == expected
        assert service_class.encode(encoding.identifier(match, syntax), implicit, True) == expected
    others = [{"00081110": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2"]}}]}},
              {"00101020": {"vr": "DS", "Value": [1.75]}},
              {"00080005": {"vr": "CS", "Value": ["ISO_IR 100"]}, "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe"}]}}]
    for match in others:
        assert encoding.encode(match, syntax) is None
        assert not isinstance(encoding.identifier(match, syntax), encoding.EncodedIdentifier)
    assert encoding.encode(matches[0], "1.2.840.10008.1.2.2") is None  # big endian: pydicom's way


def test_command_sets_are_encoded_as_pydicom_encodes_them() -> None:
    """Every command set the node sends (C-FIND, C-MOVE, C-GET, C-STORE, C-ECHO requests and
    responses, statuses with comments and sub-operation counts) gives pydicom's bytes."""
    from io import BytesIO

    from pynetdicom import dimse_primitives as dp
    from pynetdicom import dsutils
    from pynetdicom.dimse_messages import (
        C_ECHO_RSP,
        C_FIND_RSP,
        C_GET_RSP,
        C_MOVE_RSP,
        C_STORE_RQ,
        C_STORE_RSP,
    )

    def primitive(kind: type, **values: Any) -> Any:
        made = kind()
        for name, value in values.items():
            setattr(made, name, value)
        return made

    sop = "1.2.840.10008.5.1.4.1.2.2.2"
    cases = [
        (C_FIND_RSP, primitive(dp.C_FIND, MessageIDBeingRespondedTo=7, AffectedSOPClassUID=sop, Status=0xFF00,
                               Identifier=BytesIO(b"\x08\x00\x52\x00\x06\x00STUDY "))),
        (C_FIND_RSP, primitive(dp.C_FIND, MessageIDBeingRespondedTo=7, AffectedSOPClassUID=sop, Status=0)),
        (C_MOVE_RSP, primitive(dp.C_MOVE, MessageIDBeingRespondedTo=3, AffectedSOPClassUID=sop, Status=0xFF00,
                               NumberOfRemainingSuboperations=4, NumberOfCompletedSuboperations=1,
                               NumberOfFailedSuboperations=0, NumberOfWarningSuboperations=0)),
        (C_GET_RSP, primitive(dp.C_GET, MessageIDBeingRespondedTo=3, AffectedSOPClassUID=sop, Status=0xA702,
                              NumberOfCompletedSuboperations=0, NumberOfFailedSuboperations=5,
                              NumberOfWarningSuboperations=0, ErrorComment="none stored")),
        (C_STORE_RQ, primitive(dp.C_STORE, MessageID=9, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                               AffectedSOPInstanceUID="1.2.3.4.5", Priority=2, MoveOriginatorApplicationEntityTitle="MOVESCU",
                               MoveOriginatorMessageID=3, DataSet=BytesIO(b"\x00\x00"))),
        (C_STORE_RSP, primitive(dp.C_STORE, MessageIDBeingRespondedTo=9, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                                AffectedSOPInstanceUID="1.2.3.4.5", Status=0)),
        (C_ECHO_RSP, primitive(dp.C_ECHO, MessageIDBeingRespondedTo=1, AffectedSOPClassUID="1.2.840.10008.1.1", Status=0)),
    ]
    for kind, made in cases:
        message = kind()
        message.primitive_to_message(made)
        assert encoding.command_set(message.command_set) == dsutils.encode(message.command_set, True, True), kind
    # A C-MOVE's C-STORE requests (dicom_node/store_scu.py): odd and even UIDs and titles, with
    # and without the originator.
    for sop_class, instance, title, originator in (("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "MOVESCU", 3),
                                                   ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", "MOVE", 65535),
                                                   ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", None, None)):
        store = C_STORE_RQ()
        store.primitive_to_message(primitive(
            dp.C_STORE, MessageID=513, AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=instance, Priority=2,
            MoveOriginatorApplicationEntityTitle=title, MoveOriginatorMessageID=originator, DataSet=BytesIO(b"\x00\x00")))
        expected = dsutils.encode(store.command_set, True, True)
        assert encoding.store_request(513, sop_class, instance, title, originator) == expected, instance


def test_query_retrieve_responses_are_framed_as_pynetdicom_frames_them() -> None:
    """A C-FIND, C-MOVE or C-GET response written at once (dicom_node/direct.py), pending or
    final, holds the PDVs pynetdicom sends for it, in one PDU when the peer's maximum length
    allows (pynetdicom sends a command and a data set in one PDU each); what would need
    fragmenting, or carries an error comment, or is no response, is left to pynetdicom."""
    from io import BytesIO

    from pynetdicom import dimse_primitives as dp
    from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP
    from pynetdicom.pdu import P_DATA_TF

    messages = {dp.C_FIND: C_FIND_RSP, dp.C_MOVE: C_MOVE_RSP, dp.C_GET: C_GET_RSP}

    def response(kind: type, sop: str, status: int, identifier: bytes | None, **more: Any) -> Any:
        made = kind()
        made.MessageIDBeingRespondedTo, made.AffectedSOPClassUID, made.Status = 513, sop, status
        made.Identifier = BytesIO(identifier) if identifier is not None else None
        for name, value in more.items():
            setattr(made, name, value)
        return made

    def pynetdicom_pdus(made: Any, context_id: int, max_pdu: int) -> bytes:
        message = messages[type(made)]()
        message.primitive_to_message(made)
        return b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu))

    def pdvs(data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
        """The number of P-DATA-TF PDUs in `data`, and their PDVs in order (context, value)."""
        count, items = 0, []
        while data:
            end = 6 + int.from_bytes(data[2:6], "big")
            pdu = P_DATA_TF()
            pdu.decode(data[:end])
            items += [(item.presentation_context_id, item.presentation_data_value) for item in pdu.presentation_data_value_items]
            count, data = count + 1, data[end:]
        return count, items

    match = encoding.encode({"00080052": {"vr": "CS", "Value": ["STUDY"]}, "0020000D": {"vr": "UI", "Value": ["1.2.3"]}},
                            encoding.IMPLICIT_LE)
    assert match is not None
    counts = {"NumberOfRemainingSuboperations": 3, "NumberOfCompletedSuboperations": 70000 % 65536,
              "NumberOfFailedSuboperations": 1, "NumberOfWarningSuboperations": 0}
    cases = []
    for sop in ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.31"):  # odd and even lengths
        for status in (0xFF00, 0xFF01):
            cases.append(response(dp.C_FIND, sop, status, match))
            cases.append(response(dp.C_MOVE, sop, status, None, **counts))
            cases.append(response(dp.C_GET, sop, status, None, **{**counts, "NumberOfWarningSuboperations": None}))
        for status in (0x0000, 0xFE00, 0xA700, 0xC000):  # final: success, cancel, failures
            cases.append(response(dp.C_FIND, sop, status, None))
            cases.append(response(dp.C_MOVE, sop, status, None, **{**counts, "NumberOfRemainingSuboperations": None}))
        cases.append(response(dp.C_GET, sop, 0xB000, match, **counts))  # failed instances listed
    cases.append(response(dp.C_MOVE, sop, 0xFF00, match, **counts))  # an identifier, if one is given
    cases.append(response(dp.C_FIND, sop, 0x0000, match))
    for made in cases:
        for max_pdu in (0, 16384):
            framed = encoding.response(made, 5, max_pdu)
            assert framed is not None
            assert pdvs(framed) == (1, pdvs(pynetdicom_pdus(made, 5, max_pdu))[1]), made
    command_only = len(encoding.response(response(dp.C_FIND, sop, 0x0000, None), 5, 0) or b"") - 12
    both = encoding.response(response(dp.C_FIND, sop, 0xFF00, match), 5, command_only + len(match) + 11)
    assert both is not None and pdvs(both)[0] == 2  # a byte short of both in one PDU: one PDU each
    assert encoding.response(response(dp.C_FIND, sop, 0xFF00, match), 5, len(match) + 5) is None  # two fragments
    assert encoding.response(response(dp.C_FIND, sop, 0xFF00, None), 5, 0) is None
    assert encoding.response(response(dp.C_FIND, sop, None, None), 5, 0) is None  # a request
    assert encoding.response(response(dp.C_FIND, sop, 0xA700, None, ErrorComment="x"), 5, 0) is None


def test_the_c_move_client_reads_responses_and_refuses_garbled_ones() -> None:
    """dicom_node/store_scu.py reads a C-STORE-RSP split over PDUs, and ends the association
    (SubAssociationError, so pynetdicom counts the sub-operation failed) on bytes that are no
    C-STORE-RSP, the response to another message, or an A-ABORT."""
    import socket

    from pynetdicom import dsutils
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_node.store_scu import StoreAssociation, SubAssociationError

    def response(message_id: int, status: int) -> bytes:
        made = C_STORE()
        made.MessageIDBeingRespondedTo, made.Status = message_id, status
        made.AffectedSOPClassUID, made.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3"
        message = C_STORE_RSP()
        message.primitive_to_message(made)
        return dsutils.encode(message.command_set, True, True)

    def read(*pdus: bytes) -> Any:
        mine, theirs = socket.socketpair()
        with theirs:
            theirs.sendall(b"".join(pdus))
            client = StoreAssociation(mine, {}, 16384, 5, 5, "TEST")
            try:
                return client._response(7)
            finally:
                client.close()

    command = response(7, 0xB000)
    halves = [encoding.pdata(1, 0x01, command[:20]), encoding.pdata(1, 0x03, command[20:])]
    assert int(read(*halves).Status) == 0xB000  # a command in two fragments, two PDUs
    for wrong in (encoding.pdata(1, 0x03, response(8, 0)),  # the response to another message
                  encoding.pdata(1, 0x03, b"\x00\x00\x00\x09\xff\xff"),  # bytes that are no C-STORE-RSP
                  bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])):  # A-ABORT
        with pytest.raises(SubAssociationError):
            read(wrong)


def _stored_ref(path: Any, data_set: bytes | None = None) -> Any:
    """CT_small's InstanceRef at `path`, the file written there: as stored, or with `data_set`
    after its File Meta group."""
    from dicom_node.catalog import InstanceRef
    from dicom_node.files import dataset_offset

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()  # noqa: SIM115
    path.write_bytes(data if data_set is None else data[:dataset_offset(data)] + data_set)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    return InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID,
                       ds.file_meta.TransferSyntaxUID, path, path.stat().st_size)


def test_the_c_move_client_sends_nothing_of_a_file_without_a_data_set(tmp_path: Any) -> None:
    """A stored file cut after its File Meta group fails its own sub-operation (ValueError)
    before any byte goes out: the association with the destination stays up for the others."""
    import socket

    from dicom_node.retrieve import StoredInstance
    from dicom_node.store_scu import StoreAssociation

    ref = _stored_ref(tmp_path / "meta-only.dcm", b"")
    mine, theirs = socket.socketpair()
    with theirs:
        client = StoreAssociation(mine, {(ref.sop_class, ref.transfer_syntax): 1}, 16384, 5, 5, "TEST")
        with pytest.raises(ValueError, match="no data set"):
            client.send_c_store(StoredInstance(ref))
        assert client.is_established
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)  # nothing was sent
        client.close()


@pytest.mark.parametrize("stall", ["answering", "reading"])
def test_the_c_move_client_gives_up_on_a_destination_that_stalls(tmp_path: Any, stall: str) -> None:
    """A destination that stops reading mid data set, or never answers the C-STORE: after the
    DIMSE timeout the sub-operation fails (SubAssociationError) and the association is aborted."""
    import socket
    import time

    from dicom_node.files import dataset_offset
    from dicom_node.retrieve import StoredInstance
    from dicom_node.store_scu import ABORT_REQUEST, StoreAssociation, SubAssociationError

    # 16 MB do not fit the socket pair's buffers: the send itself stalls
    ref = _stored_ref(tmp_path / "stored.dcm", bytes(16 << 20) if stall == "reading" else None)
    mine, theirs = socket.socketpair()
    with theirs:
        client = StoreAssociation(mine, {(ref.sop_class, ref.transfer_syntax): 1}, 16384, 0.5, 5, "TEST")
        started = time.monotonic()
        with pytest.raises(SubAssociationError):
            client.send_c_store(StoredInstance(ref))
        assert 0.4 < time.monotonic() - started < 5
        assert not client.is_established
        received = bytearray()
        theirs.settimeout(5)
        while chunk := theirs.recv(1 << 20):  # what was sent, then the connection closed
            received += chunk
        if stall == "answering":  # the whole message went out: the abort follows it
            assert received.endswith(ABORT_REQUEST)
            assert len(received) > ref.size - dataset_offset(ref.path.read_bytes())  # the whole data set, framed
        with pytest.raises(SubAssociationError):
            client.send_c_store(StoredInstance(ref))  # the sub-operations left fail at once


def test_the_c_move_client_takes_a_garbled_association_answer_for_no_association() -> None:
    """An A-ASSOCIATE-AC that pynetdicom's PDU class cannot decode (here it asserted), cut short,
    or a PDU of no association type: no association (the C-MOVE answers 0xA801), nothing raised."""
    import socket

    from dicom_node.store_scu import associate

    # The fixed part (protocol version, reserved, AE titles, reserved), then an item cut short.
    items = b"\x00\x01" + bytes(66) + b"\x10\x00\x00\x15"
    answers = [bytes([0x02, 0, 0, 0, 0, len(items)]) + items,  # decoding it asserted
               bytes([0x02, 0, 0, 0, 0, 200]) + bytes(10),  # cut short: the connection closes
               bytes([0x09, 0, 0, 0, 0, 4, 0, 0, 0, 0])]  # no PDU type
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(len(answers))

        def answer() -> None:
            for reply in answers:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(reply)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        for reply in answers:
            assoc = associate("127.0.0.1", listener.getsockname()[1], calling_aet="ME", called_aet="DEST",
                              contexts=(("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"),), max_pdu=16384,
                              implementation=("1.2.3", None), connect_timeout_s=5, acse_timeout_s=5,
                              dimse_timeout_s=5)
            assert not assoc.is_established, reply.hex()
        thread.join(5)


def test_the_file_meta_transfer_syntax_is_read_as_pydicom_reads_it() -> None:
    """WADO-RS names each part's transfer syntax from the file's File Meta group, read without
    pydicom (dicom_node/files.py): the same UID as pydicom's for every bundled test file it
    reads; None (pydicom's way then) for what it cannot read, never an exception."""
    from pathlib import Path

    from pydicom.filereader import read_file_meta_info

    from dicom_node.files import meta_transfer_syntax

    compared = 0
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):  # bundled: no download
        try:
            expected = str(read_file_meta_info(path).get("TransferSyntaxUID", "") or "")
        except Exception:  # noqa: BLE001 - files pydicom reads without a File Meta group
            continue
        data = open(path, "rb").read()  # noqa: SIM115
        found = meta_transfer_syntax(data)
        assert found in (expected, None), path
        compared += found == expected
        for cut in (130, 140, 150, len(data) // 2):
            assert meta_transfer_syntax(data[:cut]) in (expected, None)  # a file cut short
    assert compared >= 50
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()  # noqa: SIM115
    tag = ct.index(b"\x02\x00\x10\x00UI")
    assert meta_transfer_syntax(ct[:tag + 6] + b"\xff\x00" + ct[tag + 8:]) is None  # a length past the value
    assert meta_transfer_syntax(ct[:tag + 8] + b"\xff" * 20 + ct[tag + 28:]) is None  # not a UID
    assert meta_transfer_syntax(ct[:tag + 4] + b"OB" + ct[tag + 6:]) is None  # not a UI element
    assert meta_transfer_syntax(b"\0" * 128 + b"DICM" + b"\x08\x00\x05\x00CS\x00\x00") is None  # no File Meta
