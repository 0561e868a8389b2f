"""Access tokens: JWTs signed by the built-in authorization server, or by an external issuer
(a hospital's identity provider) whose keys come from its JWKS URL.

The built-in server's signing key lives in MongoDB (`auth_keys`), made by the first process
that needs it, so every server process signs and checks with the same key and none keeps state
of its own. Revoked tokens are listed there too (`auth_revoked`, kept until they expire).
"""

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from fhir_server.auth.scopes import Grants, ScopeError

KEYS = "auth_keys"
REVOKED = "auth_revoked"
ALGORITHM = "ES256"  # the built-in server's tokens
ACCEPTED = ["RS256", "RS384", "ES256", "ES384"]  # an external issuer's (SMART asks for RS384 and ES384)
LEEWAY_S = 30  # clock skew between issuer and server
JWKS_TTL_S = 300.0
JWKS_RETRY_S = 30.0
PATIENT_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # a FHIR id  # at most one refetch per issuer in this time, for an unknown key id


class InvalidToken(Exception):
    """A bearer token that must not be used; `reason` goes to WWW-Authenticate's error_description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    """Who a valid access token speaks for, and what it allows."""

    issuer: str
    subject: str
    client_id: str
    grants: Grants
    token_id: str
    expires: int
    patient: str | None = None  # the `patient` launch context: patient/ scopes are confined to it
    fhir_user: str | None = None  # `Practitioner/…` or `Patient/…`
    roles: tuple[str, ...] = ()  # `admin`: manages clients and accounts, reads the audit trail


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey

    @property
    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": ALGORITHM, "use": "sig"}

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.private_key, algorithm=ALGORITHM, headers={"kid": self.kid})


async def signing_key(db: AsyncDatabase) -> SigningKey:
    """The built-in server's key: the stored one, or a new one stored first (racing processes
    keep the one that was stored first)."""
    keys = db[KEYS]
    found = await keys.find_one({"_id": "current"})
    if found is None:
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        with contextlib.suppress(DuplicateKeyError):
            await keys.insert_one({"_id": "current", "kid": uuid.uuid4().hex, "pem": pem, "created": time.time()})
        found = await keys.find_one({"_id": "current"})
    assert found is not None
    private_key = serialization.load_pem_private_key(found["pem"].encode(), password=None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    return SigningKey(found["kid"], private_key)


class JwksCache:
    """The public keys of external issuers, fetched from their JWKS URLs and kept for a while;
    fetched again (at most every JWKS_RETRY_S) when a token names a key id not seen yet."""

    def __init__(self, urls: Mapping[str, str]) -> None:
        self.urls = dict(urls)  # issuer → JWKS URL
        self._keys: dict[str, tuple[float, dict[str, jwt.PyJWK]]] = {}
        self._lock = asyncio.Lock()

    async def key(self, issuer: str, kid: str | None) -> jwt.PyJWK:
        if issuer not in self.urls:
            raise InvalidToken(f"unknown issuer '{issuer}'")
        fetched, keys = self._keys.get(issuer, (0.0, {}))
        age = time.monotonic() - fetched
        if age > JWKS_TTL_S or (kid not in keys and age > JWKS_RETRY_S):
            async with self._lock:
                keys = await self._fetch(issuer)
        if kid is None and len(keys) == 1:
            return next(iter(keys.values()))
        if kid not in keys:
            raise InvalidToken(f"issuer '{issuer}' has no key '{kid}'")
        return keys[kid]

    async def _fetch(self, issuer: str) -> dict[str, jwt.PyJWK]:
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.get(self.urls[issuer])
                answer.raise_for_status()
                document = answer.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise InvalidToken(f"the keys of issuer '{issuer}' cannot be fetched: {exc}") from exc
        keys: dict[str, jwt.PyJWK] = {}
        for item in document.get("keys", []) if isinstance(document, dict) else []:
            try:
                keys[str(item.get("kid"))] = jwt.PyJWK(item)
            except (jwt.PyJWKError, jwt.InvalidKeyError, TypeError):
                continue  # a key of a type we cannot use
        self._keys[issuer] = (time.monotonic(), keys)
        return keys


class TokenValidator:
    """Checks bearer tokens: signature (the built-in key, or the issuer's JWKS), issuer,
    audience (this server's FHIR base), expiry, and revocation."""

    def __init__(self, db: AsyncDatabase, own: SigningKey, external: Mapping[str, str] | None = None,
                 pinned: bool = True) -> None:
        self.db = db
        self.own = own
        self.jwks = JwksCache(external or {})
        # Unpinned (no public base URL configured): the server's own issuer and audience follow
        # the Host a request names, and one server has several (127.0.0.1, localhost, its name).
        # A token it signed itself is then taken at any of them, by path (`/auth`, `/fhir`).
        self.pinned = pinned

    async def validate(self, token: str, audience: str, own_issuer: str) -> Claims:
        """The claims of a token for `audience`; `own_issuer`: the built-in server's issuer."""
        try:
            header = jwt.get_unverified_header(token)
            issuer = str(jwt.decode(token, options={"verify_signature": False}).get("iss", ""))
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"not a JWT: {exc}") from exc
        alias = not self.pinned and header.get("kid") == self.own.kid and _path(issuer) == _path(own_issuer)
        if issuer == own_issuer or alias:
            if header.get("kid") != self.own.kid:
                raise InvalidToken("signed with a key this server does not have")
            key: Any = self.own.private_key.public_key()
            algorithms = [ALGORITHM]
        else:
            found = await self.jwks.key(issuer, header.get("kid"))
            key, algorithms = found.key, ACCEPTED
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, audience=None if alias else audience, issuer=issuer,
                                leeway=LEEWAY_S, options={"require": ["exp", "iss", "aud", "sub"], "verify_aud": not alias})
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("the token has expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken(f"the token is not for this server ({audience})") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"the token is not valid: {exc}") from exc
        if alias:
            audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
            if not any(isinstance(a, str) and _path(a) == _path(audience) for a in audiences):
                raise InvalidToken(f"the token is not for this server ({audience})")
            issuer = own_issuer  # the same server, named by another host
        token_id = str(claims.get("jti", ""))
        if token_id and await self.db[REVOKED].find_one({"_id": token_id}, {"_id": 1}):
            raise InvalidToken("the token has been revoked")
        try:
            grants = Grants.parse(str(claims.get("scope", "")))
        except ScopeError as exc:
            raise InvalidToken(f"the token's scope is not valid: {exc}") from exc
        patient = claims.get("patient")
        if patient is not None and not (isinstance(patient, str) and PATIENT_ID.fullmatch(patient)):
            raise InvalidToken("the token's patient is not a resource id")
        return Claims(
            issuer=issuer, subject=str(claims["sub"]), client_id=str(claims.get("client_id", claims["sub"])),
            grants=grants, token_id=token_id, expires=int(claims["exp"]),
            patient=patient, fhir_user=claims.get("fhirUser"),
            # Roles are this server's own: another issuer's `roles` claim means something else.
            roles=_roles(claims.get("roles")) if issuer == own_issuer else (),
        )


def _path(url: str) -> str:
    return urlsplit(url).path.rstrip("/")


def _roles(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def access_token(key: SigningKey, *, issuer: str, audience: str, subject: str, client_id: str, scope: str,
                 lifetime_s: int = 300, patient: str | None = None, fhir_user: str | None = None,
                 roles: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """A signed access token of the built-in server, and its claims."""
    now = int(time.time())
    claims: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": subject, "client_id": client_id, "scope": scope,
                              "iat": now, "exp": now + lifetime_s, "jti": uuid.uuid4().hex}
    if patient:
        claims["patient"] = patient
    if fhir_user:
        claims["fhirUser"] = fhir_user
    if roles:
        claims["roles"] = list(roles)
    return key.sign(claims), claims


async def prepare(db: AsyncDatabase) -> None:
    """Revocations are dropped once the token would have expired anyway."""
    await db[REVOKED].create_index("expires", expireAfterSeconds=0)


async def revoke(db: AsyncDatabase, token_id: str, expires: int) -> None:
    """Refuse this token from now on (kept until it would have expired anyway)."""
    until = datetime.fromtimestamp(expires + LEEWAY_S, UTC)
    await db[REVOKED].update_one({"_id": token_id}, {"$set": {"expires": until}}, upsert=True)
