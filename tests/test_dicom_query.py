"""Query/retrieve over loopback: studies stored with pynetdicom, then DCMTK findscu, movescu (to
DCMTK storescp destinations started here) and getscu, and pynetdicom for C-CANCEL, the counts of
the final responses and identifiers no SCP should choke on."""

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pymongo
import pytest
from conftest import ServerProcess, free_port, unique
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from fhir_server.storage.embedded import EmbeddedDatabase

AET = "FHIRSERVER"
TAG = unique()[:6]
TOOLS_ENV = {**os.environ, "TCP_NODELAY": "1"}
J2K = "1.2.840.10008.1.2.4.91"
DIMSE_TIMEOUT_S = 3  # the node's, for the STALLS destination


class Studies:
    """What the module stores: patient A (two studies), patient B (one), patient C (one large
    series, for C-CANCEL); every dataset as sent, by SOP Instance UID."""

    def __init__(self) -> None:
        self.a, self.b, self.c = f"QA{TAG}", f"QB{TAG}", f"RC{TAG}"  # Q?{TAG}: A and B
        self.a1, self.a2, self.b1, self.c1 = (generate_uid() for _ in range(4))
        self.a1_ct, self.a1_mr, self.a2_sc, self.a2_ct, self.b1_mr, self.c1_mr = (generate_uid() for _ in range(6))
        self.sent: dict[str, Dataset] = {}
        a = {"PatientID": self.a, "PatientName": "Müller^Anna", "PatientBirthDate": "19800101", "PatientSex": "F"}
        b = {"PatientID": self.b, "PatientName": "Doe^John", "PatientBirthDate": "19700202", "PatientSex": "M"}
        c = {"PatientID": self.c, "PatientName": "Roe^Carl"}
        study_a1 = {"StudyInstanceUID": self.a1, "StudyDate": "20240105", "StudyTime": "101500",
                    "AccessionNumber": f"ACC{TAG}1", "StudyDescription": "CT head", "TimezoneOffsetFromUTC": "+0100", **a}
        study_a2 = {"StudyInstanceUID": self.a2, "StudyDate": "20240310", "StudyTime": "090000",
                    "AccessionNumber": f"ACC{TAG}2", "TimezoneOffsetFromUTC": "+0930", **a}
        study_b1 = {"StudyInstanceUID": self.b1, "StudyDate": "20231201", "StudyTime": "235959",
                    "AccessionNumber": f"ACC{TAG}3", **b}
        for number in (1, 2):
            self.add("CT_small.dcm", SeriesInstanceUID=self.a1_ct, SeriesNumber=1, InstanceNumber=number, **study_a1)
        self.add("MR_small_implicit.dcm", SeriesInstanceUID=self.a1_mr, SeriesNumber=2, InstanceNumber=1, **study_a1)
        self.add("JPEG2000.dcm", SeriesInstanceUID=self.a2_sc, SeriesNumber=1, InstanceNumber=1, **study_a2)
        self.add("CT_small.dcm", SeriesInstanceUID=self.a2_ct, SeriesNumber=2, InstanceNumber=1, **study_a2)
        self.add("MR_small.dcm", SeriesInstanceUID=self.b1_mr, SeriesNumber=1, InstanceNumber=1, **study_b1)
        for number in range(1, 121):
            self.add("MR_small_implicit.dcm", StudyInstanceUID=self.c1, SeriesInstanceUID=self.c1_mr,
                     InstanceNumber=number, StudyDate="20220101", **c)

    def add(self, name: str, **attributes: object) -> None:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        if "ISO_IR 192" not in str(ds.get("SpecificCharacterSet", "")):
            ds.SpecificCharacterSet = "ISO_IR 192"  # Müller
        self.sent[ds.SOPInstanceUID] = ds

    def of(self, **attributes: str) -> list[Dataset]:
        return [ds for ds in self.sent.values() if all(str(ds.get(k)) == v for k, v in attributes.items())]


