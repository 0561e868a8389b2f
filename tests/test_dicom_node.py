"""The DICOM node over loopback: DCMTK and pynetdicom as the modalities, then the files and the
FHIR resources checked."""

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pymongo
import pytest
from conftest import ServerProcess, free_port, unique
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from fhir_server.storage.embedded import EmbeddedDatabase

AET = "FHIRSERVER"
# Several modalities and transfer syntaxes, a multi-frame image, deflate.
SAMPLES = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "MR_small_jpeg_ls_lossless.dcm",
    "image_dfl.dcm",  # deflated
    "SC_rgb_rle_2frame.dcm",  # two frames
]


@pytest.fixture(scope="module")
def node(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_dicom", "FHIR_DICOM_AET": AET}
    proc = ServerProcess(tmp_path_factory.mktemp("dicom"), env).start()
    yield proc
    proc.stop()


@pytest.fixture
def fhir(node: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{node.url}/fhir", timeout=60) as client:
        yield client


def fresh(name: str, study: str | None = None, series: str | None = None, patient: str | None = None) -> Dataset:
    """A bundled test file with new UIDs (and patient), transfer syntax and pixels untouched."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient or f"P{unique()}"
    ds.PatientName = "Doe^Jane"
    return ds


def save(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def storescu(
    port: int, paths: list[Path], folder: Path, datasets: list[Dataset] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """DCMTK storescu proposing each file's own transfer syntax (a config profile: plain `-R`
    would still propose only uncompressed syntaxes)."""
    datasets = datasets or [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    contexts = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets})
    syntaxes = sorted({ts for _, ts in contexts})
    lines = ["[[TransferSyntaxes]]"]
    for k, ts in enumerate(syntaxes, start=1):
        lines += [f"[TS{k}]", f"TransferSyntax1 = {ts}"]
    lines += ["", "[[PresentationContexts]]", "[Test]"]
    lines += [f"PresentationContext{k} = {sop}\\TS{syntaxes.index(ts) + 1}" for k, (sop, ts) in enumerate(contexts, 1)]
    lines += ["", "[[Profiles]]", "[Test]", "PresentationContexts = Test", ""]
    config = folder / "storescu.cfg"
    config.write_text("\n".join(lines))
    return subprocess.run(["storescu", "-xf", str(config), "Test", "-aec", AET, "127.0.0.1", str(port), *map(str, paths)],
                          capture_output=True, timeout=60, env={"TCP_NODELAY": "1"})


def stored(node: ServerProcess, ds: Dataset) -> Path:
    return node.data_dir / "dicom" / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def scu_store(port: int, datasets: list[Dataset], ae_title: str = AET) -> list[int]:
    """C-STORE each dataset on one pynetdicom association; the statuses."""
    ae = AE(ae_title="TESTSCU")
    contexts = {(d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets}
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(d).Status) for d in datasets]
    finally:
        assoc.release()


def echo(port: int, calling: str = "TESTSCU") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) == 0


def find_studies(port: int, study_uid: str) -> list[int]:
    """The statuses of a study-level C-FIND for `study_uid`."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
    try:
        return [int(status.Status) for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()


def study(fhir: httpx.Client, uid: str) -> dict:
    response = fhir.get(f"/ImagingStudy/{uid}")
    assert response.status_code == 200, response.text
    return response.json()


def test_c_echo_with_dcmtk_and_pynetdicom(node: ServerProcess) -> None:
    result = subprocess.run(["echoscu", "-aec", AET, "127.0.0.1", str(node.dicom_port)], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert echo(node.dicom_port)


def test_open_associations_wait_without_spinning(node: ServerProcess) -> None:
    """Associations left open and idle cost the node next to no processor time (its reactors
    wait for their sockets and queues), and each still answers at once."""
    assert node.process is not None

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{node.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    ae = AE(ae_title="IDLESCU")
    ae.add_requested_context(Verification)
    assocs = [ae.associate("127.0.0.1", node.dicom_port, ae_title=AET) for _ in range(3)]
    try:
        assert all(a.is_established for a in assocs)
        time.sleep(0.5)
        before, started = cpu_seconds(), time.monotonic()
        time.sleep(3)
        share = (cpu_seconds() - before) / (time.monotonic() - started)
        assert share < 0.1, f"3 idle associations took {share:.0%} of a core"
        assert all(int(a.send_c_echo().Status) == 0 for a in assocs)
    finally:
        for a in assocs:
            a.release()


def test_storescu_stores_every_syntax_unchanged_and_indexes_the_study(
    node: ServerProcess, fhir: httpx.Client, tmp_path: Path
) -> None:
    study_uid, patient_id = generate_uid(), f"P{unique()}"
    modalities = {name: pydicom.dcmread(get_testdata_file(name)).get("Modality", "OT") for name in SAMPLES}
    series = {modality: generate_uid() for modality in modalities.values()}  # a series per modality
    sent = [fresh(name, study_uid, series[modalities[name]], patient_id) for name in SAMPLES]
    paths = [save(ds, tmp_path / "out") for ds in sent]
    result = storescu(node.dicom_port, paths, tmp_path)
    assert result.returncode == 0, result.stderr.decode()

    for ds, path in zip(sent, paths, strict=True):
        kept = pydicom.dcmread(stored(node, ds))
        original = pydicom.dcmread(path)
        assert kept.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID  # no transcoding
        assert kept.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert kept.PixelData == original.PixelData
        # Every element as sent (storescu itself drops Data Set Trailing Padding on the way).
        tags = [e.tag for e in original if e.tag != 0xFFFCFFFC]
        assert [kept[t].value for t in tags] == [original[t].value for t in tags]

    resource = study(fhir, study_uid)  # indexed by the time storescu has finished
    assert resource["numberOfInstances"] == len(SAMPLES) and resource["numberOfSeries"] == len(series)
    assert resource["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}
    assert {i["uid"] for s in resource["series"] for i in s["instance"]} == {d.SOPInstanceUID for d in sent}
    assert {c["code"] for c in resource["modality"]} >= {"CT", "MR"}
    patient = fhir.get(resource["subject"]["reference"]).json()
    assert any(i["value"] == patient_id for i in patient["identifier"])
    found = fhir.get("/ImagingStudy", params={"patient.identifier": patient_id}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [study_uid]
    by_uid = fhir.get("/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"}).json()
    assert by_uid["total"] == 1
    assert fhir.get("/ImagingStudy", params={"_id": study_uid, "modality": "CT"}).json()["total"] == 1
    endpoint = fhir.get(resource["endpoint"][0]["reference"]).json()
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"


def test_concurrent_associations_on_one_study_lose_no_instance(node: ServerProcess, fhir: httpx.Client) -> None:
    study_uid, patient_id = generate_uid(), f"P{unique()}"
    series = [generate_uid() for _ in range(4)]  # an association per series
    batches = [[fresh("CT_small.dcm", study_uid, uid, patient_id) for _ in range(5)] for uid in series]
    statuses: list[list[int]] = []

    def send(batch: list[Dataset]) -> None:
        statuses.append(scu_store(node.dicom_port, batch))

    threads = [threading.Thread(target=send, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [s for batch in statuses for s in batch] == [0] * 20
    resource = study(fhir, study_uid)
    assert resource["numberOfInstances"] == 20 and resource["numberOfSeries"] == 4
    patients = fhir.get("/Patient", params={"identifier": patient_id}).json()
    assert patients["total"] == 1  # one Patient, however many associations raced to create it


def test_the_same_instance_twice_is_one_entry_and_a_change_is_a_new_version(
    node: ServerProcess, fhir: httpx.Client
) -> None:
    ds = fresh("MR_small.dcm")
    assert scu_store(node.dicom_port, [ds]) == [0]
    first = study(fhir, ds.StudyInstanceUID)
    assert scu_store(node.dicom_port, [ds]) == [0]
    again = study(fhir, ds.StudyInstanceUID)
    assert again["meta"]["versionId"] == first["meta"]["versionId"] and again["numberOfInstances"] == 1
    ds.SeriesDescription = "changed"
    assert scu_store(node.dicom_port, [ds]) == [0]
    changed = study(fhir, ds.StudyInstanceUID)
    assert int(changed["meta"]["versionId"]) == int(first["meta"]["versionId"]) + 1
    assert changed["numberOfInstances"] == 1 and changed["series"][0]["description"] == "changed"
    assert pydicom.dcmread(stored(node, ds)).SeriesDescription == "changed"
    assert len(list(stored(node, ds).parent.iterdir())) == 1


def test_a_large_instance(node: ServerProcess, fhir: httpx.Client) -> None:
    ds = fresh("CT_small.dcm")
    ds.Rows, ds.Columns = 1600, 1600
    ds.PixelData = bytes(range(256)) * (1600 * 1600 * 2 // 256)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert scu_store(node.dicom_port, [ds]) == [0]
    assert stored(node, ds).stat().st_size > 5_000_000
    assert pydicom.dcmread(stored(node, ds)).PixelData == ds.PixelData
    assert study(fhir, ds.StudyInstanceUID)["numberOfInstances"] == 1


def test_truncated_and_incomplete_datasets_are_refused(node: ServerProcess, fhir: httpx.Client) -> None:
    cut = fresh("CT_small.dcm")
    cut.PixelData = cut.PixelData[: len(cut.PixelData) * 4 // 10]  # 40 % of the pixels
    headless = fresh("CT_small.dcm")
    del headless.PixelData  # an image header without its pixels
    no_study = fresh("CT_small.dcm")
    del no_study.StudyInstanceUID
    statuses = scu_store(node.dicom_port, [cut, headless, no_study])
    assert all(s >= 0xA000 for s in statuses), [hex(s) for s in statuses]
    assert statuses[0] == 0xC210
    for ds in (cut, headless):
        assert not stored(node, ds).exists()
        assert fhir.get(f"/ImagingStudy/{ds.StudyInstanceUID}").status_code == 404
    assert echo(node.dicom_port)  # and the node goes on serving


def test_a_file_truncated_on_the_wire_is_refused(node: ServerProcess, tmp_path: Path) -> None:
    ds = fresh("CT_small.dcm")
    path = save(ds, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])  # the Pixel Data element says more than follows
    result = storescu(node.dicom_port, [path], tmp_path)
    assert not stored(node, ds).exists(), result.stdout
    assert echo(node.dicom_port)


def test_garbage_abort_and_oversized_requests_cost_only_their_connection(node: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", node.dicom_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 10)
    with socket.create_connection(("127.0.0.1", node.dicom_port), timeout=10) as sock:
        # An A-ASSOCIATE-RQ whose first item is cut short (pynetdicom's decoder asserts): A-ABORT at once.
        items = b"\x00\x01" + bytes(66) + b"\x10\x00\x00\x15"
        sock.sendall(struct.pack(">BBL", 0x01, 0x00, len(items)) + items)
        assert sock.recv(1) == b"\x07"
    with socket.create_connection(("127.0.0.1", node.dicom_port), timeout=10) as sock:
        # An A-ASSOCIATE-RQ declaring 4 GiB, then a stream of bytes: dropped, not buffered.
        sock.sendall(struct.pack(">BBL", 0x01, 0x00, 0xFFFFFFF0))
        try:
            for _ in range(200):
                sock.sendall(b"\x00" * 65536)
        except OSError:
            pass  # the node closed the connection: as it should
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET)
    assert assoc.is_established
    assoc.abort()  # a peer vanishing mid-association
    assert echo(node.dicom_port)


def test_a_connection_that_sends_nothing_holds_up_no_other(node: ServerProcess) -> None:
    """Associations are made in the accepting thread (dicom_node/node.py): nothing there waits
    for the peer, so a connection left silent does not stop the node accepting others."""
    with socket.create_connection(("127.0.0.1", node.dicom_port), timeout=10):
        started = time.monotonic()
        assert echo(node.dicom_port)
        assert time.monotonic() - started < 5


def test_the_catalog_is_indexed_at_start_before_anything_is_stored(database: EmbeddedDatabase, tmp_path: Path) -> None:
    """C-FIND and QIDO-RS read the catalog without making its indexes: the start makes them."""
    proc = ServerProcess(tmp_path, {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_dicom_fresh_catalog"})
    proc.dicom_port = 0  # DICOMweb only: recovered and prepared all the same
    proc.start()
    try:
        with pymongo.MongoClient(database.uri) as client:
            indexes = client["fhir_dicom_fresh_catalog"]["dicom_studies"].index_information()
        assert {"PatientID_1", "AccessionNumber_1", "StudyDate_1"} <= set(indexes)
    finally:
        proc.stop()


def test_allow_list_rejects_unknown_callers(database: EmbeddedDatabase, tmp_path: Path) -> None:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_dicom_acl", "FHIR_DICOM_AET": AET,
           "FHIR_DICOM_ALLOWED": "GOODSCU,LOCALSCU@127.0.0.1,FARSCU@192.0.2.1"}
    proc = ServerProcess(tmp_path, env).start()
    try:
        assert echo(proc.dicom_port, "GOODSCU") and echo(proc.dicom_port, "LOCALSCU")
        for calling in ("BADSCU", "FARSCU"):  # unknown; known but from another host
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", proc.dicom_port, ae_title=AET)
            assert assoc.is_rejected
            assert assoc.acceptor.primitive.result_source == 0x01 and assoc.acceptor.primitive.diagnostic == 0x03
        result = subprocess.run(["echoscu", "-aet", "BADSCU", "-aec", AET, "127.0.0.1", str(proc.dicom_port)],
                                capture_output=True, timeout=30)
        assert result.returncode != 0
        assert echo(proc.dicom_port, "GOODSCU")
    finally:
        proc.stop()


def test_at_most_max_associations_at_once_and_the_node_stops_at_once(database: EmbeddedDatabase, tmp_path: Path) -> None:
    """FHIR_DICOM_MAX_ASSOCIATIONS open associations at once, the next one refused (local limit
    exceeded), and one more once one is released: the association the node keeps made ahead for
    the next connection counts for none. Then the node stops within seconds, one association
    open and the next one made ahead."""
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_dicom_limit", "FHIR_DICOM_AET": AET,
           "FHIR_DICOM_MAX_ASSOCIATIONS": "2"}
    proc = ServerProcess(tmp_path, env).start()
    ae = AE(ae_title="LIMITSCU")
    ae.add_requested_context(Verification)
    try:
        held = [ae.associate("127.0.0.1", proc.dicom_port, ae_title=AET) for _ in range(2)]
        assert all(a.is_established for a in held)
        refused = ae.associate("127.0.0.1", proc.dicom_port, ae_title=AET)
        assert refused.is_rejected
        assert (refused.acceptor.primitive.result, refused.acceptor.primitive.result_source,
                refused.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
        held[0].release()
        deadline = time.monotonic() + 5
        while True:  # the released association's threads end a moment after its A-RELEASE-RP
            again = ae.associate("127.0.0.1", proc.dicom_port, ae_title=AET)
            if again.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert again.is_established
        assert int(again.send_c_echo().Status) == 0
        again.release()  # its connection closed: the node makes its next association ahead, and holds it
        time.sleep(0.5)
        assert proc.process is not None
        started = time.monotonic()
        proc.stop()
        assert proc.process.returncode is not None and time.monotonic() - started < 10
    finally:
        proc.stop()


def test_the_spare_association_waits_uncounted_and_ends_with_its_server() -> None:
    """The association a port keeps made ahead: its two threads wait (not among the AE's active
    associations), a connection takes it, and its server's close ends a waiting one; no spare
    is made after the close (a connection may close later)."""
    from dicom_node import acceptor

    ae = acceptor.NodeAE(ae_title="SPARETEST")
    ae.add_supported_context(Verification)
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_CONN_CLOSE, acceptor.refill)],
                            server_class=acceptor.InlineAssociationServer)
    ae._servers.append(server)  # as the node does: `ae.shutdown()` stops it
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        server.refill()
        spare = server._spare
        assert spare is not None and spare.is_alive() and spare.dul.is_alive()
        assert ae.active_associations == []
        scu = AE(ae_title="SPARESCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SPARETEST")
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assert ae.active_associations == [spare]  # the connection took the spare
        assoc.release()
        deadline = time.monotonic() + 5
        while server._spare is None and time.monotonic() < deadline:  # made again once the connection closed
            time.sleep(0.01)
        waiting = server._spare
        assert waiting is not None and waiting is not spare
    finally:
        ae.shutdown()
    waiting.join(2)
    waiting.dul.join(2)
    assert not waiting.is_alive() and not waiting.dul.is_alive()
    server.refill()
    assert server._spare is None


def test_an_instance_placed_but_not_indexed_is_indexed_at_start_and_by_reindex(
    database: EmbeddedDatabase, tmp_path: Path
) -> None:
    """What a crash between placing a file and indexing it leaves: the file and its marker."""
    data = tmp_path / "data"
    ds = fresh("MR_small.dcm")
    target = data / "dicom" / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    save(ds, target.parent)
    (data / "dicom" / "unindexed").mkdir(parents=True)
    (data / "dicom" / "unindexed" / ds.SOPInstanceUID).write_text(str(target.relative_to(data / "dicom")))
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_dicom_reconcile"}
    proc = ServerProcess(data, env).start()
    try:
        with httpx.Client(base_url=f"{proc.url}/fhir") as client:
            assert study(client, ds.StudyInstanceUID)["numberOfInstances"] == 1
            assert not (data / "dicom" / "unindexed" / ds.SOPInstanceUID).exists()
            # A file no marker speaks of: `fhir-server dicom reindex` walks the whole store.
            other = fresh("CT_small.dcm")
            save(other, data / "dicom" / "store" / other.StudyInstanceUID / other.SeriesInstanceUID)
            result = subprocess.run(
                [sys.executable, "-m", "fhir_server", "dicom", "reindex", "--data-dir", str(data)],
                env=proc.env, capture_output=True, timeout=120,
            )
            assert result.returncode == 0, result.stderr.decode()
            assert study(client, other.StudyInstanceUID)["numberOfInstances"] == 1
    finally:
        proc.stop()


def test_dicomweb_only_start_recovers_what_a_crash_left(database: EmbeddedDatabase, tmp_path: Path) -> None:
    """With no DIMSE port (`--dicom-port 0`) the start still indexes a marked instance (a
    STOW-RS crash) and removes old half-received files, not a younger one that another
    process on the same data folder may be receiving."""
    data = tmp_path / "data"
    ds = fresh("CT_small.dcm")
    target = data / "dicom" / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    save(ds, target.parent)
    (data / "dicom" / "unindexed").mkdir(parents=True)
    (data / "dicom" / "unindexed" / ds.SOPInstanceUID).write_text(str(target.relative_to(data / "dicom")))
    incoming = data / "dicom" / "incoming"
    incoming.mkdir()
    old, young = incoming / "left-by-a-crash", incoming / "being-received"
    for leftover in (old, young):
        leftover.write_bytes(b"DICM half-received")
    long_ago = time.time() - 2 * 3600
    os.utime(old, (long_ago, long_ago))
    proc = ServerProcess(data, {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_dicomweb_only"})
    proc.dicom_port = 0  # no DIMSE node
    proc.start()
    try:
        with httpx.Client(base_url=f"{proc.url}/fhir") as client:
            assert study(client, ds.StudyInstanceUID)["numberOfInstances"] == 1
        assert not (data / "dicom" / "unindexed" / ds.SOPInstanceUID).exists()
        assert (old.exists(), young.exists()) == (False, True)
    finally:
        proc.stop()


def test_database_down_refuses_instances_and_nothing_is_lost(tmp_path: Path) -> None:
    database = EmbeddedDatabase(tmp_path / "db", port=free_port()).start()
    # The URI's own server selection timeout (2 s), not the server's default (10 s), bounds each wait below.
    proc = ServerProcess(tmp_path / "server", {"MONGODB_URI": f"{database.uri}&serverSelectionTimeoutMS=2000"}).start()
    try:
        assert scu_store(proc.dicom_port, [fresh("CT_small.dcm")]) == [0]
        database.kill()
        first = fresh("MR_small.dcm")
        # Placed and answered before the indexer finds the database gone; kept for later.
        assert scu_store(proc.dicom_port, [first]) == [0]
        refused = fresh("MR_small.dcm")
        assert scu_store(proc.dicom_port, [refused]) == [0xA700]
        assert echo(proc.dicom_port)  # still serving
        waited = time.monotonic()
        assert find_studies(proc.dicom_port, first.StudyInstanceUID) == [0xA700]  # the catalog's reader too
        assert time.monotonic() - waited < 8  # the URI's 2 s server selection, not the default 10 s
        database.start()
        with httpx.Client(base_url=f"{proc.url}/fhir", timeout=60) as client:
            for _ in range(100):  # the node pings every 2 s, then indexes what was left
                if client.get(f"/ImagingStudy/{first.StudyInstanceUID}").status_code == 200:
                    break
                threading.Event().wait(0.5)
            assert study(client, first.StudyInstanceUID)["numberOfInstances"] == 1
            assert scu_store(proc.dicom_port, [refused]) == [0]
            assert study(client, refused.StudyInstanceUID)["numberOfInstances"] == 1
        assert find_studies(proc.dicom_port, refused.StudyInstanceUID) == [0xFF00, 0x0000]  # it reconnected
    finally:
        proc.stop()
        database.stop()


def test_an_instance_fhir_cannot_hold_does_not_hold_back_its_study(node: ServerProcess, fhir: httpx.Client) -> None:
    study_uid = generate_uid()
    good = [fresh("CT_small.dcm", study_uid, generate_uid()) for _ in range(2)]
    odd = fresh("CT_small.dcm", study_uid, good[0].SeriesInstanceUID)
    odd.InstanceNumber = "99999999999"  # valid DICOM, more than FHIR's unsignedInt holds
    assert scu_store(node.dicom_port, [*good, odd]) == [0, 0, 0]
    resource = study(fhir, study_uid)
    assert resource["numberOfInstances"] == 3
    numbers = [i.get("number") for s in resource["series"] for i in s["instance"] if i["uid"] == odd.SOPInstanceUID]
    assert numbers == [None]  # left out, not the study refused


def test_deflated_datasets_that_are_cut_or_inflate_too_far_are_refused(node: ServerProcess, tmp_path: Path) -> None:
    ds = fresh("image_dfl.dcm")
    path = save(ds, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])
    storescu(node.dicom_port, [path], tmp_path, [ds])
    assert not stored(node, ds).exists()
    assert not list((node.data_dir / "dicom" / "incoming").iterdir())  # nothing left half-received
    assert echo(node.dicom_port)


def test_an_existing_patient_is_found_by_an_issuer_with_characters_urls_reserve(
    node: ServerProcess, fhir: httpx.Client
) -> None:
    patient_id = f"P{unique()}"
    system = "General%20Hospital%20&%20Co"  # how the mapping writes the issuer "General Hospital & Co"
    created = fhir.post("/Patient", json={"resourceType": "Patient", "identifier": [{"system": system, "value": patient_id}]},
                        headers={"Content-Type": "application/fhir+json"}).json()
    ds = fresh("CT_small.dcm", patient=patient_id)
    ds.IssuerOfPatientID = "General Hospital & Co"
    assert scu_store(node.dicom_port, [ds]) == [0]
    assert study(fhir, ds.StudyInstanceUID)["subject"]["reference"] == f"Patient/{created['id']}"
