"""Mailed links (confirm an address, reset a password): JWTs signed by the server's key, bound
to one purpose and one account, short-lived and good for one use (their ids are kept in
`auth_links_used` until they expire). Their audience is the page they are for, never the FHIR
base, so none of them is an access token.
"""

import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import jwt
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from fhir_server.auth.tokens import ALGORITHM, SigningKey

USED = "auth_links_used"
Purpose = Literal["confirm", "reset"]


class InvalidLink(Exception):
    """A link that is malformed, expired, for another purpose, or used already."""


def make(key: SigningKey, issuer: str, purpose: Purpose, account_id: str, lifetime_s: int, **extra: Any) -> str:
    now = int(time.time())
    return key.sign({"iss": issuer, "aud": f"{issuer}/{purpose}", "sub": account_id, "purpose": purpose,
                     "iat": now, "exp": now + lifetime_s, "jti": uuid.uuid4().hex, **extra})


async def check(db: AsyncDatabase, key: SigningKey, token: str, issuer: str, purpose: Purpose) -> dict[str, Any]:
    """The claims of a valid, unused link for `purpose`; InvalidLink otherwise."""
    try:
        claims = jwt.decode(token, key.private_key.public_key(), algorithms=[ALGORITHM], audience=f"{issuer}/{purpose}",
                            issuer=issuer, options={"require": ["exp", "sub", "jti", "purpose"]})
    except jwt.PyJWTError as exc:
        raise InvalidLink(str(exc)) from exc
    if claims["purpose"] != purpose:
        raise InvalidLink("a link for another purpose")
    if await db[USED].find_one({"_id": claims["jti"]}, {"_id": 1}):
        raise InvalidLink("the link was used already")
    return claims


async def use(db: AsyncDatabase, key: SigningKey, token: str, issuer: str, purpose: Purpose) -> dict[str, Any]:
    """Like `check`, and the link is spent: of two uses at once, one only succeeds."""
    claims = await check(db, key, token, issuer, purpose)
    try:
        await db[USED].insert_one({"_id": claims["jti"], "expires": datetime.fromtimestamp(claims["exp"] + 60, UTC)})
    except DuplicateKeyError as exc:
        raise InvalidLink("the link was used already") from exc
    return claims


async def prepare(db: AsyncDatabase) -> None:
    await db[USED].create_index("expires", expireAfterSeconds=0)