def start_storescp(title: str, folder: Path, *options: str) -> tuple[subprocess.Popen[bytes], int]:
    """A DCMTK storescp writing what it receives as received (+B), once it answers C-ECHO (or,
    refusing every association, once it listens)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", title, "+B", "-fe", ".dcm", "-od", str(folder), *options, str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=TOOLS_ENV)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if "--refuse" in options:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return process, port
        elif subprocess.run(["echoscu", "-aec", title, "127.0.0.1", str(port)], capture_output=True,
                            env=TOOLS_ENV).returncode == 0:
            return process, port
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"storescp {title} did not start")


@pytest.fixture(scope="module")
def destinations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, int]]]:
    """DEST accepts every transfer syntax; PLAIN (storescp's default) only uncompressed ones;
    SMALL every syntax in PDUs of at most 4 KB (DCMTK's least); REFUSE no association; ABORTS
    (pynetdicom) aborts the association at its first C-STORE; STALLS (pynetdicom) answers a
    C-STORE after the node's DIMSE timeout; GARBLED answers an A-ASSOCIATE-RQ with an
    A-ASSOCIATE-AC that does not decode."""
    root = tmp_path_factory.mktemp("destinations")
    everything, port = start_storescp("DEST", root / "dest", "+xa")
    plain, plain_port = start_storescp("PLAIN", root / "plain")
    small, small_port = start_storescp("SMALL", root / "small", "+xa", "--max-pdu", "4096")
    refusing, refusing_port = start_storescp("REFUSE", root / "refuse", "--refuse")
    aborting = AE(ae_title="ABORTS")
    aborting.supported_contexts = AllStoragePresentationContexts

    def abort(event: evt.Event) -> int:
        event.assoc.abort()
        return 0xC000

    server = aborting.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, abort)])
    stalling = AE(ae_title="STALLS")
    stalling.supported_contexts = AllStoragePresentationContexts

    def stall(event: evt.Event) -> int:
        time.sleep(DIMSE_TIMEOUT_S + 2)
        return 0x0000

    stalls = stalling.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, stall)])
    garbled = socket.create_server(("127.0.0.1", 0))
    items = b"\x00\x01" + bytes(66) + b"\x10\x00\x00\x15"  # the fixed part, then an item cut short

    def answer_garbled() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                conn, _ = garbled.accept()
                with conn, contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(bytes([0x02, 0, 0, 0, 0, len(items)]) + items)

    threading.Thread(target=answer_garbled, daemon=True).start()
    yield {"DEST": (root / "dest", port), "PLAIN": (root / "plain", plain_port), "SMALL": (root / "small", small_port),
           "REFUSE": (root / "refuse", refusing_port), "ABORTS": (root / "aborts", server.server_address[1]),
           "STALLS": (root / "stalls", stalls.server_address[1]), "GARBLED": (root / "garbled", garbled.getsockname()[1])}
    garbled.close()
    stalls.shutdown()
    server.shutdown()
    for process in (everything, plain, small, refusing):
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def black_hole() -> Iterator[int]:
    """A port whose connections never complete: its accept queue is full (one connection in a
    backlog of 0), so the kernel drops further SYNs, as a host behind a dropping firewall does."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield int(listener.getsockname()[1])


@pytest.fixture(scope="module")
def node(
    database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory, destinations: dict[str, tuple[Path, int]],
    black_hole: int,
) -> Iterator[ServerProcess]:
    known = ",".join(f"{title}=127.0.0.1:{port}" for title, (_, port) in destinations.items())
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_dicom_qr", "FHIR_DICOM_AET": AET,
           "FHIR_DICOM_DESTINATIONS": f"{known},DOWN=127.0.0.1:{free_port()},HOLE=127.0.0.1:{black_hole}",
           "FHIR_DICOM_CONNECTION_TIMEOUT_S": "2", "FHIR_DICOM_DIMSE_TIMEOUT_S": str(DIMSE_TIMEOUT_S)}
    proc = ServerProcess(tmp_path_factory.mktemp("dicom_qr"), env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def studies(node: ServerProcess) -> Studies:
    made = Studies()
    ae = AE(ae_title="QRTEST")
    for sop_class, syntax in {(d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in made.sent.values()}:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in made.sent.values()]
    finally:
        assoc.release()  # answered once every instance is indexed (and catalogued)
    assert statuses == [0] * len(made.sent)
    return made


def stored(node: ServerProcess, ds: Dataset) -> Path:
    return node.data_dir / "dicom" / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def dataset_bytes(path: Path) -> bytes:
    """The dataset as encoded in a Part 10 file, without its File Meta group (each writer has its own)."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def findscu(node: ServerProcess, folder: Path, keys: list[str], model: str = "-S") -> list[Dataset]:
    """DCMTK findscu's responses (extracted to files), in the order received."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", model, "-aec", AET, "-X", "-od", str(folder), "127.0.0.1", str(node.dicom_port),
            "-k", "SpecificCharacterSet=ISO_IR 192"]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(args, capture_output=True, timeout=60, env=TOOLS_ENV)
    assert result.returncode == 0, result.stderr.decode()
    return [pydicom.dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


def uids(responses: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(r.get(keyword)) for r in responses}


def association(port: int, *contexts: str) -> object:
    ae = AE(ae_title="QRSCU")
    for context in contexts:
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    return assoc


def context_of(assoc: object, abstract_syntax: str) -> int:
    return next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == abstract_syntax)  # type: ignore[attr-defined]


def query(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def received(folder: Path) -> dict[str, Path]:
    """The files a storescp or getscu wrote, by SOP Instance UID."""
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.iterdir() if p.is_file()}


def counts(status: Dataset) -> tuple[int, int, int, int]:
    """(remaining, completed, failed, warning) of a C-MOVE/C-GET response."""
    return tuple(int(status.get(k, 0) or 0) for k in (  # type: ignore[return-value]
        "NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
        "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"))


# --- C-FIND ----------------------------------------------------------------------------------------


def test_study_level_single_values_lists_wildcards_and_return_keys(
    node: ServerProcess, studies: Studies, tmp_path: Path
) -> None:
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "StudyDate", "AccessionNumber",
            "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "SOPClassesInStudy"]
    by_patient = findscu(node, tmp_path, [*keys, f"PatientID={studies.a}"])
    assert uids(by_patient) == {studies.a1, studies.a2}
    first = next(r for r in by_patient if r.StudyInstanceUID == studies.a1)
    assert str(first.PatientName) == "Müller^Anna"  # UTF-8 (ISO_IR 192) in the response
    assert first.StudyDate == "20240105"
    assert first.AccessionNumber == f"ACC{TAG}1"
    assert sorted(first.ModalitiesInStudy) == ["CT", "MR"]
    assert (int(first.NumberOfStudyRelatedSeries), int(first.NumberOfStudyRelatedInstances)) == (2, 3)
    assert sorted(first.SOPClassesInStudy) == ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"]
    assert first.QueryRetrieveLevel == "STUDY"

    listed = findscu(node, tmp_path, [*keys, f"StudyInstanceUID={studies.a1}\\{studies.b1}"])
    assert uids(listed) == {studies.a1, studies.b1}
    assert uids(findscu(node, tmp_path, [*keys, f"PatientID=Q?{TAG}"])) == {studies.a1, studies.a2, studies.b1}
    assert uids(findscu(node, tmp_path, [*keys, "PatientName=mÜll*"])) == {studies.a1, studies.a2}  # PN: any case
    assert uids(findscu(node, tmp_path, [*keys, "PatientName=*^JOHN"])) == {studies.b1}
    assert findscu(node, tmp_path, [*keys, "PatientName=doe"]) == []  # single value: the whole name
    assert uids(findscu(node, tmp_path, [*keys, f"AccessionNumber=ACC{TAG}3"])) == {studies.b1}
    assert findscu(node, tmp_path, [*keys, f"AccessionNumber=acc{TAG}3"]) == []  # other strings: case-sensitive
    assert uids(findscu(node, tmp_path, [*keys, f"PatientID={studies.a}", "ModalitiesInStudy=NM"])) == {studies.a2}


def test_study_level_dates_and_times(node: ServerProcess, studies: Studies, tmp_path: Path) -> None:
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "StudyDate", "StudyTime", f"PatientID=Q?{TAG}"]
    assert uids(findscu(node, tmp_path, [*keys[:-1], "StudyDate=20240105", f"PatientID={studies.a}"])) == {studies.a1}
    assert uids(findscu(node, tmp_path, [*keys, "StudyDate=20240101-20240131"])) == {studies.a1}
    assert uids(findscu(node, tmp_path, [*keys, "StudyDate=-20231231"])) == {studies.b1}
    assert uids(findscu(node, tmp_path, [*keys, "StudyDate=20240301-"])) == {studies.a2}
    assert uids(findscu(node, tmp_path, [*keys, "StudyTime=0900-1030"])) == {studies.a1, studies.a2}
    assert uids(findscu(node, tmp_path, [*keys, "StudyTime=23"])) == {studies.b1}  # 23: 23:00:00-23:59:59.999999
    assert uids(findscu(node, tmp_path, [*keys, "StudyDate=20240101-", "StudyTime=-0959"])) == {studies.a2}
    both = findscu(node, tmp_path, [*keys, "StudyDate"])  # universal matching, with the values returned
    assert {(str(r.StudyInstanceUID), r.StudyDate) for r in both} == {
        (studies.a1, "20240105"), (studies.a2, "20240310"), (studies.b1, "20231201")}


