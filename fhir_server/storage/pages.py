"""Search result snapshots for paging, kept in MongoDB so any server process serves any page.

The first page of a search stores the ordered references of every match (up to a limit), in
chunks; later pages read a slice of it. Pages therefore never repeat or skip a match when data
changes between requests. Page tokens are signed (HMAC with a per-deployment secret kept in the
database), so a forged token is told apart from an expired one: 400 against 410.
"""

import base64
import contextlib
import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from fhir_server.errors import BadRequest, Gone
from fhir_server.storage.repository import SERVER

PAGES = "pages"
CHUNK = 1000


class PageStore:
    def __init__(self, db: AsyncDatabase, ttl_s: float) -> None:
        self.pages = db[PAGES]
        self.server = db[SERVER]
        self.ttl = timedelta(seconds=ttl_s)
        self._secret = b""

    async def prepare(self) -> None:
        """Create the expiry index and load (or create, once per deployment) the signing key."""
        await self.pages.create_index("exp", expireAfterSeconds=0)
        with contextlib.suppress(DuplicateKeyError):
            await self.server.insert_one({"_id": "page-secret", "key": secrets.token_hex(32)})
        doc = await self.server.find_one({"_id": "page-secret"})
        assert doc is not None
        self._secret = bytes.fromhex(doc["key"])

    def _sign(self, snapshot: str, offset: int, fingerprint: str) -> str:
        mac = hmac.new(self._secret, f"{snapshot}.{offset}.{fingerprint}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode()

    def token(self, snapshot: str, offset: int, fingerprint: str) -> str:
        return f"{snapshot}.{offset}.{self._sign(snapshot, offset, fingerprint)}"

    def parse(self, token: str, fingerprint: str) -> tuple[str, int]:
        """(snapshot id, offset) of a token made for this search; 400 for anything else."""
        parts = token.split(".")
        if len(parts) == 3 and parts[1].isascii() and parts[1].isdigit() and len(parts[1]) < 10:
            snapshot, offset, signature = parts[0], int(parts[1]), parts[2]
            if hmac.compare_digest(signature, self._sign(snapshot, offset, fingerprint)):
                return snapshot, offset
        raise BadRequest("Invalid page token (not issued by this server for this search)", expression="_page")

    async def save(self, refs: list[str], total: int) -> str:
        snapshot = secrets.token_urlsafe(12).replace(".", "_")
        expires = datetime.now(UTC) + self.ttl
        docs = [
            {"_id": f"{snapshot}:{n}", "refs": refs[start:start + CHUNK], "exp": expires, "total": total,
             "stored": len(refs)}
            for n, start in enumerate(range(0, max(len(refs), 1), CHUNK))
        ]
        await self.pages.insert_many(docs)
        return snapshot

    async def load(self, snapshot: str, offset: int, count: int) -> tuple[list[str], int, int]:
        """(references of the page, total, number of references stored)."""
        first, last = offset // CHUNK, (offset + max(count, 1) - 1) // CHUNK
        wanted = [f"{snapshot}:{n}" for n in range(first, last + 1)] + [f"{snapshot}:0"]
        docs = {d["_id"]: d async for d in self.pages.find({"_id": {"$in": wanted}})}
        head = docs.get(f"{snapshot}:0")
        now = datetime.now(UTC)
        if head is None or head["exp"].replace(tzinfo=UTC) < now:
            raise Gone("This page of search results has expired; run the search again")
        refs: list[str] = []
        for n in range(first, last + 1):
            refs.extend(docs.get(f"{snapshot}:{n}", {}).get("refs", []))
        start = offset - first * CHUNK
        return refs[start:start + count], head["total"], head.get("stored", head["total"])
