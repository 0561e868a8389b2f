"""Synthea bundles loaded as FHIR transactions through the server, next to pymongo `insert_many`.

Both run against the same embedded database in the same run, with the same write concern
(w=majority, j=true):

- server: each of the 18 bundles of ../shared/synthea-r4 POSTed as a transaction
  (`Prefer: return=minimal`), `--rounds` times, by `--clients` concurrent clients;
- pymongo, resources: the same resources (references rewritten, fresh ids) inserted with one
  `insert_many` per type and bundle: the raw insert rate;
- pymongo, stored documents: what the server itself stores for them (history entries and current
  documents with their search index), with the server's indexes, one `insert_many` per
  collection and bundle: the database's share of the server's work.

The pymongo runs insert one bundle at a time.

Then a 200-entry transaction (the largest bundle, topped up with Observations) timed `--reps`
times for its p95.

    python bench/transaction.py [--rounds 3] [--clients 1] [--reps 20] [--transactions auto|on|off]
"""

import argparse
import copy
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
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pymongo
from pymongo import ASCENDING, WriteConcern

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fhir_server.fhir_json import dumps, loads  # noqa: E402
from fhir_server.storage.client import CODEC_OPTIONS  # noqa: E402
from fhir_server.storage.embedded import EmbeddedDatabase  # noqa: E402
from fhir_server.storage.repository import current_document  # noqa: E402

SYNTHEA = ROOT.parent / "shared" / "synthea-r4"
UUID_REF = re.compile(r'"urn:uuid:([0-9a-f-]{36})"')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def bundles() -> list[dict[str, Any]]:
    return [loads(path.read_bytes()) for path in sorted(SYNTHEA.glob("*.json"))]


def two_hundred(source: list[dict[str, Any]]) -> bytes:
    """A 200-entry transaction: the largest bundle, topped up with Observations of its patient."""
    bundle = copy.deepcopy(max(source, key=lambda b: len(b["entry"])))
    patient = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    while len(bundle["entry"]) < 200:
        bundle["entry"].append({
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "bench"},
                         "subject": {"reference": patient}, "valueQuantity": {"value": 1, "unit": "1"}},
            "request": {"method": "POST", "url": "Observation"},
        })
    return dumps(bundle)


