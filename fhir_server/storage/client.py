"""Database connection lifecycle: the MongoDB client, its write concern, and the embedded fallback."""

import asyncio
import logging
import urllib.parse
from dataclasses import dataclass
from decimal import Decimal

from bson.codec_options import CodecOptions, TypeCodec, TypeRegistry
from bson.decimal128 import Decimal128
from pymongo import AsyncMongoClient, MongoClient, WriteConcern
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database as SyncDatabase

from fhir_server.config import Settings
from fhir_server.storage.embedded import EmbeddedDatabase

LOGGER = logging.getLogger(__name__)


class DecimalCodec(TypeCodec):
    """FHIR decimals as BSON Decimal128, so that their precision survives storage."""

    python_type = Decimal
    bson_type = Decimal128

    def transform_python(self, value: Decimal) -> Decimal128:
        return Decimal128(value)

    def transform_bson(self, value: Decimal128) -> Decimal:
        return value.to_decimal()


CODEC_OPTIONS: CodecOptions = CodecOptions(tz_aware=True, type_registry=TypeRegistry([DecimalCodec()]))


def write_concern(settings: Settings) -> WriteConcern:
    w: int | str = int(settings.write_concern_w) if settings.write_concern_w.isdigit() else settings.write_concern_w
    return WriteConcern(w=w, j=settings.write_journal)


@dataclass
class Database:
    client: AsyncMongoClient
    db: AsyncDatabase
    # The same database through the synchronous driver, for readers in threads of their own:
    # the DICOM node's associations read the catalog without a trip to the event loop.
    reader: SyncDatabase
    embedded: EmbeddedDatabase | None = None

    async def ping(self, timeout_s: float = 2.0) -> bool:
        try:
            await asyncio.wait_for(self.client.admin.command("ping"), timeout_s)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not reachable" for a probe
            return False

    async def close(self) -> None:
        await self.client.close()
        await asyncio.to_thread(self.reader.client.close)
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


async def open_database(settings: Settings) -> Database:
    """Connect to MONGODB_URI, or start the embedded database under the data folder."""
    embedded = None
    uri = settings.mongodb_uri
    if not uri:
        embedded = EmbeddedDatabase(settings.data_dir / "db", settings.embedded_cache_size)
        await asyncio.to_thread(embedded.start)
        uri = embedded.uri
    client: AsyncMongoClient = AsyncMongoClient(uri, tz_aware=True, **_unless_given(uri, serverSelectionTimeoutMS=10_000))
    db = client.get_database(
        settings.mongodb_db, codec_options=CODEC_OPTIONS, write_concern=write_concern(settings)
    )
    # Its reads wait at most 5 minutes for an answer (a query of the DICOM node never hangs its association).
    reader: MongoClient = MongoClient(uri, tz_aware=True, connect=False,
                                      **_unless_given(uri, serverSelectionTimeoutMS=10_000, socketTimeoutMS=300_000))
    return Database(client, db, reader.get_database(settings.mongodb_db, codec_options=CODEC_OPTIONS), embedded)


def _unless_given(uri: str, **defaults: int) -> dict[str, int]:
    """The client options `defaults`, but for those the URI sets itself (option names are
    case-insensitive): the operator's `?serverSelectionTimeoutMS=` wins over the server's."""
    given = {name.lower() for name, _ in urllib.parse.parse_qsl(uri.partition("?")[2])}
    return {name: value for name, value in defaults.items() if name.lower() not in given}