def test_patient_root_at_each_level(node: ServerProcess, studies: Studies, tmp_path: Path) -> None:
    patients = findscu(node, tmp_path, ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName=Müller*",
                                        "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies",
                                        "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"], "-P")
    [anna] = [p for p in patients if p.PatientID == studies.a]
    assert (anna.PatientBirthDate, anna.PatientSex) == ("19800101", "F")
    assert [int(anna.get(k)) for k in ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                                       "NumberOfPatientRelatedInstances")] == [2, 4, 5]

    study_level = findscu(node, tmp_path, ["QueryRetrieveLevel=STUDY", f"PatientID={studies.a}", "StudyInstanceUID",
                                           "StudyDate"], "-P")
    assert uids(study_level) == {studies.a1, studies.a2}
    assert {r.PatientID for r in study_level} == {studies.a}

    series = findscu(node, tmp_path, ["QueryRetrieveLevel=SERIES", f"PatientID={studies.a}",
                                      f"StudyInstanceUID={studies.a1}", "SeriesInstanceUID", "Modality",
                                      "SeriesNumber", "NumberOfSeriesRelatedInstances"], "-P")
    assert {(str(s.SeriesInstanceUID), s.Modality, int(s.SeriesNumber), int(s.NumberOfSeriesRelatedInstances))
            for s in series} == {(studies.a1_ct, "CT", 1, 2), (studies.a1_mr, "MR", 2, 1)}
    assert {(s.PatientID, s.StudyInstanceUID) for s in series} == {(studies.a, studies.a1)}  # keys of the levels above

    images = findscu(node, tmp_path, ["QueryRetrieveLevel=IMAGE", f"PatientID={studies.a}",
                                      f"StudyInstanceUID={studies.a1}", f"SeriesInstanceUID={studies.a1_ct}",
                                      "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns"], "-P")
    assert {(str(i.SOPInstanceUID), int(i.InstanceNumber)) for i in images} == {
        (ds.SOPInstanceUID, int(ds.InstanceNumber)) for ds in studies.of(SeriesInstanceUID=studies.a1_ct)}
    assert {(i.Rows, i.Columns, i.SeriesInstanceUID) for i in images} == {(128, 128, studies.a1_ct)}


def test_study_root_series_and_image_levels(node: ServerProcess, studies: Studies, tmp_path: Path) -> None:
    series = findscu(node, tmp_path, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={studies.a2}",
                                      "SeriesInstanceUID", "Modality", "SeriesNumber=2"])
    assert uids(series, "SeriesInstanceUID") == {studies.a2_ct}
    # Relational: keys of the study and the patient narrow series of every study.
    mr = findscu(node, tmp_path, ["QueryRetrieveLevel=SERIES", "Modality=MR", f"PatientID=Q?{TAG}",
                                  "StudyDate=-20231231", "SeriesInstanceUID", "PatientName"])
    assert uids(mr, "SeriesInstanceUID") == {studies.b1_mr}
    assert str(mr[0].PatientName) == "Doe^John"
    wanted = [ds.SOPInstanceUID for ds in studies.of(StudyInstanceUID=studies.a2)]
    images = findscu(node, tmp_path, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={studies.a2}",
                                      f"SOPInstanceUID={wanted[0]}\\{wanted[1]}\\{generate_uid()}", "SOPClassUID"])
    assert uids(images, "SOPInstanceUID") == set(wanted)
    assert all(i.SeriesInstanceUID in (studies.a2_sc, studies.a2_ct) for i in images)


def test_timezone_offset_is_returned_never_matched(node: ServerProcess, studies: Studies, tmp_path: Path) -> None:
    """TimezoneOffsetFromUTC in an identifier is the zone of its dates and times: each match
    carries its own offset (the study's at every level), and no value filters matches out."""
    keys = ["QueryRetrieveLevel=STUDY", f"PatientID={studies.a}", "StudyInstanceUID"]
    asked = findscu(node, tmp_path, [*keys, "TimezoneOffsetFromUTC"])
    assert {(str(r.StudyInstanceUID), r.TimezoneOffsetFromUTC) for r in asked} == {
        (studies.a1, "+0100"), (studies.a2, "+0930")}
    assert uids(findscu(node, tmp_path, [*keys, "TimezoneOffsetFromUTC=-0500"])) == {studies.a1, studies.a2}
    series = findscu(node, tmp_path, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={studies.a1}",
                                      "SeriesInstanceUID", "TimezoneOffsetFromUTC"])
    assert {r.TimezoneOffsetFromUTC for r in series} == {"+0100"} and len(series) == 2
    found = httpx.get(f"{node.url}/dicomweb/studies", params={"StudyInstanceUID": studies.a1}, timeout=30).json()
    assert [item["00080201"].get("Value") for item in found] == [["+0100"]]


