"""Resources on MongoDB: current versions (one collection per type) and one history collection.

Every write, with any number of server processes:

1. read the current version `n` (or none);
2. insert history entry `n+1`; its `_id` (`Type/id/n+1`) is unique, so exactly one writer claims
   version `n+1` and the others get a duplicate-key error and start again;
3. replace the current document only if it is still at `n`.

A version thus never reaches the current collection without its history entry. Where the
database has durable transactions, the three steps run in one and there is nothing to repair.
Elsewhere they run in this order, and a crash between steps 2 and 3 leaves a history entry ahead
of the current document: a read looks for it and rolls it forward (step 3 again, idempotent), and
so does the next writer that collides with it. Every write uses the database's write concern
(journaled by default).

Several resources at once (`write_all`, a transaction Bundle) commit all or nothing: in one
database transaction where those are durable; elsewhere by claiming every history entry under a
record in the `transactions` collection whose one-document switch from `pending` to `committed`
is the commit point (see `write_all`).
"""

import asyncio
import base64
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
from pymongo import ASCENDING, DESCENDING, InsertOne, ReplaceOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from fhir_server.errors import BadRequest, Conflict, PayloadTooLarge
from fhir_server.search.indexer import index_document
from fhir_server.search.registry import table_fingerprint
from fhir_server.search.to_mongo import index_keys

LOGGER = logging.getLogger(__name__)
HISTORY = "history"
TRANSACTIONS = "transactions"  # commit records of multi-resource writes in ordered mode
TRANSACTION_LEASE = timedelta(seconds=60)  # a pending commit record older than this was abandoned
TRANSACTION_KEPT = timedelta(days=1)  # finished commit records, for inspection
# A single write's version reaches its current collection within this of its timestamp (a
# multi-resource write's, once its commit record is applied: `in_flight_since`).
SETTLE = timedelta(seconds=1)
SERVER = "server"  # deployment-wide facts: the search index version, the page-token key
SEARCH_INDEX = "search-index"
MAX_ATTEMPTS = 200
MAX_DOCUMENT = 16 * 1024 * 1024 - 16 * 1024  # MongoDB's limit, less room for the command around it
# What a read needs of a current document (the search index fields stay in the database).
VERSION_FIELDS = {"v": 1, "ts": 1, "m": 1, "del": 1, "res": 1}


@dataclass(frozen=True)
class Version:
    """One stored version of a resource; `resource` is None for a deletion."""

    type: str
    id: str
    vid: int
    ts: datetime
    method: str
    resource: dict[str, Any] | None
    created: bool = False  # this version (re)created the resource: answered 201

    @property
    def deleted(self) -> bool:
        return self.resource is None


@dataclass(frozen=True)
class Change:
    """What a writer wants stored next: a resource body, or None to delete."""

    resource: dict[str, Any] | None
    method: str


# Given the current version (or None), return the change to store, None for "nothing to write",
# or raise a FhirError (e.g. a failed precondition). Called again on each retry.
Decide = Callable[[Version | None], Change | None]


@dataclass(frozen=True)
class Planned:
    """One resource's next version within `write_all`, decided against `current`."""

    type: str
    id: str
    current: Version | None  # as read when the change was decided
    change: Change


class StaleWrite(Exception):
    """A resource changed between planning and committing `write_all`: plan again."""


@dataclass(frozen=True)
class HistoryPage:
    versions: list[Version]
    next_cursor: str | None
    total: int | None


