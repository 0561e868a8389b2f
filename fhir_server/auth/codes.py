"""Authorization codes and refresh tokens of the `authorization_code` flow, in MongoDB, only as
SHA-256 digests (a copy of the database gives no usable code or token).

- A code (`auth_codes`) lives about a minute, is bound to its client, redirect URI and PKCE
  challenge (RFC 7636, S256), and is good once: a second use revokes what the first got
  (RFC 6749 4.1.2).
- Refresh tokens (`auth_refresh_tokens`) are rotated on each use; the tokens issued from one
  code are a family, and presenting a rotated one again (a stolen copy, or the thief's) revokes
  the whole family (OAuth 2.0 Security BCP 4.14).
"""

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from fhir_server.auth import tokens
from fhir_server.auth.clients import ClientError

CODES = "auth_codes"
REFRESH = "auth_refresh_tokens"
VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 4.1
CHALLENGE = re.compile(r"[A-Za-z0-9\-_]{43}")  # S256: base64url of 32 bytes, unpadded


@dataclass(frozen=True)
class Authorization:
    """What a user allowed an app: carried by a code, then by the refresh tokens it led to."""

    client_id: str
    account_id: str
    scope: str
    family: str = ""  # the code's digest: every token issued from it
    nonce: str | None = None  # OpenID Connect, echoed in the id_token


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


async def prepare(db: AsyncDatabase) -> None:
    await db[CODES].create_index("expires", expireAfterSeconds=0)
    await db[REFRESH].create_index("expires", expireAfterSeconds=0)
    await db[REFRESH].create_index("family")
    await db[REFRESH].create_index("account_id")


async def issue_code(db: AsyncDatabase, grant: Authorization, redirect_uri: str, challenge: str,
                     lifetime_s: int) -> str:
    code = secrets.token_urlsafe(32)
    await db[CODES].insert_one({
        "_id": digest(code), "client_id": grant.client_id, "account_id": grant.account_id, "scope": grant.scope,
        "nonce": grant.nonce, "redirect_uri": redirect_uri, "challenge": challenge, "used": False,
        "expires": datetime.now(UTC) + timedelta(seconds=lifetime_s)})
    return code


async def redeem_code(db: AsyncDatabase, code: str, client_id: str, redirect_uri: str, verifier: str) -> Authorization:
    """The authorization a code carries, once; ClientError `invalid_grant` for an unknown,
    expired or used code, another client's, another redirect URI, or a verifier that does not
    match its challenge. The code is spent by any attempt, so a verifier cannot be guessed."""
    key = digest(code)
    found = await db[CODES].find_one_and_update({"_id": key, "used": False}, {"$set": {"used": True}})
    if found is None:
        spent = await db[CODES].find_one({"_id": key})
        if spent is not None:  # a replayed code: what the first use got is revoked
            await revoke_family(db, key)
            if spent.get("access_jti"):
                await tokens.revoke(db, spent["access_jti"], int(spent["access_exp"]))
        raise ClientError("invalid_grant", "the code is not valid (unknown, expired or used already)")
    if _aware(found["expires"]) <= datetime.now(UTC):
        raise ClientError("invalid_grant", "the code has expired")
    if found["client_id"] != client_id:
        raise ClientError("invalid_grant", "the code was issued to another client")
    if found["redirect_uri"] != redirect_uri:
        raise ClientError("invalid_grant", "redirect_uri differs from the authorization request's")
    if not VERIFIER.fullmatch(verifier or "") or not secrets.compare_digest(s256(verifier), found["challenge"]):
        raise ClientError("invalid_grant", "code_verifier does not match the code_challenge (PKCE, S256)")
    return Authorization(found["client_id"], found["account_id"], found["scope"], key, found.get("nonce"))


async def note_access_token(db: AsyncDatabase, family: str, claims: dict[str, Any]) -> None:
    """Remember the access token a code gave, to revoke it should the code be replayed."""
    await db[CODES].update_one({"_id": family}, {"$set": {"access_jti": claims["jti"], "access_exp": claims["exp"]}})


