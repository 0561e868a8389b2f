"""X-Provenance: the Provenance of a write, sent in a header, stored with the version it made.

On a write of one resource (create, update, patch, delete, their conditional forms too) the
`X-Provenance` header may hold a Provenance resource (JSON, or base64 of it). It is checked
before anything is written (400 if it is not a valid Provenance; 403 unless the token may
create Provenance), and once the write succeeded it is stored as a new Provenance whose `target`
is the version written (`Type/id/_history/n`, from the answer's Location, Content-Location or
ETag; a target the client gave is replaced; an update that changes nothing: the current version)
and whose `recorded` is now unless given. The answer waits for it, so a client that got its
answer finds the Provenance (`Provenance?target=Type/id`).

Not for Bundles and operations (400: the header would apply to many writes or none), nor for a
conditional delete or a delete of nothing (no version names the write: nothing is stored).
A failure to store the Provenance after the write is logged; the write's answer stands.
"""

import base64
import binascii
import logging
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_server import fhir_json
from fhir_server.audit.interactions import version_of, written
from fhir_server.audit.trail import now
from fhir_server.context import authorize
from fhir_server.errors import BadRequest, FhirError, Forbidden, Issue, Unauthorized, outcome_response
from fhir_server.storage.repository import instant
from fhir_server.validation.resource import validate_resource

LOGGER = logging.getLogger(__name__)
HEADER = b"x-provenance"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PROVENANCE = "Provenance"


class ProvenanceMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITES:
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name.lower() == HEADER), None)
        if header is None:
            await self.app(scope, receive, send)
            return
        try:
            resource_type, resource_id = _single_write(scope["method"], scope["path"])
            provenance = parse(header, f"{resource_type}/{resource_id or 'new'}")
            policy = await authorize(Request(scope))
            if not policy.allows(PROVENANCE, "c"):
                raise Forbidden("X-Provenance: the token's scopes do not allow creating Provenance")
        except Unauthorized:  # the write itself answers 401
            await self.app(scope, receive, send)
            return
        except FhirError as exc:
            await outcome_response(exc.status, exc.issues, exc.headers)(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        start = held[0] if held else {"status": 500, "headers": []}
        if 200 <= start["status"] < 300:
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in start.get("headers", ())}
            target = _version_written(headers, resource_type, resource_id)
            if target is not None:
                await _store(scope, provenance, target)
        for message in held:
            await send(message)


def _single_write(method: str, path: str) -> tuple[str, str | None]:
    """The type and id (None for a create or a conditional write) a request writes."""
    parts = [p for p in path.removeprefix("/fhir").split("/") if p] if path.startswith("/fhir/") else []
    single = 0 < len(parts) <= (1 if method == "POST" else 2) and parts[0][:1].isupper()
    if not single or any(p.startswith(("$", "_")) for p in parts):
        raise BadRequest("X-Provenance is accepted on a create, update, patch or delete of one resource only")
    return parts[0], parts[1] if len(parts) == 2 else None


def parse(raw: bytes, placeholder: str) -> dict[str, Any]:
    """The header's Provenance, checked as it will be stored (with a provisional target)."""
    text = raw.strip()
    try:
        if not text.startswith(b"{"):
            text = base64.b64decode(text, validate=True)
        body = fhir_json.loads(text)
    except (ValueError, binascii.Error, RecursionError) as exc:
        raise BadRequest(f"X-Provenance is not a JSON resource (or base64 of one): {exc}") from exc
    if not isinstance(body, dict) or body.get("resourceType") != PROVENANCE:
        raise BadRequest("X-Provenance must hold a Provenance resource")
    body = {**body, "target": [{"reference": placeholder}]}
    body.setdefault("recorded", instant(now()))
    try:
        validate_resource(body, PROVENANCE, ignore_id=True)
    except BadRequest as exc:
        issues = [Issue(f"X-Provenance: {i.diagnostics}", i.code, i.severity, i.expression) for i in exc.issues]
        raise BadRequest(issues[0].diagnostics, issues=issues) from exc
    return body


def _version_written(headers: dict[str, str], resource_type: str, resource_id: str | None) -> str | None:
    """The version a write answered with: its Location (a create) or Content-Location (an
    update, patch: conditional ones name no id in the request), else the id and ETag."""
    location = headers.get("location") or headers.get("content-location")
    if location and "/_history/" in location:
        return written(location)
    vid = version_of(headers.get("etag"))
    if resource_id and vid:
        return f"{resource_type}/{resource_id}/_history/{vid}"
    return None


async def _store(scope: Scope, provenance: dict[str, Any], target: str) -> None:
    resources = scope["app"].state.resources
    try:
        result = await resources.create(PROVENANCE, {**provenance, "target": [{"reference": target}]})
    except Exception:
        LOGGER.exception("X-Provenance of %s not stored", target)
        return
    if result.version is not None:
        scope.setdefault("state", {})["provenance"] = f"{PROVENANCE}/{result.version.id}"
