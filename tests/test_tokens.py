"""Access tokens: the built-in server's (signed with the key kept in MongoDB) and an external
issuer's (checked against its JWKS, served here by a local HTTP server); every way a token
must fail: expired, wrong audience, wrong signature, unknown issuer or key, revoked."""

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from conftest import run_with_database, unique
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_server.auth.tokens import (
    InvalidToken,
    SigningKey,
    TokenValidator,
    access_token,
    revoke,
    signing_key,
)
from fhir_server.storage.embedded import EmbeddedDatabase

OWN = "http://127.0.0.1:8080/auth"
AUDIENCE = "http://127.0.0.1:8080/fhir"


class Jwks:
    """An external issuer's JWKS endpoint; `keys` can change while it serves."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                jwks.fetches += 1
                body = json.dumps({"keys": jwks.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def jwks() -> Iterator[Jwks]:
    served = Jwks()
    yield served
    served.server.shutdown()


def rsa_key(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return private, {**public, "kid": kid, "alg": "RS384"}


def external_token(private: rsa.RSAPrivateKey, kid: str, issuer: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": issuer, "aud": AUDIENCE, "sub": "nurse-7", "scope": "user/Observation.rs", "iat": now,
            "exp": now + 300, "jti": unique(), **claims}
    return jwt.encode(body, private, algorithm="RS384", headers={"kid": kid})


def test_own_tokens_round_trip_and_fail_as_they_should(database: EmbeddedDatabase) -> None:
    async def scenario(db: Any) -> None:
        key = await signing_key(db)
        assert (await signing_key(db)).kid == key.kid  # kept: every process signs with it
        validator = TokenValidator(db, key)
        token, claims = access_token(key, issuer=OWN, audience=AUDIENCE, subject="app-1", client_id="app-1",
                                     scope="openid patient/*.rs", patient="123", fhir_user="Patient/123")
        found = await validator.validate(token, AUDIENCE, OWN)
        assert (found.subject, found.client_id, found.patient, found.fhir_user) == ("app-1", "app-1", "123", "Patient/123")
        assert found.grants.access("Observation", "s").confined and found.token_id == claims["jti"]

        expired, _ = access_token(key, issuer=OWN, audience=AUDIENCE, subject="a", client_id="a", scope="", lifetime_s=-120)
        with pytest.raises(InvalidToken, match="expired"):
            await validator.validate(expired, AUDIENCE, OWN)
        with pytest.raises(InvalidToken, match="not for this server"):
            await validator.validate(token, "http://elsewhere/fhir", OWN)
        forged = SigningKey(key.kid, ec.generate_private_key(ec.SECP256R1())).sign({**claims, "scope": "system/*.cruds"})
        with pytest.raises(InvalidToken, match="not valid"):
            await validator.validate(forged, AUDIENCE, OWN)
        with pytest.raises(InvalidToken, match="not a JWT"):
            await validator.validate("not.a.token", AUDIENCE, OWN)
        await revoke(db, claims["jti"], claims["exp"])
        with pytest.raises(InvalidToken, match="revoked"):
            await validator.validate(token, AUDIENCE, OWN)
        bad_scope, _ = access_token(key, issuer=OWN, audience=AUDIENCE, subject="a", client_id="a", scope="patient/Observation.xyz")
        with pytest.raises(InvalidToken, match="scope"):
            await validator.validate(bad_scope, AUDIENCE, OWN)

    run_with_database(database, scenario)


def test_external_issuer_by_its_jwks(database: EmbeddedDatabase, jwks: Jwks) -> None:
    issuer = "https://idp.hospital.example"

    async def scenario(db: Any) -> None:
        validator = TokenValidator(db, await signing_key(db), {issuer: jwks.url})
        first, first_jwk = rsa_key("k1")
        jwks.keys = [first_jwk]
        claims = await validator.validate(external_token(first, "k1", issuer, fhirUser="Practitioner/9"), AUDIENCE, OWN)
        assert claims.fhir_user == "Practitioner/9" and not claims.grants.access("Observation", "s").confined
        with pytest.raises(InvalidToken, match="unknown issuer"):
            await validator.validate(external_token(first, "k1", "https://other.example"), AUDIENCE, OWN)
        other, _ = rsa_key("k1")
        with pytest.raises(InvalidToken, match="not valid"):  # the right key id, the wrong key
            await validator.validate(external_token(other, "k1", issuer), AUDIENCE, OWN)
        with pytest.raises(InvalidToken, match="has no key 'k2'"):  # unknown id: refetched at most every 30 s
            await validator.validate(external_token(other, "k2", issuer), AUDIENCE, OWN)
        assert jwks.fetches == 1

    run_with_database(database, scenario)