def test_c_cancel_ends_a_find_early(node: ServerProcess, studies: Studies) -> None:
    """A C-CANCEL sent right behind the C-FIND request (the node answers 120 matches faster than
    an SCU reading them can cancel after the first) ends the answer with the Cancel status."""
    assoc = association(node.dicom_port, StudyRootQueryRetrieveInformationModelFind)
    assoc.dul._run_loop_delay = 0.0001  # this SCU's reactor sends the C-CANCEL at once (not 1 ms later)
    try:
        responses = assoc.send_c_find(query("IMAGE", SeriesInstanceUID=studies.c1_mr, SOPInstanceUID=""),
                                      StudyRootQueryRetrieveInformationModelFind, msg_id=11)
        assoc.send_c_cancel(11, context_of(assoc, StudyRootQueryRetrieveInformationModelFind))
        statuses = [int(status.Status) for status, _ in responses]
        assert statuses[-1] == 0xFE00, [hex(s) for s in statuses[-3:]]
        assert statuses.count(0xFF00) < 120
        # A C-CANCEL coming after the answer is stale: the next request, of the same Message ID
        # (as some SCUs number them all), gets the whole series.
        assoc.send_c_cancel(11, context_of(assoc, StudyRootQueryRetrieveInformationModelFind))
        time.sleep(0.2)
        again = assoc.send_c_find(query("IMAGE", SeriesInstanceUID=studies.c1_mr, SOPInstanceUID=""),
                                  StudyRootQueryRetrieveInformationModelFind, msg_id=11)
        statuses = [int(s.Status) for s, _ in again]
        assert (statuses.count(0xFF00), statuses[-1]) == (120, 0)
    finally:
        assoc.release()


def test_invalid_identifiers_fail_and_the_node_goes_on(node: ServerProcess, studies: Studies) -> None:
    assoc = association(node.dicom_port, StudyRootQueryRetrieveInformationModelFind,
                        PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                        StudyRootQueryRetrieveInformationModelGet)
    study_root = StudyRootQueryRetrieveInformationModelFind

    def find_statuses(identifier: Dataset, model: str = study_root) -> list[int]:
        return [int(status.Status) for status, _ in assoc.send_c_find(identifier, model)]

    try:
        no_level = Dataset()
        no_level.PatientID = studies.a
        assert find_statuses(no_level) == [0xA900]
        assert find_statuses(query("PATIENT", PatientID=studies.a)) == [0xA900]  # no patient level in Study Root
        assert find_statuses(query("NOWHERE", PatientID=studies.a)) == [0xA900]
        assert find_statuses(query("STUDY", StudyDate="2024-01-05")) == [0xA900]
        assert find_statuses(query("STUDY", StudyDate="20240101-20240105-20240110")) == [0xA900]
        assert find_statuses(query("STUDY", Modality="CT")) == [0xA900]  # a series key at the study level
        assert find_statuses(query("STUDY", PatientID="nobody-at-all", StudyInstanceUID="")) == [0x0000]
        # Identifiers that are no datasets at all.
        for message_id, garbage in enumerate((b"not a dataset at all, just some text", b"\xff\xff\xff"), start=21):
            request = C_FIND()
            request.MessageID, request.AffectedSOPClassUID, request.Priority = message_id, study_root, 2
            request.Identifier = BytesIO(garbage)
            assoc._reactor_checkpoint.clear()  # as send_c_find does: the reactor leaves the answer to us
            while not assoc._is_paused:
                time.sleep(0.001)
            try:
                assoc.dimse.send_msg(request, context_of(assoc, study_root))
                _, answer = assoc.dimse.get_msg(block=True)
            finally:
                assoc._reactor_checkpoint.set()
            assert (answer.Status, answer.MessageIDBeingRespondedTo) in ((0xA900, message_id), (0xC000, message_id))
        # Retrieval without the level's unique key.
        moved = [(int(s.Status), s) for s, _ in assoc.send_c_move(query("SERIES", StudyInstanceUID=studies.a1),
                                                                   "DEST", StudyRootQueryRetrieveInformationModelMove)]
        assert moved[-1][0] == 0xA900
        # Still serving: on this association and on new ones.
        assert find_statuses(query("STUDY", PatientID=studies.b, StudyInstanceUID=""))[-2:] == [0xFF00, 0x0000]
    finally:
        assoc.release()
    fresh = association(node.dicom_port, Verification)
    assert int(fresh.send_c_echo().Status) == 0
    fresh.release()


# --- C-MOVE ----------------------------------------------------------------------------------------


def test_movescu_sends_files_as_stored(
    node: ServerProcess, studies: Studies, destinations: dict[str, tuple[Path, int]]
) -> None:
    folder, _ = destinations["DEST"]
    for study in (studies.a1, studies.a2):  # explicit and implicit VR, JPEG 2000
        result = subprocess.run(["movescu", "-S", "-aec", AET, "-aem", "DEST", "127.0.0.1", str(node.dicom_port),
                                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"],
                                capture_output=True, timeout=60, env=TOOLS_ENV)
        assert result.returncode == 0, result.stderr.decode()
    got = received(folder)
    sent = studies.of(StudyInstanceUID=studies.a1) + studies.of(StudyInstanceUID=studies.a2)
    assert {ds.SOPInstanceUID for ds in sent} <= set(got)
    for ds in sent:
        assert dataset_bytes(got[ds.SOPInstanceUID]) == dataset_bytes(stored(node, ds)), ds.SOPInstanceUID
        meta = pydicom.filereader.read_file_meta_info(got[ds.SOPInstanceUID])
        assert meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


def test_move_counts_failures_and_unknown_destinations(
    node: ServerProcess, studies: Studies, destinations: dict[str, tuple[Path, int]]
) -> None:
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = association(node.dicom_port, model)
    try:
        series = [(int(s.Status), counts(s)) for s, _ in assoc.send_c_move(
            query("SERIES", StudyInstanceUID=studies.b1, SeriesInstanceUID=studies.b1_mr), "DEST", model)]
        assert series[-1] == (0x0000, (0, 1, 0, 0))
        assert series[:-1] == [(0xFF00, (0, 1, 0, 0))]  # one pending response per sub-operation
        # PLAIN takes no JPEG 2000: that instance fails, it is not transcoded, the other goes.
        responses = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=studies.a2), "PLAIN", model))
        final, identifier = responses[-1]
        assert (int(final.Status), counts(final)[1:]) == (0xB000, (1, 1, 0))
        [sc] = studies.of(SeriesInstanceUID=studies.a2_sc)
        assert identifier.FailedSOPInstanceUIDList == sc.SOPInstanceUID  # one UID: VM 1
        plain = received(destinations["PLAIN"][0])
        assert sc.SOPInstanceUID not in plain
        [ct] = studies.of(SeriesInstanceUID=studies.a2_ct)
        assert dataset_bytes(plain[ct.SOPInstanceUID]) == dataset_bytes(stored(node, ct))
        # IMAGE level with a UID list, PATIENT level in the Study Root model refused.
        wanted = [ds.SOPInstanceUID for ds in studies.of(SeriesInstanceUID=studies.a1_ct)]
        image = list(assoc.send_c_move(query("IMAGE", SOPInstanceUID=wanted), "DEST", model))
        assert (int(image[-1][0].Status), counts(image[-1][0])[1:]) == (0x0000, (2, 0, 0))
        for destination in ("NOWHERE", "DOWN"):  # unknown, or known but not answering
            [(status, _)] = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=studies.b1), destination, model))
            assert int(status.Status) == 0xA801
        nothing = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=generate_uid()), "DEST", model))
        assert [(int(s.Status), counts(s)[1:]) for s, _ in nothing] == [(0x0000, (0, 0, 0))]
    finally:
        assoc.release()


