"""Page loads of the web console on 500 imported patients: server time per page.

Imports the retinal image manager's generated data set (`--num-sites 10 --num-patients 500`,
about 2,100 graded images, a third of the sites with DICOM cameras) and the EHR and interactions
sample data of tests/data into a fresh server on the embedded database, signs in as a
practitioner through the console's own flow, then requests each page `--reps` times in turn
(after two warm-up rounds, `--pause` seconds apart as between a person's clicks: back to back,
each page would also pay for the audit trail's writing of the previous pages' events) and prints the median and p95 of the server's own duration for each
(the access log's `duration_ms`, found by the request id the benchmark sends), with the
client's wall time beside it.

    python bench/console.py [--reps 20] [--patients 500] [--pause 0.3] [--keep DIR]

`--keep DIR` keeps the imported data in DIR, and a later run with the same DIR measures at once.
"""

import argparse
import html
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
PASSWORD = "S3cret-pass!"
EMAIL = "bench@clinic.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "fhir_server", *args], input=stdin.encode(), capture_output=True,
                          env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fhir-server {' '.join(args[:2])} failed:\n{done.stderr.decode()[-3000:]}")
    return done.stdout.decode()


def start(data_dir: Path, port: int, dicom_port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "fhir_server", "serve", "--port", str(port), "--data-dir",
                                    str(data_dir), "--dicom-port", str(dicom_port)], stdout=out, stderr=out, env=env)
    for _ in range(900):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the server stopped:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise SystemExit("the server did not start")


def import_data(url: str, dicom_port: int, patients: int) -> None:
    fhir = f"{url}/fhir"
    dicom = ["--dicom", f"127.0.0.1:{dicom_port}"]
    started = time.perf_counter()
    cli("import", "retinal", "--randomize", "--num-sites", "10", "--num-patients", str(patients), "--seed", "7",
        "--url", fhir, *dicom)
    cli("import", "ehr", str(DATA / "ehr" / "ehr.json"), str(DATA / "ehr" / "patients.csv"),
        str(DATA / "ehr" / "laboratory_results.csv"), "--url", fhir, *dicom)
    cli("import", "interactions", str(DATA / "interactions" / "interactions.json"), "--url", fhir)
    print(f"imported in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def settle(timeout_s: float = 900) -> None:
    """Wait until the machine is idle: after an import the server indexes its audit trail in the
    background (about 1,000 events a second), which would be measured with the pages."""
    def busy() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        work, total = busy()
        time.sleep(3)
        work2, total2 = busy()
        if (work2 - work) / max(total2 - total, 1) < 0.15:
            return
    print("the machine did not become idle; measuring anyway", file=sys.stderr)


def sign_in(http: httpx.Client) -> None:
    answer = http.get("/console/login")
    form = http.get(answer.headers["location"])
    fields = {k: html.unescape(v) for k, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                                                          form.text)}
    answer = http.post("/auth/authorize", data={**fields, "email": EMAIL, "password": PASSWORD})
    answer = http.get(answer.headers["location"])
    if answer.status_code != 303 or "console_at" not in http.cookies:
        raise SystemExit(f"sign-in failed: {answer.status_code} {answer.text[:500]}")


def first_id(http: httpx.Client, path: str, params: dict[str, str]) -> str:
    bundle = http.get(f"/fhir/{path}", params={**params, "_count": "1"}).json()
    return str(bundle["entry"][0]["resource"]["id"])


