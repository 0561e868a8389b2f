"""What an HTTP request was, for its AuditEvent (pure: from its method, path, query, the first
bytes of its body where they tell something, and its response's status and headers).

FHIR requests are `rest` events whose subtype is the RESTful interaction; DICOMweb requests are
DICOM's Query (QIDO-RS) and Instances Transferred (WADO-RS, STOW-RS); the authorization server's
form posts are User Authentication events, its administration Security Alerts.

Not audited: `/health`, the API docs, discovery documents (`.well-known`, `/auth/jwks`) and the
authorization pages' GET forms (they hold no data and decide nothing); nor any path outside
`/fhir`, `/dicomweb` and `/auth` (they answer 404).
"""

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from fhir_server.audit import events as ev

PREFIXES = ("/fhir", "/dicomweb", "/auth")
NOT_AUDITED = frozenset({"/fhir/.well-known/smart-configuration", "/auth/jwks", "/auth/.well-known/openid-configuration"})
BUNDLE_TYPE = re.compile(rb'"type"\s*:\s*"(batch|transaction)"')
DICOMWEB_SEARCHES = frozenset({"studies", "series", "instances"})
PATIENT_PARAMETERS = ("patient", "subject")


def audited(method: str, path: str) -> bool:
    if not path.startswith(PREFIXES) or path in NOT_AUDITED or "/.well-known/" in path:
        return False
    if path.startswith("/auth") and not path.startswith("/auth/admin"):
        return method == "POST"  # the form posts: token, login, revoke, register…
    return True


def reads_audit_events(method: str, path: str, query: bytes) -> bool:
    """Whether a request may find AuditEvents: of the type, naming it in its query (`_type`,
    `_revinclude`), a system-level search or history, `$everything`, `$export`."""
    if method not in ("GET", "HEAD", "POST") or not path.startswith("/fhir"):
        return False
    if "AuditEvent" in path or b"AuditEvent" in query:
        return True
    rest = path[len("/fhir"):].strip("/")
    if rest == "":
        return method != "POST"  # a POST is a Bundle, whose reads come through one by one
    return rest in ("_history", "_search") or "$everything" in rest or "$export" in rest


def wants_body(method: str, path: str) -> bool:
    """Whether the first bytes of the request body tell what the request was: a Bundle's type,
    a search or auth form."""
    if method != "POST":
        return False
    return path.rstrip("/") == "/fhir" or path.endswith("/_search") or path.startswith("/auth")


@dataclass(frozen=True)
class Exchange:
    """One request and its answer, as the middleware saw them."""

    method: str
    path: str
    query: str
    status: int
    location: str | None = None
    etag: str | None = None
    body: bytes = b""  # the first bytes of the request body, when `wants_body`
    patients: tuple[str, ...] = ()  # Patients the request's state names (the token's patient, a route's)
    bundle_type: str | None = None  # of a Bundle POSTed to the base, as the route parsed it


@dataclass
class Described:
    kind: dict[str, str]
    subtype: dict[str, str] | None
    action: str | None
    entities: list[dict[str, Any]] = field(default_factory=list)
    name: str | None = None  # who the request says it is (an auth form's client or email)


def describe(exchange: Exchange) -> Described:
    if exchange.path.startswith("/dicomweb"):
        return _dicomweb(exchange)
    if exchange.path.startswith("/auth"):
        return _auth(exchange)
    return _fhir(exchange)


# -- FHIR ---------------------------------------------------------------------------------------


def _fhir(exchange: Exchange) -> Described:
    method = exchange.method
    parts = [unquote(p) for p in exchange.path[len("/fhir"):].split("/") if p]
    code, resource_type, resource_id = _interaction(method, parts, exchange.body, exchange.bundle_type)
    described = Described(ev.REST, ev.interaction(code) if code else None, ev.ACTIONS.get(code or ""))
    patients = list(exchange.patients)
    target = written(exchange.location) if exchange.location else None
    if target is None and resource_type and resource_id:
        target = f"{resource_type}/{resource_id}"
        vid = version_of(exchange.etag)
        if vid and code not in ("history-instance", "search-type", "operation"):
            target += f"/_history/{vid}"
    if code == "search-type" and resource_type == "Patient" and resource_id:  # a compartment search
        patients.append(f"Patient/{resource_id}")
        target = None
    if target:
        described.entities.append(ev.resource_entity(target))
    if code in ("search-type", "search-system"):
        query = exchange.query
        if exchange.path.endswith("/_search") and exchange.body:
            query = "&".join(filter(None, [exchange.body.decode("utf-8", "replace"), query]))
        searched = "/".join(p for p in parts if p != "_search")
        described.entities.append(ev.query_entity(f"{searched}?{query}"))
        patients.extend(_patients_searched(query))
    if code == "operation":
        name = next((p for p in parts if p.startswith("$")), "")
        described.entities.append({**ev.query_entity(f"{'/'.join(parts)}?{exchange.query}"),
                                   "detail": [{"type": "operation", "valueString": name}]})
    seen = {e["what"].get("reference", "").split("/_history/")[0] for e in described.entities if "what" in e}
    for patient in dict.fromkeys(patients):
        if patient not in seen:
            described.entities.append(ev.patient_entity(patient))
    return described


