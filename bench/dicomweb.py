"""DICOM query/retrieve and DICOMweb: this server next to Orthanc (with its DICOMweb plugin), in one run.

Both targets get the same instances by DCMTK `storescu` (TCP_NODELAY=1), generated from pydicom's
bundled test files with fresh UIDs:

- `--studies` small studies (1,000: 100 patients, `--per-study` CT/MR instances each), dates spread
  over 2023-2024, for the searches;
- `--large` CT instances of 1600 x 1600 16-bit pixels, about 5 MB each, in two studies: the
  first one's is retrieved by WADO-RS.

Both targets are started (on empty storage) and hold the same data; then they are measured in
`--rounds` interleaved rounds (this server, Orthanc, then Orthanc, this server...), so that
what the shared machine does meanwhile weighs on both alike. Over all rounds:

- QIDO-RS study search latency: each query of `QUERIES` `--repeat` times over one HTTP connection
  per round (httpx, sequential), median and p95; the answers of the two targets are compared
  (same StudyInstanceUIDs, same PatientID, StudyDate, AccessionNumber per study);
- WADO-RS study retrieval: `curl` of that study as `multipart/related; type="application/dicom"`,
  once per round, MB/s (median), the body size checked against the files sent;
- C-FIND latency: study-level Study Root queries by PatientID over one pynetdicom association
  per round, `--repeat` in all, median and p95;
- C-MOVE throughput: DCMTK `movescu` of `--move` small studies in all to a DCMTK `storescp` (the
  same destination AE for both targets), one movescu each, instances/s, the received count checked.

    python bench/dicomweb.py [--studies 1000] [--per-study 2] [--large 20] [--repeat 50] [--rounds 5]
                             [--only node|orthanc]

Needs DCMTK (storescu, storescp, movescu, echoscu), Orthanc and its DICOMweb plugin
(apt-get install dcmtk orthanc orthanc-dicomweb) and curl.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pydicom
from dicom_store import (
    CALLING_AET,
    ORTHANC,
    BenchError,
    Dataset,
    Node,
    Orthanc,
    Service,
    _echo,
    _free_port,
    _restamp,
    _settled_count,
    _wait_until,
    large_set,
    storescu,
)
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_node.reactors import pause_handshake
from dicom_node.sender import set_nodelay  # pynetdicom leaves Nagle's algorithm on

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DESTINATION_AET = "BENCHDEST"
PATIENTS = 100
# QIDO study searches: (name, query string, whole answers compared). A search with a limit has
# no defined order: only its size is compared. PatientName without `^`: Orthanc 1.10 matches no
# name when a query holds a component separator (`Bench^Patient04*` finds nothing there).
QUERIES = (
    ("by PatientID", "PatientID=BENCH-017", True),
    ("by PatientName wildcard", "PatientName=Bench*Patient04*", True),
    ("by StudyDate range", "StudyDate=20240101-20240630", True),
    ("by AccessionNumber", "AccessionNumber=BENCH00421", True),
    ("by ModalitiesInStudy", "ModalitiesInStudy=MR", True),
    ("first page of all (limit 100)", "limit=100", False),
)
COMPARED = ("0020000D", "00100020", "00080020", "00080050")  # StudyInstanceUID, PatientID, StudyDate, AccessionNumber


def search_set(folder: Path, studies: int, per_study: int) -> Dataset:
    """`studies` studies of `per_study` instances (CT or MR, alternately), over PATIENTS patients."""
    folder.mkdir(parents=True)
    sources = [pydicom.dcmread(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm")]
    result = Dataset("search", [], studies, studies, min(studies, PATIENTS))
    for study in range(studies):
        ds, study_uid, series_uid = sources[study % 2], generate_uid(), generate_uid()
        for number in range(1, per_study + 1):
            _restamp(ds, study % PATIENTS, study_uid, study, series_uid, 1, number)
            ds.PatientID, ds.PatientName = f"BENCH-{study % PATIENTS:03d}", f"Bench^Patient{study % PATIENTS:03d}"
            ds.AccessionNumber = f"BENCH{study:05d}"
            ds.StudyDate = f"{2023 + study % 2}{1 + study % 12:02d}{1 + study % 28:02d}"
            result.add(folder / f"{study:05d}-{number:03d}.dcm", ds)
    return result.done(folder)


class DicomWebNode(Node):
    label = "this server"

    def __init__(self, work: Path, env: dict[str, str], destination: int):
        super().__init__(work, {**env, "FHIR_DICOM_DESTINATIONS": f"{DESTINATION_AET}=127.0.0.1:{destination}"})
        self.dicomweb = ""

    def start(self) -> None:
        super().start()
        self.dicomweb = f"{self.url}/dicomweb"


class DicomWebOrthanc(Orthanc):
    def __init__(self, work: Path, env: dict[str, str], destination: int):
        super().__init__(work, env)
        self.destination = destination
        self.dicomweb = ""

    def config(self) -> dict[str, object]:
        return {
            **super().config(),
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "MainDicomTags"},
            "DicomModalities": {"dest": [DESTINATION_AET, "127.0.0.1", self.destination]},
            # queries and retrieves from an SCU not in DicomModalities, as for the node
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True, "DicomAlwaysAllowGet": True,
        }

    def start(self) -> None:
        super().start()
        self.dicomweb = f"{self.url}/dicom-web"


def _ms(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered) * 1000, ordered[max(0, int(len(ordered) * 0.95) - 1)] * 1000


def qido(target: Node | Orthanc, repeat: int) -> dict[str, tuple[list[float], list[dict[str, object]]]]:
    """Per query: `repeat` latencies (s), and the answer's key attributes."""
    results = {}
    with httpx.Client(timeout=60, headers={"Accept": "application/dicom+json"}) as client:
        for name, query, _ in QUERIES:
            url = f"{target.dicomweb}/studies?{query}"
            answer = client.get(url)
            if answer.status_code not in (200, 204):
                raise BenchError(f"{target.label}: GET {url}: {answer.status_code} {answer.text[:300]}")
            found = answer.json() if answer.status_code == 200 else []
            keys = sorted(({k: (s.get(k, {}).get("Value") or [None])[0] for k in COMPARED} for s in found),
                          key=lambda s: str(s["0020000D"]))
            timings = []
            for _ in range(repeat):
                started = time.perf_counter()
                client.get(url).raise_for_status()
                timings.append(time.perf_counter() - started)
            results[name] = (timings, keys)
    return results


