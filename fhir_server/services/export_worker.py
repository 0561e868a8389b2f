"""The bulk export worker: an asyncio task of the server process that runs export jobs one at a
time, in batches between which the API's requests are served.

Jobs live in MongoDB (`storage/exports.py`): the worker claims the oldest job that is queued or
whose lease has lapsed (its worker died), so a job survives restarts and any process may run it.

Consistency: an export holds each resource as it was at the job's transaction time. A current
document stamped after it is replaced by its newest earlier version from history (none, or a
deletion: left out); a document is read once, from one cursor or one id list, so a resource
changed while the export runs is neither skipped nor written twice.
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo.errors import PyMongoError

from fhir_server import fhir_json
from fhir_server.config import Settings
from fhir_server.errors import Issue, operation_outcome
from fhir_server.search.dates import ONE_MS
from fhir_server.search.indexer import references
from fhir_server.search.registry import parameter, patient_compartment
from fhir_server.storage.exports import ExportFiles, ExportJobs, ExportReader, NdjsonWriter
from fhir_server.storage.repository import SETTLE, ResourceRepository, Version

LOGGER = logging.getLogger(__name__)
ID_LIST_LIMIT = 20_000  # more candidate ids than this: one pass over the collection instead
PROGRESS_EVERY_S = 2.0
ERRORS_FILE = "errors.ndjson"
PATIENT = "Patient/"


class JobLost(Exception):
    """The job was cancelled, or taken over by another worker after this one's lease lapsed."""


@dataclass(frozen=True)
class Scope:
    """Which resources a job exports: all of a type (system level), or those in the compartment
    of `members` (patient ids; None: of any patient)."""

    level: str
    members: frozenset[str] | None
    base_url: str = ""

    def codes(self, resource_type: str) -> tuple[str, ...]:
        return () if self.level == "system" else patient_compartment().get(resource_type, ())

    def _any_member(self, resource_type: str, resource_id: str, refs: list[str]) -> bool:
        if self.level == "system":
            return True
        if resource_type == "Patient" and (self.members is None or resource_id in self.members):
            return True
        return any(
            ref.startswith(PATIENT) and (self.members is None or ref[len(PATIENT):] in self.members)
            for ref in refs
        )

    def holds(self, resource_type: str, doc: dict[str, Any]) -> bool:
        """A current document, by its stored index keys (what a compartment search matches)."""
        index = doc.get("p") or {}
        refs = [key[1:] for code in self.codes(resource_type) for key in index.get(code, ()) if key[:1] == "="]
        return self._any_member(resource_type, doc["_id"], refs)

    def holds_version(self, version: Version) -> bool:
        """An earlier version, by the references it holds."""
        assert version.resource is not None
        refs = []
        for code in self.codes(version.type):
            param = parameter(version.type, code)
            if param is not None:
                refs.extend(references(param, version.resource, self.base_url))
        return self._any_member(version.type, version.id, refs)


@dataclass
class Progress:
    """What the status request shows while the job runs."""

    types: int
    type: str = ""
    index: int = 0
    written: int = 0
    about: int = 0

    def start(self, resource_type: str, index: int, about: int) -> None:
        self.type, self.index, self.written, self.about = resource_type, index, 0, about

    def doc(self) -> dict[str, Any]:
        return {"type": self.type, "index": self.index, "types": self.types, "written": self.written,
                "about": self.about}


