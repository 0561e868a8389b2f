"""SMART on FHIR authorization at the FHIR API: bearer tokens (missing, bad, expired, wrong
audience, unknown issuer → 401), scopes on every kind of interaction (→ 403), `_include` and
`_revinclude` that must not leak, transactions entry by entry, patient/ confinement to one
Patient compartment, granular scopes, bulk export and DICOMweb; and the Backend Services
grant end to end, registered with `fhir-server clients add`."""

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pymongo
import pytest
from conftest import FHIR_JSON, ServerProcess, unique
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fhir_server.auth.tokens import SigningKey, access_token
from fhir_server.storage.embedded import EmbeddedDatabase

DB = "fhir_authz_tests"


class Secured:
    """A server with FHIR_AUTH on, and tokens of its own issuer for any scopes."""

    def __init__(self, server: ServerProcess, key: SigningKey) -> None:
        self.server, self.key = server, key
        self.base = f"{server.url}/fhir"
        self.issuer = f"{server.url}/auth"

    def token(self, scope: str, *, patient: str | None = None, lifetime_s: int = 300, audience: str | None = None,
              roles: tuple[str, ...] = ()) -> str:
        token, _ = access_token(self.key, issuer=self.issuer, audience=audience or self.base, subject=f"app-{unique()}",
                                client_id="tests", scope=scope, lifetime_s=lifetime_s, patient=patient, roles=roles)
        return token

    def client(self, scope: str, **claims: Any) -> httpx.Client:
        token = self.token(scope, **claims)
        return httpx.Client(base_url=self.base, timeout=60, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def secured(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": DB, "FHIR_AUTH": "true", "FHIR_EXPORT_POLL_S": "0.2"}
    server = ServerProcess(tmp_path_factory.mktemp("secured"), env).start()
    with pymongo.MongoClient(database.uri) as mongo:
        stored = mongo[DB]["auth_keys"].find_one({"_id": "current"})
    assert stored is not None
    private = serialization.load_pem_private_key(stored["pem"].encode(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    yield Secured(server, SigningKey(stored["kid"], private))
    server.stop()


@pytest.fixture(scope="module")
def world(secured: Secured) -> dict[str, str]:
    """Two patients, each with a lab and a vital-signs Observation and an Encounter; a
    Practitioner who performed one of A's Observations."""
    ids: dict[str, str] = {}
    with secured.client("system/*.cruds") as admin:
        def create(name: str, resource: dict[str, Any]) -> None:
            answer = admin.post(f"/{resource['resourceType']}", json=resource)
            assert answer.status_code == 201, answer.text
            ids[name] = answer.json()["id"]

        create("practitioner", {"resourceType": "Practitioner", "name": [{"family": "Grey"}]})
        for who in ("a", "b"):
            create(who, {"resourceType": "Patient", "name": [{"family": f"Patient-{who}"}]})
            subject = {"reference": f"Patient/{ids[who]}"}
            for category in ("laboratory", "vital-signs"):
                create(f"{who}-{category}", {
                    "resourceType": "Observation", "status": "final", "subject": subject,
                    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                              "code": category}]}],
                    "code": {"text": category},
                    "performer": [{"reference": f"Practitioner/{ids['practitioner']}"}],
                })
            create(f"{who}-encounter", {"resourceType": "Encounter", "status": "finished", "subject": subject,
                                         "class": {"code": "AMB"}})
    return ids


def entries(bundle: dict[str, Any], mode: str | None = None) -> list[str]:
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])
            if mode is None or e.get("search", {}).get("mode") == mode]


def assert_forbidden(answer: httpx.Response) -> None:
    assert answer.status_code == 403, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert answer.json()["issue"][0]["code"] == "forbidden"


# -- tokens ----------------------------------------------------------------------------------------


