"""Short-lived named locks kept in MongoDB, so that every server process sees them.

Used to serialise conditional creates and updates of the same criteria: without one, two
simultaneous `If-None-Exist` creates both find nothing and both create. Also held per
practitioner while an Appointment is checked against double booking and written.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from fhir_server.errors import Conflict

LOCKS = "locks"


@asynccontextmanager
async def hold(
    db: AsyncDatabase, key: str, *, lease_s: float = 30.0, wait_s: float = 20.0
) -> AsyncIterator[None]:
    """Hold lock `key` for the block. The lease is renewed while the block runs; a holder that
    died loses the lock when its lease ends."""
    locks = db[LOCKS]
    owner = uuid.uuid4().hex
    deadline = asyncio.get_running_loop().time() + wait_s
    delay = 0.002
    while True:
        now = datetime.now(UTC)
        try:
            await locks.insert_one({"_id": key, "owner": owner, "expires": now + timedelta(seconds=lease_s)})
            break
        except DuplicateKeyError:
            await locks.delete_one({"_id": key, "expires": {"$lt": now}})  # a dead holder's lease
        if asyncio.get_running_loop().time() > deadline:
            raise Conflict(f"Timed out waiting for a concurrent request on '{key[:200]}'")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    renewal = asyncio.create_task(_renew(locks, key, owner, lease_s))
    try:
        yield
    finally:
        renewal.cancel()
        await locks.delete_one({"_id": key, "owner": owner})


async def _renew(locks: AsyncCollection, key: str, owner: str, lease_s: float) -> None:
    """Extend the lease while the holder works, so a slow holder is not taken for a dead one."""
    while True:
        await asyncio.sleep(lease_s / 3)
        expires = datetime.now(UTC) + timedelta(seconds=lease_s)
        await locks.update_one({"_id": key, "owner": owner}, {"$set": {"expires": expires}})