def assert_moves_on(assoc: object, studies: Studies) -> None:
    """The association still serves: a series moves to DEST."""
    model = StudyRootQueryRetrieveInformationModelMove
    again = list(assoc.send_c_move(query("SERIES", StudyInstanceUID=studies.b1, SeriesInstanceUID=studies.b1_mr),  # type: ignore[attr-defined]
                                   "DEST", model))
    assert (int(again[-1][0].Status), counts(again[-1][0])[1:]) == (0x0000, (1, 0, 0))


def test_move_fragments_and_survives_destinations_that_refuse_or_abort(
    node: ServerProcess, studies: Studies, destinations: dict[str, tuple[Path, int]]
) -> None:
    """The node's own C-STORE client (dicom_node/store_scu.py): the data set cut to the
    destination's largest PDU; a rejected association is 0xA801; an association aborted at the
    first C-STORE fails that sub-operation and the rest; the node goes on serving."""
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = association(node.dicom_port, model)
    try:
        small = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=studies.a1), "SMALL", model))
        assert (int(small[-1][0].Status), counts(small[-1][0])[1:]) == (0x0000, (3, 0, 0))
        got = received(destinations["SMALL"][0])
        for ds in studies.of(StudyInstanceUID=studies.a1):  # CT_small: about 10 fragments of 4 KB
            assert dataset_bytes(got[ds.SOPInstanceUID]) == dataset_bytes(stored(node, ds)), ds.SOPInstanceUID
        [(refused, _)] = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=studies.a1), "REFUSE", model))
        assert int(refused.Status) == 0xA801
        aborted = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=studies.a1), "ABORTS", model))
        final, identifier = aborted[-1]
        assert (int(final.Status), counts(final)[1:]) == (0xA702, (0, 3, 0))
        sent = {ds.SOPInstanceUID for ds in studies.of(StudyInstanceUID=studies.a1)}
        assert set(identifier.FailedSOPInstanceUIDList) == sent
        assert_moves_on(assoc, studies)
    finally:
        assoc.release()


def test_move_gives_up_on_a_destination_that_stalls_or_garbles(node: ServerProcess, studies: Studies) -> None:
    """A destination that does not answer a C-STORE within the DIMSE timeout: that sub-operation
    and the ones left fail (0xA702), once the timeout has passed, not later. One whose
    A-ASSOCIATE-AC does not decode: 0xA801. The requestor's association goes on after both."""
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = association(node.dicom_port, model)
    try:
        started = time.monotonic()
        stalled = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=studies.a1), "STALLS", model))
        assert (int(stalled[-1][0].Status), counts(stalled[-1][0])[1:]) == (0xA702, (0, 3, 0))
        assert DIMSE_TIMEOUT_S - 0.5 < time.monotonic() - started < DIMSE_TIMEOUT_S + 10
        [(garbled, _)] = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=studies.a1), "GARBLED", model))
        assert int(garbled.Status) == 0xA801
        assert_moves_on(assoc, studies)
    finally:
        assoc.release()


def test_move_checks_the_identifier_before_the_destination(node: ServerProcess, studies: Studies) -> None:
    """An invalid identifier is 0xA900 whatever the destination (never contacted for it, nor
    for a retrieve matching nothing); the destination's own errors come after."""
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = association(node.dicom_port, model)
    try:
        for destination in ("DEST", "DOWN", "NOWHERE"):
            invalid = list(assoc.send_c_move(query("SERIES", StudyInstanceUID=studies.a1), destination, model))
            assert [int(s.Status) for s, _ in invalid] == [0xA900], destination
            nothing = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=generate_uid()), destination, model))
            expected = (0xA801, (0, 0, 0)) if destination == "NOWHERE" else (0x0000, (0, 0, 0))
            assert [(int(s.Status), counts(s)[1:]) for s, _ in nothing] == [expected], destination
        [(status, _)] = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=studies.b1), "DOWN", model))
        assert int(status.Status) == 0xA801  # a valid identifier: the destination's error
    finally:
        assoc.release()


def test_move_to_a_destination_that_never_answers_gives_up(node: ServerProcess, studies: Studies) -> None:
    """A destination whose host drops the connection attempt: 0xA801 after the connection
    timeout (2 s here), not after the system's SYN retries."""
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = association(node.dicom_port, model)
    try:
        started = time.monotonic()
        [(status, _)] = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=studies.b1), "HOLE", model))
        assert int(status.Status) == 0xA801
        assert time.monotonic() - started < 10
    finally:
        assoc.release()


