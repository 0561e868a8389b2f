"""Patient create and read through the server (HTTP, wrk) next to the raw driver (pymongo).

Both run in the same process tree against the embedded database (a fresh one for each run), with the same write
concern (journaled) and 8 concurrent clients, so the ratio is the server's own overhead:
HTTP, validation, versioning (history entry + current document), JSON. The server runs with its
audit trail off and on (FHIR_AUDIT), alternately, `--rounds` times each, each run on a fresh
database; the best run of each is kept, and the audit trail's overhead printed.

    python bench/crud.py [--n 2000] [--clients 8] [--transactions auto|on|off] [--rounds 2]

`--transactions on` measures the write path used on MongoDB replica sets (the embedded database
defaults to ordered writes with a repair check on read).

Needs `wrk` (apt-get install wrk).
"""

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from pymongo import AsyncMongoClient, WriteConcern

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fhir_server.storage.embedded import EmbeddedDatabase  # noqa: E402

PATIENT = (
    '{"resourceType":"Patient","identifier":[{"system":"urn:bench","value":"1"}],'
    '"name":[{"family":"Chalmers","given":["Peter","James"]}],"gender":"male",'
    '"birthDate":"1974-12-25","address":[{"line":["534 Erewhon St"],"city":"PleasantVille","postalCode":"3999"}],'
    '"telecom":[{"system":"phone","value":"(03) 5555 6473","use":"work"}]}'
)

WRK_SCRIPT = """
local n_per_thread = {per_thread}
local ids = {{{ids}}}
local counter = 0
local done_count = 0
local threads = {{}}
function setup(thread)
  thread:set("offset", #threads)
  table.insert(threads, thread)
end
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  if {is_create} then
    return wrk.format("POST", "/fhir/Patient", {{["Content-Type"] = "application/fhir+json"}}, [[{body}]])
  end
  local id = ids[((counter + offset * n_per_thread) % #ids) + 1]
  return wrk.format("GET", "/fhir/Patient/" .. id)
end
function response(status, headers, body)
  if status >= 300 then io.stderr:write("unexpected status " .. status .. "\\n") end
  done_count = done_count + 1
  if done_count == n_per_thread then
    io.write("THREAD_DONE\\n")
    io.flush()
    wrk.thread:stop()
  end
end
function done(summary, latency, requests)
  io.write(string.format("RESULT %d %.3f %d %d %d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(95), summary.errors.status))
end
"""


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def driver_baseline(uri: str, n: int, clients: int) -> dict[str, tuple[float, float, float]]:
    """The same operations straight through pymongo: insert_one with j=true, find_one by _id."""
    import orjson

    client: AsyncMongoClient = AsyncMongoClient(uri, tz_aware=True)
    db = client.get_database("bench_driver", write_concern=WriteConcern(w="majority", j=True))
    await db.patients.drop()
    doc = orjson.loads(PATIENT)
    results = {}
    for name in ("create", "read"):
        latencies: list[float] = []
        per_client = n // clients

        async def worker(k: int, name: str = name, per_client: int = per_client, latencies: list[float] = latencies) -> None:
            for i in range(per_client):
                key = f"{k}-{i}"
                started = time.perf_counter()
                if name == "create":
                    await db.patients.insert_one({"_id": key, **doc})
                else:
                    await db.patients.find_one({"_id": key})
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
        results[name] = (len(latencies) / elapsed, _pct(latencies, 50) * 1000, _pct(latencies, 95) * 1000)
    await client.close()
    return results