def instant(ts: datetime) -> str:
    """FHIR instant with millisecond precision, as stored (MongoDB dates hold milliseconds)."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _history_id(resource_type: str, resource_id: str, vid: int) -> str:
    # Zero-padded so that ties on `ts` still sort by version.
    return f"{resource_type}/{resource_id}/{vid:010d}"


def _versions_of(resource_type: str, resource_id: str) -> dict[str, Any]:
    """The history entries of one resource: equality on its id and type (index `i_1_t_1`). An
    `_id` range would say the same, but the embedded database answers ranges on `_id` by
    reading the whole history (200 ms for 4,000 entries, on every read of an unknown id)."""
    return {"i": resource_id, "t": resource_type}


def _stamp(resource: dict[str, Any], resource_id: str, vid: int, ts: datetime) -> dict[str, Any]:
    """Server-owned id and meta first, whatever the client sent for them."""
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(vid)
    meta["lastUpdated"] = instant(ts)
    body = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}
    return {"resourceType": resource["resourceType"], "id": resource_id, "meta": meta, **body}


def _version(doc: dict[str, Any], resource_type: str | None = None) -> Version:
    ts = doc["ts"].astimezone(UTC)
    if "t" in doc:  # history entry
        return Version(doc["t"], doc["i"], doc["v"], ts, doc["m"], doc.get("res"), doc.get("c", False))
    assert resource_type is not None
    return Version(resource_type, doc["_id"], doc["v"], ts, doc.get("m", "PUT"), doc.get("res"))


def _just_after(ts: datetime) -> datetime:
    try:
        return ts + timedelta(milliseconds=1)
    except OverflowError:
        return ts


def encode_cursor(ts: datetime, key: str) -> str:
    raw = f"{int(ts.timestamp() * 1000)}:{key}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        millis, key = raw.split(":", 1)
        return datetime.fromtimestamp(int(millis) / 1000, UTC), key
    except (ValueError, UnicodeDecodeError, OverflowError, OSError) as exc:
        raise BadRequest("Invalid paging cursor", expression="_cursor") from exc


def current_document(entry: dict[str, Any], search_indexing: bool = True, base_url: str = "") -> dict[str, Any]:
    """The current-collection document of history entry `entry`, with its search index."""
    resource = entry.get("res")
    doc: dict[str, Any] = {"_id": entry["i"], "v": entry["v"], "ts": entry["ts"], "m": entry["m"], "del": resource is None}
    if resource is not None:
        doc["res"] = resource
        if search_indexing:
            doc.update(index_document(resource, entry["ts"], base_url))
            doc["ixv"] = table_fingerprint(base_url)
    return doc


def _entry(
    resource_type: str, resource_id: str, current: Version | None, change: Change, ts: datetime
) -> dict[str, Any]:
    """The history entry of the version after `current`."""
    vid = (current.vid if current else 0) + 1
    entry: dict[str, Any] = {
        "_id": _history_id(resource_type, resource_id, vid),
        "t": resource_type,
        "i": resource_id,
        "v": vid,
        "ts": ts,
        "m": change.method,
    }
    if change.resource is not None:
        entry["res"] = _stamp(change.resource, resource_id, vid, ts)
        if current is None or current.deleted:
            entry["c"] = True
    return entry


def _duplicates_only(exc: BulkWriteError) -> bool:
    return all(e.get("code") == 11000 for e in exc.details.get("writeErrors", [])) and not exc.details.get(
        "writeConcernErrors"
    )


class ResourceRepository:
    """Versioned storage of FHIR resources. Knows MongoDB; knows no HTTP."""

    def __init__(self, db: AsyncDatabase, *, search_indexing: bool = True, base_url: str = "") -> None:
        self.db = db
        self.history = db[HISTORY]
        self._indexed: set[str] = set()
        self.transactions = False  # set by `prepare`
        self.embedded = False  # the embedded database: set by `prepare`
        self.search_indexing = search_indexing  # off only to measure what indexing costs
        self.base_url = base_url  # absolute references to it are indexed as local ones

    async def prepare(self, transactions: str = "auto") -> None:
        """Choose how writes are made atomic, and create the shared indexes.

        `auto`: in a transaction on a MongoDB replica set or sharded cluster; ordered writes,
        repaired on read, on a standalone server and on the embedded server, whose committed
        transactions do not survive `kill -9` (measured with SecantusDB 0.7.0b3).
        """
        build = await self.db.client.admin.command("buildInfo")
        self.embedded = "secantusVersion" in build
        if transactions == "auto":
            hello = await self.db.client.admin.command("hello")
            replicated = "setName" in hello or hello.get("msg") == "isdbgrid"
            self.transactions = replicated and not self.embedded
        else:
            self.transactions = transactions == "on"
        LOGGER.info("writes %s", "in transactions" if self.transactions else "ordered, repaired on read")
        await self.ensure_indexes()
        if not self.transactions:
            await self.recover()
        await self._check_search_index()

    async def _check_search_index(self) -> None:
        """Warn when stored resources were indexed with another parameter table or format."""
        marker = await self.db[SERVER].find_one({"_id": SEARCH_INDEX})
        if marker is None and not await self.stored_types():
            await self.mark_search_index()  # a new database: indexed as written from now on
        elif marker is None or marker.get("fingerprint") != table_fingerprint(self.base_url):
            LOGGER.warning(
                "stored resources were indexed for search by another version: "
                "run `fhir-server reindex` so that searches find them all"
            )

    async def mark_search_index(self) -> None:
        """Record that every stored resource is indexed with the current parameter table."""
        await self.db[SERVER].update_one(
            {"_id": SEARCH_INDEX}, {"$set": {"fingerprint": table_fingerprint(self.base_url)}}, upsert=True
        )

    async def ensure_indexes(self) -> None:
        # Ascending keys, scanned backwards for newest-first; one resource's versions are the `_id`
        # range `Type/id/…` and need no index of their own. Time ranges are half-open (`$gte low`,
        # `$lt high + 1 ms`): the embedded server drops the boundary of an inclusive date bound on
        # the index direction's far side, and with millisecond times both forms select the same.
        await self.history.create_index([("t", ASCENDING), ("ts", ASCENDING), ("_id", ASCENDING)])
        await self.history.create_index([("ts", ASCENDING), ("_id", ASCENDING)])
        await self.history.create_index([("i", ASCENDING), ("t", ASCENDING)])  # one resource's versions
        await self.db[TRANSACTIONS].create_index("exp", expireAfterSeconds=0)
        await self.db[TRANSACTIONS].create_index("state")  # the few in flight among a day's records

    async def collection(self, resource_type: str) -> AsyncCollection:
        """The current-version collection of a type, with its indexes."""
        collection = self.db[resource_type]
        if resource_type not in self._indexed:  # a per-process cache: creating is idempotent
            for key in index_keys():
                await collection.create_index(key)
            self._indexed.add(resource_type)
        return collection

    # -- reads -------------------------------------------------------------------------------

    async def read(self, resource_type: str, resource_id: str) -> Version | None:
        """The current version (possibly a deletion), or None if the resource never existed."""
        doc = await self.db[resource_type].find_one({"_id": resource_id}, VERSION_FIELDS)
        if self.transactions:  # history and current are written together: nothing to repair
            return None if doc is None else _version(doc, resource_type)
        # Repair: a history entry whose current write was interrupted.
        if doc is None:
            pending = await self.history.find_one(
                _versions_of(resource_type, resource_id), sort=[("_id", DESCENDING)]
            )
        else:
            pending = await self.history.find_one({"_id": _history_id(resource_type, resource_id, doc["v"] + 1)})
        if pending is None or not await self._committed(pending):
            return None if doc is None else _version(doc, resource_type)
        await self._apply(resource_type, pending, None)
        return _version(pending)

    async def read_version(self, resource_type: str, resource_id: str, vid: int) -> Version | None:
        doc = await self.history.find_one({"_id": _history_id(resource_type, resource_id, vid)})
        return None if doc is None or not await self._committed(doc) else _version(doc)

    async def find(self, resource_type: str, query: dict[str, Any], *, limit: int) -> list[Version]:
        """Current versions matching a filter built by `to_mongo`, in id order."""
        if limit <= 0:
            return []
        cursor = self.db[resource_type].find(query, VERSION_FIELDS).sort("_id", ASCENDING)
        return [_version(doc, resource_type) async for doc in cursor.limit(limit)]

    async def find_ids(
        self, resource_type: str, query: dict[str, Any], sort: list[tuple[str, int]], *, limit: int
    ) -> list[str]:
        """The ids of matching current versions, in `sort` order, at most `limit`."""
        return [doc["_id"] for doc in await self.find_sort_keys(resource_type, query, sort, limit=limit)]

    async def fetch(self, resource_type: str, ids: list[str]) -> list[Version]:
        """Current, not deleted versions of `ids`, in that order (missing ones left out)."""
        if not ids:
            return []
        found = {
            doc["_id"]: _version(doc, resource_type)
            async for doc in self.db[resource_type].find({"_id": {"$in": ids}, "del": False}, VERSION_FIELDS)
        }
        return [found[i] for i in ids if i in found]

    async def find_sort_keys(
        self, resource_type: str, query: dict[str, Any], sort: list[tuple[str, int]], *, limit: int,
        ordered: bool = True,
    ) -> list[dict[str, Any]]:
        """`_id` and sort fields of matching current versions, in `sort` order (also to merge
        several types' results); in no order unless `ordered`."""
        if limit <= 0:
            return []
        cursor = self.db[resource_type].find(query, {"_id": 1, **{field: 1 for field, _ in sort}})
        if sort and ordered:
            cursor = cursor.sort(sort)
        return [doc async for doc in cursor.limit(limit)]

    async def stored_types(self) -> list[str]:
        """Resource types that have a collection."""
        names = await self.db.list_collection_names()
        return [n for n in names if n[:1].isupper()]

    async def count(self, resource_type: str, query: dict[str, Any]) -> int:
        return await self.db[resource_type].count_documents(query)

    async def index_values(
        self, resource_type: str, query: dict[str, Any], code: str, *, limit: int
    ) -> list[list[str]]:
        """The keys of parameter `code` of the matching resources (for reverse chaining)."""
        cursor = self.db[resource_type].find(query, {f"p.{code}": 1}).limit(limit)
        return [doc.get("p", {}).get(code, []) async for doc in cursor]

    async def aggregate(self, resource_type: str, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The results of an aggregation pipeline (built in `fhir_server.search`) over the
        current versions of a type."""
        cursor = await self.db[resource_type].aggregate(pipeline)
        return [doc async for doc in cursor]

    async def history_page(
        self,
        *,
        resource_type: str | None = None,
        resource_id: str | None = None,
        since: datetime | None = None,
        at: tuple[datetime, datetime] | None = None,
        count: int,
        cursor: str | None = None,
        leave_out: str | None = None,
    ) -> HistoryPage:
        """Versions newest first, `count` at a time; `cursor` continues after a previous page.

        `at=(low, high)` keeps the versions that were current at some moment of that period;
        `leave_out`: a type whose versions the system history does not list.
        """
        query: dict[str, Any] = {}
        if resource_type and resource_id:
            query = _versions_of(resource_type, resource_id)
        elif resource_type:
            query["t"] = resource_type
        elif leave_out:
            query["t"] = {"$ne": leave_out}
        ts_range: dict[str, datetime] = {}
        if since:
            ts_range["$gte"] = since
        if at:
            ts_range["$lt"] = _just_after(at[1])
        if ts_range:
            query["ts"] = ts_range
        total = None if at or cursor else await self.history.count_documents(query)
        if count == 0:
            return HistoryPage([], None, total)
        after: tuple[datetime, str] | None = decode_cursor(cursor) if cursor else None
        # Rounds of count + 1 entries, until one more than a page is kept: `_at` drops the
        # versions replaced before its period, and claims of uncommitted writes are skipped.
        versions: list[tuple[Version, str]] = []
        while True:
            round_query = query
            if after is not None:
                ts, key = after
                round_query = {"$and": [query, {"$or": [{"ts": {"$lt": ts}}, {"ts": ts, "_id": {"$lt": key}}]}]}
            found = self.history.find(round_query).sort([("ts", DESCENDING), ("_id", DESCENDING)]).limit(count + 1)
            docs = await found.to_list(None)
            versions.extend(await self._current_during(docs, at))
            if len(versions) > count or len(docs) <= count:
                break
            after = (docs[-1]["ts"], docs[-1]["_id"])
        next_cursor = None
        if len(versions) > count:
            last_version, last_key = versions[count - 1]
            next_cursor = encode_cursor(last_version.ts, last_key)
        return HistoryPage([v for v, _ in versions[:count]], next_cursor, total)

    async def _current_during(
        self, docs: list[dict[str, Any]], at: tuple[datetime, datetime] | None
    ) -> list[tuple[Version, str]]:
        """Keep the versions not yet replaced when the period starts (all of them without `at`)."""
        docs = await self._visible(docs)
        if not at or not docs:
            return [(_version(d), d["_id"]) for d in docs]
        low = at[0]
        older = [d for d in docs if d["ts"] < low]
        successors = {
            _history_id(d["t"], d["i"], d["v"] + 1): d for d in older
        }
        replaced_before_low = set()
        async for nxt in self.history.find({"_id": {"$in": list(successors)}}, {"ts": 1}):
            if nxt["ts"] <= low:
                replaced_before_low.add(successors[nxt["_id"]]["_id"])
        return [(_version(d), d["_id"]) for d in docs if d["_id"] not in replaced_before_low]

    # -- re-indexing -------------------------------------------------------------------------

    def _stale(self, everything: bool) -> dict[str, Any]:
        return {"del": False} if everything else {"del": False, "ixv": {"$ne": table_fingerprint(self.base_url)}}

    async def count_stale(self, resource_type: str, everything: bool = False) -> int:
        """Current resources indexed with another parameter table (or all, `everything`)."""
        return await self.db[resource_type].count_documents(self._stale(everything))

    async def reindex(self, resource_type: str, everything: bool = False) -> AsyncIterator[int]:
        """Recompute the search index of stale resources; yields after each one. A resource
        changed meanwhile is left alone: its writer indexed it."""
        collection = await self.collection(resource_type)
        async for doc in collection.find(self._stale(everything), {"v": 1, "ts": 1, "res": 1}):
            fields = index_document(doc["res"], doc["ts"].replace(tzinfo=UTC), self.base_url)
            fields["ixv"] = table_fingerprint(self.base_url)
            await collection.update_one({"_id": doc["_id"], "v": doc["v"]}, {"$set": fields})
            yield 1

    # -- writes ------------------------------------------------------------------------------

    async def write(
        self, resource_type: str, resource_id: str, decide: Decide, *, new_id: bool = False
    ) -> tuple[Version | None, Version | None]:
        """Store the next version chosen by `decide`; returns (new version or None, previous).

        `new_id`: the id was just minted by the server, so the first attempt need not look for a
        current version.
        """
        collection = await self.collection(resource_type)
        for attempt in range(MAX_ATTEMPTS):
            look = attempt > 0 or not new_id
            try:
                if not self.transactions:
                    return await self._attempt(collection, resource_id, decide, look, None)
                async with self.db.client.start_session() as session:
                    return await session.with_transaction(
                        lambda s, look=look: self._attempt(collection, resource_id, decide, look, s)
                    )
            except DuplicateKeyError:  # another writer claimed this version: start again
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
        raise Conflict(
            f"{resource_type}/{resource_id} is being changed by other writers (or a transaction); try again",
            headers={"Retry-After": "1"},
        )

    async def _attempt(
        self,
        collection: AsyncCollection,
        resource_id: str,
        decide: Decide,
        look: bool,
        session: AsyncClientSession | None,
    ) -> tuple[Version | None, Version | None]:
        resource_type = collection.name
        doc = None
        if look:
            doc = await collection.find_one({"_id": resource_id}, VERSION_FIELDS, session=session)
        current = None if doc is None else _version(doc, resource_type)
        change = decide(current)
        if change is None and session is None:
            # Nothing to write, so no claim collides with a write interrupted after its history
            # entry: judge again on the version a read finds (and rolls forward).
            latest = await self.read(resource_type, resource_id)
            if _vid(latest) != _vid(current):
                current = latest
                change = decide(current)
        if change is None:
            return None, current
        ts = _now() if current is None else max(_now(), current.ts)
        entry = _entry(resource_type, resource_id, current, change, ts)
        doc = self._document(entry)
        try:
            await self.history.insert_one(entry, session=session)
        except DuplicateKeyError:
            if session is None:  # make sure the winner's write is applied: it may have crashed
                claimed = await self.history.find_one({"_id": entry["_id"]})
                if claimed is not None and await self._committed(claimed):
                    await self._apply(resource_type, claimed, None)
            raise
        await self._apply(resource_type, entry, session, doc)
        return _version(entry), current

    def _document(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The current document of `entry`, refused before anything is written when too large."""
        doc = current_document(entry, self.search_indexing, self.base_url)
        if len(bson.encode(doc, codec_options=self.db.codec_options)) > MAX_DOCUMENT:
            raise PayloadTooLarge(f"{entry['t']}/{entry['i']} with its search index would exceed 16 MiB")
        return doc

    async def _apply(
        self,
        resource_type: str,
        entry: dict[str, Any],
        session: AsyncClientSession | None,
        doc: dict[str, Any] | None = None,
    ) -> None:
        """Make history `entry` the current version, if the current one is its predecessor."""
        collection = await self.collection(resource_type)
        doc = doc or current_document(entry, self.search_indexing, self.base_url)
        if entry["v"] == 1:
            try:
                await collection.insert_one(doc, session=session)
            except DuplicateKeyError:
                if session is not None:
                    raise  # inside a transaction: let it abort and retry
        else:
            await collection.replace_one({"_id": entry["i"], "v": entry["v"] - 1}, doc, session=session)

    # -- several resources, all or nothing -------------------------------------------------------

    async def write_all(self, planned: list[Planned], kept: Sequence[Version] = ()) -> list[Version]:
        """Store every planned change or none; all versions get one timestamp.

        Raises StaleWrite when a resource is no longer at the version its change was decided
        against (a concurrent writer won): the caller decides again and retries. So it does
        when one of `kept` (versions decided to stay as they are: updates that change nothing)
        is no longer current, since the caller's answer for it would then be wrong.

        Without durable database transactions, the commit is made of journaled single-document
        writes: a commit record `pending` listing the history entries; the entries themselves,
        marked with the record's id (their unique `_id`s claim the versions, so a racing writer
        of the same resource fails here and nothing is visible yet: readers and history skip
        entries of uncommitted records); the record switched to `committed` (the commit point);
        then the current documents, and the record `applied`. A crash before the
        commit point leaves claims that the next reader, writer or start-up discards once the
        record's lease ends; after it, the same actors finish the work. `kept` versions are
        checked just before the commit point: a later version of one, claimed or committed,
        fails the commit.
        """
        if not planned and not kept:
            return []
        ts = max([_now()] + [p.current.ts for p in planned if p.current is not None])
        entries = sorted(  # one order for every writer: racing transactions collide on their first shared entry
            (_entry(p.type, p.id, p.current, p.change, ts) for p in planned), key=lambda e: e["_id"]
        )
        docs = {e["_id"]: self._document(e) for e in entries}
        for resource_type in {e["t"] for e in entries}:
            await self.collection(resource_type)
        if self.transactions:
            await self._write_all_in_transaction(entries, docs, kept)
        else:
            await self._write_all_claimed(entries, docs, kept)
        by_id = {e["_id"]: _version(e) for e in entries}
        return [by_id[_history_id(p.type, p.id, (p.current.vid if p.current else 0) + 1)] for p in planned]

    async def _write_all_in_transaction(
        self, entries: list[dict[str, Any]], docs: dict[str, dict[str, Any]], kept: Sequence[Version]
    ) -> None:
        async with self.db.client.start_session() as session:
            try:
                async with await session.start_transaction():
                    for version in kept:  # a write, so that a concurrent writer of it conflicts
                        pinned = await self.db[version.type].update_one(
                            {"_id": version.id, "v": version.vid}, {"$inc": {"pin": 1}}, session=session
                        )
                        if pinned.matched_count != 1:
                            raise StaleWrite(f"{version.type}/{version.id} changed meanwhile")
                    if entries:
                        await self.history.insert_many(entries, ordered=True, session=session)
                    for resource_type, group in _by_type(entries).items():
                        ops = [_current_write(e, docs[e["_id"]]) for e in group]
                        result = await self.db[resource_type].bulk_write(ops, ordered=True, session=session)
                        if result.inserted_count + result.matched_count != len(ops):
                            raise StaleWrite("a resource changed meanwhile")
            except DuplicateKeyError as exc:
                raise StaleWrite(str(exc)) from exc
            except BulkWriteError as exc:
                if not _duplicates_only(exc):
                    raise
                raise StaleWrite(str(exc)) from exc
            except OperationFailure as exc:
                if exc.has_error_label("TransientTransactionError"):
                    raise StaleWrite(str(exc)) from exc
                raise

    async def _write_all_claimed(
        self, entries: list[dict[str, Any]], docs: dict[str, dict[str, Any]], kept: Sequence[Version]
    ) -> None:
        if not entries:
            await self._check_kept(kept)
            return
        records = self.db[TRANSACTIONS]
        tx = uuid.uuid4().hex
        claims = [e["_id"] for e in entries]
        await records.insert_one(
            {"_id": tx, "state": "pending", "lease": _now() + TRANSACTION_LEASE, "ts": entries[0]["ts"], "claims": claims}
        )
        try:
            try:
                await self.history.insert_many([{**e, "tx": tx} for e in entries], ordered=True)
            except BulkWriteError as exc:
                if not _duplicates_only(exc):
                    raise
                raise StaleWrite("another writer claimed a version first") from exc
            await self._check_kept(kept)
            committed = await records.update_one({"_id": tx, "state": "pending"}, {"$set": {"state": "committed"}})
            if committed.modified_count != 1:  # taken for abandoned after its lease: not committed
                raise StaleWrite("the commit record expired before the commit")
        except BaseException:
            await self._discard(tx, owner=True)
            raise
        try:
            await self._finish(tx, entries, docs)
        except Exception:  # committed: readers, later writers and start-up finish it
            LOGGER.exception("transaction %s committed; applying it failed and is left to recovery", tx)

    async def _check_kept(self, kept: Sequence[Version]) -> None:
        """StaleWrite when a later version of one of `kept` is claimed or stored: every writer
        inserts its history entry first. Claims of abandoned writes are discarded, not waited for."""
        if not kept:
            return
        later = {"_id": {"$in": [_history_id(v.type, v.id, v.vid + 1) for v in kept]}}
        found = await self.history.find(later).to_list(None)
        if not found:
            return
        await self._visible(found)
        if await self.history.find_one(later, {"_id": 1}) is not None:
            raise StaleWrite("a version decided to stay as it is changed meanwhile")

    async def _finish(self, tx: str, entries: list[dict[str, Any]], docs: dict[str, dict[str, Any]] | None = None) -> None:
        """Apply a committed record's entries (idempotent). The entries keep their mark: a
        reader meeting it finds the record `applied` (or, once it has expired, the entry still
        there, since discarded claims are deleted first), and rewriting them would double the
        cost of the history writes."""
        for resource_type, group in _by_type(entries).items():
            ops = [_current_write(e, (docs or {}).get(e["_id"]) or self._document(e)) for e in group]
            try:
                await self.db[resource_type].bulk_write(ops, ordered=False)
            except BulkWriteError as exc:  # versions already applied by a reader or an earlier run
                if not _duplicates_only(exc):
                    raise
        await self.db[TRANSACTIONS].update_one(
            {"_id": tx}, {"$set": {"state": "applied", "exp": _now() + TRANSACTION_KEPT}, "$unset": {"lease": ""}}
        )

    async def _discard(self, tx: str, owner: bool = False) -> None:
        """Abort a record that is still pending, and remove the claims of an aborted one (also
        those its owner inserted after someone else aborted it: `owner`, or met later). A
        discarded record is kept, so that its claims are never taken for committed ones."""
        records = self.db[TRANSACTIONS]
        await records.update_one({"_id": tx, "state": "pending"}, {"$set": {"state": "aborted"}})
        record = await records.find_one({"_id": tx})
        if record is None or record["state"] not in ("aborted", "discarded"):
            return
        await self.history.delete_many({"_id": {"$in": record["claims"]}, "tx": tx})
        if record["state"] == "aborted" or owner:
            await records.update_one({"_id": tx}, {"$set": {"state": "discarded"}, "$unset": {"lease": ""}})

    async def _committed(self, entry: dict[str, Any]) -> bool:
        """Whether a history entry is part of the record: not a claim of an uncommitted write."""
        return bool(await self._visible([entry]))

    async def _visible(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The entries that are not claims of uncommitted writes (discarding abandoned ones)."""
        marks = {e["tx"] for e in entries if "tx" in e}
        if not marks:
            return entries
        records = {r["_id"]: r async for r in self.db[TRANSACTIONS].find({"_id": {"$in": list(marks)}})}
        verdicts: dict[str, bool] = {}
        for tx in marks:
            record = records.get(tx)
            # No record: applied long ago (discarded records are kept).
            if record is None or record["state"] in ("committed", "applied"):
                verdicts[tx] = True
                if record is not None and record["state"] == "committed" and _lapsed(record):
                    await self._finish_record(record)  # its writer died after the commit point
            else:
                if record["state"] != "pending" or _lapsed(record):
                    await self._discard(tx)
                verdicts[tx] = False
        return [e for e in entries if "tx" not in e or verdicts[e["tx"]]]

    async def recover(self) -> None:
        """Finish committed multi-resource writes and discard abandoned ones (at start-up)."""
        records = self.db[TRANSACTIONS]
        async for record in records.find({"state": {"$in": ["pending", "committed", "aborted"]}}):
            if record["state"] == "committed":
                await self._finish_record(record)
            elif record["state"] == "aborted" or _lapsed(record):
                await self._discard(record["_id"])

    async def _finish_record(self, record: dict[str, Any]) -> None:
        LOGGER.warning("finishing transaction %s interrupted after its commit", record["_id"])
        entries = await self.history.find({"_id": {"$in": record["claims"]}}).to_list(None)
        await self._finish(record["_id"], entries)

    async def changed_since(self, resource_types: Sequence[str], since: datetime) -> bool:
        """Whether a version of `resource_types` stamped at `since` or later is current, or a
        multi-resource write is in flight (its versions may be stamped earlier). Deleting
        stamps a version too."""
        for resource_type in resource_types:
            if await (await self.collection(resource_type)).find_one({"ts": {"$gte": since}}, {"_id": 1}) is not None:
                return True
        return await self.in_flight_since() is not None

    async def in_flight_since(self) -> datetime | None:
        """The earliest timestamp of a multi-resource write not yet applied (None: none is):
        its versions are stamped then but reach the current collections later."""
        oldest = None
        async for record in self.db[TRANSACTIONS].find({"state": {"$in": ["pending", "committed"]}}, {"ts": 1}):
            if "ts" in record and (oldest is None or record["ts"] < oldest):
                oldest = record["ts"].replace(tzinfo=UTC)
        return oldest


def _vid(version: Version | None) -> int:
    return version.vid if version else 0


def _lapsed(record: dict[str, Any]) -> bool:
    lease = record.get("lease")
    return lease is None or lease.replace(tzinfo=UTC) < _now()


def _by_type(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(entry["t"], []).append(entry)
    return groups


def _current_write(entry: dict[str, Any], doc: dict[str, Any]) -> InsertOne | ReplaceOne:
    """Version 1 is inserted; a later one replaces its predecessor only."""
    if entry["v"] == 1:
        return InsertOne(doc)
    return ReplaceOne({"_id": entry["i"], "v": entry["v"] - 1}, doc)