def test_a_request_without_a_valid_token_is_401(secured: Secured, world: dict[str, str]) -> None:
    url = f"{secured.base}/Patient/{world['a']}"
    answer = httpx.get(url)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.json()["issue"][0]["code"] == "login"
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode({"iss": secured.issuer, "aud": secured.base, "sub": "x", "exp": int(time.time()) + 60,
                         "scope": "system/*.cruds"}, other, algorithm="ES256", headers={"kid": secured.key.kid})
    unknown_issuer = jwt.encode({"iss": "https://idp.example", "aud": secured.base, "sub": "x",
                                 "exp": int(time.time()) + 60, "scope": "system/*.cruds"}, other, algorithm="ES256")
    for token, reason in (
        ("not-a-jwt", "not a JWT"),
        (secured.token("system/*.rs", lifetime_s=-120), "expired"),
        (secured.token("system/*.rs", audience="http://127.0.0.1/elsewhere"), "not for this server"),
        (forged, "not valid"),
        (unknown_issuer, "unknown issuer"),
    ):
        answer = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401, reason
        challenge = answer.headers["www-authenticate"]
        assert 'error="invalid_token"' in challenge and reason in challenge, challenge
    # The CapabilityStatement and SMART discovery need no token.
    assert httpx.get(f"{secured.base}/metadata").status_code == 200
    smart = httpx.get(f"{secured.base}/.well-known/smart-configuration").json()
    assert smart["token_endpoint"] == f"{secured.issuer}/token"
    openid = httpx.get(f"{secured.issuer}/.well-known/openid-configuration").json()
    for name in ("issuer", "jwks_uri", "authorization_endpoint", "token_endpoint"):
        assert openid[name] == smart[name], name
    assert openid["issuer"] == secured.issuer and openid["jwks_uri"] == f"{secured.issuer}/jwks"


def test_the_capability_statement_describes_the_security(secured: Secured) -> None:
    security = httpx.get(f"{secured.base}/metadata").json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    oauth = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert oauth["token"] == f"{secured.issuer}/token"


# -- scopes on each interaction --------------------------------------------------------------------


def test_scopes_decide_each_interaction(secured: Secured, world: dict[str, str]) -> None:
    observation = f"Observation/{world['a-laboratory']}"
    with secured.client("user/Observation.rs") as reader:
        current = reader.get(f"/{observation}")
        assert current.status_code == 200
        body = current.json()
        assert reader.get(f"/{observation}/_history/1").status_code == 200
        assert reader.get(f"/{observation}/_history").status_code == 200
        assert reader.get("/Observation/_history").status_code == 200
        assert reader.get("/Observation", params={"code:text": "laboratory"}).status_code == 200
        assert reader.post("/Observation/_search", data={"code:text": "laboratory"}).status_code == 200
        assert_forbidden(reader.get(f"/Patient/{world['a']}"))
        assert_forbidden(reader.get("/Patient"))
        assert_forbidden(reader.get("/Patient/_history"))
        assert_forbidden(reader.post("/Observation", json=body))
        assert_forbidden(reader.put(f"/{observation}", json=body))
        assert_forbidden(reader.put("/Observation", params={"_id": world["a-laboratory"]}, json=body))
        assert_forbidden(reader.patch(f"/{observation}", content=b'[{"op": "replace", "path": "/status", "value": "amended"}]',
                                      headers={"Content-Type": "application/json-patch+json"}))
        assert_forbidden(reader.delete(f"/{observation}"))
        assert_forbidden(reader.delete("/Observation", params={"_id": world["a-laboratory"]}))
    with secured.client("user/Observation.c") as writer:
        del body["id"]
        assert writer.post("/Observation", json=body).status_code == 201
        assert_forbidden(writer.get(f"/{observation}"))
        # A conditional create answers with the match: it needs the match to be readable.
        assert_forbidden(writer.post("/Observation", json=body, headers={"If-None-Exist": f"_id={world['a-laboratory']}"}))
    with secured.client("user/Observation.read user/Observation.write") as v1:  # SMART v1 forms
        assert v1.get(f"/{observation}").status_code == 200
        assert v1.post("/Observation", json=body).status_code == 201
    with secured.client("system/*.cruds") as everything:
        # The audit trail is written by the server only.
        audit = {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2026-01-01T00:00:00Z",
                 "agent": [{"requestor": True}], "source": {"observer": {"display": "x"}}}
        assert_forbidden(everything.post("/AuditEvent", json=audit))


