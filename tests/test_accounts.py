"""User accounts and the SMART `authorization_code` flow of the built-in authorization server,
end to end: a real server with authorization on, the embedded database, HTTP, and an SMTP sink
whose captured mails give the links a person would follow.

Register → confirm → authorize with PKCE → token → FHIR requests with the bearer token →
refresh (rotation, reuse detection) → password reset; and the ways each step must refuse."""

import base64
import hashlib
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pymongo
import pytest
from aiosmtpd.controller import Controller
from conftest import ServerProcess, free_port, unique
from cryptography.hazmat.primitives.asymmetric import ec

from fhir_server.storage.embedded import EmbeddedDatabase

REDIRECT = "http://127.0.0.1:9/callback"
APP_SCOPE = "openid fhirUser launch/patient offline_access online_access patient/*.rs user/*.rs"
PATIENT_SCOPE = "openid fhirUser launch/patient offline_access online_access patient/*.rs"
PASSWORD = "Correct-Horse-7"
LOGIN_FAILED = "The email address or password is not right"
MAX_FAILURES = 3


class MailSink:
    """An SMTP server that keeps every mail it is sent."""

    def __init__(self) -> None:
        self.mails: list[Message] = []
        self._lock = threading.Lock()
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        with self._lock:
            self.mails.append(message_from_bytes(envelope.content))
        return "250 OK"

    def wait_for(self, to: str, subject: str, timeout: float = 15.0) -> str:
        """The text of the newest mail to `to` with `subject`, once it arrives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [m for m in self.mails if m["To"] == to and m["Subject"] == subject]
            if found:
                with self._lock:
                    self.mails.remove(found[-1])
                return str(found[-1].get_payload(decode=True).decode())
            time.sleep(0.05)
        raise AssertionError(f"no mail '{subject}' to {to}")

    def link(self, to: str, subject: str, page: str) -> str:
        text = self.wait_for(to, subject)
        match = re.search(rf"(http://\S+/auth/{page}\?token=\S+)", text)
        assert match, text
        return match.group(1)


class Hidden(HTMLParser):
    """The hidden fields of a page's form."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "input" and found.get("type") == "hidden":
            self.fields[str(found["name"])] = str(found.get("value") or "")


