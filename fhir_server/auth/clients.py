"""Registered clients of the built-in authorization server, and SMART Backend Services
authentication: a client proves who it is with a JWT signed by its own key (`private_key_jwt`,
RFC 7523), checked against the public keys registered for it (a JWKS, or a JWKS URL). Apps
acting for a user (`authorization_code`) have redirect URIs; a public one (a browser or mobile
app, which can keep no secret) has no keys and relies on PKCE alone.

Clients are kept in MongoDB (`auth_clients`); assertion ids (`jti`) are kept until they expire
(`auth_assertions`), so an assertion cannot be replayed on any server process.
"""

import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from fhir_server.auth.scopes import Grants, ScopeError
from fhir_server.security import loopback

CLIENTS = "auth_clients"
ASSERTIONS = "auth_assertions"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ["RS384", "ES384", "RS256", "ES256"]  # SMART requires RS384 and ES384
MAX_ASSERTION_LIFETIME_S = 300  # SMART: exp at most five minutes ahead
LEEWAY_S = 30


class ClientError(Exception):
    """An OAuth error of the token endpoint (RFC 6749 5.2): `error` is its code."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    scope: str  # the most the client may ask for
    jwks: dict[str, Any] | None = None  # its public keys, for private_key_jwt
    jwks_url: str | None = None
    redirect_uris: tuple[str, ...] = ()  # for authorization_code (apps acting for a user)
    fhir_user: str | None = None  # a backend service may act as a Practitioner
    roles: tuple[str, ...] = field(default_factory=tuple)
    public: bool = False  # no keys: authorization_code with PKCE only (SMART client-public)
    disabled: bool = False
    # A spent refresh token presented again this soon (another browser tab renewing at the same
    # moment) gets new tokens of its family instead of revoking it; 0: never (a replay).
    refresh_reuse_s: int = 0

    def public_view(self) -> dict[str, Any]:
        """What the admin API shows."""
        return {"id": self.client_id, "name": self.name, "scope": self.scope, "redirectUris": list(self.redirect_uris),
                "public": self.public, "jwksUrl": self.jwks_url, "jwks": self.jwks, "fhirUser": self.fhir_user,
                "disabled": self.disabled}

    def allowed(self, requested: str) -> str:
        """The requested scopes the client may have (all of them when none is asked for);
        ClientError `invalid_scope` for a scope it may not have."""
        try:
            mine = Grants.parse(self.scope)
            wanted = Grants.parse(requested or self.scope)
        except ScopeError as exc:
            raise ClientError("invalid_scope", str(exc)) from exc
        for scope in wanted.scopes:
            if not any(s.context == scope.context and s.resource_type in ("*", scope.resource_type)
                       and scope.permissions <= s.permissions and (not s.search or s.search == scope.search)
                       for s in mine.scopes):
                raise ClientError("invalid_scope", f"the client may not have '{scope.text}'")
        extra = wanted.other - mine.other
        if extra:
            raise ClientError("invalid_scope", f"the client may not have {' '.join(sorted(extra))}")
        return wanted.text


async def prepare(db: AsyncDatabase) -> None:
    """Assertion ids are dropped once their assertion has expired."""
    await db[ASSERTIONS].create_index("expires", expireAfterSeconds=0)


def check_redirect_uri(uri: str) -> str:
    """A redirect URI that may be registered: absolute, without fragment (RFC 6749 3.1.2),
    https, or http on a loopback address (RFC 8252 7.3), or an app's private scheme with a dot
    (RFC 8252 7.1: `com.example.app:/callback`). ValueError otherwise."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise ValueError(f"redirect URI '{uri}' is not a URI") from exc
    if not parts.scheme or parts.fragment or "#" in uri or any(c.isspace() for c in uri):
        raise ValueError(f"redirect URI '{uri}' must be absolute, without a fragment")
    if parts.scheme == "https" and parts.hostname:
        return uri
    if parts.scheme == "http" and parts.hostname and loopback(parts.hostname):
        return uri
    if parts.scheme not in ("http", "https") and "." in parts.scheme:
        return uri
    raise ValueError(f"redirect URI '{uri}' must be https (http only on a loopback address) or a private app scheme")


async def register(db: AsyncDatabase, client: Client) -> Client:
    """Store a new client (its id must be new). ValueError for a client that could not be
    used: a public one without redirect URIs or with keys, a confidential one without keys."""
    for uri in client.redirect_uris:
        check_redirect_uri(uri)
    if client.public and (client.jwks or client.jwks_url or not client.redirect_uris):
        raise ValueError("a public client has redirect URIs and no keys")
    if not client.public and not (client.jwks or client.jwks_url):
        raise ValueError("a confidential client needs its public keys (a JWKS, or a JWKS URL)")
    document = {"_id": client.client_id, "name": client.name, "scope": client.scope, "jwks": client.jwks,
                "jwks_url": client.jwks_url, "redirect_uris": list(client.redirect_uris), "fhir_user": client.fhir_user,
                "roles": list(client.roles), "public": client.public, "disabled": False, "created": time.time()}
    try:
        await db[CLIENTS].insert_one(document)
    except DuplicateKeyError as exc:
        raise ValueError(f"a client '{client.client_id}' exists already") from exc
    return client


