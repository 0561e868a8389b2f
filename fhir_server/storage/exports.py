"""Bulk export jobs in MongoDB, their files on disk, and the reads an export makes.

A job document holds all that a worker needs to run or resume the job and that a status request
needs to answer, so any server process can do either. A worker claims a job by compare-and-set on
its lease and renews the lease while it works; every later write of the worker is conditional on
still owning the job, so a cancelled job, or one taken over after its lease lapsed, is never
written by a worker that lost it. A type is recorded in the job only once all its files are on
disk under their final names: a resumed job redoes only the types not recorded.
"""

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from fhir_server.search.to_mongo import export_filter, referencing

EXPORTS = "exports"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # the lease of a job nobody holds
PART = ".part"
SUFFIX = ".ndjson"
FETCH_CHUNK = 100
# A Group's member list can be long: only the worker reads it.
STATUS_FIELDS = {"members": 0}


def _now() -> datetime:
    return datetime.now(UTC)


class ExportJobs:
    """The `exports` collection: one document per job."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.jobs = db[EXPORTS]

    async def prepare(self) -> None:
        await self.jobs.create_index("expires", expireAfterSeconds=0)
        await self.jobs.create_index([("status", ASCENDING), ("lease", ASCENDING)])

    async def create(self, job: dict[str, Any]) -> None:
        await self.jobs.insert_one({**job, "status": "queued", "lease": EPOCH, "attempts": 0, "done": {}})

    async def get(self, job_id: str, *, members: bool = False) -> dict[str, Any] | None:
        """The job, or None when unknown, cancelled or expired (the TTL monitor runs late)."""
        job = await self.jobs.find_one({"_id": job_id}, None if members else STATUS_FIELDS)
        if job is None or (job.get("expires") and job["expires"] < _now()):
            return None
        return job

    async def claim(self, owner: str, lease_s: float) -> dict[str, Any] | None:
        """Take the oldest job that is queued or whose worker's lease has lapsed."""
        now = _now()
        return await self.jobs.find_one_and_update(
            {"status": {"$in": ["queued", "running"]}, "lease": {"$lt": now}},
            {"$set": {"status": "running", "owner": owner, "lease": now + timedelta(seconds=lease_s)},
             "$inc": {"attempts": 1}},
            sort=[("created", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )

    async def renew(self, job_id: str, owner: str, lease_s: float, progress: dict[str, Any]) -> bool:
        """Extend the lease and publish progress; False when the job is no longer ours."""
        found = await self.jobs.update_one(
            {"_id": job_id, "owner": owner, "status": "running"},
            {"$set": {"lease": _now() + timedelta(seconds=lease_s), "progress": progress}},
        )
        return found.matched_count == 1

    async def record_type(self, job_id: str, owner: str, resource_type: str, files: list[dict[str, Any]]) -> bool:
        found = await self.jobs.update_one(
            {"_id": job_id, "owner": owner, "status": "running"},
            {"$set": {f"done.{resource_type}": files}},
        )
        return found.matched_count == 1

    async def finish(self, job_id: str, owner: str, errors: list[dict[str, Any]], ttl_s: float) -> bool:
        return await self._end(job_id, owner, ttl_s, status="complete", errors=errors)

    async def fail(self, job_id: str, owner: str, message: str, ttl_s: float) -> bool:
        return await self._end(job_id, owner, ttl_s, status="failed", error=message)

    async def _end(self, job_id: str, owner: str, ttl_s: float, **fields: Any) -> bool:
        """A running job this worker owns, ended: kept `ttl_s` for its status and files."""
        now = _now()
        found = await self.jobs.update_one(
            {"_id": job_id, "owner": owner, "status": "running"},
            {"$set": {**fields, "completed": now, "expires": now + timedelta(seconds=ttl_s)},
             "$unset": {"lease": "", "progress": ""}},
        )
        return found.matched_count == 1

    async def release(self, job_id: str, owner: str) -> None:
        """Give a running job back (the server stops): another worker takes it at once."""
        await self.jobs.update_one(
            {"_id": job_id, "owner": owner, "status": "running"},
            {"$set": {"lease": EPOCH}, "$inc": {"attempts": -1}},
        )

    async def delete(self, job_id: str) -> bool:
        return (await self.jobs.delete_one({"_id": job_id})).deleted_count == 1

    async def expire(self) -> None:
        await self.jobs.delete_many({"expires": {"$lt": _now()}})

    async def known(self, job_ids: list[str]) -> set[str]:
        return {doc["_id"] async for doc in self.jobs.find({"_id": {"$in": job_ids}}, {"_id": 1})}


class ExportFiles:
    """`<root>/<job id>/`: one folder of NDJSON files per job."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def path(self, job_id: str, name: str) -> Path:
        return self.folder(job_id) / name

    async def remove(self, job_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.folder(job_id), True)

    async def clear(self, job_id: str, prefix: str) -> None:
        """Remove the files (finished or not) of a previous attempt at one type."""

        def clear() -> None:
            folder = self.folder(job_id)
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.name.startswith(prefix):
                        path.unlink(missing_ok=True)

        await asyncio.to_thread(clear)

    async def folders(self) -> list[str]:
        def listing() -> list[str]:
            return [p.name for p in self.root.iterdir() if p.is_dir()] if self.root.is_dir() else []

        return await asyncio.to_thread(listing)

    async def write_all(self, job_id: str, name: str, lines: list[bytes]) -> None:
        """A small file in one go, as `.part` renamed when complete."""
        writer = NdjsonWriter(self.folder(job_id), name.removesuffix(SUFFIX))
        await writer.add(lines)
        await writer.finish()


class NdjsonWriter:
    """The files of one type, `<stem>-<n>.ndjson` of at most `limit` lines each (without a limit,
    one file `<stem>.ndjson`): written as `.part`, flushed to disk and renamed when complete, so
    a file under its final name is whole."""

    def __init__(self, folder: Path, stem: str, limit: int | None = None) -> None:
        self.folder = folder
        self.stem = stem
        self.limit = limit
        self.files: list[dict[str, Any]] = []  # finished: {"name", "count"}
        self._handle: IO[bytes] | None = None
        self._name = ""
        self._count = 0

    async def add(self, lines: list[bytes]) -> None:
        while lines:
            if self._handle is None:
                numbered = self.limit is not None
                self._name = f"{self.stem}-{len(self.files) + 1}{SUFFIX}" if numbered else self.stem + SUFFIX
                self._handle = await asyncio.to_thread(self._open, self.folder / (self._name + PART))
                self._count = 0
            room = len(lines) if self.limit is None else self.limit - self._count
            chunk, lines = lines[:room], lines[room:]
            await asyncio.to_thread(self._handle.write, b"".join(chunk))
            self._count += len(chunk)
            if self.limit is not None and self._count >= self.limit:
                await self._close()

    async def finish(self) -> list[dict[str, Any]]:
        if self._handle is not None:
            await self._close()
        return self.files

    async def abort(self) -> None:
        if self._handle is not None:
            await asyncio.to_thread(self._handle.close)
            self._handle = None

    @staticmethod
    def _open(path: Path) -> IO[bytes]:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb")  # noqa: SIM115 - closed by `_close` or `abort`

    async def _close(self) -> None:
        handle, name = self._handle, self._name
        assert handle is not None
        self._handle = None

        def complete() -> None:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(self.folder / (name + PART), self.folder / name)

        await asyncio.to_thread(complete)
        self.files.append({"name": name, "count": self._count})


class ExportReader:
    """The reads of an export on the current-version collections."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db

    async def scan(self, resource_type: str, fields: dict[str, int], batch: int) -> AsyncIterator[list[dict[str, Any]]]:
        """Every current document once, in natural order (one cursor: the embedded database
        pages an `_id` range by reading it whole each time)."""
        cursor = self.db[resource_type].find({}, fields).batch_size(batch)
        found: list[dict[str, Any]] = []
        async for doc in cursor:
            found.append(doc)
            if len(found) >= batch:
                yield found
                found = []
        if found:
            yield found

    async def fetch(self, resource_type: str, ids: list[str], fields: dict[str, int]) -> list[dict[str, Any]]:
        """By id, a hundred at a time: the embedded database slows down on longer `$in` lists."""
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), FETCH_CHUNK):
            query = export_filter(ids=ids[start:start + FETCH_CHUNK])
            found.extend([doc async for doc in self.db[resource_type].find(query, fields)])
        return found

    async def changed_ids(self, resource_type: str, moment: datetime, limit: int) -> list[str]:
        """Ids of the documents changed at or after `moment` (by the `ts` index), at most `limit`."""
        cursor = self.db[resource_type].find(export_filter(changed_from=moment), {"_id": 1}).limit(limit)
        return [doc["_id"] async for doc in cursor]

    async def referencing_ids(self, resource_type: str, codes: list[str], targets: list[str], limit: int) -> list[str]:
        cursor = self.db[resource_type].find(referencing(codes, targets), {"_id": 1}).limit(limit)
        return [doc["_id"] async for doc in cursor]

    async def estimate(self, resource_type: str) -> int:
        return await self.db[resource_type].estimated_document_count()