def test_movescu_reports_an_unknown_destination(node: ServerProcess, studies: Studies) -> None:
    result = subprocess.run(["movescu", "-v", "-S", "-aec", AET, "-aem", "NOWHERE", "127.0.0.1", str(node.dicom_port),
                             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies.b1}"],
                            capture_output=True, timeout=60, env=TOOLS_ENV)
    assert "MoveDestinationUnknown" in result.stderr.decode() + result.stdout.decode()


# --- C-GET -----------------------------------------------------------------------------------------


def getscu(
    node: ServerProcess, folder: Path, keys: list[str], model: str = "-S", *options: str
) -> tuple[str, dict[str, Path]]:
    """DCMTK getscu into `folder` (bit-preserving): its output and the files by SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-v", model, "+B", *options, "-aec", AET, "-od", str(folder), "127.0.0.1", str(node.dicom_port)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(args, capture_output=True, timeout=60, env=TOOLS_ENV)
    return result.stderr.decode() + result.stdout.decode(), received(folder)


def final_counts(output: str) -> dict[str, int]:
    return {name: int(value) for name, value in
            re.findall(r"Number of (Remaining|Completed|Failed|Warning) Suboperations\s*:\s*(\d+)", output)}


def test_getscu_retrieves_on_its_own_association(node: ServerProcess, studies: Studies, tmp_path: Path) -> None:
    output, got = getscu(node, tmp_path / "series", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={studies.a1}",
                                                     f"SeriesInstanceUID={studies.a1_ct}"])
    sent = studies.of(SeriesInstanceUID=studies.a1_ct)
    assert set(got) == {ds.SOPInstanceUID for ds in sent}, output
    for ds in sent:
        assert dataset_bytes(got[ds.SOPInstanceUID]) == dataset_bytes(stored(node, ds))
    assert final_counts(output) == {"Remaining": 0, "Completed": 2, "Failed": 0, "Warning": 0}

    # getscu proposes each storage class once, explicit VR first: the node accepts that for MR
    # too, so the implicit VR MR instance of the study fails (never converted); the CTs come.
    output, got = getscu(node, tmp_path / "study", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={studies.a1}"])
    assert set(got) == {ds.SOPInstanceUID for ds in sent}, output
    assert final_counts(output) == {"Remaining": 0, "Completed": 2, "Failed": 1, "Warning": 0}
    assert "SubOperationsCompleteOneOrMoreFailures" in output  # 0xB000

    # getscu proposes uncompressed syntaxes only: the JPEG 2000 instance fails, unconverted.
    output, got = getscu(node, tmp_path / "mixed", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={studies.a2}"])
    [sc] = studies.of(SeriesInstanceUID=studies.a2_sc)
    [ct] = studies.of(SeriesInstanceUID=studies.a2_ct)
    assert set(got) == {ct.SOPInstanceUID}
    assert final_counts(output) == {"Remaining": 0, "Completed": 1, "Failed": 1, "Warning": 0}
    # Proposing JPEG 2000 first (+xw), the SCU gets it as stored.
    output, got = getscu(node, tmp_path / "j2k", ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={studies.a2}",
                                                  f"SeriesInstanceUID={studies.a2_sc}", f"SOPInstanceUID={sc.SOPInstanceUID}"],
                         "-S", "+xw")
    assert set(got) == {sc.SOPInstanceUID}, output
    assert dataset_bytes(got[sc.SOPInstanceUID]) == dataset_bytes(stored(node, sc))
    assert pydicom.filereader.read_file_meta_info(got[sc.SOPInstanceUID]).TransferSyntaxUID == J2K


def test_getscu_patient_level(node: ServerProcess, studies: Studies, tmp_path: Path) -> None:
    output, got = getscu(node, tmp_path, ["QueryRetrieveLevel=PATIENT", f"PatientID={studies.b}"], "-P")
    [mr] = studies.of(PatientID=studies.b)
    assert set(got) == {mr.SOPInstanceUID}, output
    assert dataset_bytes(got[mr.SOPInstanceUID]) == dataset_bytes(stored(node, mr))


def test_patient_level_retrieve_honours_the_issuer(node: ServerProcess, tmp_path: Path) -> None:
    """One PatientID in two issuers' namespaces is two patients: a retrieve naming the issuer
    gets that patient's instances alone; without an issuer, the PatientID of any issuer."""
    patient_id, sent = f"QI{TAG}", {}
    for issuer in ("HOSP_A", "HOSP_B"):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.IssuerOfPatientID = patient_id, issuer
        sent[issuer] = ds
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(sent["HOSP_A"].SOPClassUID, sent["HOSP_A"].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET)
    assert [int(assoc.send_c_store(ds).Status) for ds in sent.values()] == [0, 0]
    assoc.release()
    keys = ["QueryRetrieveLevel=PATIENT", f"PatientID={patient_id}"]
    output, got = getscu(node, tmp_path / "a", [*keys, "IssuerOfPatientID=HOSP_A"], "-P")
    assert set(got) == {sent["HOSP_A"].SOPInstanceUID}, output
    output, got = getscu(node, tmp_path / "both", keys, "-P")
    assert set(got) == {ds.SOPInstanceUID for ds in sent.values()}, output


