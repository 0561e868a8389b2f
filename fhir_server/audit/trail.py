"""The buffered writer of AuditEvents.

Writing each event through the ordinary write path (a version check, a history entry, the
current document) would double the cost of a read. Events are instead kept in memory and
inserted in batches (`insert_many`, every `flush_s` or `batch` events, and at shutdown), as
version 1 of a new resource in exactly the documents the repository writes: the history entry
first, then the current document with its search index. Reads, vreads, history and searches
of AuditEvent then go through the ordinary code. Ids are random, so any number of server
processes may share the database; none keeps more than its buffer.

A crash loses what is buffered: at most `flush_s` (or `batch` events) of the trail, or, while
the database is unreachable, everything waiting (at most `max_buffered` events; beyond that new
events are dropped and counted in the log).
"""

import asyncio
import collections
import contextlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from pymongo.errors import BulkWriteError, PyMongoError

from fhir_server.config import Settings
from fhir_server.storage.repository import Change, ResourceRepository, _entry, current_document

LOGGER = logging.getLogger(__name__)
AUDIT_EVENT = "AuditEvent"
_active: "AuditTrail | None" = None


def active() -> "AuditTrail | None":
    """The running trail of this process (the DICOM node's threads record into it), or None."""
    return _active


def now() -> datetime:
    """The current instant at the millisecond (what MongoDB dates hold)."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


class AuditTrail:
    def __init__(
        self,
        repository: ResourceRepository,
        *,
        observer: str,
        dicom_observer: str,
        flush_s: float = 0.1,
        batch: int = 200,
        max_buffered: int = 100_000,
    ) -> None:
        self.repository = repository
        self.observer = observer  # the source of HTTP events: this server
        self.dicom_observer = dicom_observer  # of DICOM events: the node's AE title
        self.flush_s = flush_s
        self.batch = batch
        self.max_buffered = max_buffered
        self._pending: collections.deque[tuple[str, dict[str, Any], datetime]] = collections.deque()
        self._dropped = 0
        self._waking = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    async def start(self) -> None:
        global _active
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await self.repository.collection(AUDIT_EVENT)  # its search indexes
        self._task = asyncio.create_task(self._run(), name="audit-trail")
        _active = self

    async def stop(self) -> None:
        """Write what is buffered (once more after a failure, then give up and log)."""
        global _active
        if _active is self:
            _active = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _ in range(2):
            if await self.flush():
                break
        if self._pending:
            LOGGER.error("audit trail: %d events could not be written at shutdown", len(self._pending))

    def record(self, event: dict[str, Any], recorded: datetime) -> None:
        """Queue an AuditEvent (recorded at `recorded`); from any thread, never blocking."""
        if len(self._pending) >= self.max_buffered:
            self._dropped += 1
            return
        self._pending.append((str(uuid.uuid4()), event, recorded))  # its id kept across retries
        if len(self._pending) >= self.batch and not self._waking and self._loop is not None:
            self._waking = True
            with contextlib.suppress(RuntimeError):  # the loop closed: stop() wrote the rest
                self._loop.call_soon_threadsafe(self._wake_up)

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            self._waking = False
            await self.flush()

    async def flush(self) -> bool:
        """Insert everything buffered, a batch at a time; False when the database refused (the
        events stay buffered, in order, for the next round)."""
        async with self._flushing:
            if self._dropped:
                LOGGER.error("audit trail: %d events dropped, the buffer was full", self._dropped)
                self._dropped = 0
            while self._pending:
                taken = [self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))]
                try:
                    await self._insert(taken)
                except (PyMongoError, OSError) as exc:
                    self._pending.extendleft(reversed(taken))
                    LOGGER.error("audit trail: writing %d events failed (%s); kept for the next try",
                                 len(self._pending), exc)
                    return False
            return True

    async def _insert(self, taken: list[tuple[str, dict[str, Any], datetime]]) -> None:
        """History entries first, then the current documents: the order every writer keeps, so a
        read finds (and rolls forward) an event whose current document a crash prevented.
        Inserting again after a partial failure only meets the `_id`s already written."""
        repository = self.repository
        entries = [_entry(AUDIT_EVENT, event_id, None, Change(event, "POST"), ts) for event_id, event, ts in taken]
        docs = [current_document(e, repository.search_indexing, repository.base_url) for e in entries]
        await _insert_new(repository.history, entries)
        await _insert_new(repository.db[AUDIT_EVENT], docs)


async def _insert_new(collection: Any, docs: list[dict[str, Any]]) -> None:
    try:
        await collection.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])) or exc.details.get(
            "writeConcernErrors"
        ):
            raise


def from_settings(repository: ResourceRepository, settings: Settings) -> AuditTrail:
    address = settings.base_url or f"http://{settings.host}:{settings.port}/fhir"
    return AuditTrail(
        repository, observer=f"fhir-server {address}", dicom_observer=settings.dicom_aet,
        flush_s=settings.audit_flush_s, batch=settings.audit_batch, max_buffered=settings.audit_max_buffered,
    )