def wado(target: Node | Orthanc, study: str, expected_bytes: int) -> float:
    """MB/s of the whole large study as multipart/related, by curl."""
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", "-H",
         'Accept: multipart/related; type="application/dicom"', f"{target.dicomweb}/studies/{study}"],
        capture_output=True, text=True, timeout=600, check=True)
    size, seconds = done.stdout.split()
    if int(size) < 0.99 * expected_bytes:  # each target writes its own File Meta header
        raise BenchError(f"{target.label}: WADO-RS gave {size} bytes, the files sent hold {expected_bytes}")
    return int(size) / 1e6 / float(seconds)


def cfind(target: Node | Orthanc, queries: range) -> tuple[list[float], int]:
    """Latencies (s) of study-level C-FIND by PatientID (patient k of `queries` each), and the
    matches of the last one."""
    pause_handshake()  # else pynetdicom may take a response for a request, and wait out its DIMSE timeout
    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", target.dicom_port, ae_title=target.aet, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        raise BenchError(f"{target.label}: no C-FIND association")
    timings, matches = [], 0
    try:
        for k in queries:
            query = pydicom.Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.PatientID = f"BENCH-{k % PATIENTS:03d}"
            query.StudyInstanceUID = query.StudyDate = query.AccessionNumber = ""
            started = time.perf_counter()
            matches = sum(1 for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                          if status and status.Status in (0xFF00, 0xFF01))
            timings.append(time.perf_counter() - started)
    finally:
        assoc.release()
    return timings, matches


