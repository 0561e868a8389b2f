"""DICOMweb (PS3.18) against a real server: STOW-RS, WADO-RS and QIDO-RS with dicomweb-client
and plain HTTP, the FHIR ImagingStudy they keep up to date, and the error paths."""

import asyncio
import errno
import io
import resource
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import ServerProcess, assert_outcome, unique
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid
from python_multipart.multipart import MultipartParser, parse_options_header
from requests import HTTPError
from starlette.requests import Request

from fhir_server.routes.dicomweb import stow as stow_route
from fhir_server.storage.embedded import EmbeddedDatabase

DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
SAMPLES = {  # name → what it exercises
    "CT_small.dcm": "explicit VR little endian, 16-bit",
    "MR_small.dcm": "window center/width in the header",
    "rtdose.dcm": "uncompressed multi-frame (15 frames, 32-bit, implicit VR)",
    "SC_rgb_jpeg_dcmtk.dcm": "compressed (JPEG baseline), colour",
}
MAX_PARTS = 100  # FHIR_DICOMWEB_MAX_PARTS of the server under test
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, FAILURE_REASON, RETRIEVE_URL = "00081198", "00081199", "00081197", "00081190"


@pytest.fixture(scope="module")
def server(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_dicomweb", "FHIR_DICOMWEB_MAX_PARTS": str(MAX_PARTS)}
    proc = ServerProcess(tmp_path_factory.mktemp("dicomweb"), env).start()
    yield proc
    proc.stop()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.url}/dicomweb", timeout=60) as client:
        yield client