def test_includes_do_not_leak_what_the_scopes_do_not_cover(secured: Secured, world: dict[str, str]) -> None:
    with secured.client("user/Observation.rs") as reader:
        bundle = reader.get("/Observation", params={"_id": world["a-laboratory"], "_include": "*"}).json()
        assert entries(bundle) == [f"Observation/{world['a-laboratory']}"]
        bundle = reader.get("/Observation", params={"_id": world["a-laboratory"], "_include": "Observation:subject"}).json()
        assert entries(bundle, "include") == []
    with secured.client("user/Patient.rs") as reader:
        bundle = reader.get("/Patient", params={"_id": world["a"], "_revinclude": "Observation:subject"}).json()
        assert entries(bundle) == [f"Patient/{world['a']}"]
    with secured.client("user/Patient.rs user/Observation.rs") as both:
        bundle = both.get("/Patient", params={"_id": world["a"], "_revinclude": "Observation:subject"}).json()
        included = set(entries(bundle, "include"))
        assert {f"Observation/{world['a-laboratory']}", f"Observation/{world['a-vital-signs']}"} <= included


def test_system_search_covers_the_types_the_token_may_search(secured: Secured, world: dict[str, str]) -> None:
    with secured.client("user/Encounter.rs") as reader:
        bundle = reader.get("", params={"_id": f"{world['a-encounter']},{world['a']}"}).json()
        assert entries(bundle) == [f"Encounter/{world['a-encounter']}"]
        assert_forbidden(reader.get("", params={"_type": "Patient"}))


# -- transactions and batches ----------------------------------------------------------------------


def test_a_transaction_is_refused_whole_when_one_entry_is_not_allowed(secured: Secured, world: dict[str, str]) -> None:
    marker = unique()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": marker}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Patient", "name": [{"family": marker}]}, "request": {"method": "POST", "url": "Patient"}},
    ]}
    with secured.client("user/Observation.cruds") as writer:
        answer = writer.post("", json=bundle)
        assert_forbidden(answer)
        assert "entry[1]" in answer.text or "Patient" in answer.text
        assert writer.get("/Observation", params={"code:text": marker}).json().get("total") == 0
        batch = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": f"Patient/{world['a']}"}},
            {"request": {"method": "GET", "url": f"Observation/{world['a-laboratory']}"}},
        ]}
        answers = writer.post("", json=batch).json()["entry"]
        assert answers[0]["response"]["status"].startswith("403")
        assert answers[1]["response"]["status"].startswith("200")
    with secured.client("user/Observation.cruds user/Patient.c") as allowed:
        results = allowed.post("", json=bundle).json()["entry"]
        assert [r["response"]["status"][:3] for r in results] == ["201", "201"]


# -- patient/ scopes: one Patient compartment ------------------------------------------------------


def test_patient_scopes_reach_one_compartment(secured: Secured, world: dict[str, str]) -> None:
    a, b = world["a"], world["b"]
    with secured.client("patient/*.rs", patient=a) as mine:
        assert mine.get(f"/Patient/{a}").status_code == 200
        assert_forbidden(mine.get(f"/Patient/{b}"))
        assert_forbidden(mine.get(f"/Observation/{world['b-laboratory']}"))
        assert mine.get(f"/Observation/{world['a-laboratory']}").status_code == 200
        assert entries(mine.get("/Patient").json()) == [f"Patient/{a}"]
        found = mine.get("/Observation", params={"_count": "100"}).json()
        assert {f"Observation/{world['a-laboratory']}", f"Observation/{world['a-vital-signs']}"} <= set(entries(found))
        assert {e["resource"]["subject"]["reference"] for e in found["entry"]} == {f"Patient/{a}"}
        # Asked for B's by criteria: the compartment still applies.
        assert entries(mine.get("/Observation", params={"subject": f"Patient/{b}"}).json()) == []
        assert_forbidden(mine.get(f"/Patient/{b}/Observation"))
        assert mine.get(f"/Patient/{a}/Observation").json()["total"] == found["total"]
        # Includes reach the compartment only; a Practitioner is outside any compartment.
        bundle = mine.get("/Encounter", params={"_include": "Encounter:subject"}).json()
        assert entries(bundle) == [f"Encounter/{world['a-encounter']}", f"Patient/{a}"]
        assert mine.get(f"/Practitioner/{world['practitioner']}").status_code == 200
        everything = entries(mine.get(f"/Patient/{a}/$everything").json())
        assert f"Patient/{a}" in everything and not any(b in ref for ref in everything)
        assert_forbidden(mine.get(f"/Patient/{b}/$everything"))
        assert_forbidden(mine.get("/Patient/$everything"))
        history = entries(mine.get("/_history", params={"_count": "1000"}).json())
        assert f"Observation/{world['a-laboratory']}" in history
        assert not any(ref.endswith((b, world["b-laboratory"], world["b-encounter"])) for ref in history)
        assert_forbidden(mine.get("/$export", headers={"Prefer": "respond-async"}))
    with secured.client("patient/*.rs") as nobody:  # patient/ scopes but no patient
        assert_forbidden(nobody.get("/Observation"))