def cmove(target: Node | Orthanc, env: dict[str, str], destination: Path, studies: list[str], port: int) -> tuple[int, float]:
    """Instances moved and seconds taken moving `studies` (one movescu each) to the storescp."""
    before = sum(1 for _ in destination.rglob("*.dcm"))
    argv = ["movescu", "-S", "-aet", CALLING_AET, "-aec", target.aet, "-aem", DESTINATION_AET, "-k", "QueryRetrieveLevel=STUDY"]
    started = time.perf_counter()
    for study in studies:
        done = subprocess.run([*argv, "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(target.dicom_port)],
                              env=env, capture_output=True, timeout=600)
        if done.returncode:
            raise BenchError(f"{target.label}: movescu failed: {done.stderr.decode()[-500:]}")
    seconds = time.perf_counter() - started
    return sum(1 for _ in destination.rglob("*.dcm")) - before, seconds


def _share(total: int, rounds: int, r: int) -> range:
    """Round r's part of `total` (0..total-1 split in `rounds` near-equal parts)."""
    return range(total * r // rounds, total * (r + 1) // rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--per-study", type=int, default=2)
    parser.add_argument("--large", type=int, default=20, help="5 MB instances of the retrieved study")
    parser.add_argument("--repeat", type=int, default=50, help="requests per QIDO query and C-FIND")
    parser.add_argument("--move", type=int, default=50, help="small studies moved by C-MOVE")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds")
    parser.add_argument("--only", choices=("node", "orthanc"), action="append")
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "movescu", "echoscu", "curl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed: apt-get install dcmtk curl")
    order = [t for t in ("node", "orthanc") if not args.only or t in args.only]
    if "orthanc" in order and not (Path(ORTHANC).exists() and Path(DICOMWEB_PLUGIN).exists()):
        raise SystemExit("Orthanc and its DICOMweb plugin are needed: apt-get install orthanc orthanc-dicomweb")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {**os.environ, "TCP_NODELAY": "1"}
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    results: dict[str, dict[str, object]] = {}
    labels: dict[str, str] = {}
    try:
        search = search_set(work / "search", args.studies, args.per_study)
        large = large_set(work / "large", args.large)
        large_study = str(pydicom.dcmread(large.files[0], stop_before_pixels=True).StudyInstanceUID)
        large_bytes = sum(f.stat().st_size for f in large.files if
                          str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) == large_study)
        moved_studies = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                                for f in search.files[: args.move * args.per_study]})
        print(f"generated {len(search.files)} search instances ({search.studies} studies) and {len(large.files)} "
              f"large ones ({large.bytes / 1e6:.0f} MB)", flush=True)
        targets: dict[str, DicomWebNode | DicomWebOrthanc] = {}
        destinations: dict[str, tuple[Service, Path, int]] = {}
        try:
            for name in order:
                received = work / f"moved-{name}"
                received.mkdir()
                dest_port = _free_port()
                destinations[name] = (Service("storescp", ["storescp", "-aet", DESTINATION_AET, "+B", "-fe", ".dcm", "-od",
                                                           str(received), str(dest_port)], env, work / f"storescp-{name}.log"),
                                      received, dest_port)
                cls = DicomWebNode if name == "node" else DicomWebOrthanc
                target = targets[name] = cls(work / name, env, dest_port)
                target.work.mkdir()
                target.start()
                for data in (search, large):
                    _, errors = storescu(env, target.aet, target.dicom_port, data, target.work / f"storescu-{data.name}.log")
                    if errors:
                        raise BenchError(f"{target.label}: storescu: {errors[:3]}")
                expected = len(search.files) + len(large.files)
                stored, _ = _settled_count(target, expected)
                if stored != expected:
                    raise BenchError(f"{target.label}: holds {stored} instances of {expected}")
                labels[name] = target.label
                dest, _, dest_port = destinations[name]
                _wait_until(dest, lambda port=dest_port: _echo(env, DESTINATION_AET, port), "C-ECHO answer from storescp")
                results[name] = {"qido": {}, "wado": [], "cfind": ([], 0), "cmove": (0, 0.0)}
            for r in range(args.rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    target, got = targets[name], results[name]
                    _, received, dest_port = destinations[name]
                    for query, (timings, keys) in qido(target, len(_share(args.repeat, args.rounds, r))).items():
                        got["qido"].setdefault(query, ([], keys))[0].extend(timings)  # type: ignore[union-attr]
                    got["wado"].append(wado(target, large_study, large_bytes))  # type: ignore[union-attr]
                    timings, matches = cfind(target, _share(args.repeat, args.rounds, r))
                    got["cfind"] = (got["cfind"][0] + timings, matches)  # type: ignore[index]
                    part = _share(len(moved_studies), args.rounds, r)
                    moved, seconds = cmove(target, env, received, moved_studies[part.start:part.stop], dest_port)
                    got["cmove"] = (got["cmove"][0] + moved, got["cmove"][1] + seconds)  # type: ignore[index]
                print(f"round {r + 1} of {args.rounds} done", flush=True)
        finally:
            for target in targets.values():
                target.stop()
            for dest, _, _ in destinations.values():
                dest.stop()
    except BenchError as exc:
        raise SystemExit(f"{exc}\n(logs in {work})") from None
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    report(order, labels, results, args)


def report(order: list[str], labels: dict[str, str], results: dict[str, dict[str, object]], args: argparse.Namespace) -> None:
    print(f"\nDICOM query/retrieve and DICOMweb, {args.studies} studies of {args.per_study} instances + one study of "
          f"{args.large} x 5 MB, {args.rounds} interleaved rounds, {os.cpu_count()} cores, TCP_NODELAY=1")
    print(f"{'measure':<44}" + "".join(f"{labels[t]:>22}" for t in order)
          + ("   ratio (node / Orthanc, >1 = better)" if len(order) == 2 else ""))
    rows: list[tuple[str, list[float], bool]] = []  # (name, values, lower is better)
    for name, *_ in QUERIES:
        latencies = [_ms(results[t]["qido"][name][0]) for t in order]  # type: ignore[index]
        rows.append((f"QIDO {name}: median ms", [m for m, _ in latencies], True))
        rows.append((f"QIDO {name}: p95 ms", [p for _, p in latencies], True))
    rows.append(("WADO-RS study retrieval MB/s", [statistics.median(results[t]["wado"]) for t in order], False))  # type: ignore[arg-type]
    latencies = [_ms(results[t]["cfind"][0]) for t in order]  # type: ignore[index]
    rows.append(("C-FIND study by PatientID: median ms", [m for m, _ in latencies], True))
    rows.append(("C-FIND study by PatientID: p95 ms", [p for _, p in latencies], True))
    rows.append(("C-MOVE instances/s", [results[t]["cmove"][0] / results[t]["cmove"][1] for t in order], False))  # type: ignore[index]
    for title, values, lower in rows:
        ratio = ""
        if len(values) == 2 and values[0] and values[1]:
            ratio = f"{(values[1] / values[0]) if lower else (values[0] / values[1]):>12.2f}"
        print(f"{title:<44}" + "".join(f"{v:>22,.2f}" for v in values) + ratio)
    problems = []
    if len(order) == 2:
        for name, _, whole in QUERIES:
            mine, theirs = (results[t]["qido"][name][1] for t in order)  # type: ignore[index]
            same = mine == theirs if whole else len(mine) == len(theirs)
            print(f"check: QIDO {name}: {len(mine)} and {len(theirs)} studies, "
                  + (("same answers" if whole else "as many") if same else "ANSWERS DIFFER"))
            if not same:
                problems.append(f"QIDO {name}: the answers differ (first: {mine[:1]} vs {theirs[:1]})")
    for t in order:
        print(f"check: {labels[t]}: C-MOVE delivered {results[t]['cmove'][0]} instances")  # type: ignore[index]
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
