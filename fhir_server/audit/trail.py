"""The audit trail's writer: events stored at once in batches, indexed for search later.

Storing each event as a resource (a history entry, a current document with its search index) is
what read and search need, and costs the embedded database 0.5 to 0.75 ms of CPU an event: more
than half of what a whole FHIR read costs it. So the trail has two stages:

1. **recorded**: an event is kept in memory (serialised) and, every `flush_s` or `batch` events,
   the events gathered are stored (journaled) as one batch: one document in `audit_batches`,
   their compressed JSON with what indexers claim it by. This is the durable record, a few µs
   an event, one write per batch (two writes, each waiting for the journal, held up the
   queries meanwhile more). A crash loses what was not flushed yet: at most `flush_s` of
   events (`max_buffered` while the database is unreachable).
2. **indexed**: a batch becomes AuditEvent resources, in exactly the documents the repository
   writes (version 1: the history entry, then the current document with its search index), so
   that the ordinary read, vread, history and search code serves them. This runs when this
   process serves no request, HTTP or DICOM connection (idle for `IDLE_S`), when the oldest
   batch waits longer than `index_lag_s` (so under constant load events become searchable
   within that lag), and before
   any request that may read AuditEvents (`catch_up`), so that what such a request finds is
   complete up to the events still in some process's memory.

Batches are claimed under a lease and removed once indexed; event ids are the batch's id and the
event's place in it, so a batch indexed twice (its indexer died before removing it) stores the
same resources once. Any number of server processes may share the database.
"""

import asyncio
import collections
import contextlib
import logging
import threading
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import orjson
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import BulkWriteError, PyMongoError

from fhir_server.config import Settings
from fhir_server.storage.repository import (
    Change,
    ResourceRepository,
    _duplicates_only,
    _entry,
    current_document,
)