async def issue_refresh(db: AsyncDatabase, grant: Authorization, lifetime_s: int, access: dict[str, Any]) -> str:
    token = secrets.token_urlsafe(32)
    await db[REFRESH].insert_one({
        "_id": digest(token), "family": grant.family, "client_id": grant.client_id, "account_id": grant.account_id,
        "scope": grant.scope, "used": False, "access_jti": access["jti"],
        "access_exp": access["exp"], "expires": datetime.now(UTC) + timedelta(seconds=lifetime_s)})
    return token


async def rotate_refresh(
    db: AsyncDatabase, token: str, client_id: str, asked: str = "", reuse_s: int = 0,
) -> Authorization:
    """The authorization a refresh token carries, spending the token;
    ClientError `invalid_grant` for an unknown or expired one, and for a spent one, whose
    whole family is then revoked, unless it was spent by its client less than `reuse_s` ago
    (two tabs of a browser renewing at once: the second gets tokens too). `asked`: the narrower
    scope wanted (RFC 6749 6); wider is `invalid_scope`, the token unspent (a retry with it must
    not look like a replay)."""
    key = digest(token)
    now = datetime.now(UTC)
    if asked:
        current = await db[REFRESH].find_one({"_id": key, "used": False}, {"scope": 1})
        if current is not None and not set(asked.split()) <= set(current["scope"].split()):
            raise ClientError("invalid_scope", "a refresh may ask for fewer scopes than were granted, not more")
    found = await db[REFRESH].find_one_and_update({"_id": key, "used": False, "expires": {"$gt": now}},
                                                  {"$set": {"used": True, "used_at": now}})
    if found is None:
        spent = await db[REFRESH].find_one({"_id": key})
        if spent is not None and _reusable(spent, client_id, reuse_s, now):
            return Authorization(spent["client_id"], spent["account_id"], spent["scope"], spent["family"])
        if spent is not None and spent.get("used"):
            await revoke_family(db, spent["family"])
        raise ClientError("invalid_grant", "the refresh token is not valid (unknown, expired, revoked or used already)")
    if found["client_id"] != client_id:
        await revoke_family(db, found["family"])
        raise ClientError("invalid_grant", "the refresh token was issued to another client")
    return Authorization(found["client_id"], found["account_id"], found["scope"], found["family"])


def _reusable(spent: dict[str, Any], client_id: str, reuse_s: int, now: datetime) -> bool:
    """A token its client spent less than `reuse_s` ago, not revoked nor expired since."""
    if not reuse_s or spent.get("revoked") or spent.get("client_id") != client_id:
        return False
    used_at, expires = spent.get("used_at"), spent.get("expires")
    return (used_at is not None and expires is not None and _aware(expires) > now
            and now - _aware(used_at) <= timedelta(seconds=reuse_s))


async def revoke_family(db: AsyncDatabase, family: str) -> None:
    await _revoke(db, {"family": family})


async def revoke_account(db: AsyncDatabase, account_id: str) -> None:
    """Every refresh token of an account (password reset, account disabled)."""
    await _revoke(db, {"account_id": account_id})


async def revoke_refresh(db: AsyncDatabase, token: str, client_id: str) -> bool:
    """RFC 7009 for a refresh token of `client_id`: its family. False for no such token."""
    found = await db[REFRESH].find_one({"_id": digest(token)})
    if found is None or found["client_id"] != client_id:
        return False
    await revoke_family(db, found["family"])
    return True


async def _revoke(db: AsyncDatabase, query: dict[str, Any]) -> None:
    now = int(datetime.now(UTC).timestamp())
    async for found in db[REFRESH].find({**query, "revoked": {"$ne": True}}):
        if found.get("access_jti") and int(found.get("access_exp", 0)) > now:
            await tokens.revoke(db, found["access_jti"], int(found["access_exp"]))
    await db[REFRESH].update_many(query, {"$set": {"used": True, "revoked": True}})


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