@pytest.fixture
def fhir(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as client:
        yield client


@pytest.fixture
def dicomweb(server: ServerProcess) -> DICOMwebClient:
    return DICOMwebClient(f"{server.url}/dicomweb")


def fresh(name: str, study: str | None = None, **attributes: object) -> Dataset:
    """A bundled test file with new UIDs and patient (transfer syntax and pixels untouched)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"P{unique()}"
    ds.PatientName = "Doe^Jane"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset) -> bytes:
    """The file as dicomweb-client sends it."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def multipart(parts: list[bytes], boundary: str = "b0undary", part_type: str = "application/dicom") -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{boundary}--\r\n".encode()


def stow(http: httpx.Client, parts: list[bytes], path: str = "/studies", **headers: str) -> httpx.Response:
    content_type = headers.pop("content_type", f"{MULTIPART_DICOM}; boundary=b0undary")
    return http.post(path, content=multipart(parts), headers={"Content-Type": content_type, **headers})


def split(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart response: (headers, body) each."""
    kind, params = parse_options_header(response.headers["content-type"])
    assert kind == b"multipart/related", response.headers["content-type"]
    parts: list[tuple[dict[str, str], bytearray]] = []
    header: list[bytearray] = [bytearray(), bytearray()]

    def header_end() -> None:
        parts[-1][0][header[0].decode().lower()] = header[1].decode().strip()
        header[0].clear()
        header[1].clear()

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": lambda: parts.append(({}, bytearray())),
        "on_header_field": lambda d, s, e: header[0].extend(d[s:e]),
        "on_header_value": lambda d, s, e: header[1].extend(d[s:e]),
        "on_header_end": header_end,
        "on_part_data": lambda d, s, e: parts[-1][1].extend(d[s:e]),
    })
    parser.write(response.content)
    parser.finalize()
    return [(h, bytes(b)) for h, b in parts]


@pytest.fixture(scope="module")
def study(server: ServerProcess) -> dict[str, object]:
    """One study of every sample, stored by STOW-RS through dicomweb-client."""
    uid = generate_uid()
    datasets = [fresh(name, uid, PatientID="DW-1", PatientName="Dicomweb^Alice", StudyDate="20240115",
                      AccessionNumber="ACC-DW-1") for name in SAMPLES]
    client = DICOMwebClient(f"{server.url}/dicomweb")
    response = client.store_instances(datasets)
    return {"uid": uid, "datasets": datasets, "response": response, "sent": {d.SOPInstanceUID: encode(d) for d in datasets}}


# -- STOW-RS ----------------------------------------------------------------------------------


def test_stow_stores_every_sample_and_answers_their_urls(study: dict, server: ServerProcess) -> None:
    response: Dataset = study["response"]
    datasets: list[Dataset] = study["datasets"]
    assert "FailedSOPSequence" not in response
    referenced = {item.ReferencedSOPInstanceUID: item for item in response.ReferencedSOPSequence}
    assert set(referenced) == {d.SOPInstanceUID for d in datasets}
    for ds in datasets:
        item = referenced[ds.SOPInstanceUID]
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL.endswith(f"/studies/{study['uid']}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
        kept = server.data_dir / "dicom" / "store" / study["uid"] / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert kept.read_bytes() == study["sent"][ds.SOPInstanceUID]  # stored as sent
    assert response.RetrieveURL.endswith(f"/dicomweb/studies/{study['uid']}")
    assert not list((server.data_dir / "dicom" / "incoming").iterdir())


def test_stow_updates_the_imaging_study_before_answering(study: dict, fhir: httpx.Client, http: httpx.Client) -> None:
    found = fhir.get("/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{study['uid']}"}).json()
    assert found["total"] == 1
    resource = found["entry"][0]["resource"]
    assert resource["numberOfInstances"] == len(SAMPLES)
    assert {i["uid"] for s in resource["series"] for i in s["instance"]} == {d.SOPInstanceUID for d in study["datasets"]}
    endpoint = fhir.get(resource["endpoint"][0]["reference"]).json()
    retrieved = httpx.get(f"{endpoint['address']}/studies/{study['uid']}", headers={"Accept": MULTIPART_DICOM}, timeout=60)
    assert retrieved.status_code == 200
    assert len(split(retrieved)) == len(SAMPLES)


def test_stow_is_idempotent_and_checks_the_study_of_the_url(http: httpx.Client, fhir: httpx.Client) -> None:
    ds = fresh("MR_small.dcm")
    raw = encode(ds)
    first = stow(http, [raw], f"/studies/{ds.StudyInstanceUID}")
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == DICOM_JSON
    version = fhir.get(f"/ImagingStudy/{ds.StudyInstanceUID}").json()["meta"]["versionId"]
    again = stow(http, [raw], f"/studies/{ds.StudyInstanceUID}")
    assert again.status_code == 200
    assert fhir.get(f"/ImagingStudy/{ds.StudyInstanceUID}").json()["meta"]["versionId"] == version  # no new version

    other = generate_uid()
    mismatch = stow(http, [raw], f"/studies/{other}")
    assert mismatch.status_code == 409
    failed = mismatch.json()[FAILED_SOP_SEQUENCE]["Value"]
    assert failed[0][FAILURE_REASON]["Value"] == [0xA900]
    assert failed[0]["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert REFERENCED_SOP_SEQUENCE not in mismatch.json()
    assert fhir.get(f"/ImagingStudy/{other}").status_code == 404


def test_stow_with_some_parts_refused_is_202(http: httpx.Client, server: ServerProcess) -> None:
    good = fresh("CT_small.dcm")
    truncated = encode(fresh("CT_small.dcm"))[:-2000]
    no_uid = fresh("CT_small.dcm")
    del no_uid.SeriesInstanceUID
    response = stow(http, [encode(good), b"not DICOM at all", truncated, encode(no_uid)])
    assert response.status_code == 202, response.text
    body = response.json()
    assert [i["00081155"]["Value"][0] for i in body[REFERENCED_SOP_SEQUENCE]["Value"]] == [good.SOPInstanceUID]
    reasons = [i[FAILURE_REASON]["Value"][0] for i in body[FAILED_SOP_SEQUENCE]["Value"]]
    assert reasons == [0xC210, 0xC210, 0xA900]
    assert not list((server.data_dir / "dicom" / "incoming").iterdir())  # refused parts are dropped


def test_stow_refuses_a_file_meta_that_names_another_instance(http: httpx.Client, server: ServerProcess) -> None:
    other = fresh("CT_small.dcm")
    other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other_class = fresh("CT_small.dcm")
    other_class.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    bare = fresh("CT_small.dcm")
    del bare.file_meta.MediaStorageSOPClassUID
    del bare.file_meta.MediaStorageSOPInstanceUID
    response = stow(http, [encode(other), encode(other_class), encode(bare)])
    assert response.status_code == 409, response.text
    failed = response.json()[FAILED_SOP_SEQUENCE]["Value"]
    assert [i[FAILURE_REASON]["Value"] for i in failed] == [[0xA900]] * 3
    assert [i["00081155"]["Value"][0] for i in failed] == [d.SOPInstanceUID for d in (other, other_class, bare)]
    for ds in (other, other_class, bare):
        assert not (server.data_dir / "dicom" / "store" / ds.StudyInstanceUID).exists()
    assert not list((server.data_dir / "dicom" / "incoming").iterdir())


@pytest.mark.parametrize(("content_type", "body", "status"), [
    ("application/dicom", b"x", 415),
    ('multipart/related; type="application/dicom+json"; boundary=b0undary', multipart([b"{}"]), 415),
    ("multipart/related; type=\"application/dicom\"", multipart([b"x"]), 400),  # no boundary
    (f"{MULTIPART_DICOM}; boundary=b0undary", multipart([b"x"])[:-12], 400),  # cut before the close delimiter
    (f"{MULTIPART_DICOM}; boundary=b0undary", b"garbage before any boundary", 400),
    (f"{MULTIPART_DICOM}; boundary=b0undary", b"--b0undary--\r\n", 400),  # no part
    (f"{MULTIPART_DICOM}; boundary=b0undary", multipart([b"junk"]), 409),  # parsed, but not DICOM
])
def test_stow_bad_requests_are_4xx(http: httpx.Client, server: ServerProcess, content_type: str, body: bytes,
                                   status: int) -> None:
    response = http.post("/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert not list((server.data_dir / "dicom" / "incoming").iterdir())


def test_stow_takes_at_most_max_parts(http: httpx.Client, server: ServerProcess) -> None:
    assert stow(http, [b"x"] * MAX_PARTS).status_code == 409  # as many as allowed: each refused on its own
    response = stow(http, [b"x"] * (MAX_PARTS + 1))
    assert response.status_code == 413, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert str(MAX_PARTS) in response.json()["issue"][0]["diagnostics"]
    assert not list((server.data_dir / "dicom" / "incoming").iterdir())


def test_stow_answers_a_full_disk_with_507_and_keeps_no_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the part files' writes fail as on a full disk (ENOSPC)."""
    written: list[int] = []

    def full_disk(self: object, data: bytes, start: int, end: int) -> None:
        written.append(end - start)
        if len(written) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stow_route._PartFiles, "_data", full_disk)
    body = multipart([b"x" * 100, b"y" * 100, b"z" * 100])

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    with pytest.raises(stow_route.InsufficientStorage) as raised:
        asyncio.run(stow_route._receive(request, tmp_path, b"b0undary", "application/dicom", MAX_PARTS))
    assert raised.value.status == 507
    assert list(tmp_path.iterdir()) == []  # the part written before is gone too


def test_stow_with_an_invalid_study_uid_in_the_url_is_400(http: httpx.Client) -> None:
    assert stow(http, [b"x"], "/studies/1.2.x").status_code == 400


# -- WADO-RS: instances -----------------------------------------------------------------------


def test_wado_study_series_and_instance_are_the_files_as_sent(study: dict, http: httpx.Client) -> None:
    datasets: list[Dataset] = study["datasets"]
    whole = http.get(f"/studies/{study['uid']}", headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax=*"})
    assert whole.status_code == 200
    assert whole.headers["content-type"].startswith(MULTIPART_DICOM)
    parts = split(whole)
    assert sorted(body for _, body in parts) == sorted(study["sent"].values())  # byte for byte
    for headers, body in parts:
        syntax = pydicom.dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID
        assert headers["content-type"] == f"application/dicom; transfer-syntax={syntax}"
        assert int(headers["content-length"]) == len(body)
    ds = datasets[0]
    series = split(http.get(f"/studies/{study['uid']}/series/{ds.SeriesInstanceUID}"))
    assert [body for _, body in series] == [study["sent"][ds.SOPInstanceUID]]
    url = f"/studies/{study['uid']}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    assert [body for _, body in split(http.get(url))] == [study["sent"][ds.SOPInstanceUID]]


def test_wado_sends_the_files_as_they_were_when_asked(http: httpx.Client, server: ServerProcess) -> None:
    """The body's length is known up front, and it holds the files as they were when the request
    came, even when an instance is stored again and another removed while it is sent (24 MB:
    more than the loopback connection's buffers hold, so the last file is still to be sent)."""
    uid = generate_uid()
    datasets = [fresh("CT_small.dcm", uid) for _ in range(3)]
    for seed, ds in enumerate(datasets):
        ds.add_new(0x00091010, "OB", np.random.default_rng(seed).bytes(8 << 20))
    sent = [encode(ds) for ds in datasets]
    assert stow(http, sent).status_code == 200
    paths = [server.data_dir / "dicom" / "store" / uid / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm" for ds in datasets]
    with http.stream("GET", f"/studies/{uid}", headers={"Accept": MULTIPART_DICOM}) as response:
        assert response.status_code == 200 and "transfer-encoding" not in response.headers
        chunks = response.iter_raw()
        body = bytearray(next(chunks))
        replacement = paths[2].with_suffix(".new")
        replacement.write_bytes(sent[2][: len(sent[2]) // 2])  # the store replaces a file whole, by a rename
        replacement.replace(paths[2])
        paths[1].unlink()
        for chunk in chunks:
            body.extend(chunk)
    assert len(body) == int(response.headers["content-length"])
    response._content = bytes(body)
    assert sorted(part for _, part in split(response)) == sorted(sent)


def test_wado_when_the_server_can_map_no_more_files_is_503_then_200(http: httpx.Client, server: ServerProcess) -> None:
    """A retrieval maps each of its files; when the process may map no more (here: its address
    space capped just above what it uses, as the kernel's map count would), the answer is 503
    with Retry-After, and once it may, the same request gets the files."""
    assert server.process is not None
    ds = fresh("CT_small.dcm")
    ds.add_new(0x00091010, "OB", np.random.default_rng(7).bytes(64 << 20))
    sent = encode(ds)
    assert stow(http, [sent]).status_code == 200
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    in_use = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmSize:")) * 1024
    before = resource.prlimit(server.process.pid, resource.RLIMIT_AS, (in_use + (32 << 20), resource.RLIM_INFINITY))
    try:
        refused = http.get(f"/studies/{ds.StudyInstanceUID}", headers={"Accept": MULTIPART_DICOM})
    finally:
        resource.prlimit(server.process.pid, resource.RLIMIT_AS, before)
    assert_outcome(refused, 503, "try again")
    assert refused.headers["retry-after"] == "5"
    assert [body for _, body in split(http.get(f"/studies/{ds.StudyInstanceUID}", headers={"Accept": MULTIPART_DICOM}))] == [sent]


def test_wado_with_dicomweb_client(study: dict, dicomweb: DICOMwebClient) -> None:
    datasets: list[Dataset] = study["datasets"]
    got = dicomweb.retrieve_study(study["uid"])
    assert {d.SOPInstanceUID for d in got} == {d.SOPInstanceUID for d in datasets}
    ds = datasets[1]
    series = dicomweb.retrieve_series(study["uid"], ds.SeriesInstanceUID)
    assert [d.SOPInstanceUID for d in series] == [ds.SOPInstanceUID]
    instance = dicomweb.retrieve_instance(study["uid"], ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert instance.PixelData == ds.PixelData and instance.PatientName == "Dicomweb^Alice"


def test_wado_asking_another_transfer_syntax_is_406(study: dict, http: httpx.Client) -> None:
    accept = f"{MULTIPART_DICOM}; transfer-syntax=1.2.840.10008.1.2.4.50"  # JPEG: not what most are stored in
    assert http.get(f"/studies/{study['uid']}", headers={"Accept": accept}).status_code == 406
    jpeg = next(d for d in study["datasets"] if d.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50")
    url = f"/studies/{study['uid']}/series/{jpeg.SeriesInstanceUID}/instances/{jpeg.SOPInstanceUID}"
    assert http.get(url, headers={"Accept": accept}).status_code == 200
    either = f"{accept}, {MULTIPART_DICOM}; transfer-syntax=*; q=0.5"  # the next choice serves the study
    assert http.get(f"/studies/{study['uid']}", headers={"Accept": either}).status_code == 200


# -- WADO-RS: metadata ------------------------------------------------------------------------


def test_metadata_at_every_level(study: dict, dicomweb: DICOMwebClient, http: httpx.Client) -> None:
    datasets: list[Dataset] = study["datasets"]
    items = dicomweb.retrieve_study_metadata(study["uid"])
    assert len(items) == len(SAMPLES)
    for item in items:
        assert "7FE00010" not in item  # no pixel data
        parsed = Dataset.from_json(item)
        assert parsed.StudyInstanceUID == study["uid"] and parsed.PatientID == "DW-1"
    ds = datasets[0]
    series = dicomweb.retrieve_series_metadata(study["uid"], ds.SeriesInstanceUID)
    assert [Dataset.from_json(i).SOPInstanceUID for i in series] == [ds.SOPInstanceUID]
    instance = dicomweb.retrieve_instance_metadata(study["uid"], ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert Dataset.from_json(instance).Rows == ds.Rows
    response = http.get(f"/studies/{study['uid']}/metadata", headers={"Accept": "application/dicom+xml"})
    assert response.status_code == 406


def test_metadata_bulk_data_uris_resolve(http: httpx.Client) -> None:
    ds = fresh("CT_small.dcm")
    ds.add_new(0x00091010, "OB", bytes(range(256)) * 8)  # a private binary value past the inline threshold
    assert stow(http, [encode(ds)]).status_code == 200
    base = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    item = http.get(f"{base}/metadata").json()[0]
    uri = item["00091010"]["BulkDataURI"]
    assert uri.endswith(f"{base}/bulkdata/00091010")
    parts = split(http.get(uri))
    assert parts[0][1] == bytes(range(256)) * 8
    assert http.get(f"{base}/bulkdata/7FE00010").status_code == 404
    assert http.get(f"{base}/bulkdata/zz").status_code == 400


def peak_growth(server: ServerProcess, call: object) -> int:
    """How far the server's peak resident memory rises above what it holds during `call()`
    (Linux: writing 5 to clear_refs resets the peak, VmHWM)."""
    assert server.process is not None and callable(call)
    status = Path(f"/proc/{server.process.pid}/status")

    def kilobytes(field: str) -> int:
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(field))

    Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")
    before = kilobytes("VmRSS:")
    call()
    return (kilobytes("VmHWM:") - before) * 1024


def test_large_bulk_data_stays_in_the_file(http: httpx.Client, server: ServerProcess) -> None:
    value = np.random.default_rng(5).bytes(48 << 20)
    ds = fresh("CT_small.dcm")
    ds.add_new(0x00091010, "OB", value)
    item = Dataset()
    item.add_new(0x00091012, "OB", bytes(range(256)) * 8)
    ds.add_new(0x00091011, "SQ", [item])
    assert stow(http, [encode(ds)]).status_code == 200
    base = instance_path({"uid": ds.StudyInstanceUID}, ds)
    root = str(http.base_url).rstrip("/")
    found: list[dict] = []
    assert peak_growth(server, lambda: found.append(http.get(f"{base}/metadata").json()[0])) < 16 << 20
    assert found[0]["00091010"] == {"vr": "OB", "BulkDataURI": f"{root}{base}/bulkdata/00091010"}
    bodies: list[bytes] = []
    assert peak_growth(server, lambda: bodies.append(split(http.get(f"{base}/bulkdata/00091010"))[0][1])) < 16 << 20
    assert bodies[0] == value
    nested = found[0]["00091011"]["Value"][0]["00091012"]["BulkDataURI"]
    assert nested.endswith(f"{base}/bulkdata/00091011/0/00091012")
    assert split(http.get(nested))[0][1] == bytes(range(256)) * 8
    implicit = fresh("rtdose.dcm", EncapsulatedDocument=bytes(range(256)) * 20)  # implicit VR: OB from the dictionary
    assert stow(http, [encode(implicit)]).status_code == 200
    base = instance_path({"uid": implicit.StudyInstanceUID}, implicit)
    uri = http.get(f"{base}/metadata").json()[0]["00420011"]
    assert uri == {"vr": "OB", "BulkDataURI": f"{root}{base}/bulkdata/00420011"}
    assert split(http.get(uri["BulkDataURI"]))[0][1] == bytes(range(256)) * 20


# -- WADO-RS: rendered and frames ---------------------------------------------------------------


def by_name(study: dict, name: str) -> Dataset:
    return study["datasets"][list(SAMPLES).index(name)]


def instance_path(study: dict, ds: Dataset) -> str:
    return f"/studies/{study['uid']}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


@pytest.mark.parametrize(("name", "mode", "size"), [
    ("CT_small.dcm", "L", (128, 128)),
    ("MR_small.dcm", "L", (64, 64)),
    ("SC_rgb_jpeg_dcmtk.dcm", "RGB", (100, 100)),  # decoded from JPEG
    ("rtdose.dcm", "L", (10, 10)),  # the first frame
])
def test_rendered_instance_as_jpeg_and_png(study: dict, http: httpx.Client, name: str, mode: str,
                                           size: tuple[int, int]) -> None:
    url = f"{instance_path(study, by_name(study, name))}/rendered"
    jpeg = http.get(url)
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(jpeg.content))
    assert (image.format, image.mode, image.size) == ("JPEG", mode, size)
    png = http.get(url, headers={"Accept": "image/png"})
    image = Image.open(io.BytesIO(png.content))
    assert (png.headers["content-type"], image.format, image.mode, image.size) == ("image/png", "PNG", mode, size)


def test_rendered_follows_the_window_and_viewport(study: dict, http: httpx.Client, dicomweb: DICOMwebClient) -> None:
    ds = by_name(study, "CT_small.dcm")
    url = f"{instance_path(study, ds)}/rendered"
    narrow = Image.open(io.BytesIO(http.get(url, params={"window": "40,80"}, headers={"Accept": "image/png"}).content))
    wide = Image.open(io.BytesIO(http.get(url, params={"window": "40,4000"}, headers={"Accept": "image/png"}).content))
    assert np.asarray(narrow).std() > np.asarray(wide).std()  # a narrow window has more contrast
    small = Image.open(io.BytesIO(http.get(url, params={"viewport": "32,32"}).content))
    assert small.size == (32, 32)
    inverted = fresh("CT_small.dcm", PhotometricInterpretation="MONOCHROME1")
    assert stow(http, [encode(inverted)]).status_code == 200
    flipped = Image.open(io.BytesIO(http.get(f"{instance_path({'uid': inverted.StudyInstanceUID}, inverted)}/rendered",
                                             headers={"Accept": "image/png"}).content))
    plain = Image.open(io.BytesIO(http.get(url, headers={"Accept": "image/png"}).content))
    assert np.abs(np.asarray(flipped).astype(int) + np.asarray(plain) - 255).max() <= 1  # MONOCHROME1 inverted
    client_png = dicomweb.retrieve_instance_rendered(study["uid"], ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                                     media_types=("image/png",))
    assert Image.open(io.BytesIO(client_png)).size == (128, 128)
    for bad in ({"window": "40"}, {"window": "a,b"}, {"viewport": "0,10"}, {"quality": "101"}, {"window": "1,1,cubic"}):
        assert http.get(url, params=bad).status_code == 400, bad
    assert http.get(url, headers={"Accept": "image/gif"}).status_code == 406


def rle_zeros(rows: int, columns: int) -> Dataset:
    """An 8-bit RLE Lossless image of zeros (Rows × Columns a multiple of 128): 2 bytes per 128
    pixels compressed, however large it is decoded."""
    ds = fresh("CT_small.dcm", Rows=rows, Columns=columns, BitsAllocated=8, BitsStored=8, HighBit=7,
               PixelRepresentation=0)
    ds.file_meta.TransferSyntaxUID = RLELossless
    segment = bytes([129, 0]) * (rows * columns // 128)  # PackBits: the next byte 128 times
    header = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56)  # one segment, at 64
    ds.PixelData = encapsulate([header + segment])
    return ds


def test_rendered_refuses_a_frame_too_large_before_decoding_it(http: httpx.Client) -> None:
    huge = rle_zeros(10_000, 10_000)  # 100 megapixels in 1.6 MB: some 2 GB to render in float64
    assert stow(http, [encode(huge)]).status_code == 200
    base = instance_path({"uid": huge.StudyInstanceUID}, huge)
    response = http.get(f"{base}/rendered", params={"viewport": "64,64"})
    assert response.status_code == 406, response.text
    assert "10000×10000" in response.json()["issue"][0]["diagnostics"]
    assert response.elapsed.total_seconds() < 5  # refused from the header, nothing decoded
    study_rendered = http.get(f"/studies/{huge.StudyInstanceUID}/rendered")
    assert study_rendered.status_code == 200 and split(study_rendered) == []  # left out
    small = rle_zeros(256, 512)  # the same encoding, within the budget
    assert stow(http, [encode(small)]).status_code == 200
    image = Image.open(io.BytesIO(http.get(f"{instance_path({'uid': small.StudyInstanceUID}, small)}/rendered",
                                           params={"viewport": "64,64"}).content))
    assert image.size == (64, 32)


def test_rendering_a_large_frame_costs_a_few_bytes_a_pixel(http: httpx.Client, server: ServerProcess) -> None:
    pixels = np.random.default_rng(11).integers(0, 4096, size=(4000, 4000), dtype="<u2")  # 16 megapixels
    ds = fresh("CT_small.dcm", Rows=4000, Columns=4000, PixelData=pixels.tobytes())
    assert stow(http, [encode(ds)]).status_code == 200
    url = f"{instance_path({'uid': ds.StudyInstanceUID}, ds)}/rendered"
    images: list[Image.Image] = []
    # Bytes a pixel at most: measured 6 and 8 (float64, the viewport last: 17); shrunk by Pillow alone, 10.
    for params, most in (({"viewport": "64,64"}, 8), ({}, 12)):
        growth = peak_growth(server, lambda p=params: images.append(Image.open(io.BytesIO(http.get(url, params=p).content))))
        assert growth < most * 16_000_000, (params, growth)
    assert [i.size for i in images] == [(64, 64), (4000, 4000)]


def test_rendered_series_and_study_are_one_image_per_instance(study: dict, http: httpx.Client) -> None:
    whole = http.get(f"/studies/{study['uid']}/rendered", headers={"Accept": 'multipart/related; type="image/png"'})
    assert whole.status_code == 200
    images = [Image.open(io.BytesIO(body)) for _, body in split(whole)]
    assert len(images) == len(SAMPLES) and {i.format for i in images} == {"PNG"}
    ds = by_name(study, "SC_rgb_jpeg_dcmtk.dcm")
    series = split(http.get(f"/studies/{study['uid']}/series/{ds.SeriesInstanceUID}/rendered"))
    assert [Image.open(io.BytesIO(body)).mode for _, body in series] == ["RGB"]


def test_frames_of_an_uncompressed_multiframe(study: dict, http: httpx.Client, dicomweb: DICOMwebClient) -> None:
    ds = by_name(study, "rtdose.dcm")
    frames = ds.pixel_array  # 15 x 10 x 10, 32-bit
    response = http.get(f"{instance_path(study, ds)}/frames/1,3,15")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    got = [body for _, body in split(response)]
    assert got == [frames[i].astype("<u4").tobytes() for i in (0, 2, 14)]
    via_client = dicomweb.retrieve_instance_frames(study["uid"], ds.SeriesInstanceUID, ds.SOPInstanceUID, [2])
    assert via_client == [frames[1].astype("<u4").tobytes()]
    rendered = http.get(f"{instance_path(study, ds)}/frames/15/rendered", headers={"Accept": "image/png"})
    assert Image.open(io.BytesIO(rendered.content)).size == (10, 10)


def test_frames_are_each_sent_once_and_as_stored(study: dict, http: httpx.Client) -> None:
    ds = by_name(study, "rtdose.dcm")
    base = instance_path(study, ds)
    assert http.get(f"{base}/frames/{','.join(['1'] * 5000)}").status_code == 400  # 5,000 copies of a frame
    assert http.get(f"{base}/frames/1,2,1").status_code == 400
    every = list(range(15, 0, -1))
    response = http.get(f"{base}/frames/{','.join(map(str, every))}")
    assert [body for _, body in split(response)] == [ds.pixel_array[n - 1].astype("<u4").tobytes() for n in every]
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, size=(3, 700, 800), dtype="<u2")  # frames of 1.1 MB: read in chunks
    large = fresh("CT_small.dcm", Rows=700, Columns=800, NumberOfFrames=3, PixelData=pixels.tobytes())
    assert stow(http, [encode(large)]).status_code == 200
    got = split(http.get(f"{instance_path({'uid': large.StudyInstanceUID}, large)}/frames/3,1"))
    assert [body for _, body in got] == [pixels[2].tobytes(), pixels[0].tobytes()]
    assert [int(headers["content-length"]) for headers, _ in got] == [700 * 800 * 2] * 2


def test_frames_errors(study: dict, http: httpx.Client) -> None:
    ds = by_name(study, "rtdose.dcm")
    base = instance_path(study, ds)
    assert http.get(f"{base}/frames/16").status_code == 404
    assert http.get(f"{base}/frames/0").status_code == 404
    assert http.get(f"{base}/frames/1,x").status_code == 400
    assert http.get(f"{base}/frames/").status_code in (400, 404)
    assert http.get(f"{base}/frames/1,2/rendered").status_code == 400
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert http.get(f"{base}/frames/1", headers={"Accept": accept}).status_code == 406
    jpeg = by_name(study, "SC_rgb_jpeg_dcmtk.dcm")
    assert http.get(f"{instance_path(study, jpeg)}/frames/1").status_code == 406  # compressed: not served as frames


def test_malformed_image_attributes_are_never_a_500(http: httpx.Client) -> None:
    frames = fresh("CT_small.dcm", NumberOfFrames="77")
    element = b"\x28\x00\x08\x00IS\x02\x00"  # (0028,0008) IS, 2 bytes: not "77" in a random UID
    raw = encode(frames).replace(element + b"77", element + b"ab", 1)  # an IS pydicom cannot read as a number
    assert raw != encode(frames)
    refused = stow(http, [raw])
    assert refused.status_code == 409 and refused.json()[FAILED_SOP_SEQUENCE]["Value"][0][FAILURE_REASON]["Value"] == [0xC210]
    slope = fresh("CT_small.dcm", RescaleSlope="7.5")
    assert stow(http, [encode(slope).replace(b"7.5 ", b"x.y ", 1)]).status_code == 200
    base = instance_path({"uid": slope.StudyInstanceUID}, slope)
    assert Image.open(io.BytesIO(http.get(f"{base}/rendered").content)).size == (128, 128)  # rendered without it
    palette = fresh("CT_small.dcm", PhotometricInterpretation="PALETTE COLOR")  # and no palette
    assert stow(http, [encode(palette)]).status_code == 200
    base = instance_path({"uid": palette.StudyInstanceUID}, palette)
    assert http.get(f"{base}/rendered").status_code == 406
    study_rendered = http.get(f"/studies/{palette.StudyInstanceUID}/rendered")
    assert study_rendered.status_code == 200 and split(study_rendered) == []  # left out, the body still whole
    assert http.get(f"{base}/metadata").status_code == 200


# -- WADO-RS: errors --------------------------------------------------------------------------


def test_unknown_and_invalid_uids(study: dict, http: httpx.Client) -> None:
    ds = study["datasets"][0]
    unknown = generate_uid()
    for url in (f"/studies/{unknown}", f"/studies/{unknown}/metadata", f"/studies/{unknown}/rendered",
                f"/studies/{study['uid']}/series/{unknown}", f"/studies/{study['uid']}/series/{unknown}/metadata",
                f"/studies/{study['uid']}/series/{ds.SeriesInstanceUID}/instances/{unknown}",
                f"/studies/{study['uid']}/series/{ds.SeriesInstanceUID}/instances/{unknown}/rendered",
                f"/studies/{study['uid']}/series/{ds.SeriesInstanceUID}/instances/{unknown}/frames/1"):
        response = http.get(url)
        assert response.status_code == 404, url
        assert "Traceback" not in response.text
    for url in ("/studies/1.2.3a", f"/studies/{'1.' * 40}1/metadata"):
        response = http.get(url)
        assert response.status_code == 400, (url, response.status_code)
    series, instance = ds.SeriesInstanceUID, ds.SOPInstanceUID
    for path in ("/studies/..", "/studies/%2e%2e", "/studies/../metadata", "/studies/%2E%2E/rendered",
                 f"/studies/{study['uid']}/series/../metadata", f"/studies/{study['uid']}/series/%2e%2e/rendered",
                 f"/studies/{study['uid']}/series/{series}/instances/..",
                 f"/studies/{study['uid']}/series/{series}/instances/../frames/1",
                 f"/studies/../series/{series}/instances/{instance}/bulkdata/00091010",
                 "/studies/../series/../instances/../rendered"):
        status, body = raw_get(http, path)  # `..` as sent: it reaches the handler, which refuses it
        assert status == 400 and "is not a valid UID" in body, (path, status, body[:200])
    for path in ("/studies/..%2f..%2fetc", f"/studies/{study['uid']}/series/..%2f..%2f/metadata"):
        assert raw_get(http, path)[0] == 404, path  # a slash, even encoded, is no part of a UID: no route


def test_bad_accept_is_406(study: dict, http: httpx.Client) -> None:
    url = f"/studies/{study['uid']}"
    assert http.get(url, headers={"Accept": "application/pdf"}).status_code == 406
    assert http.get(url, headers={"Accept": 'multipart/related; type="image/jpeg"'}).status_code == 406
    assert http.get(url, headers={"Accept": "application/dicom+json;q=0"}).status_code == 406
    assert http.get(url, headers={"Accept": "*/*"}).status_code == 200
    assert http.get(f"{url}/metadata", headers={"Accept": "application/json"}).status_code == 200
    assert http.get(f"{url}/metadata", params={"accept": "image/png"}).status_code == 406  # the query parameter wins


def test_accept_q_0_refuses_a_type(study: dict, http: httpx.Client) -> None:
    rendered = f"{instance_path(study, by_name(study, 'CT_small.dcm'))}/rendered"
    response = http.get(rendered, headers={"Accept": "*/*, image/jpeg;q=0"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    response = http.get(rendered, headers={"Accept": "image/*;q=0, image/png;q=0.5"})  # the more specific wins
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert http.get(rendered, headers={"Accept": "image/*, image/png;q=0, image/jpeg;q=0"}).status_code == 406
    assert http.get(rendered, params={"accept": "*/*, image/jpeg;q=0"}).headers["content-type"] == "image/png"
    url = f"/studies/{study['uid']}"
    assert http.get(url, headers={"Accept": f"*/*, {MULTIPART_DICOM}; q=0"}).status_code == 406
    assert http.get(url, headers={"Accept": f"multipart/related; q=0, {MULTIPART_DICOM}"}).status_code == 200
    assert http.get(f"{url}/metadata", headers={"Accept": "*/*, application/*;q=0"}).status_code == 406


def test_dicomweb_client_raises_on_unknown_study(dicomweb: DICOMwebClient) -> None:
    with pytest.raises(HTTPError):
        dicomweb.retrieve_study_metadata(generate_uid())


def raw_get(http: httpx.Client, path: str) -> tuple[int, str]:
    """GET `/dicomweb{path}` sent byte for byte on a socket: httpx resolves `..` segments before
    sending, so through it such a URL never reaches the server as written."""
    with socket.create_connection((http.base_url.host, http.base_url.port or 80), timeout=60) as connection:
        connection.sendall(f"GET /dicomweb{path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        received = bytearray()
        while chunk := connection.recv(1 << 16):
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("latin-1")


def test_no_file_outside_the_store_is_reachable(server: ServerProcess, http: httpx.Client) -> None:
    """A DICOM file beside the store, where `studies/..` would lead without the UID checks."""
    ds = fresh("CT_small.dcm")
    outside = server.data_dir / "dicom" / "outside"
    outside.mkdir()
    try:
        (outside / "secret.dcm").write_bytes(encode(ds))
        for path in ("/studies/../series/outside", "/studies/../series/outside/metadata",
                     "/studies/../series/outside/rendered", "/studies/../series/outside/instances/secret",
                     "/studies/%2e%2e/series/outside/instances/secret/metadata",
                     "/studies/../series/outside/instances/secret/frames/1"):
            status, body = raw_get(http, path)
            assert status == 400 and "is not a valid UID" in body, (path, status, body[:200])
            assert ds.SOPInstanceUID not in body
    finally:
        shutil.rmtree(outside)


# -- QIDO-RS ----------------------------------------------------------------------------------

STUDY_REQUIRED = ("00080020", "00080030", "00080050", "00080056", "00080061", "00080090", "00100010", "00100020",
                  "00100030", "00100040", "0020000D", "00200010", "00201206", "00201208", RETRIEVE_URL)
SERIES_REQUIRED = ("00080060", "0008103E", "0020000E", "00200011", "00201209", "00400244", "00400245", "00400275",
                   RETRIEVE_URL)
INSTANCE_REQUIRED = ("00080016", "00080018", "00080056", "00200013", "00280010", "00280011", "00280100",
                     "00280008", RETRIEVE_URL)


def search(http: httpx.Client, path: str, **params: object) -> list[dict]:
    response = http.get(path, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    return response.json()


def value(item: dict, tag: str) -> object:
    return (item.get(tag, {}).get("Value") or [None])[0]


def test_qido_studies_by_patient_name_date_and_modality(study: dict, http: httpx.Client) -> None:
    by_id = search(http, "/studies", PatientID="DW-1")
    assert [value(i, "0020000D") for i in by_id] == [study["uid"]]
    item = by_id[0]
    assert all(tag in item for tag in STUDY_REQUIRED), sorted(set(STUDY_REQUIRED) - set(item))
    assert value(item, RETRIEVE_URL).endswith(f"/dicomweb/studies/{study['uid']}")
    assert value(item, "00201208") == len(SAMPLES)
    assert "00080052" not in item  # C-FIND's QueryRetrieveLevel is not QIDO's
    assert set(item["00080061"]["Value"]) >= {"CT", "MR"}
    assert [value(i, "0020000D") for i in search(http, "/studies", PatientName="Dicomweb^A*")] == [study["uid"]]
    assert [value(i, "0020000D") for i in search(http, "/studies", **{"00100020": "DW-1"})] == [study["uid"]]
    assert search(http, "/studies", PatientID="DW-1", StudyDate="20240101-20240131")
    assert not search(http, "/studies", PatientID="DW-1", StudyDate="20240201-")
    assert search(http, "/studies", PatientID="DW-1", ModalitiesInStudy="MR")
    assert not search(http, "/studies", PatientID="DW-1", ModalitiesInStudy="US")
    assert search(http, "/studies", AccessionNumber="ACC-DW-1", StudyInstanceUID=f"{generate_uid()},{study['uid']}")
    assert search(http, "/studies", PatientName="nobody*") == []


def test_qido_fuzzy_matching_of_names(study: dict, http: httpx.Client) -> None:
    assert search(http, "/studies", PatientName="alice") == []
    fuzzy = search(http, "/studies", PatientName="alice", fuzzymatching="true", PatientID="DW-1")
    assert [value(i, "0020000D") for i in fuzzy] == [study["uid"]]
    assert search(http, "/studies", PatientID="DW-1", fuzzymatching="false")
    assert http.get("/studies", params={"fuzzymatching": "maybe"}).status_code == 400


def test_qido_limit_offset_and_includefield(http: httpx.Client, dicomweb: DICOMwebClient) -> None:
    patient = f"P{unique()}"
    uids = set()
    for k in range(3):
        ds = fresh("CT_small.dcm", PatientID=patient, StudyDescription=f"Study {k}")
        assert stow(http, [encode(ds)]).status_code == 200
        uids.add(ds.StudyInstanceUID)
    first = search(http, "/studies", PatientID=patient, limit=2)
    rest = search(http, "/studies", PatientID=patient, limit=2, offset=2)
    assert len(first) == 2 and len(rest) == 1
    assert {value(i, "0020000D") for i in first + rest} == uids
    assert search(http, "/studies", PatientID=patient, offset=3) == []
    described = search(http, "/studies", PatientID=patient, includefield="StudyDescription,00101010")
    assert {value(i, "00081030") for i in described} == {"Study 0", "Study 1", "Study 2"}
    assert all("00101010" in i for i in described)  # PatientAge, asked by tag
    everything = search(http, "/studies", PatientID=patient, includefield="all")
    assert all("00101010" in i and "00081030" in i for i in everything)
    via_client = dicomweb.search_for_studies(search_filters={"PatientID": patient}, fields=["StudyDescription"],
                                             limit=1)
    assert len(via_client) == 1 and value(via_client[0], "00081030").startswith("Study ")


def test_qido_series_and_instances(study: dict, http: httpx.Client, dicomweb: DICOMwebClient) -> None:
    uid = study["uid"]
    series = search(http, f"/studies/{uid}/series")
    assert len(series) == len(SAMPLES)
    for item in series:
        assert all(tag in item for tag in SERIES_REQUIRED), sorted(set(SERIES_REQUIRED) - set(item))
        assert value(item, RETRIEVE_URL).endswith(f"/studies/{uid}/series/{value(item, '0020000E')}")
    ct = by_name(study, "CT_small.dcm")
    assert [value(i, "0020000E") for i in search(http, f"/studies/{uid}/series", Modality="CT")] == [ct.SeriesInstanceUID]
    flat = search(http, "/series", PatientID="DW-1")  # relational: the study's attributes come too
    assert len(flat) == len(SAMPLES) and {value(i, "00100010")["Alphabetic"] for i in flat} == {"Dicomweb^Alice"}
    instances = search(http, f"/studies/{uid}/series/{ct.SeriesInstanceUID}/instances")
    assert [value(i, "00080018") for i in instances] == [ct.SOPInstanceUID]
    item = instances[0]
    assert all(tag in item for tag in INSTANCE_REQUIRED), sorted(set(INSTANCE_REQUIRED) - set(item))
    assert value(item, "00280010") == 128
    assert value(item, RETRIEVE_URL).endswith(f"/studies/{uid}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}")
    assert len(search(http, f"/studies/{uid}/instances")) == len(SAMPLES)
    everywhere = search(http, "/instances", StudyInstanceUID=uid, SOPClassUID=ct.SOPClassUID)
    assert [value(i, "00080018") for i in everywhere] == [ct.SOPInstanceUID]
    assert value(everywhere[0], "00100020") == "DW-1"
    assert len(dicomweb.search_for_series(uid)) == len(SAMPLES)
    assert len(dicomweb.search_for_instances(uid, ct.SeriesInstanceUID)) == 1
    assert search(http, f"/studies/{generate_uid()}/series") == []


@pytest.mark.parametrize(("path", "params", "status"), [
    ("/studies", {"NoSuchKeyword": "x"}, 400),
    ("/studies", {"limit": "-1"}, 400),
    ("/studies", {"limit": "abc"}, 400),
    ("/studies", {"limit": "0"}, 400),
    ("/studies", {"offset": "x"}, 400),
    ("/studies", {"Modality": "CT"}, 400),  # a series-level key cannot be matched at the study level
    ("/studies", {"StudyInstanceUID": "1.2.abc"}, 400),
    ("/studies", {"StudyDate": "2024-01-01-garbage"}, 400),
    ("/studies", {"NumberOfStudyRelatedInstances": "many"}, 400),
    ("/studies", {"ReferencedStudySequence": "x"}, 400),
    ("/studies", {"PatientName.PatientID": "x"}, 400),  # not a sequence
    ("/studies", {"ffffffff": "x"}, 400),
    ("/studies/1.2.x/series", {}, 400),
    ("/series", {"includefield": "Nonsense"}, 400),
])
def test_qido_bad_queries_are_400(http: httpx.Client, path: str, params: dict, status: int) -> None:
    response = http.get(path, params=params)
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text


def test_qido_accept(http: httpx.Client) -> None:
    assert http.get("/studies", headers={"Accept": "application/dicom+xml"}).status_code == 406
    assert http.get("/studies", headers={"Accept": 'multipart/related; type="application/dicom+xml"'}).status_code == 406
    assert http.get("/studies", headers={"Accept": "application/json"}, params={"limit": 1}).status_code == 200