def test_patient_scopes_write_only_into_the_compartment(secured: Secured, world: dict[str, str]) -> None:
    a, b = world["a"], world["b"]

    def observation(patient: str) -> dict[str, Any]:
        return {"resourceType": "Observation", "status": "final", "code": {"text": "self-reported"},
                "subject": {"reference": f"Patient/{patient}"}}

    with secured.client("patient/Observation.cruds", patient=a) as mine:
        created = mine.post("/Observation", json=observation(a))
        assert created.status_code == 201
        assert_forbidden(mine.post("/Observation", json=observation(b)))
        assert_forbidden(mine.post("/Observation", json={k: v for k, v in observation(a).items() if k != "subject"}))
        moved = {**created.json(), "subject": {"reference": f"Patient/{b}"}}
        assert_forbidden(mine.put(f"/Observation/{created.json()['id']}", json=moved))
        assert_forbidden(mine.delete(f"/Observation/{world['b-laboratory']}"))
        assert_forbidden(mine.put(f"/Observation/{world['b-laboratory']}", json={**observation(a), "id": world["b-laboratory"]}))
        assert mine.delete(f"/Observation/{created.json()['id']}").status_code in (200, 204)
        transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": observation(a), "request": {"method": "POST", "url": "Observation"}},
            {"resource": observation(b), "request": {"method": "POST", "url": "Observation"}},
        ]}
        assert_forbidden(mine.post("", json=transaction))


def test_a_granular_scope_narrows_reads_and_searches(secured: Secured, world: dict[str, str]) -> None:
    with secured.client("user/Observation.rs?category=laboratory") as labs:
        found = entries(labs.get("/Observation", params={"_count": "100"}).json())
        assert f"Observation/{world['a-laboratory']}" in found and f"Observation/{world['b-laboratory']}" in found
        assert f"Observation/{world['a-vital-signs']}" not in found
        assert labs.get(f"/Observation/{world['a-laboratory']}").status_code == 200
        assert_forbidden(labs.get(f"/Observation/{world['a-vital-signs']}"))


# -- bulk export and DICOMweb ----------------------------------------------------------------------


def test_an_export_belongs_to_the_token_that_started_it(secured: Secured, world: dict[str, str]) -> None:
    scope = "system/Observation.rs system/Patient.rs"
    token = secured.token(scope)
    with httpx.Client(base_url=secured.base, timeout=60, headers={"Authorization": f"Bearer {token}"}) as mine:
        kick = mine.get("/$export", params={"_type": "Observation"}, headers={"Prefer": "respond-async"})
        assert kick.status_code == 202, kick.text
        status_url = kick.headers["content-location"]
        assert_forbidden(mine.get("/$export", params={"_type": "Encounter"}, headers={"Prefer": "respond-async"}))
        deadline = time.monotonic() + 30
        while (status := mine.get(status_url)).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.status_code == 200, status.text
        manifest = status.json()
        assert manifest["requiresAccessToken"] is True
        assert [o["type"] for o in manifest["output"]] == ["Observation"]
        assert mine.get(manifest["output"][0]["url"]).status_code == 200
    assert httpx.get(status_url).status_code == 401
    with secured.client(scope) as other:  # the same scopes, another client
        assert other.get(status_url).status_code == 404
        assert other.get(manifest["output"][0]["url"]).status_code == 404
        assert other.delete(status_url).status_code == 404


