"""Search on 100,000 resources in the embedded database: the server (HTTP) next to pymongo.

Loads the Synthea bundles of ../shared/synthea-r4 repeated with fresh ids (and fresh patient
identifiers) until `--n` resources are stored, indexed exactly as the server indexes them;
starts the server on that database; then, per query shape, prints p50/p95 latency through HTTP
and the same query issued directly with pymongo on the indexed fields (filters built by the
server's own translation), and their ratio. Last, the write-path cost of indexing: Patient
creates/s (wrk, 8 clients) with search indexing on and off.

    python bench/search.py [--n 100000] [--reps 30]

Needs `wrk` (apt-get install wrk).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pymongo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from crud import run_wrk  # noqa: E402

from fhir_server.fhir_json import loads  # noqa: E402
from fhir_server.search.criteria import parse_search  # noqa: E402
from fhir_server.search.to_mongo import sort_spec, to_filter  # noqa: E402
from fhir_server.storage.embedded import EmbeddedDatabase  # noqa: E402
from fhir_server.storage.repository import current_document  # noqa: E402

SYNTHEA = ROOT.parent / "shared" / "synthea-r4"
DB = "bench_search"
UUID_REF = re.compile(r'"urn:uuid:([0-9a-f-]{36})"')


def _bundles() -> list[list[dict[str, Any]]]:
    return [loads(path.read_bytes())["entry"] for path in sorted(SYNTHEA.glob("*.json"))]


def load(uri: str, n: int) -> dict[str, Any]:
    """Store about `n` resources; returns facts the queries need (a patient, its identifier…)."""
    bundles = _bundles()
    client: pymongo.MongoClient = pymongo.MongoClient(uri, tz_aware=True)
    db = client[DB]
    stored, copy, batch = 0, 0, {}
    facts: dict[str, Any] = {}
    started = time.perf_counter()
    while stored < n:
        seen: set[str] = set()  # organisations and practitioners recur across bundles
        for entries in bundles:
            types = {e["fullUrl"].removeprefix("urn:uuid:"): e["resource"]["resourceType"] for e in entries}
            for entry in entries:
                text = json.dumps(entry["resource"], default=str)
                text = UUID_REF.sub(lambda m, t=types, c=copy: f'"{t.get(m.group(1), "Resource")}/{c}-{m.group(1)}"', text)
                resource = loads(text.encode())
                resource["id"] = f"{copy}-{entry['fullUrl'].removeprefix('urn:uuid:')}"
                if f"{resource['resourceType']}/{resource['id']}" in seen:
                    continue
                seen.add(f"{resource['resourceType']}/{resource['id']}")
                for ident in resource.get("identifier", []) if resource["resourceType"] == "Patient" else []:
                    ident["value"] = f"{ident.get('value')}-{copy}"
                resource["meta"] = {"versionId": "1", "lastUpdated": datetime.now(UTC).isoformat()}
                entry_doc = {"i": resource["id"], "v": 1, "ts": datetime.now(UTC), "m": "POST", "res": resource}
                batch.setdefault(resource["resourceType"], []).append(current_document(entry_doc))
                stored += 1
            if stored >= n:
                break
        for resource_type, docs in batch.items():
            if copy == 0:  # indexes first: building them afterwards is slower
                db[resource_type].create_index("ix")
                db[resource_type].create_index("ts")
            db[resource_type].insert_many(docs, ordered=False)
        batch = {}
        copy += 1
        print(f"  loaded {stored} resources ({stored / (time.perf_counter() - started):.0f}/s)", flush=True)
    # A patient with many observations, for sorting and paging.
    counts: dict[str, int] = {}
    for doc in db.Observation.find({"p.patient": {"$exists": True}}, {"p.patient": 1}):
        ref = doc["p"]["patient"][0][1:]
        counts[ref] = counts.get(ref, 0) + 1
    patient_ref = max(counts, key=lambda r: counts[r])
    patient = db.Patient.find_one({"_id": patient_ref.split("/")[1]})
    facts["patient"] = patient_ref
    facts["observations"] = counts[patient_ref]
    facts["mrn"] = next(i for i in patient["res"]["identifier"] if i.get("type"))["value"]
    facts["family"] = patient["res"]["name"][0]["family"][:4]
    client.close()
    return facts


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def _filter(resource_type: str, query: str) -> tuple[dict[str, Any], list[tuple[str, int]], int]:
    from urllib.parse import parse_qsl

    request = parse_search(resource_type, parse_qsl(query), strict=True, default_count=50, max_count=1000)
    return to_filter(request.criteria, embedded=True), sort_spec(request.sort), request.count


def shapes(facts: dict[str, Any]) -> list[tuple[str, str, str]]:
    patient, mrn = facts["patient"], facts["mrn"]
    return [
        ("token equality", "Observation", f"patient={patient}&code=http://loinc.org|8302-2"),
        ("string prefix", "Patient", f"name={facts['family']}"),
        ("date range", "Encounter", f"patient={patient}&date=ge2015-01-01&date=lt2019-01-01"),
        ("chained", "Observation", f"patient.identifier={mrn}&code=http://loinc.org|8302-2"),
        ("_include", "Observation", f"patient={patient}&code=http://loinc.org|8302-2&_include=Observation:patient"),
        ("_sort + page 20", "Observation", f"patient={patient}&_sort=-date&_count={max(1, min(10, facts['observations'] // 20))}"),
        ("_summary=count", "Observation", f"patient={patient}&_summary=count"),
        ("token, all patients", "Observation", "code=http://loinc.org|8302-2"),
        ("count, all patients", "Observation", "code=http://loinc.org|8302-2&_summary=count"),
    ]


def http_latency(client: httpx.Client, resource_type: str, query: str, reps: int, page: int) -> tuple[list[float], int]:
    times, matches = [], 0
    for _ in range(reps + 3):
        url = f"/fhir/{resource_type}?{query}"
        started = time.perf_counter()
        for _ in range(page):  # follow `next` to the page asked for; time the last request only
            started = time.perf_counter()
            response = client.get(url)
            response.raise_for_status()
            bundle = response.json()
            url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), url)
        times.append(time.perf_counter() - started)
        matches = bundle.get("total", 0)
    return times[3:], matches


def driver_latency(db: Any, resource_type: str, query: str, reps: int, page: int) -> list[float]:
    """The same query through pymongo: chains resolved by a first query, includes by a second."""
    times = []
    chained = query.startswith("patient.identifier=")
    for _ in range(reps + 3):
        started = time.perf_counter()
        q = query
        if chained:
            mrn, rest = q.removeprefix("patient.identifier=").split("&", 1)
            ids = [d["_id"] for d in db.Patient.find({"ix": f"identifier={mrn}", "del": False}, {"_id": 1})]
            q = rest
        filter_, sort, count = _filter(resource_type, q)
        if chained:
            filter_ = {"ix": {"$in": [f"patient=Patient/{i}" for i in ids]}, **{k: v for k, v in filter_.items() if k != "ix"}}
        if count == 0:
            db[resource_type].count_documents(filter_)
        else:
            docs = list(db[resource_type].find(filter_, {"res": 1}).sort(sort).skip((page - 1) * count).limit(count))
            if "_include" in query:
                refs = {d["res"]["subject"]["reference"].split("/")[1] for d in docs}
                list(db.Patient.find({"_id": {"$in": list(refs)}}, {"res": 1}))
        times.append(time.perf_counter() - started)
    return times[3:]


def indexing_cost(port: int, work: Path, rounds: int = 3) -> tuple[float, float]:
    """Median Patient creates/s with and without search indexing, runs alternating (the rate
    varies by some 10 % from run to run), each on a fresh embedded database."""
    rates: dict[str, list[float]] = {"true": [], "false": []}
    for round_ in range(rounds):
        for indexing in ("true", "false"):
            database = EmbeddedDatabase(work / f"db-create-{indexing}-{round_}")
            database.start()
            server = start_server(database.uri, port, work, "bench_create", {"FHIR_SEARCH_INDEXING": indexing})
            try:
                rate, _, _ = run_wrk(f"http://127.0.0.1:{port}", 2000, 8, True, [], work)
                rates[indexing].append(rate)
            finally:
                server.terminate()
                server.wait()
                database.stop()
    return statistics.median(rates["true"]), statistics.median(rates["false"])


def start_server(uri: str, port: int, work: Path, db: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(work / f"server-{db}.log", "ab")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "fhir_server", "serve", "--port", str(port), "--data-dir", str(work), "--dicom-port", "0"],
        env={**os.environ, "MONGODB_URI": uri, "FHIR_MONGODB_DB": db, "FHIR_LOG_LEVEL": "WARNING", **(env or {})},
        stdout=log, stderr=log,
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--indexing-only", action="store_true", help="only the write-path cost of indexing")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    port = 18080
    if not args.indexing_only:
        search_shapes(args.n, args.reps, port, work)
    with_index, without = indexing_cost(port, work)
    print(f"\nPatient creates/s on a new database (wrk, 8 clients, median of 3): {with_index:.0f} with search "
          f"indexing, {without:.0f} without: indexing costs {100 * (1 - with_index / without):.0f} % of create throughput")


def search_shapes(n: int, reps: int, port: int, work: Path) -> None:
    database = EmbeddedDatabase(work / "db", cache_size="1G")
    database.start()
    try:
        print(f"loading {n} resources into the embedded database")
        facts = load(database.uri, n)
        print(f"patient {facts['patient']} has {facts['observations']} observations")
        server = start_server(database.uri, port, work, DB)
        driver = pymongo.MongoClient(database.uri, tz_aware=True)[DB]
        rows = []
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                for name, resource_type, query in shapes(facts):
                    page = 20 if "page 20" in name else 1
                    served, total = http_latency(client, resource_type, query, reps, page)
                    direct = driver_latency(driver, resource_type, query, reps, page)
                    rows.append((name, total, _pct(served, 50) * 1000, _pct(served, 95) * 1000,
                                 _pct(direct, 50) * 1000, _pct(direct, 95) * 1000))
        finally:
            server.terminate()
            server.wait()
        print(f"\n{'shape':<20}{'matches':>8}{'p50 ms':>9}{'p95 ms':>9}{'pymongo p50':>13}{'p95':>8}{'ratio':>7}")
        for name, total, p50, p95, d50, d95 in rows:
            print(f"{name:<20}{total:>8}{p50:>9.1f}{p95:>9.1f}{d50:>13.1f}{d95:>8.1f}{p50 / d50:>7.2f}")
    finally:
        database.stop()


if __name__ == "__main__":
    main()