def stored_form(bundle: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(resources by type, history entries, current documents by type) for `bundle`, with fresh ids."""
    ids = {e["fullUrl"]: str(uuid.uuid4()) for e in bundle["entry"]}
    types = {e["fullUrl"]: e["resource"]["resourceType"] for e in bundle["entry"]}
    text = dumps([e["resource"] for e in bundle["entry"]]).decode()
    text = UUID_REF.sub(lambda m: f'"{types["urn:uuid:" + m.group(1)]}/{ids["urn:uuid:" + m.group(1)]}"', text)
    resources, history, current = {}, [], {}
    now = datetime.now(UTC)
    for entry, resource in zip(bundle["entry"], loads(text.encode()), strict=True):
        resource["id"] = ids[entry["fullUrl"]]
        resource["meta"] = {"versionId": "1", "lastUpdated": now.isoformat(timespec="milliseconds")}
        kind = resource["resourceType"]
        resources.setdefault(kind, []).append({"_id": resource["id"], **resource})
        item = {"_id": f"{kind}/{resource['id']}/{1:010d}", "t": kind, "i": resource["id"], "v": 1, "ts": now,
                "m": "POST", "res": resource, "c": True}
        history.append(item)
        current.setdefault(kind, []).append(current_document(item))
    return resources, history, current


def driver_rates(uri: str, source: list[dict[str, Any]], rounds: int) -> tuple[float, float]:
    """Resources/s of pymongo insert_many: bare resources, and the server's stored documents."""
    client: pymongo.MongoClient = pymongo.MongoClient(uri, tz_aware=True)
    concern = WriteConcern(w="majority", j=True)
    bare = client.get_database("bench_tx_raw", codec_options=CODEC_OPTIONS)  # decimals as the server stores them
    shaped = client.get_database("bench_tx_docs", codec_options=CODEC_OPTIONS)
    shaped.history.create_index([("t", ASCENDING), ("ts", ASCENDING), ("_id", ASCENDING)])
    shaped.history.create_index([("ts", ASCENDING), ("_id", ASCENDING)])
    prepared = [stored_form(b) for _ in range(rounds) for b in source]
    for _, _, current in prepared:
        for kind in current:
            shaped[kind].create_index("ix")
            shaped[kind].create_index("ts")
    count = sum(len(h) for _, h, _ in prepared)
    started = time.perf_counter()
    for resources, _, _ in prepared:
        for kind, docs in resources.items():
            bare.get_collection(kind, write_concern=concern).insert_many(docs)
    raw = count / (time.perf_counter() - started)
    started = time.perf_counter()
    for _, history, current in prepared:
        shaped.get_collection("history", write_concern=concern).insert_many(history)
        for kind, docs in current.items():
            shaped.get_collection(kind, write_concern=concern).insert_many(docs)
    documents = count / (time.perf_counter() - started)
    client.close()
    return raw, documents


def server_rate(url: str, bodies: list[tuple[bytes, int]], rounds: int, clients: int) -> tuple[float, float, list[float]]:
    """(resources/s, bundles/s, latencies) of the bundles POSTed as transactions by `clients`
    concurrent clients."""
    work = [body for _ in range(rounds) for body, _ in bodies]
    latencies: list[float] = []

    def send(body: bytes) -> float:
        with httpx.Client(base_url=url, timeout=120) as client:
            t0 = time.perf_counter()
            answer = client.post("/fhir", content=body, headers={"Content-Type": "application/fhir+json",
                                                                  "Prefer": "return=minimal"})
            if answer.status_code != 200:
                raise SystemExit(f"transaction failed: {answer.status_code} {answer.text[:500]}")
            return time.perf_counter() - t0

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(send, work))
    elapsed = time.perf_counter() - started
    resources = rounds * sum(n for _, n in bodies)
    return resources / elapsed, len(work) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--clients", type=int, default=1, help="concurrent clients for the throughput run")
    parser.add_argument("--transactions", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args()
    source = bundles()
    bodies = [(dumps(b), len(b["entry"])) for b in source]
    big = two_hundred(source)
    work = Path(tempfile.mkdtemp(prefix="bench-transaction-"))
    database = EmbeddedDatabase(work / "db", cache_size="1G").start()
    log = open(work / "server.log", "ab")  # noqa: SIM115
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fhir_server", "serve", "--port", str(port), "--data-dir", str(work), "--dicom-port", "0"],
        env={**os.environ, "MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "bench_tx", "FHIR_LOG_LEVEL": "WARNING",
             "FHIR_WRITE_TRANSACTIONS": args.transactions},
        stdout=log, stderr=log,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for _ in range(600):
                try:
                    if client.get("/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            client.post("/fhir", content=bodies[0][0], headers={"Content-Type": "application/fhir+json"})  # warm-up
            resources_s, bundles_s, latencies = server_rate(f"http://127.0.0.1:{port}", bodies, args.rounds, args.clients)
            big_latencies = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                answer = client.post("/fhir", content=big, headers={"Content-Type": "application/fhir+json",
                                                                     "Prefer": "return=minimal"})
                big_latencies.append(time.perf_counter() - t0)
                assert answer.status_code == 200, answer.text[:500]
        raw, documents = driver_rates(database.uri, source, args.rounds)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        database.stop()
        shutil.rmtree(work, ignore_errors=True)
    count = sum(n for _, n in bodies)
    print(f"{len(bodies)} Synthea bundles ({count} resources) x {args.rounds} rounds, {args.clients} client(s), "
          f"w=majority j=true, embedded database, transactions={args.transactions}")
    print(f"{'path':<44}{'res/s':>9}{'bundles/s':>11}{'ratio':>8}")
    print(f"{'server: POST /fhir transaction (HTTP)':<44}{resources_s:>9.0f}{bundles_s:>11.2f}{resources_s / raw:>8.2f}")
    print(f"{'pymongo insert_many: the resources':<44}{raw:>9.0f}{raw / count * len(bodies):>11.2f}{1:>8.2f}")
    print(f"{'pymongo insert_many: the stored documents':<44}{documents:>9.0f}"
          f"{documents / count * len(bodies):>11.2f}{documents / raw:>8.2f}")
    print(f"bundle latency p50 {_pct(latencies, 50) * 1000:.0f} ms, p95 {_pct(latencies, 95) * 1000:.0f} ms; "
          f"200-entry transaction ({args.reps} runs): p50 {_pct(big_latencies, 50) * 1000:.0f} ms, "
          f"p95 {_pct(big_latencies, 95) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