def run_wrk(url: str, n: int, clients: int, is_create: bool, ids: list[str], work: Path) -> tuple[float, float, float]:
    threads = 2
    script = work / ("create.lua" if is_create else "read.lua")
    script.write_text(
        WRK_SCRIPT.format(
            per_thread=n // threads,
            ids=",".join(f'"{i}"' for i in ids) if ids else "",
            is_create="true" if is_create else "false",
            body=PATIENT,
        )
    )
    env = {**os.environ, "TCP_NODELAY": "1"}
    # wrk sleeps for all of -d even when every thread has stopped: interrupt it (SIGINT makes it
    # report at once, with the real elapsed time) when each thread has done its share.
    wrk = subprocess.Popen(
        ["wrk", f"-t{threads}", f"-c{clients}", "-d300s", "--timeout", "30s", "-s", str(script), url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert wrk.stdout is not None
    finished = 0
    result = ""
    for line in wrk.stdout:
        if line.startswith("THREAD_DONE"):
            finished += 1
            if finished == threads:
                wrk.send_signal(signal.SIGINT)
        elif line.startswith("RESULT"):
            result = line
    stderr = wrk.stderr.read() if wrk.stderr else ""
    wrk.wait()
    if not result:
        raise SystemExit(f"wrk gave no result:\n{stderr[-2000:]}")
    _, requests, seconds, p50, p95, bad = result.split()
    if int(bad):
        raise SystemExit(f"wrk saw {bad} non-2xx responses:\n{stderr[-2000:]}")
    return int(requests) / float(seconds), int(p50) / 1000, int(p95) / 1000


Measured = tuple[float, float, float]  # res/s, p50 ms, p95 ms


def serve_and_measure(work: Path, args: argparse.Namespace, audit: bool, run: int) -> dict[str, Measured]:
    """Creates then reads through a fresh server process and database, the audit trail on or off."""
    database = EmbeddedDatabase(work / f"db{run}").start()
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    name = "bench_server"
    env = {**os.environ, "MONGODB_URI": database.uri, "FHIR_MONGODB_DB": name, "FHIR_LOG_LEVEL": "WARNING",
           "FHIR_WRITE_TRANSACTIONS": args.transactions, "FHIR_AUDIT": "true" if audit else "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "fhir_server", "serve", "--port", str(port), "--data-dir", str(work / f"server{run}"),
         "--dicom-port", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        create = run_wrk(url, args.n, args.clients, True, [], work)

        async def ids() -> list[str]:
            client: AsyncMongoClient = AsyncMongoClient(database.uri)
            found = [d["_id"] async for d in client[name].Patient.find({}, {"_id": 1})]
            await client.close()
            return found

        read = run_wrk(url, args.n, args.clients, False, asyncio.run(ids()), work)
    finally:
        server.terminate()
        server.wait(30)
        database.stop()
    return {"create": create, "read": read}


def best(runs: list[dict[str, Measured]], name: str) -> Measured:
    """The run with the highest throughput: the one least disturbed by the rest of the machine."""
    return max((r[name] for r in runs), key=lambda m: m[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--transactions", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--rounds", type=int, default=2, help="server runs with the audit trail off and on, alternating")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="fhir-bench-"))
    runs: dict[bool, list[dict[str, Measured]]] = {False: [], True: []}
    try:
        database = EmbeddedDatabase(work / "db").start()
        try:
            baseline = asyncio.run(driver_baseline(database.uri, args.n, args.clients))
        finally:
            database.stop()
        for run in range(args.rounds * 2):
            audit = run % 2 == 1
            runs[audit].append(serve_and_measure(work, args, audit, run))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"N={args.n} Patients, {args.clients} concurrent clients, write concern w=majority j=true, "
          f"embedded database, transactions={args.transactions}, best of {args.rounds} runs per audit setting")
    print(f"{'operation':<10}{'path':<26}{'res/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'ratio':>8}")
    for name in ("create", "read"):
        raw = baseline[name]
        for audit, label in ((False, "server, audit off"), (True, "server, audit on")):
            measured = best(runs[audit], name)
            print(f"{name:<10}{label:<26}{measured[0]:>9.0f}{measured[1]:>9.1f}{measured[2]:>9.1f}{measured[0] / raw[0]:>8.2f}")
        print(f"{'':<10}{'pymongo direct':<26}{raw[0]:>9.0f}{raw[1]:>9.1f}{raw[2]:>9.1f}{1:>8.2f}")
    for name in ("create", "read"):
        off, on = best(runs[False], name), best(runs[True], name)
        print(f"audit overhead, {name}: throughput {1 - on[0] / off[0]:+.1%}, p50 {on[1] / off[1] - 1:+.1%}")


if __name__ == "__main__":
    main()