def _interaction(
    method: str, parts: list[str], body: bytes, bundle_type: str | None = None
) -> tuple[str | None, str | None, str | None]:
    """The RESTful interaction of a FHIR path, with the type and id it names. A Bundle the route
    did not parse (refused before) is judged by the first bytes of its body."""
    operation = any(p.startswith("$") for p in parts)
    if not parts:
        if method == "POST":
            if bundle_type in ("batch", "transaction"):
                return bundle_type, None, None
            found = BUNDLE_TYPE.search(body)
            return (found.group(1).decode() if found else "batch"), None, None
        return ("search-system" if method == "GET" else None), None, None
    first = parts[0]
    if operation:
        return "operation", _type(first), _id(parts)
    if parts == ["metadata"]:
        return "capabilities", None, None
    if parts == ["_history"]:
        return "history-system", None, None
    if parts == ["_search"]:
        return "search-system", None, None
    resource_type = _type(first)
    if len(parts) == 1:
        codes = {"GET": "search-type", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        return codes.get(method), resource_type, None
    second = parts[1]
    if len(parts) == 2 and second == "_search":
        return "search-type", resource_type, None
    if len(parts) == 2 and second == "_history":
        return "history-type", resource_type, None
    if len(parts) == 2:
        codes = {"GET": "read", "HEAD": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        return codes.get(method), resource_type, second
    if parts[2] == "_history":
        return ("vread" if len(parts) == 4 else "history-instance"), resource_type, second
    return "search-type", resource_type, second  # a compartment search: Patient/1/Observation


def _type(segment: str) -> str | None:
    return segment if segment[:1].isupper() and segment.isalnum() else None


def _id(parts: list[str]) -> str | None:
    return parts[1] if len(parts) > 2 and not parts[1].startswith("$") else None


def written(location: str) -> str | None:
    """`http://host/fhir/Patient/1/_history/2` → `Patient/1/_history/2`."""
    parts = location.split("?")[0].rstrip("/").split("/")
    if "_history" in parts:
        at = parts.index("_history")
        return "/".join(parts[max(0, at - 2): at + 2])
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def version_of(etag: str | None) -> str | None:
    if not etag:
        return None
    value = etag.removeprefix("W/").strip('"')
    return value if value.isdigit() else None


def _patients_searched(query: str) -> list[str]:
    """`patient=1`, `patient=Patient/1` and `subject=Patient/1`: one Patient each (several
    values, modifiers and chains name none)."""
    found = []
    for name, value in parse_qsl(query, keep_blank_values=False):
        if name not in PATIENT_PARAMETERS or "," in value or not value:
            continue
        if value.startswith("Patient/") and value.count("/") == 1:
            found.append(value)
        elif name == "patient" and "/" not in value:
            found.append(f"Patient/{value}")
    return found


# -- DICOMweb -----------------------------------------------------------------------------------


def _dicomweb(exchange: Exchange) -> Described:
    parts = [p for p in exchange.path[len("/dicomweb"):].split("/") if p]
    study = parts[1] if len(parts) > 1 and parts[0] == "studies" else None
    if exchange.method == "POST":
        described = Described(ev.INSTANCES_TRANSFERRED, ev.local("STOW-RS"), "C")
    elif parts and parts[-1] in DICOMWEB_SEARCHES:
        described = Described(ev.QUERY, ev.local("QIDO-RS"), "E")
        described.entities.append(ev.query_entity(f"{exchange.path}?{exchange.query}"))
    else:
        described = Described(ev.INSTANCES_TRANSFERRED, ev.local("WADO-RS"), "R")
    if study:
        described.entities.append(ev.study_entity(study))
    return described


# -- the authorization server -------------------------------------------------------------------

AUTH_SUBTYPES = {"/auth/token": ev.LOGIN, "/auth/authorize": ev.LOGIN, "/auth/revoke": ev.LOGOUT}


def _auth(exchange: Exchange) -> Described:
    path = exchange.path.rstrip("/")
    action = "R" if exchange.method == "GET" else "E"
    if path.startswith("/auth/admin"):
        described = Described(ev.SECURITY_ALERT, ev.local("admin"), action)
        described.entities.append({**ev.query_entity(f"{path}?{exchange.query}"), "name": path})
    else:
        subtype = AUTH_SUBTYPES.get(path) or ev.local(path.removeprefix("/auth/") or "auth")
        described = Described(ev.USER_AUTHENTICATION, subtype, action)
    described.name = _claimed(exchange.body)
    return described


def _claimed(body: bytes) -> str | None:
    """Who an auth form says it is: its client_id, its client assertion's subject (unverified:
    the outcome tells whether it held), or its email address. Never anything secret."""
    if not body:
        return None
    try:
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
    except ValueError:
        return None
    if form.get("client_id"):
        return form["client_id"][:200]
    assertion = form.get("client_assertion", "")
    if assertion.count(".") == 2:
        payload = assertion.split(".")[1]
        try:
            claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, binascii.Error):
            claims = None
        if isinstance(claims, dict) and isinstance(claims.get("sub"), str):
            return claims["sub"][:200]
    email = form.get("email", "").strip()
    return email[:254] or None