def get_association(node: ServerProcess, instance: Dataset, on_store: Callable[[evt.Event], int]) -> Any:
    """A pynetdicom C-GET association that takes `instance`'s class in implicit VR only, its
    C-STOREs answered by `on_store`."""
    ae = AE(ae_title="PYGETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(instance.SOPClassUID, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET,
                         ext_neg=[build_role(instance.SOPClassUID, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    return assoc


def test_pynetdicom_get_with_role_selection(node: ServerProcess, studies: Studies) -> None:
    """An SCU proposing the implicit VR syntax alone gets the implicit VR instance as stored."""
    [mr] = studies.of(SeriesInstanceUID=studies.a1_mr)
    got: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0

    assoc = get_association(node, mr, on_store)
    try:
        responses = list(assoc.send_c_get(query("SERIES", StudyInstanceUID=studies.a1, SeriesInstanceUID=studies.a1_mr),
                                          StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert (int(final.Status), counts(final)[1:]) == (0x0000, (1, 0, 0))
    assert got == {mr.SOPInstanceUID: dataset_bytes(stored(node, mr))}


def test_a_get_requestor_that_does_not_answer_its_c_store_is_aborted(node: ServerProcess, studies: Studies) -> None:
    """A C-GET requestor that does not answer a C-STORE within the node's DIMSE timeout has its
    association aborted (pynetdicom's way): once the timeout has passed; the node goes on."""
    [mr] = studies.of(SeriesInstanceUID=studies.a1_mr)

    def on_store(event: evt.Event) -> int:
        time.sleep(DIMSE_TIMEOUT_S + 1)  # past the node's timeout (pynetdicom reads the abort after it)
        return 0

    assoc = get_association(node, mr, on_store)
    started = time.monotonic()
    try:
        list(assoc.send_c_get(query("SERIES", StudyInstanceUID=studies.a1, SeriesInstanceUID=studies.a1_mr),
                              StudyRootQueryRetrieveInformationModelGet))
        deadline = time.monotonic() + 30
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted
        assert DIMSE_TIMEOUT_S - 0.5 < time.monotonic() - started < DIMSE_TIMEOUT_S + 10
    finally:
        if assoc.is_established:
            assoc.abort()
    echo = association(node.dicom_port, Verification)
    try:
        assert int(echo.send_c_echo().Status) == 0  # type: ignore[attr-defined]
    finally:
        echo.release()  # type: ignore[attr-defined]


def test_a_get_associations_syntax_order_is_its_own(node: ServerProcess, studies: Studies) -> None:
    """A C-GET SCU's preferred syntax is accepted on its association only: a later association
    proposing the same syntaxes gets the node's own first choice (implicit VR)."""
    ct = studies.of(SeriesInstanceUID=studies.a1_ct)[0]

    def accepted(role: bool) -> str:
        ae = AE(ae_title="PYGETSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(ct.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        roles = [build_role(ct.SOPClassUID, scp_role=True)] if role else []
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET, ext_neg=roles)
        assert assoc.is_established
        try:
            [context] = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ct.SOPClassUID]
            return str(context.transfer_syntax[0])
        finally:
            assoc.release()

    assert accepted(role=True) == ExplicitVRLittleEndian
    assert accepted(role=False) == ImplicitVRLittleEndian
    assert accepted(role=True) == ExplicitVRLittleEndian


def test_only_the_nodes_own_sends_stream_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: once the node's file sending is installed, a path another part of the
    process sends is still decoded as pynetdicom does by default; a StoredInstance is streamed."""
    from pynetdicom import _config, association

    from dicom_node.catalog import InstanceRef
    from dicom_node.retrieve import StoredInstance, install_file_sending

    install_file_sending()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    decoded: list[str] = []
    monkeypatch.setattr(association, "dcmread", lambda name, *a, **k: decoded.append(name) or pydicom.dcmread(name, *a, **k))
    scp = AE(ae_title="LOCALSCP")
    scp.add_supported_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)])
    try:
        scu = AE(ae_title="LOCALSCU")
        scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = scu.associate("127.0.0.1", port, ae_title="LOCALSCP")
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(path).Status) == 0
            assert decoded == [str(path)]  # someone else's file: pynetdicom's default
            ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID,
                              ds.file_meta.TransferSyntaxUID, path, path.stat().st_size)
            assert int(assoc.send_c_store(StoredInstance(ref)).Status) == 0
            assert decoded == [str(path)]  # the node's: streamed as stored, never decoded
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert not _config.STORE_SEND_CHUNKED_DATASET


# --- the catalog -----------------------------------------------------------------------------------


def test_reindex_catalogues_an_existing_store(node: ServerProcess, studies: Studies, database: EmbeddedDatabase) -> None:
    """`fhir-server dicom reindex` over the node's files into another database: the same catalog."""
    env = {**os.environ, "MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_dicom_qr_reindex"}
    result = subprocess.run([sys.executable, "-m", "fhir_server", "dicom", "reindex",
                             "--data-dir", str(node.data_dir)], capture_output=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    with pymongo.MongoClient(database.uri) as client:
        live, rebuilt = client["fhir_dicom_qr"], client["fhir_dicom_qr_reindex"]
        for name in ("dicom_patients", "dicom_studies", "dicom_series", "dicom_instances"):
            assert rebuilt[name].count_documents({}) == live[name].count_documents({}) > 0, name
        fields = ("_id", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "ModalitiesInStudy",
                  "SOPClassesInStudy", "PatientID", "patient")

        def summary(db: pymongo.database.Database) -> list[tuple[str, ...]]:
            return sorted(tuple(str(sorted(v) if isinstance(v, list) else v) for v in (d.get(f) for f in fields))
                          for d in db["dicom_studies"].find())

        assert summary(rebuilt) == summary(live)
        a1 = rebuilt["dicom_studies"].find_one({"_id": studies.a1})
        assert (a1["NumberOfStudyRelatedSeries"], a1["NumberOfStudyRelatedInstances"]) == (2, 3)


def test_catalog_follows_instances_sent_again(node: ServerProcess, tmp_path: Path) -> None:
    """The same instance again changes nothing; sent for another patient or into another
    series, it moves, and the counts follow."""
    study, first_series, patient, other = generate_uid(), generate_uid(), f"QD{TAG}", f"QE{TAG}"
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.PatientID = study, first_series, patient
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mr.StudyInstanceUID, mr.SeriesInstanceUID, mr.PatientID = study, generate_uid(), other

    def send(*datasets: Dataset) -> None:
        ae = AE(ae_title="QRTEST")
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET)
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * len(datasets)
        assoc.release()

    def study_row() -> tuple[object, ...]:
        [found] = findscu(node, tmp_path, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}", "PatientID",
                                           "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                                           "NumberOfStudyRelatedInstances"])
        modalities = found.ModalitiesInStudy
        return (found.PatientID, sorted([modalities] if isinstance(modalities, str) else modalities),
                int(found.NumberOfStudyRelatedSeries), int(found.NumberOfStudyRelatedInstances))

    def patients() -> set[str]:
        found = findscu(node, tmp_path, ["QueryRetrieveLevel=PATIENT", f"PatientID=Q?{TAG}",
                                         "NumberOfPatientRelatedStudies"], "-P")
        return {f"{p.PatientID}:{int(p.NumberOfPatientRelatedStudies)}" for p in found if p.PatientID in (patient, other)}

    send(ct)
    send(ct)
    assert study_row() == (patient, ["CT"], 1, 1)
    assert patients() == {f"{patient}:1"}
    send(mr)  # the latest instance's patient is the study's
    assert study_row() == (other, ["CT", "MR"], 2, 2)
    assert patients() == {f"{other}:1"}
    ct.SeriesInstanceUID = generate_uid()  # the CT instance moves to a new series: the old one is gone
    send(ct)
    assert study_row() == (patient, ["CT", "MR"], 2, 2)
    series = findscu(node, tmp_path, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID"])
    assert uids(series, "SeriesInstanceUID") == {ct.SeriesInstanceUID, mr.SeriesInstanceUID}


def wado_parts(node: ServerProcess, study: str) -> int:
    """How many instances WADO-RS sends for the study (0 when it is unknown: 404)."""
    response = httpx.get(f"{node.url}/dicomweb/studies/{study}", timeout=60,
                         headers={"Accept": 'multipart/related; type="application/dicom"'})
    if response.status_code == 404:
        return 0
    assert response.status_code == 200, response.text
    boundary = re.search(r'boundary="?([^";]+)', response.headers["content-type"]).group(1)  # type: ignore[union-attr]
    return len(response.content.split(b"--" + boundary.encode())) - 2  # before the first, after the last


def test_an_instance_sent_again_elsewhere_has_one_copy_everywhere(node: ServerProcess, tmp_path: Path) -> None:
    """A CT sent into series S1, then into S2 of the same study, then into another study: one
    file on disk, and WADO-RS, QIDO-RS, C-FIND and FHIR all count it once, where it is now (its
    first study, left empty, is gone); again after `fhir-server dicom reindex`, even with an
    older copy left in the first series (as the node used to leave it)."""
    study, other, s1, s2, s3 = (generate_uid() for _ in range(5))
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct.PatientID = f"QM{TAG}"
    store = node.data_dir / "dicom" / "store"
    fhir = httpx.Client(base_url=f"{node.url}/fhir", timeout=60)

    def send(study_uid: str, series_uid: str) -> None:
        ct.StudyInstanceUID, ct.SeriesInstanceUID = study_uid, series_uid
        ae = AE(ae_title="QRTEST")
        ae.add_requested_context(ct.SOPClassUID, ct.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET)
        assert int(assoc.send_c_store(ct).Status) == 0
        assoc.release()

    def counts_of(study_uid: str) -> tuple[int, int, int, int | None]:
        """WADO-RS parts, QIDO-RS instances, C-FIND instances, FHIR numberOfInstances."""
        qido = httpx.get(f"{node.url}/dicomweb/studies/{study_uid}/instances", timeout=60)
        found = findscu(node, tmp_path, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid}", "SOPInstanceUID"])
        resource = fhir.get(f"/ImagingStudy/{study_uid}")
        number = resource.json()["numberOfInstances"] if resource.status_code == 200 else None
        return wado_parts(node, study_uid), len(qido.json()) if qido.status_code == 200 else 0, len(found), number

    def copies() -> list[Path]:
        return sorted(store.glob(f"*/*/{ct.SOPInstanceUID}.dcm"))

    try:
        send(study, s1)
        send(study, s2)
        assert copies() == [store / study / s2 / f"{ct.SOPInstanceUID}.dcm"]
        assert counts_of(study) == (1, 1, 1, 1)
        assert [s["uid"] for s in fhir.get(f"/ImagingStudy/{study}").json()["series"]] == [s2]
        send(other, s3)
        assert copies() == [store / other / s3 / f"{ct.SOPInstanceUID}.dcm"]
        assert counts_of(other) == (1, 1, 1, 1)
        assert counts_of(study) == (0, 0, 0, None)
        assert fhir.get(f"/ImagingStudy/{study}").status_code == 410  # deleted: its versions stay in history
        assert fhir.get(f"/ImagingStudy/{study}/_history").json()["total"] >= 3

        stale = store / study / s1 / f"{ct.SOPInstanceUID}.dcm"  # a copy an earlier version left behind
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(copies()[0].read_bytes())
        long_ago = time.time() - 3600
        os.utime(stale, (long_ago, long_ago))
        result = subprocess.run([sys.executable, "-m", "fhir_server", "dicom", "reindex", "--data-dir", str(node.data_dir)],
                                capture_output=True, timeout=300, env=node.env)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert copies() == [store / other / s3 / f"{ct.SOPInstanceUID}.dcm"]
        assert counts_of(other) == (1, 1, 1, 1)
        assert counts_of(study) == (0, 0, 0, None)
    finally:
        fhir.close()


def test_an_association_reactor_stays_paused_once_a_sender_saw_it_paused() -> None:
    """pynetdicom's race (its issue #875): the reactor passed its checkpoint with `_is_paused`
    still true, a sender (a C-STORE SCU's request) cleared the checkpoint and saw it paused, then the
    reactor read the queue and took the response as an unexpected request. With the node's
    handshake, leaving the pause waits until the sender lets it go."""
    import threading

    from pynetdicom.association import Association

    from dicom_node.reactors import pause_handshake

    pause_handshake()
    assoc = Association(AE(), "requestor")
    assoc._is_paused = True  # the reactor, about to pass its (set) checkpoint
    assoc._reactor_checkpoint.clear()  # a sender: pause it...
    assert assoc._is_paused  # ...and it looks paused: the sender sends
    leaving = threading.Thread(target=setattr, args=(assoc, "_is_paused", False))
    leaving.start()  # the reactor, past its checkpoint, about to read the queue
    leaving.join(0.3)
    assert leaving.is_alive() and assoc._is_paused, "the reactor ran while a sender held it paused"
    assoc._reactor_checkpoint.set()  # the sender got its response
    leaving.join(5)
    assert not leaving.is_alive() and not assoc._is_paused
