"""DICOM C-STORE into this node, next to DCMTK storescp (the ceiling) and Orthanc, in one run.

Two sets of instances are generated in a temporary folder from pydicom's bundled test files,
with fresh UIDs:

- small: `--small` instances (500: 10 studies of 50 instances in 2 to 5 series, 5 patients with
  2 studies each), each series made from one test file (CT, MR and secondary-capture images, in
  their own transfer syntax: explicit and implicit VR little endian, RLE, JPEG baseline, JPEG
  lossless, JPEG-LS lossless, JPEG 2000 lossless);
- large: `--large` CT instances (20, two studies) of 1600 x 1600 16-bit pixels, about 5 MB each,
  explicit VR little endian.

Each set is sent by DCMTK `storescu` over one association (only the presentation contexts the
files need, each file in its own transfer syntax), `TCP_NODELAY=1` in the environment of the
DCMTK tools and of Orthanc, and timed from storescu's start to its exit, against:

- this node: `python -m fhir_server serve --dicom-port ... --dicom-aet FHIRSERVER` on its
  embedded database; after each set, `GET /fhir/ImagingStudy?_elements=numberOfInstances` must
  add up to the instances sent;
- DCMTK `storescp` (receive only: writes each data set as received, `+B`): the ceiling;
- Orthanc (its own SQLite index and file storage, no plugins, no compression); after each set,
  `GET /statistics` CountInstances must match.

Each target is started afresh for each round on empty storage and gets one warm-up instance
(not timed) before the two sets. Every receiver keeps its default maximum PDU (16 KB).
Figures are medians over `--rounds`; MB are 10^6 bytes of the files sent. Without TCP_NODELAY
(Nagle's algorithm against delayed ACKs on loopback) storescp and Orthanc alike fall to about
11 small instances/s.

    python bench/dicom_store.py [--small 500] [--large 20] [--rounds 1] [--only node|storescp|orthanc]

Needs DCMTK (storescu, storescp, echoscu) and Orthanc (apt-get install dcmtk orthanc).
"""