LOGGER = logging.getLogger(__name__)
AUDIT_EVENT = "AuditEvent"
BATCHES = "audit_batches"
PAYLOADS = "audit_batch_events"  # where a batch stored before kept its events apart
LEASE = timedelta(seconds=60)  # a batch claimed for longer was abandoned by its indexer
STOP_WAIT_S = 10.0  # at shutdown, for the round in progress (an indexing round: one batch)
IDLE_S = 0.2  # no request for this long: the process is idle, and indexes
LOOK_AGAIN_S = 5.0
CATCH_UP_WAIT_S = 10.0  # the longest a catch-up waits for batches other processes are indexing
NEVER = datetime(1970, 1, 1, tzinfo=UTC)
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
        index_lag_s: float = 60.0,
    ) -> None:
        self.repository = repository
        self.batches = repository.db[BATCHES]  # {_id, ts, lease, n, events (compressed JSON)}
        self.payloads = repository.db[PAYLOADS]
        self.observer = observer  # the source of HTTP events: this server
        self.dicom_observer = dicom_observer  # of DICOM events: the node's AE title
        self.flush_s = flush_s
        self.batch = batch
        self.max_buffered = max_buffered
        self.index_lag = timedelta(seconds=index_lag_s)
        # Serialised: thousands of live dicts would be carried into the collector's oldest
        # generation, and make its full collections (over the whole heap) frequent.
        self._pending: collections.deque[bytes] = collections.deque()
        self._dropped = 0
        self._waking = False
        self._busy = 0  # requests being served
        self._busy_lock = threading.Lock()
        self._last_request = 0.0  # when the last one ended (monotonic)
        self._oldest_stored: datetime | None = None  # of the batches stored since indexing last ran dry
        self._next_look = 0.0  # when an idle process looks for batches again, having found none
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        global _active
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await self.repository.collection(AUDIT_EVENT)  # its search indexes
        await self.batches.create_index([("ts", ASCENDING)])
        self._task = asyncio.create_task(self._run(), name="audit-trail")
        _active = self

    async def stop(self) -> None:
        """Store what is buffered (indexing is left to the next idle moment, of any process)."""
        global _active
        if _active is self:
            _active = None
        if self._task is not None:
            # Not cancelled: a flush cut off between taking its events and storing them would
            # lose them. The loop ends after the round it is in.
            self._stopping = True
            self._wake_up()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_WAIT_S)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        for _ in range(2):
            if await self.flush():
                break
        if self._pending:
            LOGGER.error("audit trail: %d events could not be written at shutdown", len(self._pending))

    # -- stage 1: recorded ----------------------------------------------------------------------

    def record(self, event: dict[str, Any]) -> None:
        """Queue an AuditEvent; from any thread, never blocking."""
        if len(self._pending) >= self.max_buffered:
            self._dropped += 1
            return
        self._pending.append(orjson.dumps(event))  # deques are thread-safe: the DICOM node records too
        if len(self._pending) >= self.batch and not self._waking and self._loop is not None:
            self._waking = True
            with contextlib.suppress(RuntimeError):  # the loop closed: stop() wrote the rest
                self._loop.call_soon_threadsafe(self._wake_up)

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def flush(self) -> bool:
        """Store everything recorded, a batch per document; False when the database refused
        (the events stay, in order, for the next round)."""
        if self._dropped:
            LOGGER.error("audit trail: %d events dropped, the buffer was full", self._dropped)
            self._dropped = 0
        waiting = len(self._pending)  # not what arrives meanwhile: that would flush one event at a time
        while waiting > 0:
            taken = [self._pending.popleft() for _ in range(min(self.batch, waiting, len(self._pending)))]
            waiting -= len(taken)
            if not taken:
                break
            batch_id, stored = str(uuid.uuid4()), now()
            events = bson.Binary(zlib.compress(b"[" + b",".join(taken) + b"]", 1))
            try:
                await self.batches.insert_one({"_id": batch_id, "ts": stored, "lease": NEVER, "n": len(taken), "events": events})
            except (PyMongoError, OSError) as exc:
                self._pending.extendleft(reversed(taken))
                LOGGER.error("audit trail: storing %d events failed (%s); kept for the next try",
                             len(self._pending), exc)
                return False
            self._oldest_stored = self._oldest_stored or stored
        return True

    # -- stage 2: indexed -----------------------------------------------------------------------

    def serving(self) -> None:
        """A request (HTTP, or a DICOM connection in its own thread) is being served."""
        with self._busy_lock:
            self._busy += 1

    def served(self) -> None:
        with self._busy_lock:
            self._busy -= 1
            self._last_request = time.monotonic()

    def _idle(self) -> bool:
        return self._busy == 0 and time.monotonic() - self._last_request >= IDLE_S

    async def catch_up(self) -> None:
        """Index every stored batch (this process's recorded events first): before a request
        that may read AuditEvents. Batches other processes are indexing are waited for."""
        await self.flush()
        deadline = time.monotonic() + CATCH_UP_WAIT_S
        while True:
            while await self._index_one():
                pass
            if await self.batches.find_one({}, {"_id": 1}) is None or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            self._waking = False
            try:
                await self.flush()
                while not self._stopping and (
                    self._idle() and (self._oldest_stored or time.monotonic() >= self._next_look) or self._lagging()
                ):
                    if not await self._index_one():
                        self._oldest_stored = None  # ran dry: look again later (another process's batches)
                        self._next_look = time.monotonic() + LOOK_AGAIN_S
                        break
                    await self.flush()
            except (PyMongoError, OSError) as exc:
                LOGGER.error("audit trail: indexing failed (%s); trying again later", exc)

    def _lagging(self) -> bool:
        """Whether this process stored a batch longer than `index_lag` ago that may still wait
        (known without asking the database, whose queries on a long backlog are slow)."""
        return self._oldest_stored is not None and self._oldest_stored < now() - self.index_lag

    async def _index_one(self) -> bool:
        """Claim one batch and store its events as AuditEvent resources; False when none is free."""
        moment = now()
        batch = await self.batches.find_one_and_update(
            {"lease": {"$lt": moment}}, {"$set": {"lease": moment + LEASE}},
            sort=[("ts", ASCENDING)], return_document=ReturnDocument.AFTER,
        )
        if batch is None:
            return False
        repository = self.repository
        apart = "events" not in batch  # a batch stored before the events moved into it
        payload = await self.payloads.find_one({"_id": batch["_id"]}) if apart else batch
        events = orjson.loads(zlib.decompress(payload["events"])) if payload is not None else []  # None: indexed, not yet removed
        ts = now()  # stored now: `_lastUpdated` and history order follow what search can find
        entries = [_entry(AUDIT_EVENT, f"{batch['_id']}-{i}", None, Change(event, "POST"), ts)
                   for i, event in enumerate(events)]
        # History entries first, then the current documents: the order every writer keeps.
        if entries:
            # Their search index, about 0.4 ms an event, in a thread: a request arriving meanwhile
            # is served between slices of it, not after a whole batch (tens of ms on the loop).
            documents = await asyncio.to_thread(
                lambda: [current_document(e, repository.search_indexing, repository.base_url) for e in entries])
            await _insert_new(repository.history, entries)
            await _insert_new(repository.db[AUDIT_EVENT], documents)
        if apart:
            await self.payloads.delete_one({"_id": batch["_id"]})
        await self.batches.delete_one({"_id": batch["_id"]})
        return True


async def _insert_new(collection: Any, docs: list[dict[str, Any]]) -> None:
    """Insert, leaving alone the documents already there (a batch indexed again)."""
    try:
        await collection.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        if not _duplicates_only(exc):
            raise


def from_settings(repository: ResourceRepository, settings: Settings) -> AuditTrail:
    address = settings.base_url or f"http://{settings.host}:{settings.port}/fhir"
    return AuditTrail(
        repository, observer=f"fhir-server {address}", dicom_observer=settings.dicom_aet,
        flush_s=settings.audit_flush_s, batch=settings.audit_batch, max_buffered=settings.audit_max_buffered,
        index_lag_s=settings.audit_index_lag_s,
    )