def new_client_id() -> str:
    return secrets.token_urlsafe(12)


async def find(db: AsyncDatabase, client_id: str) -> Client | None:
    """The client with this id, unless it is disabled."""
    found = await db[CLIENTS].find_one({"_id": client_id, "disabled": {"$ne": True}})
    return _client(found) if found else None


def _client(found: dict[str, Any]) -> Client:
    return Client(found["_id"], found.get("name", ""), found.get("scope", ""), found.get("jwks"), found.get("jwks_url"),
                  tuple(found.get("redirect_uris", ())), found.get("fhir_user"), tuple(found.get("roles", ())),
                  bool(found.get("public")), bool(found.get("disabled")), int(found.get("refresh_reuse_s") or 0))


async def all_clients(db: AsyncDatabase, limit: int = 1000) -> list[Client]:
    return [_client(d) async for d in db[CLIENTS].find({}, sort=[("_id", 1)], limit=limit)]


async def set_disabled(db: AsyncDatabase, client_id: str, disabled: bool = True) -> bool:
    done = await db[CLIENTS].update_one({"_id": client_id}, {"$set": {"disabled": disabled}})
    return done.matched_count == 1


async def _client_keys(client: Client) -> list[jwt.PyJWK]:
    document = client.jwks
    if document is None and client.jwks_url:
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                answer = await http.get(client.jwks_url)
                answer.raise_for_status()
                document = answer.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ClientError("invalid_client", f"the client's keys cannot be fetched: {exc}", 401) from exc
    keys = []
    for item in (document or {}).get("keys", []):
        try:
            keys.append(jwt.PyJWK(item))
        except (jwt.PyJWKError, jwt.InvalidKeyError, TypeError):
            continue
    return keys


async def authenticate(db: AsyncDatabase, assertion_type: str | None, assertion: str | None, token_url: str) -> Client:
    """The client a `private_key_jwt` assertion proves (SMART Backend Services): signed by one of
    its registered keys, iss = sub = client_id, aud = this token endpoint, exp at most five
    minutes ahead, jti never seen before. ClientError `invalid_client` (401) otherwise."""
    if assertion_type != ASSERTION_TYPE or not assertion:
        raise ClientError("invalid_client", f"client_assertion_type must be {ASSERTION_TYPE}, with a client_assertion", 401)
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise ClientError("invalid_client", f"the client assertion is not a JWT: {exc}", 401) from exc
    client_id = str(unverified.get("iss", ""))
    client = await find(db, client_id) if client_id else None
    if client is None or unverified.get("sub") != client_id:
        raise ClientError("invalid_client", "unknown client, or iss and sub differ", 401)
    keys = [k for k in await _client_keys(client) if header.get("kid") in (None, k.key_id)]
    claims = None
    for key in keys:
        try:
            claims = jwt.decode(assertion, key.key, algorithms=ALGORITHMS, audience=token_url, issuer=client_id,
                                leeway=LEEWAY_S, options={"require": ["exp", "iss", "sub", "aud", "jti"]})
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            raise ClientError("invalid_client", f"the client assertion is not valid: {exc}", 401) from exc
    if claims is None:
        raise ClientError("invalid_client", "the client assertion is not signed by a key of the client", 401)
    if int(claims["exp"]) > time.time() + MAX_ASSERTION_LIFETIME_S + LEEWAY_S:
        raise ClientError("invalid_client", "the client assertion expires more than five minutes ahead", 401)
    try:
        expires = datetime.fromtimestamp(int(claims["exp"]) + LEEWAY_S, UTC)
        await db[ASSERTIONS].insert_one({"_id": f"{client_id}|{claims['jti']}", "expires": expires})
    except DuplicateKeyError as exc:
        raise ClientError("invalid_client", "the client assertion was used already", 401) from exc
    return client


async def ensure_public(
    db: AsyncDatabase, client_id: str, name: str, scope: str, redirect_uri: str, refresh_reuse_s: int = 0,
) -> None:
    """A public client of the server's own (the web console): made on first use, its scope and
    refresh reuse kept current, `redirect_uri` added to its list. ValueError for a URI that may
    not be registered."""
    check_redirect_uri(redirect_uri)
    await db[CLIENTS].update_one(
        {"_id": client_id},
        {"$set": {"name": name, "scope": scope, "public": True, "refresh_reuse_s": refresh_reuse_s},
         "$addToSet": {"redirect_uris": redirect_uri},
         "$setOnInsert": {"jwks": None, "jwks_url": None, "fhir_user": None, "roles": [], "disabled": False,
                          "created": time.time()}},
        upsert=True,
    )
