"""Clients of the built-in authorization server: SMART Backend Services authentication by a
signed assertion (private_key_jwt), and the scopes a client may ask for."""

import time
import uuid
from typing import Any

import jwt
import pytest
from conftest import run_with_database
from cryptography.hazmat.primitives.asymmetric import ec

from fhir_server.auth.clients import ASSERTION_TYPE, Client, ClientError, authenticate, register
from fhir_server.storage.embedded import EmbeddedDatabase

TOKEN_URL = "http://127.0.0.1:8080/auth/token"


def es384(kid: str) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    private = ec.generate_private_key(ec.SECP384R1())
    public = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return private, {**public, "kid": kid, "alg": "ES384"}


def assertion(private: ec.EllipticCurvePrivateKey, client_id: str, kid: str = "k1", **changes: Any) -> str:
    claims = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": int(time.time()) + 240, "jti": uuid.uuid4().hex,
              **changes}
    return jwt.encode(claims, private, algorithm="ES384", headers={"kid": kid})


def test_backend_service_authentication(database: EmbeddedDatabase) -> None:
    async def scenario(db: Any) -> None:
        private, jwk = es384("k1")
        client = await register(db, Client("ehr-1", "Ward EHR", "system/*.rs system/Observation.cruds", {"keys": [jwk]}))
        with pytest.raises(ValueError, match="exists already"):
            await register(db, client)
        proof = assertion(private, "ehr-1")
        assert (await authenticate(db, ASSERTION_TYPE, proof, TOKEN_URL)).client_id == "ehr-1"

        async def refused(text: str, proof: str | None, kind: str | None = ASSERTION_TYPE) -> None:
            with pytest.raises(ClientError, match=text) as caught:
                await authenticate(db, kind, proof, TOKEN_URL)
            assert caught.value.error == "invalid_client" and caught.value.status == 401

        await refused("used already", proof)  # no replay
        await refused("client_assertion_type", assertion(private, "ehr-1"), "urn:other")
        await refused("not valid", assertion(private, "ehr-1", aud="http://elsewhere/token"))
        await refused("five minutes", assertion(private, "ehr-1", exp=int(time.time()) + 3600))
        await refused("not valid", assertion(private, "ehr-1", exp=int(time.time()) - 120))
        await refused("unknown client", assertion(private, "nobody"))
        await refused("iss and sub differ", assertion(private, "ehr-1", sub="someone-else"))
        await refused("not signed by a key of the client", assertion(es384("k1")[0], "ehr-1"))
        await refused("not a JWT", "garbage")

    run_with_database(database, scenario)


def test_the_scopes_a_client_may_ask_for() -> None:
    client = Client("ehr-1", "Ward EHR", "system/*.rs system/Observation.cruds")
    assert client.allowed("") == "system/*.rs system/Observation.cruds"  # nothing asked: all it may have
    assert client.allowed("system/Patient.r system/Observation.c") == "system/Observation.c system/Patient.r"
    assert client.allowed("system/Patient.read") == "system/Patient.rs"
    for wanted in ("system/Patient.c", "user/*.rs", "patient/*.rs", "system/*.cruds", "launch/patient", "system/Patient.xyz"):
        with pytest.raises(ClientError) as caught:
            client.allowed(wanted)
        assert caught.value.error == "invalid_scope", wanted