def cli(env: dict[str, str], *args: str, stdin: str = "") -> str:
    done = subprocess.run([sys.executable, "-m", "fhir_server", *args], env=env, input=stdin.encode(),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


@pytest.fixture(scope="module")
def mail() -> Iterator[MailSink]:
    sink = MailSink()
    sink.controller.start()
    yield sink
    sink.controller.stop()


@pytest.fixture(scope="module")
def setup(database: EmbeddedDatabase, mail: MailSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A server with authorization on, a public app, an administrator and a practitioner."""
    port = free_port()
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": f"fhir_accounts_{unique()}", "FHIR_AUTH": "true",
           "FHIR_BASE_URL": f"http://127.0.0.1:{port}/fhir", "FHIR_SMTP_HOST": "127.0.0.1",
           "FHIR_SMTP_PORT": str(mail.controller.port), "FHIR_SMTP_FROM": "portal@example.org",
           "FHIR_AUTH_MAX_FAILURES": str(MAX_FAILURES)}
    full_env = {**os.environ, **env}
    app = cli(full_env, "clients", "add", "--name", "Patient <App>", "--scope", APP_SCOPE, "--public",
              "--redirect-uri", REDIRECT, "--redirect-uri", "http://localhost:9/other")
    cli(full_env, "accounts", "add", "--email", "admin@example.org", "--role", "admin", "--fhir-user",
        "Practitioner/admin-1", "--password-stdin", stdin=PASSWORD + "\n")
    cli(full_env, "accounts", "add", "--email", "dr@example.org", "--role", "practitioner", "--fhir-user",
        "Practitioner/dr-1", "--password-stdin", stdin=PASSWORD + "\n")
    server = ServerProcess(tmp_path_factory.mktemp("accounts"), env, port=port).start()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield {"http": http, "client_id": app, "server": server, "db": env["FHIR_MONGODB_DB"]}
    server.stop()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def request_params(app: str, challenge: str, scope: str = PATIENT_SCOPE, **changes: str | None) -> dict[str, str]:
    params = {"response_type": "code", "client_id": app, "redirect_uri": REDIRECT, "scope": scope,
              "state": secrets.token_urlsafe(8), "code_challenge": challenge, "code_challenge_method": "S256",
              "nonce": "n-1"}
    return {k: v for k, v in {**params, **changes}.items() if v is not None}


def log_in(http: httpx.Client, params: dict[str, str], email: str, password: str) -> httpx.Response:
    """The login page for an authorization request, filled in and sent as a browser would."""
    shown = http.get("/auth/authorize", params=params)
    assert shown.status_code == 200, shown.text
    assert 'for="email"' in shown.text and 'for="password"' in shown.text
    return http.post("/auth/authorize", data={**Hidden(shown.text).fields, "email": email, "password": password})


def redirected(answer: httpx.Response) -> dict[str, str]:
    assert answer.status_code == 303, answer.text
    location = answer.headers["location"]
    assert location.startswith(REDIRECT + "?"), location
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def code_for(setup: dict, email: str, scope: str = PATIENT_SCOPE) -> tuple[str, str]:
    verifier, challenge = pkce()
    params = request_params(setup["client_id"], challenge, scope)
    back = redirected(log_in(setup["http"], params, email, PASSWORD))
    assert back["state"] == params["state"] and "code" in back, back
    return back["code"], verifier


def exchange(setup: dict, code: str, verifier: str, **changes: str) -> httpx.Response:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier,
            "client_id": setup["client_id"], **changes}
    return setup["http"].post("/auth/token", data=form)


def tokens_for(setup: dict, email: str, scope: str = PATIENT_SCOPE) -> dict[str, Any]:
    answer = exchange(setup, *code_for(setup, email, scope))
    assert answer.status_code == 200, answer.text
    return answer.json()


def introspect(setup: dict, token: str) -> dict[str, Any]:
    answer = setup["http"].post("/auth/introspect", data={"token": token, "client_id": setup["client_id"]})
    assert answer.status_code == 200, answer.text
    return answer.json()


def oauth_error(answer: httpx.Response, error: str) -> None:
    assert answer.status_code in (400, 401), answer.text
    assert answer.json()["error"] == error, answer.text


def register(http: httpx.Client, email: str, password: str = PASSWORD, name: str = "Ada Lovelace") -> httpx.Response:
    assert http.get("/auth/register").status_code == 200
    return http.post("/auth/register", data={"name": name, "email": email, "password": password, "password2": password})


def follow(http: httpx.Client, link: str) -> httpx.Response:
    """Open a mailed link (a page with a button), then press the button."""
    path = urlsplit(link)
    shown = http.get(f"{path.path}?{path.query}")
    assert shown.status_code == 200, shown.text
    return http.post(path.path, data=Hidden(shown.text).fields)


@pytest.fixture(scope="module")
def patient(setup: dict, mail: MailSink) -> dict[str, str]:
    """A patient who registered and confirmed the address."""
    http, email = setup["http"], f"ada-{unique()}@example.org"
    weak = register(http, email, "password")
    assert weak.status_code == 400 and "at least 8 characters" in weak.text and 'role="alert"' in weak.text
    assert register(http, email).status_code == 200
    link = mail.link(email, "Confirm your email address", "confirm")
    assert str(setup["server"].port) in link  # the configured public URL
    unconfirmed = log_in(http, request_params(setup["client_id"], pkce()[1]), email, PASSWORD)
    assert unconfirmed.status_code == 401 and "Confirm your email address first" in unconfirmed.text
    assert follow(http, link).status_code == 200
    path = urlsplit(link)
    assert http.post(path.path, data={"token": parse_qs(path.query)["token"][0]}).status_code == 400  # once only
    return {"email": email}


def test_patient_app_flow(setup: dict, patient: dict[str, str]) -> None:
    http = setup["http"]
    answer = tokens_for(setup, patient["email"])
    assert answer["token_type"] == "Bearer" and answer["patient"] and answer["refresh_token"] and answer["id_token"]
    assert set(answer["scope"].split()) == {"openid", "fhirUser", "launch/patient", "offline_access",
                                            "online_access", "patient/*.rs"}
    claims = introspect(setup, answer["access_token"])
    assert claims["active"] and claims["patient"] == answer["patient"]
    assert claims["fhirUser"] == f"Patient/{answer['patient']}"
    bearer = {"Authorization": f"Bearer {answer['access_token']}"}
    assert http.get("/fhir/metadata", headers=bearer).status_code == 200
    own = http.get(f"/fhir/Patient/{answer['patient']}", headers=bearer)
    assert own.status_code == 200, own.text  # the record made when the address was confirmed
    assert own.json()["telecom"][0]["value"] == patient["email"]
    assert http.get(f"/fhir/Patient/{answer['patient']}").status_code == 401

    wider = http.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": answer["refresh_token"],
                                           "client_id": setup["client_id"], "scope": answer["scope"] + " user/*.cruds"})
    oauth_error(wider, "invalid_scope")  # refused, and the token not spent: the retry below is no replay
    refreshed = http.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": answer["refresh_token"],
                                               "client_id": setup["client_id"]})
    assert refreshed.status_code == 200, refreshed.text
    rotated = refreshed.json()
    assert rotated["refresh_token"] != answer["refresh_token"] and "id_token" not in rotated
    assert introspect(setup, rotated["access_token"])["active"]
    again = http.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": answer["refresh_token"],
                                           "client_id": setup["client_id"]})
    oauth_error(again, "invalid_grant")  # a rotated token used again revokes the whole family
    oauth_error(http.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": rotated["refresh_token"],
                                               "client_id": setup["client_id"]}), "invalid_grant")
    assert not introspect(setup, rotated["access_token"])["active"]


def test_a_registered_patient_gets_one_record_however_the_first_sign_ins_interleave(
    setup: dict, mail: MailSink, database: EmbeddedDatabase
) -> None:
    """The confirmation makes the Patient record; a first sign-in that read the account before
    that was linked makes it again: the same record, not a second one left unused."""
    http, email = setup["http"], f"twice-{unique()}@example.org"
    assert register(http, email).status_code == 200
    assert follow(http, mail.link(email, "Confirm your email address", "confirm")).status_code == 200
    with pymongo.MongoClient(database.uri) as mongo:
        db = mongo[setup["db"]]
        made = db["auth_accounts"].find_one({"email": email})["fhir_user"]
        db["auth_accounts"].update_one({"email": email}, {"$set": {"fhir_user": None}})  # as that sign-in saw it
        assert tokens_for(setup, email)["access_token"]
        assert db["auth_accounts"].find_one({"email": email})["fhir_user"] == made
        records = [d["_id"] for d in db["Patient"].find({"del": False}, {"res.telecom": 1})
                   if any(t.get("value") == email for t in d["res"].get("telecom", []))]
    assert [f"Patient/{r}" for r in records] == [made]


def test_code_is_bound_and_single_use(setup: dict, patient: dict[str, str]) -> None:
    code, verifier = code_for(setup, patient["email"])
    oauth_error(exchange(setup, code, pkce()[0]), "invalid_grant")  # wrong verifier: and the code is spent
    oauth_error(exchange(setup, code, verifier), "invalid_grant")

    code, verifier = code_for(setup, patient["email"])
    oauth_error(exchange(setup, code, verifier, redirect_uri="http://localhost:9/other"), "invalid_grant")

    code, verifier = code_for(setup, patient["email"])
    oauth_error(exchange(setup, code, verifier, client_id="nobody"), "invalid_client")
    first = exchange(setup, code, verifier)
    assert first.status_code == 200, first.text
    oauth_error(exchange(setup, code, verifier), "invalid_grant")  # replayed: what it gave is revoked
    assert not introspect(setup, first.json()["access_token"])["active"]


def test_authorization_request_errors(setup: dict, patient: dict[str, str]) -> None:
    http, client_id = setup["http"], setup["client_id"]
    challenge = pkce()[1]
    for changes in ({"redirect_uri": "http://127.0.0.1:9/elsewhere"}, {"client_id": "nobody"}):
        shown = http.get("/auth/authorize", params=request_params(client_id, challenge, **changes))
        assert shown.status_code == 400 and "location" not in shown.headers  # shown, never redirected
        assert "text/html" in shown.headers["content-type"]
    for changes, error in (({"code_challenge": None}, "invalid_request"),
                           ({"code_challenge_method": "plain"}, "invalid_request"),
                           ({"response_type": "token"}, "unsupported_response_type"),
                           ({"scope": "system/*.rs"}, "invalid_scope"),
                           ({"aud": "http://elsewhere/fhir"}, "invalid_request")):
        params = request_params(client_id, challenge, **changes)
        back = redirected(http.get("/auth/authorize", params=params))
        assert back["error"] == error and back["state"] == params["state"], (changes, back)
    # a patient may not grant user/ scopes; a practitioner gets them, but no patient/ ones
    params = request_params(client_id, challenge, APP_SCOPE)
    assert redirected(log_in(http, params, patient["email"], PASSWORD))["error"] == "invalid_scope"
    practitioner = tokens_for(setup, "dr@example.org", "openid fhirUser user/*.rs online_access launch/patient")
    assert "patient" not in practitioner and "launch/patient" not in practitioner["scope"]
    assert introspect(setup, practitioner["access_token"])["fhirUser"] == "Practitioner/dr-1"
    params = request_params(client_id, challenge, "patient/*.rs")
    assert redirected(log_in(http, params, "dr@example.org", PASSWORD))["error"] == "invalid_scope"
    params = request_params(client_id, challenge)
    shown = http.get("/auth/authorize", params=params)
    assert "Patient &lt;App&gt;" in shown.text and "<App>" not in shown.text  # escaped
    denied = http.post("/auth/authorize", data={**Hidden(shown.text).fields, "action": "deny"})
    assert redirected(denied)["error"] == "access_denied"


def test_lockout_and_generic_failures(setup: dict, mail: MailSink) -> None:
    http, client_id = setup["http"], setup["client_id"]
    params = request_params(client_id, pkce()[1])
    email = f"locked-{unique()}@example.org"
    assert register(http, email).status_code == 200
    assert follow(http, mail.link(email, "Confirm your email address", "confirm")).status_code == 200

    def failure(who: str, password: str) -> float:
        started = time.monotonic()
        answer = log_in(http, params, who, password)
        assert answer.status_code == 401 and LOGIN_FAILED in answer.text, answer.text
        return time.monotonic() - started

    unknown = [failure(f"nobody-{unique()}@example.org", "Wrong-pass-1") for _ in range(MAX_FAILURES)]
    wrong = [failure(email, "Wrong-pass-1") for _ in range(MAX_FAILURES)]
    assert min(unknown) > 0.3 * min(wrong)  # both verify a password hash
    failure(email, PASSWORD)  # locked: the right password gets the same answer
    params = request_params(client_id, pkce()[1], "user/*.rs")
    assert redirected(log_in(http, params, "dr@example.org", PASSWORD))["code"]  # others are not locked


def test_password_reset(setup: dict, mail: MailSink) -> None:
    http = setup["http"]
    email = f"reset-{unique()}@example.org"
    assert register(http, email).status_code == 200
    assert follow(http, mail.link(email, "Confirm your email address", "confirm")).status_code == 200
    before = tokens_for(setup, email)
    known = http.post("/auth/forgot", data={"email": email})
    stranger = f"nobody-{unique()}@example.org"
    unknown = http.post("/auth/forgot", data={"email": stranger})
    assert known.status_code == unknown.status_code == 200
    assert known.text.replace(email, "X") == unknown.text.replace(stranger, "X")
    link = mail.link(email, "Reset your password", "reset")
    assert http.post("/auth/forgot", data={"email": email}).status_code == 200
    second = parse_qs(urlsplit(mail.link(email, "Reset your password", "reset")).query)["token"][0]  # same password
    path = urlsplit(link)
    shown = http.get(f"{path.path}?{path.query}")
    assert shown.status_code == 200 and 'for="password"' in shown.text
    token = Hidden(shown.text).fields["token"]
    weak = http.post("/auth/reset", data={"token": token, "password": "short", "password2": "short"})
    assert weak.status_code == 400 and "at least 8 characters" in weak.text
    new = "Another-Secret-9"
    assert http.post("/auth/reset", data={"token": token, "password": new, "password2": new}).status_code == 200
    assert http.post("/auth/reset", data={"token": token, "password": new, "password2": new}).status_code == 400
    third = "Third-Secret-10"  # a link made for the password that was changed since: refused
    assert http.post("/auth/reset", data={"token": second, "password": third, "password2": third}).status_code == 400
    params = request_params(setup["client_id"], pkce()[1])
    assert log_in(http, params, email, PASSWORD).status_code == 401
    assert redirected(log_in(http, params, email, new))["code"]
    refresh = http.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": before["refresh_token"],
                                             "client_id": setup["client_id"]})
    oauth_error(refresh, "invalid_grant")  # sessions end with the old password


def test_admin_api(setup: dict, patient: dict[str, str], mail: MailSink) -> None:
    http = setup["http"]
    assert http.get("/auth/admin/accounts").status_code == 401
    assert http.get("/auth/admin/accounts", headers={"Authorization": "Bearer nonsense"}).status_code == 401
    patient_token = tokens_for(setup, patient["email"])["access_token"]
    refused = http.get("/auth/admin/accounts", headers={"Authorization": f"Bearer {patient_token}"})
    assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"
    admin = {"Authorization": f"Bearer {tokens_for(setup, 'admin@example.org', 'openid user/*.rs')['access_token']}"}
    listed = http.get("/auth/admin/accounts", headers=admin)
    assert listed.status_code == 200 and "password" not in listed.text
    assert {"admin@example.org", "dr@example.org", patient["email"]} <= {a["email"] for a in listed.json()["accounts"]}
    email = f"nurse-{unique()}@example.org"
    made = http.post("/auth/admin/accounts", headers=admin, json={"email": email, "role": "practitioner",
                                                                  "fhirUser": "Practitioner/n-1", "password": PASSWORD})
    assert made.status_code == 201, made.text
    weak = http.post("/auth/admin/accounts", headers=admin, json={"email": f"x{email}", "role": "practitioner",
                                                                  "fhirUser": "Practitioner/n-2", "password": "weak"})
    assert weak.status_code == 400 and weak.json()["error"] == "invalid_request"
    params = request_params(setup["client_id"], pkce()[1], "user/*.rs")
    assert redirected(log_in(http, params, email, PASSWORD))["code"]
    assert http.post(f"/auth/admin/accounts/{made.json()['id']}/disable", headers=admin).json()["disabled"]
    assert log_in(http, params, email, PASSWORD).status_code == 401
    invited = f"invited-{unique()}@example.org"  # no password: a mail invites to choose one
    made = http.post("/auth/admin/accounts", headers=admin, json={"email": invited, "role": "practitioner",
                                                                  "fhirUser": "Practitioner/n-3"})
    assert made.status_code == 201 and made.json()["invited"], made.text
    path = urlsplit(mail.link(invited, "Your account", "reset"))
    token = Hidden(http.get(f"{path.path}?{path.query}").text).fields["token"]
    assert http.post("/auth/reset", data={"token": token, "password": PASSWORD, "password2": PASSWORD}).status_code == 200
    assert redirected(log_in(http, params, invited, PASSWORD))["code"]
    client = http.post("/auth/admin/clients", headers=admin,
                       json={"name": "Ward app", "scope": "user/*.rs", "public": True, "redirectUris": [REDIRECT]})
    assert client.status_code == 201, client.text
    assert client.json()["id"] in {c["id"] for c in http.get("/auth/admin/clients", headers=admin).json()["clients"]}
    bad = http.post("/auth/admin/clients", headers=admin,
                    json={"name": "Bad", "scope": "user/*.rs", "public": True, "redirectUris": ["http://evil.example/cb"]})
    assert bad.status_code == 400


def test_discovery(setup: dict) -> None:
    found = setup["http"].get("/.well-known/smart-configuration").json()
    assert found["authorization_endpoint"].endswith("/auth/authorize")
    assert found["code_challenge_methods_supported"] == ["S256"]
    assert {"authorization_code", "refresh_token"} <= set(found["grant_types_supported"])
    assert {"launch-standalone", "client-public", "permission-offline", "context-standalone-patient"} <= set(
        found["capabilities"])


def test_cli_refuses_a_public_client_without_redirect(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fhir_server", "clients", "add", "--name", "x", "--scope",
                           "user/*.rs", "--public", "--data-dir", str(tmp_path)], capture_output=True, timeout=60,
                          check=False)
    assert done.returncode != 0 and b"needs its --redirect-uri" in done.stderr


def test_cli_on_a_data_folder_a_server_uses_says_so(tmp_path: Path) -> None:
    """`accounts add` while a server runs on the embedded database's folder: a message to stop
    it first, not a stack trace."""
    running = EmbeddedDatabase(tmp_path / "db").start()
    try:
        env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
        done = subprocess.run([sys.executable, "-m", "fhir_server", "accounts", "add", "--email", "a@clinic.example",
                               "--role", "practitioner", "--data-dir", str(tmp_path)], env=env, capture_output=True,
                              timeout=60, check=False)
    finally:
        running.stop()
    assert done.returncode != 0 and b"Traceback" not in done.stderr
    assert b"is in use by another process" in done.stderr, done.stderr.decode()[-2000:]


def test_confidential_app_and_id_token(setup: dict) -> None:
    """An app with keys of its own proves itself with private_key_jwt at the token endpoint;
    its id_token is signed by the server's key, for the app, with the nonce and fhirUser."""
    http = setup["http"]
    admin = {"Authorization": f"Bearer {tokens_for(setup, 'admin@example.org', 'openid user/*.rs')['access_token']}"}
    private = ec.generate_private_key(ec.SECP384R1())
    jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k1", "alg": "ES384"}
    made = http.post("/auth/admin/clients", headers=admin, json={
        "name": "Ward EHR app", "scope": "openid fhirUser user/*.rs", "redirectUris": [REDIRECT], "jwks": {"keys": [jwk]}})
    assert made.status_code == 201, made.text
    app = made.json()["id"]
    verifier, challenge = pkce()
    back = redirected(log_in(http, request_params(app, challenge, "openid fhirUser user/*.rs"), "dr@example.org", PASSWORD))
    form = {"grant_type": "authorization_code", "code": back["code"], "redirect_uri": REDIRECT, "code_verifier": verifier}
    oauth_error(http.post("/auth/token", data={**form, "client_id": app}), "invalid_client")  # no assertion
    token_url = f"{setup['server'].url}/auth/token"
    proof = jwt.encode({"iss": app, "sub": app, "aud": token_url, "exp": int(time.time()) + 120, "jti": unique()},
                       private, algorithm="ES384", headers={"kid": "k1"})
    answer = http.post("/auth/token", data={**form, "client_assertion": proof,
                                            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"})
    assert answer.status_code == 200, answer.text
    keys = http.get("/auth/jwks").json()["keys"]
    identity = jwt.decode(answer.json()["id_token"], jwt.PyJWK(keys[0]).key, algorithms=["ES256"], audience=app,
                          issuer=f"{setup['server'].url}/auth")
    assert identity["nonce"] == "n-1" and identity["fhirUser"] == f"{setup['server'].url}/fhir/Practitioner/dr-1"


def test_concurrent_failed_logins_are_all_counted(database: EmbeddedDatabase) -> None:
    """Failed logins to one address racing each other (several server processes, or one
    event loop) are each counted: the first ones used to overwrite each other's count, allowing
    more guesses before the lockout."""
    import asyncio
    from datetime import UTC, datetime

    from conftest import run_with_database

    from fhir_server.auth import accounts

    async def scenario(db: Any) -> None:
        now = datetime.now(UTC)
        email = f"racing-{unique()}@example.org"
        await asyncio.gather(*(accounts._failed(db, email, now, accounts.Lockout(max_failures=10)) for _ in range(4)))
        state = await db[accounts.LOGINS].find_one({"_id": email})
        assert state is not None and state["failures"] == 4, state

    run_with_database(database, scenario)