def test_dicomweb_needs_imaging_scopes(secured: Secured) -> None:
    url = f"{secured.server.url}/dicomweb/studies"
    assert httpx.get(url).status_code == 401
    for scope, status in (("user/Observation.rs", 403), ("patient/ImagingStudy.rs", 403), ("user/ImagingStudy.rs", 200)):
        token = secured.token(scope, patient=str(uuid.uuid4()))
        answer = httpx.get(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"})
        assert answer.status_code in (status, 204 if status == 200 else status), (scope, answer.text)


# -- SMART Backend Services, end to end ------------------------------------------------------------


def test_backend_services_grant_end_to_end(secured: Secured, database: EmbeddedDatabase, tmp_path: Any,
                                           world: dict[str, str]) -> None:
    private = ec.generate_private_key(ec.SECP384R1())
    public = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "ES384"}]}))
    env = {**os.environ, "MONGODB_URI": database.uri, "FHIR_MONGODB_DB": DB}
    added = subprocess.run([sys.executable, "-m", "fhir_server", "clients", "add", "--name", "Lab system",
                            "--scope", "system/Observation.rs system/Patient.r", "--jwks", str(jwks)],
                           env=env, capture_output=True, text=True, timeout=60, check=True)
    client_id = added.stdout.strip()
    smart = httpx.get(f"{secured.server.url}/.well-known/smart-configuration").json()

    def assertion() -> str:
        claims = {"iss": client_id, "sub": client_id, "aud": smart["token_endpoint"], "jti": uuid.uuid4().hex,
                  "exp": int(time.time()) + 240}
        return jwt.encode(claims, private, algorithm="ES384", headers={"kid": "k1"})

    form = {"grant_type": "client_credentials", "scope": "system/Observation.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}
    answer = httpx.post(smart["token_endpoint"], data={**form, "client_assertion": assertion()})
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    assert answer.json()["scope"] == "system/Observation.rs"
    headers = {"Authorization": f"Bearer {token}", "Accept": FHIR_JSON}
    assert httpx.get(f"{secured.base}/Observation/{world['a-laboratory']}", headers=headers).status_code == 200
    assert_forbidden(httpx.get(f"{secured.base}/Patient/{world['a']}", headers=headers))
    refused = httpx.post(smart["token_endpoint"], data={**form, "scope": "system/Observation.cruds", "client_assertion": assertion()})
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"
    # Revoked: refused from then on, on every server process (the list is in the database).
    revoke = httpx.post(smart["revocation_endpoint"], data={
        "token": token, "client_assertion": assertion(), "client_assertion_type": form["client_assertion_type"]})
    assert revoke.status_code == 200
    gone = httpx.get(f"{secured.base}/Observation/{world['a-laboratory']}", headers=headers)
    assert gone.status_code == 401 and "revoked" in gone.headers["www-authenticate"]


def test_a_fhir_client_library_works_with_a_bearer_token(secured: Secured, world: dict[str, str]) -> None:
    """fhirpy, unmodified, with a token (as from the Backend Services grant above)."""
    from fhirpy import SyncFHIRClient

    client = SyncFHIRClient(secured.base, authorization=f"Bearer {secured.token('user/Patient.cruds')}")
    patient = client.resource("Patient", name=[{"family": f"Library-{unique()}"}])
    patient.save()
    assert client.reference("Patient", patient.id).to_resource()["name"][0]["family"].startswith("Library-")
    assert client.resources("Patient").search(_id=patient.id).count() == 1
    with pytest.raises(Exception, match="403|forbidden|Forbidden"):
        client.resources("Observation").fetch()


def test_a_chain_or_has_searches_only_types_the_token_may_search(secured: Secured, world: dict[str, str]) -> None:
    with secured.client("user/Observation.rs") as reader:
        assert_forbidden(reader.get("/Observation", params={"subject:Patient.name": "Patient-a"}))
    with secured.client("user/Patient.rs") as reader:
        assert_forbidden(reader.get("/Patient", params={"_has:Observation:subject:code:text": "laboratory"}))
    with secured.client("user/Patient.rs user/Observation.rs") as both:
        found = both.get("/Observation", params={"subject:Patient.name": "Patient-a", "code:text": "laboratory"}).json()
        assert f"Observation/{world['a-laboratory']}" in entries(found)


def test_the_importer_brings_a_token(secured: Secured) -> None:
    records = os.path.join(os.path.dirname(__file__), "data", "interactions", "interactions.json")
    argv = [sys.executable, "-m", "fhir_server", "import", "interactions", records, "--url", secured.base, "--json"]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    done = subprocess.run([*argv, "--token", secured.token("system/*.cruds")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["created"]["Encounter"] > 0 and not summary["rejected"], summary


# -- what a search, a condition or a reference could tell (each a leak once) -----------------------

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf"
                    "c0f01f0005000201d3a3a3a60000000049454e44ae426082")


@pytest.fixture(scope="module")
def sensitive(secured: Secured, world: dict[str, str]) -> dict[str, str]:
    """B's HIV test, run on a Device; an image of A and one of B through the upload service."""
    ids: dict[str, str] = {}
    with secured.client("system/*.cruds") as admin:
        device = admin.post("/Device", json={"resourceType": "Device", "deviceName": [{"name": "analyser", "type": "other"}]})
        ids["device"] = device.json()["id"]
        hiv = admin.post("/Observation", json={
            "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{world['b']}"},
            "code": {"coding": [{"system": "urn:test", "code": "HIV"}]}, "device": {"reference": f"Device/{ids['device']}"},
            "performer": [{"reference": f"Practitioner/{world['practitioner']}"}]})
        ids["hiv"] = hiv.json()["id"]
        for who in ("a", "b"):
            upload = admin.post(f"/Patient/{world[who]}/$upload-image", content=PNG, headers={"Content-Type": "image/png"})
            assert upload.status_code == 201, upload.text
            ids[f"{who}-binary"] = upload.json()["content"][0]["attachment"]["url"].rsplit("/", 1)[-1]
    return ids


def test_patient_scopes_beyond_the_compartment(secured: Secured, world: dict[str, str], sensitive: dict[str, str]) -> None:
    with secured.client("patient/*.cruds", patient=world["a"]) as mine:
        assert mine.get(f"/Binary/{sensitive['a-binary']}").status_code == 200  # its securityContext is A
        assert_forbidden(mine.get(f"/Binary/{sensitive['b-binary']}"))
        assert_forbidden(mine.get("/Binary"))
        assert_forbidden(mine.delete(f"/Binary/{sensitive['b-binary']}"))
        assert_forbidden(mine.get(f"/Device/{sensitive['device']}"))  # not what every record shares
        assert mine.get(f"/Practitioner/{world['practitioner']}").status_code == 200
        assert_forbidden(mine.put(f"/Practitioner/{world['practitioner']}",
                                  json={"resourceType": "Practitioner", "id": world["practitioner"], "name": [{"family": "X"}]}))
        # Content naming another patient too is not this token's to write.
        forged = {"resourceType": "Observation", "status": "final", "code": {"text": "forged"},
                  "subject": {"reference": f"Patient/{world['b']}"}, "performer": [{"reference": f"Patient/{world['a']}"}]}
        assert_forbidden(mine.post("/Observation", json=forged))


def test_chains_has_and_iterations_stay_within_reach(secured: Secured, world: dict[str, str],
                                                    sensitive: dict[str, str]) -> None:
    hiv = {"_has:Observation:performer:code": "urn:test|HIV"}
    with secured.client("patient/*.rs", patient=world["a"]) as mine:  # only B had that test
        assert entries(mine.get("/Practitioner", params=hiv).json()) == []
        assert_forbidden(mine.get("/Device", params={"_has:Observation:device:subject": f"Patient/{world['b']}"}))
        bundle = mine.get("/Practitioner", params={"_id": world["practitioner"], "_revinclude": "Observation:performer",
                                                   "_include:iterate": "Observation:device"}).json()
        assert not any(ref.startswith("Device/") for ref in entries(bundle))
    with secured.client("user/Practitioner.rs user/Observation.rs") as both:
        assert entries(both.get("/Practitioner", params=hiv).json()) == [f"Practitioner/{world['practitioner']}"]
    with secured.client("user/Patient.rs user/Practitioner.rs") as no_observations:  # at every level of a _has
        assert_forbidden(no_observations.get("/Practitioner", params={
            "_has:Patient:general-practitioner:_has:Observation:subject:code": "urn:test|HIV"}))
    with secured.client("user/*.rs") as not_admin:
        assert_forbidden(not_admin.get("/Patient", params={"_has:Observation:subject:_has:AuditEvent:entity:outcome": "0"}))
    with secured.client("user/Observation.rs?category=laboratory user/Practitioner.rs") as labs:
        assert entries(labs.get("/Practitioner", params={"_has:Observation:performer:category": "vital-signs"}).json()) == []
    with secured.client("user/Patient.rs user/Device.rs") as no_observations:
        bundle = no_observations.get("/Patient", params={"_id": world["b"], "_revinclude": "Observation:subject",
                                                         "_include:iterate": "Observation:device"}).json()
        assert entries(bundle) == [f"Patient/{world['b']}"]


def test_conditions_and_references_are_searches_within_reach(secured: Secured, world: dict[str, str],
                                                            sensitive: dict[str, str]) -> None:
    a, b = world["a"], world["b"]
    with secured.client("patient/Observation.d", patient=a) as no_search:
        assert_forbidden(no_search.delete("/Observation", params={"subject": f"Patient/{b}", "code": "urn:test|HIV"}))
    with secured.client("patient/Observation.cruds patient/Patient.rs", patient=a) as mine:
        for code in ("urn:test|HIV", "urn:test|flu"):  # the same answer: nothing of B's is seen
            answer = mine.delete("/Observation", params={"subject": f"Patient/{b}", "code": code})
            assert answer.status_code in (200, 204), answer.text
        assert mine.delete("/Observation", params={"subject": f"Patient/{b}"}).status_code in (200, 204)
        body = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": f"Patient/{a}"}}
        created = mine.post("/Observation", json=body, headers={"If-None-Exist": f"subject=Patient/{b}&code=urn:test|HIV"})
        assert created.status_code == 201
        probe = {"resourceType": "Bundle", "type": "transaction", "entry": [{
            "resource": {**body, "focus": [{"reference": f"Observation?subject=Patient/{b}&code=urn:test|HIV"}]},
            "request": {"method": "POST", "url": "Observation"}}]}
        answer = mine.post("", json=probe)
        assert answer.status_code == 412 and "matches 0" in answer.text
    with secured.client("openid") as nobody:
        assert_forbidden(nobody.post(f"/Observation/{sensitive['hiv']}/$validate", params={"mode": "delete"}))


def test_mixed_scopes_and_odd_claims(secured: Secured, world: dict[str, str], sensitive: dict[str, str]) -> None:
    with secured.client("user/Patient.rs patient/Observation.rs", patient=world["a"]) as mixed:
        assert_forbidden(mixed.get("/$export", params={"_type": "Observation"}, headers={"Prefer": "respond-async"}))
        assert mixed.get(f"/Patient/{world['b']}").status_code == 200  # user/ Patient scope
        everything = mixed.get(f"/Patient/{world['b']}/$everything").json()
        assert not any(ref.startswith("Observation/") for ref in entries(everything))
    now = int(time.time())
    for patient in (123, ["x"], ""):
        token = secured.key.sign({"iss": secured.issuer, "aud": secured.base, "sub": "odd", "scope": "patient/*.rs",
                                  "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex, "patient": patient})
        assert httpx.get(f"{secured.base}/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    answer = httpx.get(f"{secured.base}/Observation",
                       headers={"Authorization": f"Bearer {secured.token('user/Observation.rs?_count=1')}"})
    assert answer.status_code == 401 and "result parameters" in answer.headers["www-authenticate"]
    foreign = jwt.encode({"iss": "https://idp.exämple/\"x\"", "aud": secured.base, "sub": "x", "exp": now + 60},
                         ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    answer = httpx.get(f"{secured.base}/Patient", headers={"Authorization": f"Bearer {foreign}"})
    assert answer.status_code == 401 and "unknown issuer" in answer.headers["www-authenticate"]


def test_serving_beyond_loopback_needs_authorization_or_insecure(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_") and k != "MONGODB_URI"}
    argv = [sys.executable, "-m", "fhir_server", "serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)]
    refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Refusing to serve 0.0.0.0 without authorization" in refused.stderr
    assert not (tmp_path / "db").exists()  # refused before the database starts


def test_a_token_of_this_server_works_at_each_of_its_names(secured: Secured, world: dict[str, str]) -> None:
    """Without FHIR_BASE_URL, the issuer and audience follow the Host: a token got from
    localhost is taken at 127.0.0.1 too (it is this server's signature that counts)."""
    other = secured.server.url.replace("127.0.0.1", "localhost")
    token, _ = access_token(secured.key, issuer=f"{other}/auth", audience=f"{other}/fhir", subject="app",
                            client_id="tests", scope="user/Patient.rs")
    answer = httpx.get(f"{secured.base}/Patient/{world['a']}", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
