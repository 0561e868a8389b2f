"""Conditional-request locks in MongoDB: a slow holder keeps its lock, a dead one loses it."""

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from conftest import unique
from pymongo import AsyncMongoClient

from fhir_server.errors import Conflict
from fhir_server.storage import locks
from fhir_server.storage.embedded import EmbeddedDatabase


def test_a_holder_slower_than_its_lease_keeps_the_lock(database: EmbeddedDatabase) -> None:
    async def scenario() -> None:
        client: AsyncMongoClient = AsyncMongoClient(database.uri, tz_aware=True)
        db, key = client["fhir_lock_tests"], f"slow-{unique()}"
        try:
            async with locks.hold(db, key, lease_s=0.3):
                await asyncio.sleep(1.0)  # three leases long: renewed meanwhile
                with pytest.raises(Conflict):
                    async with locks.hold(db, key, lease_s=0.3, wait_s=0.5):
                        pass
            async with locks.hold(db, key, wait_s=0.5):  # released on exit
                pass
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_dead_holders_lock_is_taken_over_when_its_lease_ends(database: EmbeddedDatabase) -> None:
    async def scenario() -> None:
        client: AsyncMongoClient = AsyncMongoClient(database.uri, tz_aware=True)
        db, key = client["fhir_lock_tests"], f"dead-{unique()}"
        try:
            expires = datetime.now(UTC) + timedelta(seconds=0.5)
            await db[locks.LOCKS].insert_one({"_id": key, "owner": "crashed", "expires": expires})
            async with locks.hold(db, key, wait_s=5):
                assert (await db[locks.LOCKS].find_one({"_id": key}))["owner"] != "crashed"
        finally:
            await client.close()

    asyncio.run(scenario())