def pages(http: httpx.Client) -> list[tuple[str, str]]:
    """(name, path) of each page measured, with ids from the data set."""
    ehr = first_id(http, "Patient", {"identifier": "urn:fhir-server:source:ehr:patient|P001"})
    retinal = first_id(http, "Patient", {"identifier": "urn:fhir-server:source:retinal:patient|"})
    site = first_id(http, "Organization", {"identifier": "urn:fhir-server:source:retinal:site|"})
    encounter = first_id(http, "Encounter", {"_tag": "urn:fhir-server:interactions:label|"})
    study = http.get("/fhir/ImagingStudy", params={"_count": "1"}).json()["entry"][0]["resource"]
    series = study["series"][0]
    instance = f"{study['id']}/{series['uid']}/{series['instance'][0]['uid']}"
    media = http.get("/fhir/Media", params={"_count": "1"}).json()["entry"][0]["resource"]
    binary = media["content"]["url"].rsplit("/", 1)[-1]
    return [
        ("dashboard", "/console/"),
        ("dashboard: AI readiness (fetched after the page)", "/console/readiness?fragment=1"),
        ("patients", "/console/patients"),
        ("patients: statistics (fetched after the page)", "/console/statistics/patients?fragment=1"),
        ("patients, name search", "/console/patients?name=smith"),
        ("patient (EHR)", f"/console/patients/{ehr}"),
        ("patient (retinal)", f"/console/patients/{retinal}"),
        ("imaging gallery", "/console/imaging"),
        ("imaging, one site, left eye", f"/console/imaging?site=Organization/{site}&eye=left"),
        ("viewer (DICOM)", f"/console/imaging/view/dicom/{instance}"),
        ("thumbnail (DICOM)", f"/console/images/dicom/{instance}?size=256"),
        ("thumbnail (PNG)", f"/console/images/binary/{binary}?size=256"),
        ("upload", "/console/upload"),
        ("appointments", "/console/appointments"),
        ("interactions", "/console/interactions"),
        ("interaction", f"/console/interactions/{encounter}"),
        ("resource browser, Patient?name=smith", "/console/browse?type=Patient&q=name=smith"),
        ("resource browser, Observation?_count=20", "/console/browse?type=Observation&q=_count=20"),
        ("resource browser, one", f"/console/browse/Patient/{ehr}"),
        ("profile", "/console/profile"),
    ]


def durations(log: Path) -> dict[str, float]:
    found = {}
    for line in log.read_text(errors="replace").splitlines():
        if '"fhir_server.access"' in line and '"/console' in line:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            found[record.get("request_id", "")] = float(record.get("duration_ms", 0))
    return found


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(http: httpx.Client, log: Path, reps: int, pause: float) -> list[tuple[str, list[float], list[float]]]:
    targets = pages(http)
    sent: dict[str, list[tuple[str, float]]] = {name: [] for name, _ in targets}
    for round_ in range(reps + 2):
        for name, path in targets:
            time.sleep(pause)
            request_id = uuid.uuid4().hex
            began = time.perf_counter()
            answer = http.get(path, headers={"X-Request-ID": request_id})
            wall = (time.perf_counter() - began) * 1000
            if answer.status_code != 200:
                raise SystemExit(f"{path}: {answer.status_code} {answer.text[:500]}")
            if round_ >= 2:
                sent[name].append((request_id, wall))
    time.sleep(0.5)  # the access log is written as the response ends
    server = durations(log)
    return [(name, [server[r] for r, _ in sent[name] if r in server], [w for _, w in sent[name]])
            for name, _ in targets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between requests")
    parser.add_argument("--keep", type=Path, help="data folder kept between runs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-console-"))
    data_dir = args.keep or work / "data"
    fresh = not (data_dir / "db").exists()
    if fresh:
        data_dir.mkdir(parents=True, exist_ok=True)
        cli("accounts", "add", "--email", EMAIL, "--role", "practitioner", "--fhir-user", "Practitioner/bench",
            "--data-dir", str(data_dir), "--password-stdin", stdin=PASSWORD + "\n")
    port, dicom_port = free_port(), free_port()
    log = work / "server.log"
    server = start(data_dir, port, dicom_port, log)
    try:
        url = f"http://127.0.0.1:{port}"
        if fresh:
            import_data(url, dicom_port, args.patients)
        practitioner = {"resourceType": "Practitioner", "id": "bench", "name": [{"family": "Bench", "given": ["Dr"]}]}
        httpx.put(f"{url}/fhir/Practitioner/bench", json=practitioner, timeout=60).raise_for_status()  # the account's
        settle()
        with httpx.Client(base_url=url, timeout=120) as http:
            sign_in(http)
            totals = {t: http.get(f"/fhir/{t}", params={"_summary": "count"}).json()["total"]
                      for t in ("Patient", "Observation", "ImagingStudy", "Media", "Appointment", "Encounter")}
            results = measure(http, log, args.reps, args.pause)
        print(f"data: {', '.join(f'{n:,} {t}' for t, n in totals.items())}; "
              f"{args.reps} requests per page, {args.pause} s apart\n")
        print("| page | server p50 ms | server p95 ms | client p50 ms |")
        print("| --- | ---: | ---: | ---: |")
        for name, server_ms, wall_ms in results:
            print(f"| {name} | {statistics.median(server_ms):.0f} | {pct(server_ms, 0.95):.0f} | "
                  f"{statistics.median(wall_ms):.0f} |")
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