import argparse
import array
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("node", "storescp", "orthanc")
NODE_AET, STORESCP_AET, ORTHANC_AET, CALLING_AET = "FHIRSERVER", "STORESCP", "ORTHANC", "BENCHSCU"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
if sys.prefix != sys.base_prefix:  # DCMTK's tools, not pynetdicom's apps of the same names in the venv
    os.environ["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                         if d and Path(d).resolve() != Path(sys.prefix, "bin").resolve())
# The series of the small set take their pixels and attributes from these files in turn.
SMALL_SOURCES = (
    "CT_small.dcm",  # CT, explicit VR little endian, 39 KB
    "MR_small.dcm",  # MR, explicit VR little endian, 10 KB
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small_RLE.dcm",  # RLE lossless
    "CT_small.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # secondary capture, JPEG baseline
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small.dcm",
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, first-order prediction
)
STUDIES, PATIENTS = 10, 5
LARGE_SIDE = 1600  # pixels; 16 bits: 5.12 MB of pixel data
STORESCU_TIMEOUT_S = 900
START_TIMEOUT_S = 180
INDEX_WAIT_S = 60


class BenchError(RuntimeError):
    pass


@dataclass
class Dataset:
    name: str
    files: list[Path]
    studies: int
    series: int
    patients: int
    syntaxes: Counter = field(default_factory=Counter)
    contexts: set[tuple[str, str]] = field(default_factory=set)  # (SOP class, transfer syntax) of the files
    bytes: int = 0
    config: Path | None = None  # storescu's association profile for these files

    def add(self, path: Path, ds: pydicom.Dataset) -> None:
        ds.save_as(path, enforce_file_format=True)
        self.files.append(path)
        syntax = ds.file_meta.TransferSyntaxUID
        self.syntaxes[syntax.name] += 1
        self.contexts.add((str(ds.SOPClassUID), str(syntax)))

    def done(self, folder: Path) -> "Dataset":
        self.bytes = sum(f.stat().st_size for f in self.files)
        self.config = folder / "storescu.cfg"
        self.config.write_text(storescu_profile(self.contexts))
        return self


@dataclass
class Sent:
    seconds: float
    stored: int  # what the target reports holding after the set (warm-up included)
    expected: int
    lag: float | None  # seconds after storescu's exit until the target reported all, if it lagged
    failures: list[str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the instances ---------------------------------------------------------------------------


def _restamp(ds: pydicom.Dataset, patient: int, study_uid: str, study: int, series_uid: str, series: int,
             number: int) -> str:
    ds.PatientID = f"BENCH-{patient:03d}"
    ds.PatientName = f"Bench^Patient{patient:03d}"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = f"S{study:03d}"
    ds.AccessionNumber = f"BENCH{study:05d}"
    ds.StudyDescription = f"bench study {study}"
    ds.StudyDate = f"2024{1 + study % 12:02d}{1 + study % 28:02d}"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series
    ds.InstanceNumber = number
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    return uid


def small_set(folder: Path, count: int, seed: int = 1) -> Dataset:
    """`count` instances over 10 studies (5 patients, 2 studies each), 2 to 5 series a study."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    sources = {name: pydicom.dcmread(get_testdata_file(name)) for name in set(SMALL_SOURCES)}
    for ds in sources.values():
        if ds["PixelData"].is_undefined_length:
            ds["PixelData"].VR = "OB"  # some of the test files say OW: encapsulated pixel data is OB
    per_study = [count // STUDIES + (1 if s < count % STUDIES else 0) for s in range(STUDIES)]
    result = Dataset("small", [], 0, 0, PATIENTS)
    series_total = 0
    for study, in_study in enumerate(per_study):
        if not in_study:
            continue
        study_uid = generate_uid()
        result.studies += 1
        n_series = min(rng.randint(2, 5), in_study)
        sizes = [in_study // n_series + (1 if k < in_study % n_series else 0) for k in range(n_series)]
        for series, size in enumerate(sizes, start=1):
            name = SMALL_SOURCES[series_total % len(SMALL_SOURCES)]
            series_total += 1
            ds, series_uid = sources[name], generate_uid()
            for number in range(1, size + 1):
                _restamp(ds, study % PATIENTS, study_uid, study, series_uid, series, number)
                path = folder / f"{study:03d}-{series:02d}-{number:04d}.dcm"
                result.add(path, ds)
    result.series = series_total
    return result.done(folder)


def large_set(folder: Path, count: int) -> Dataset:
    """`count` CT instances of 1600 x 1600 16-bit pixels, explicit VR little endian, 2 studies."""
    folder.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    pixels = array.array("H", (((x + y) * 3) & 0x0FFF for y in range(LARGE_SIDE) for x in range(LARGE_SIDE)))
    if sys.byteorder != "little":
        pixels.byteswap()
    ds.Rows = ds.Columns = LARGE_SIDE
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    result = Dataset("large", [], 0, 0, 1)
    studies = 2 if count > 1 else 1
    for study in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        result.studies += 1
        result.series += 1
        for number in range(1, count // studies + (1 if study < count % studies else 0) + 1):
            _restamp(ds, 900, study_uid, 900 + study, series_uid, 1, number)
            path = folder / f"{study:03d}-01-{number:04d}.dcm"
            result.add(path, ds)
    return result.done(folder)


def warmup_set(folder: Path) -> Dataset:
    folder.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    _restamp(ds, 999, generate_uid(), 999, generate_uid(), 1, 1)
    result = Dataset("warm-up", [], 1, 1, 1)
    result.add(folder / "warmup.dcm", ds)
    return result.done(folder)


def storescu_profile(contexts: set[tuple[str, str]]) -> str:
    """A storescu association profile (`-xf FILE Bench`) proposing, for each SOP class of the
    files, one presentation context per transfer syntax they are in, with that syntax only (and
    implicit VR little endian next to explicit), as a modality sending stored images as they are."""
    syntaxes = sorted({ts for _, ts in contexts})
    lines = ["[[TransferSyntaxes]]"]
    for k, ts in enumerate(syntaxes, start=1):
        lines += [f"[TS{k}]", f"TransferSyntax1 = {ts}"]
        if ts == pydicom.uid.ExplicitVRLittleEndian:
            lines.append(f"TransferSyntax2 = {pydicom.uid.ImplicitVRLittleEndian}")
    lines += ["", "[[PresentationContexts]]", "[Bench]"]
    for k, (sop, ts) in enumerate(sorted(contexts), start=1):
        lines.append(f"PresentationContext{k} = {sop}\\TS{syntaxes.index(ts) + 1}")
    lines += ["", "[[Profiles]]", "[Bench]", "PresentationContexts = Bench", ""]
    return "\n".join(lines)


# --- the processes ---------------------------------------------------------------------------


class Service:
    """A server process in its own process group, its output in `log`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.name, self.log_path = name, log
        self._log: IO[bytes] = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}:\n{_tail(self.log_path)}")

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # what it started itself (the node's embedded database) gets a moment to follow it
        deadline = time.monotonic() + 15
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def _echo(env: dict[str, str], aet: str, port: int) -> bool:
    try:
        return subprocess.run(["echoscu", "-aet", CALLING_AET, "-aec", aet, "-to", "2", "-ta", "5", "127.0.0.1",
                               str(port)], env=env, capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _wait_until(service: Service, ready, what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.check_alive()
        if ready():
            return
        time.sleep(0.2)
    raise BenchError(f"{service.name}: no {what} after {timeout:.0f} s:\n{_tail(service.log_path)}")


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Target:
    label = ""
    aet = ""

    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env = work, env
        self.dicom_port = _free_port()
        self.service: Service | None = None

    def start(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        """The instances the target holds."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def _wait_echo(self) -> None:
        assert self.service is not None
        _wait_until(self.service, lambda: _echo(self.env, self.aet, self.dicom_port), "C-ECHO answer")


class Node(Target):
    label = "this node (fhir_server serve)"
    aet = NODE_AET

    def start(self) -> None:
        self.http_port = _free_port()
        env = {k: v for k, v in self.env.items() if k != "MONGODB_URI"}  # the embedded database
        env["FHIR_LOG_LEVEL"] = "WARNING"
        self.service = Service("the node", [
            sys.executable, "-m", "fhir_server", "serve", "--port", str(self.http_port),
            "--data-dir", str(self.work / "data"), "--dicom-port", str(self.dicom_port), "--dicom-aet", self.aet,
        ], env, self.work / "node.log", cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        _wait_until(self.service, lambda: _http_ok(f"{self.url}/health"), "GET /health = 200")
        self._wait_echo()

    def count(self) -> int:
        total = 0
        url: str | None = f"{self.url}/fhir/ImagingStudy?_count=100&_elements=numberOfInstances"
        with httpx.Client(timeout=60, headers={"Accept": "application/fhir+json"}) as client:
            while url:
                answer = client.get(url)
                if answer.status_code != 200:
                    raise BenchError(f"GET {url}: {answer.status_code} {answer.text[:500]}")
                bundle = answer.json()
                total += sum(e.get("resource", {}).get("numberOfInstances", 0) for e in bundle.get("entry", []))
                url = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
        return total


class StoreScp(Target):
    label = "DCMTK storescp (receive only, +B)"
    aet = STORESCP_AET

    def start(self) -> None:
        self.out = self.work / "received"
        self.out.mkdir(parents=True)
        self.service = Service("storescp", [
            "storescp", "-aet", self.aet, "+xa", "+B", "-dhl", "-od", str(self.out), str(self.dicom_port),
        ], self.env, self.work / "storescp.log")
        self._wait_echo()

    def count(self) -> int:
        return sum(1 for f in self.out.rglob("*") if f.is_file() and f.stat().st_size > 0)


class Orthanc(Target):
    label = "Orthanc"
    aet = ORTHANC_AET

    def start(self) -> None:
        self.http_port = _free_port()
        path = self.work / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        self.service = Service("Orthanc", [ORTHANC, str(path)], self.env, self.work / "orthanc.log", cwd=self.work)
        self.url = f"http://127.0.0.1:{self.http_port}"
        _wait_until(self.service, lambda: _http_ok(f"{self.url}/system"), "GET /system = 200")
        self._wait_echo()
        self.label = f"Orthanc {httpx.get(f'{self.url}/system', timeout=10).json().get('Version', '')}".strip()

    def config(self) -> dict[str, object]:
        """Orthanc's configuration file (bench/dicomweb.py adds its DICOMweb plugin)."""
        return {
            "Name": "bench", "StorageDirectory": str(self.work / "storage"), "IndexDirectory": str(self.work / "index"),
            "StorageCompression": False, "DicomServerEnabled": True, "DicomAet": self.aet,
            "DicomPort": self.dicom_port, "HttpServerEnabled": True, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False,
            "DicomModalities": {}, "Plugins": [], "LuaScripts": [], "SaveJobs": False,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"], "UnknownSopClassAccepted": True,
            "OverwriteInstances": False, "MaximumStorageSize": 0, "MaximumPatientCount": 0,
        }

    def count(self) -> int:
        return int(httpx.get(f"{self.url}/statistics", timeout=60).json()["CountInstances"])


def storescu(env: dict[str, str], aet: str, port: int, data: Dataset, log: Path) -> tuple[float, list[str]]:
    """Seconds from storescu's start to its exit sending `data` over one association, and its errors.

    The association proposes the presentation contexts of `data.config` (each file goes in its own
    transfer syntax); `-nh`: go on past a failed store (the count check reports it)."""
    assert data.config is not None
    argv = ["storescu", "-xf", str(data.config), "Bench", "-nh", "-aet", CALLING_AET, "-aec", aet,
            "-to", "30", "-ta", "30", "127.0.0.1", str(port), *map(str, data.files)]
    with open(log, "ab") as out:
        started = time.perf_counter()
        try:
            done = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=STORESCU_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"storescu did not finish in {STORESCU_TIMEOUT_S} s:\n{_tail(log)}") from exc
        seconds = time.perf_counter() - started
    errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(("E:", "F:"))]
    if done.returncode:
        errors.append(f"storescu exit status {done.returncode}")
    return seconds, errors


def _settled_count(target: Target, expected: int) -> tuple[int, float | None]:
    """The target's count right after storescu's exit; if short, polled until complete or INDEX_WAIT_S."""
    started = time.perf_counter()
    stored = target.count()
    if stored == expected:
        return stored, None
    while time.perf_counter() - started < INDEX_WAIT_S:
        time.sleep(0.25)
        stored = target.count()
        if stored == expected:
            return stored, time.perf_counter() - started
    return stored, None


def run_target(target: Target, sets: list[Dataset], warmup: Dataset) -> dict[str, Sent]:
    """Start `target`, send the warm-up then each set over its own association, stop it."""
    results: dict[str, Sent] = {}
    try:
        target.start()
        _, errors = storescu(target.env, target.aet, target.dicom_port, warmup, target.work / "storescu-warmup.log")
        expected = len(warmup.files)
        if errors:
            raise BenchError(f"{target.label}: the warm-up instance failed:\n" + "\n".join(errors[:10]))
        _settled_count(target, expected)
        for data in sets:
            seconds, errors = storescu(target.env, target.aet, target.dicom_port, data,
                                       target.work / f"storescu-{data.name}.log")
            expected += len(data.files)
            stored, lag = _settled_count(target, expected)
            results[data.name] = Sent(seconds, stored, expected, lag, errors)
    finally:
        target.stop()
    return results


# --- the report ------------------------------------------------------------------------------


SHORT = {
    "Explicit VR Little Endian": "explicit VR LE", "Implicit VR Little Endian": "implicit VR LE", "RLE Lossless": "RLE",
    "JPEG Baseline (Process 1)": "JPEG baseline", "JPEG 2000 Image Compression (Lossless Only)": "JPEG 2000 lossless",
    "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])": "JPEG lossless SV1",
    "JPEG-LS Lossless Image Compression": "JPEG-LS lossless",
}


def _describe(data: Dataset) -> str:
    mb = data.bytes / 1e6
    syntaxes = ", ".join(f"{SHORT.get(name, name)} {n}" for name, n in data.syntaxes.most_common())
    return (f"{data.name}: {len(data.files)} instances, {data.patients} patient(s), {data.studies} studies, "
            f"{data.series} series, {mb:.1f} MB ({mb / len(data.files) * 1000:.0f} KB each): {syntaxes}")


def report(small: Dataset, large: Dataset, order: list[str], labels: dict[str, str],
           runs: dict[str, list[dict[str, Sent]]], rounds: int) -> None:
    version = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"DICOM C-STORE with storescu ({version.strip('$ ')}), one association per set, TCP_NODELAY=1, "
          f"{os.cpu_count()} cores, median of {rounds} round(s)")
    print(_describe(small))
    print(_describe(large))

    def median(target: str, name: str, data: Dataset, per: str) -> float:
        rates = [(len(data.files) if per == "inst" else data.bytes / 1e6) / r[name].seconds for r in runs[target]]
        return statistics.median(rates)

    columns = (("small inst/s", "small", small, "inst"), ("small MB/s", "small", small, "mb"),
               ("large MB/s", "large", large, "mb"), ("large inst/s", "large", large, "inst"))
    table = {t: [median(t, name, data, per) for _, name, data, per in columns] for t in order}
    print(f"{'target':<38}" + "".join(f"{title:>14}" for title, *_ in columns))
    for target in order:
        print(f"{labels[target]:<38}" + "".join(f"{v:>14,.1f}" for v in table[target]))
    if "node" in table:
        for other in ("storescp", "orthanc"):
            if other in table:
                print(f"{'ratio node / ' + labels[other].split(' (')[0]:<38}"
                      + "".join(f"{a / b:>14.2f}" for a, b in zip(table["node"], table[other], strict=True)))
    problems = []
    for target in order:
        how = "ImagingStudy numberOfInstances summed" if target == "node" else "instances"
        for name in ("small", "large"):
            sent = [r[name] for r in runs[target]]
            lags = [s.lag for s in sent if s.lag is not None]
            complete = sum(s.stored == s.expected for s in sent)
            state = (f"complete at storescu's exit in {complete - len(lags)} of {len(sent)} round(s)"
                     + (f", {max(lags):.2f} s after it at worst in {len(lags)}" if lags else ""))
            print(f"check: {labels[target]}, after the {name} set: {how} {', '.join(str(s.stored) for s in sent)}"
                  f" of {sent[0].expected} sent (warm-up included): {state}")
            for k, one in enumerate(sent, start=1):
                where = f"{labels[target]}, round {k}, {name} set"
                if one.stored != one.expected:
                    problems.append(f"{where}: holds {one.stored} instances, {one.expected} sent")
                if one.failures:
                    problems.append(f"{where}: storescu reported {len(one.failures)} error(s), first: "
                                    + " | ".join(one.failures[:3]))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=500, help="small instances (10 studies)")
    parser.add_argument("--large", type=int, default=20, help="5 MB instances (2 studies)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each starts every target afresh")
    parser.add_argument("--only", choices=TARGETS, action="append", help="this target only (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) for debugging")
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "echoscu"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed: apt-get install dcmtk")
    order = [t for t in TARGETS if not args.only or t in args.only]
    if "orthanc" in order and not Path(ORTHANC).exists():
        raise SystemExit("Orthanc is needed: apt-get install orthanc")
    # SIGTERM (a timeout from outside) unwinds through the finally blocks like Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {**os.environ, "TCP_NODELAY": "1"}
    work = Path(tempfile.mkdtemp(prefix="bench-dicom-store-"))
    classes = {"node": Node, "storescp": StoreScp, "orthanc": Orthanc}
    labels = {t: classes[t].label for t in order}
    runs: dict[str, list[dict[str, Sent]]] = {t: [] for t in order}
    try:
        started = time.perf_counter()
        small = small_set(work / "small", args.small)
        large = large_set(work / "large", args.large)
        warmup = warmup_set(work / "warmup")
        print(f"generated {len(small.files) + len(large.files)} instances in {time.perf_counter() - started:.1f} s",
              flush=True)
        for k in range(args.rounds):
            for name in order:
                target = classes[name](work / f"{name}-{k}", env)
                target.work.mkdir()
                results = run_target(target, [small, large], warmup)
                labels[name] = target.label
                runs[name].append(results)
                print(f"round {k + 1}: {target.label}: small {results['small'].seconds:.2f} s, "
                      f"large {results['large'].seconds:.2f} s", flush=True)
                if not args.keep:
                    shutil.rmtree(target.work, ignore_errors=True)
    except BenchError as exc:
        raise SystemExit(f"{exc}\n(logs in {work})" if args.keep else str(exc)) from None
    finally:
        if args.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(small, large, order, labels, runs, args.rounds)


if __name__ == "__main__":
    main()