class ExportWorker:
    def __init__(
        self, repository: ResourceRepository, jobs: ExportJobs, files: ExportFiles, settings: Settings
    ) -> None:
        self.repository = repository
        self.reader = ExportReader(repository.db)
        self.jobs = jobs
        self.files = files
        self.settings = settings
        self.owner = uuid.uuid4().hex
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._held: str | None = None  # the job claimed, until it is finished or given back
        self._lost = asyncio.Event()

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bulk-export")

    async def stop(self) -> None:
        """Stop at once and give the running job back, for another process (or the next start)
        to resume."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._held is not None:
            try:
                await asyncio.wait_for(self.jobs.release(self._held, self.owner), 5)
            except (PyMongoError, TimeoutError):
                LOGGER.warning("could not give back export job %s: its lease will lapse", self._held)

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def cancelled(self, job_id: str) -> None:
        """The job was deleted: stop writing it now rather than at the next lease renewal."""
        if self._held == job_id:
            self._lost.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = 0.0
        while True:
            try:
                if loop.time() >= next_sweep:
                    await self._sweep()
                    next_sweep = loop.time() + self.settings.export_poll_s
                self._wake.clear()
                job = await self.jobs.claim(self.owner, self.settings.export_lease_s)
                if job is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.settings.export_poll_s)
                    continue
                self._held = job["_id"]
                await self._execute(job)
                self._held = None
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the worker outlives any one failure (database down, …)
                LOGGER.exception("bulk export worker error; retrying")
                self._held = None
                await asyncio.sleep(self.settings.export_poll_s)

    async def _sweep(self) -> None:
        """Drop expired jobs, and the folders of jobs that no longer exist (expired, cancelled)."""
        await self.jobs.expire()
        folders = await self.files.folders()
        if folders:
            known = await self.jobs.known(folders)
            for name in folders:
                if name not in known and name != self._held:
                    await self.files.remove(name)

    # -- one job -------------------------------------------------------------------------------

    async def _execute(self, job: dict[str, Any]) -> None:
        job_id, ttl = job["_id"], self.settings.export_ttl_s
        if job["attempts"] > self.settings.export_max_attempts:
            message = f"The export was interrupted {job['attempts'] - 1} times; start it again"
            await self.jobs.fail(job_id, self.owner, message, ttl)
            await self.files.remove(job_id)
            return
        self._lost = asyncio.Event()
        progress = Progress(types=len(job["types"]))
        keeper = asyncio.create_task(self._keep(job_id, progress))
        LOGGER.info("export %s started (attempt %d)", job_id, job["attempts"])
        try:
            await self._settle(job["transactionTime"])
            members = job.get("members")
            scope = Scope(job["level"], None if members is None else frozenset(members), self.repository.base_url)
            for index, resource_type in enumerate(job["types"], 1):
                if resource_type in job["done"]:
                    continue
                progress.start(resource_type, index, await self.reader.estimate(resource_type))
                written = await self._export_type(job, resource_type, scope, progress)
                self._check()
                if not await self.jobs.record_type(job_id, self.owner, resource_type, written):
                    raise JobLost
            errors = await self._write_errors(job)
            self._check()
            if not await self.jobs.finish(job_id, self.owner, errors, ttl):
                raise JobLost
            LOGGER.info("export %s complete", job_id)
        except JobLost:
            LOGGER.info("export %s stopped: cancelled or taken over", job_id)
            if await self.jobs.get(job_id) is None:
                await self.files.remove(job_id)
        except (asyncio.CancelledError, PyMongoError):
            raise  # stopping, or the database is unreachable: the job is resumed later
        except Exception:  # noqa: BLE001 - a job's failure is reported in its status
            LOGGER.exception("export %s failed", job_id)
            await self.jobs.fail(job_id, self.owner, "The export failed: see the server log", ttl)
            await self.files.remove(job_id)
        finally:
            keeper.cancel()

    def _check(self) -> None:
        if self._lost.is_set():
            raise JobLost

    async def _keep(self, job_id: str, progress: Progress) -> None:
        """Renew the lease and publish progress while the job runs."""
        every = min(self.settings.export_lease_s / 3, PROGRESS_EVERY_S)
        while True:
            await asyncio.sleep(every)
            try:
                if not await self.jobs.renew(job_id, self.owner, self.settings.export_lease_s, progress.doc()):
                    self._lost.set()
                    return
            except PyMongoError as exc:
                LOGGER.warning("export %s: lease not renewed (%s)", job_id, exc)

    async def _settle(self, transaction_time: datetime) -> None:
        """Wait until the writes stamped up to the transaction time have been applied: single
        writes within `SETTLE`, transactions once their commit records are (the committed ones of
        writers that died are finished, the abandoned ones discarded, after their lease)."""
        wait = (transaction_time + SETTLE - datetime.now(UTC)).total_seconds()
        if wait > 0:
            await asyncio.sleep(wait)
        while True:
            self._check()
            oldest = await self.repository.in_flight_since()
            if oldest is None or oldest > transaction_time:
                return
            await asyncio.sleep(1.0)
            await self.repository.recover()

    async def _export_type(
        self, job: dict[str, Any], resource_type: str, scope: Scope, progress: Progress
    ) -> list[dict[str, Any]]:
        """Write one type's files; returns them, complete, as `{name, count}`."""
        job_id = job["_id"]
        await self.files.clear(job_id, f"{resource_type}-")
        writer = NdjsonWriter(self.files.folder(job_id), resource_type, self.settings.export_file_resources)
        try:
            async for docs in self._documents(job, resource_type, scope):
                resources = await self._as_of(job, resource_type, scope, docs)
                await writer.add([fhir_json.dumps(r) + b"\n" for r in resources])
                progress.written += len(resources)
                self._check()
                await asyncio.sleep(self.settings.export_pause_s)  # and let requests in
            return await writer.finish()
        except BaseException:
            await writer.abort()
            raise

    async def _documents(
        self, job: dict[str, Any], resource_type: str, scope: Scope
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The current documents that may belong to the export, in batches, each one once."""
        fields = {"v": 1, "ts": 1, "del": 1, "res": 1, **{f"p.{c}": 1 for c in scope.codes(resource_type)}}
        ids = await self._candidates(job, resource_type, scope)
        batch = self.settings.export_batch_size
        if ids is None:
            async for docs in self.reader.scan(resource_type, fields, batch):
                yield docs
            return
        for start in range(0, len(ids), batch):
            yield await self.reader.fetch(resource_type, ids[start:start + batch], fields)

    async def _candidates(self, job: dict[str, Any], resource_type: str, scope: Scope) -> list[str] | None:
        """The ids that can be in the export, when an index finds few; None: read every document."""
        limit = ID_LIST_LIMIT + 1
        found: set[str] = set()
        if scope.members is not None:
            codes = list(scope.codes(resource_type))
            if codes:
                targets = [PATIENT + m for m in sorted(scope.members)]
                found.update(await self.reader.referencing_ids(resource_type, codes, targets, limit))
            if resource_type == "Patient":
                found.update(scope.members)
            # Changed since the transaction time: they may have been in the compartment then.
            found.update(await self.reader.changed_ids(resource_type, job["transactionTime"] + ONE_MS, limit))
        elif job.get("since") is not None:
            found.update(await self.reader.changed_ids(resource_type, job["since"], limit))
        else:
            return None
        return None if len(found) > ID_LIST_LIMIT else sorted(found)

    async def _as_of(
        self, job: dict[str, Any], resource_type: str, scope: Scope, docs: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The resources of `docs` as they were at the transaction time, within the job's scope."""
        moment, since = job["transactionTime"], job.get("since")
        out: list[dict[str, Any]] = []
        for doc in docs:
            if "ts" not in doc:  # not a document the server wrote
                continue
            if doc["ts"] <= moment:
                if doc.get("del") or "res" not in doc or (since and doc["ts"] < since):
                    continue
                if scope.holds(resource_type, doc):
                    out.append(doc["res"])
                continue
            version = await self._version_at(resource_type, doc["_id"], doc["v"], moment)
            if version is None or version.resource is None or (since and version.ts < since):
                continue
            if scope.holds_version(version):
                out.append(version.resource)
        return out

    async def _version_at(self, resource_type: str, resource_id: str, current: int, moment: datetime) -> Version | None:
        """The newest version stored at or before `moment`, from history."""
        for vid in range(current - 1, 0, -1):
            version = await self.repository.read_version(resource_type, resource_id, vid)
            if version is not None and version.ts <= moment:
                return version
        return None

    async def _write_errors(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The request's warnings (parameters ignored, patients not found) as one OperationOutcome."""
        warnings = job.get("warnings") or []
        if not warnings:
            return []
        outcome = operation_outcome([Issue(w["diagnostics"], w["code"], "warning") for w in warnings])
        await self.files.write_all(job["_id"], ERRORS_FILE, [fhir_json.dumps(outcome) + b"\n"])
        return [{"name": ERRORS_FILE, "count": 1}]
