"""The audit middleware: one AuditEvent for every audited HTTP request (`interactions.audited`),
whatever its outcome (401 and 403 included), handed to the app's trail (`app.state.audit`).

It sits inside the access log and outside the error boundary, so it sees every answer as sent,
500s included. The requester is the request's `Policy` (`request.state.access`, put there by
`context.authorize`): the token's subject, fhirUser and roles; the token's patient is the
event's patient entity too.
"""

import logging
from http import HTTPStatus
from typing import Any

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_server.audit import events as ev
from fhir_server.audit.interactions import Exchange, audited, describe, reads_audit_events, wants_body
from fhir_server.audit.trail import AuditTrail, now
from fhir_server.context import authorize
from fhir_server.errors import FhirError

LOGGER = logging.getLogger(__name__)
PEEK = 8192  # the most bytes of a request body, or an error response, kept for the event


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        trail = getattr(getattr(scope.get("app"), "state", None), "audit", None)
        if scope["type"] != "http" or trail is None:
            await self.app(scope, receive, send)
            return
        if reads_audit_events(scope["method"], scope["path"], scope.get("query_string", b"")) and await _reads_trail(scope):
            try:
                await trail.catch_up()
            except Exception:  # the answer may then miss the newest events: not worth a failure
                LOGGER.exception("audit trail: catching up failed")
        if not audited(scope["method"], scope["path"]):
            trail.serving()
            try:
                await self.app(scope, receive, send)
            finally:
                trail.served()
            return
        peeked = bytearray()
        error = bytearray()
        answer: dict[str, Any] = {"status": 500}

        async def peeking_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(peeked) < PEEK:
                peeked.extend(message.get("body", b"")[: PEEK - len(peeked)])
            return message

        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() in (b"location", b"etag"):
                        answer[name.lower().decode()] = value.decode("latin-1")
            elif message["type"] == "http.response.body" and answer["status"] >= 400 and len(error) < PEEK:
                error.extend(message.get("body", b"")[: PEEK - len(error)])
            await send(message)

        peeking = wants_body(scope["method"], scope["path"])
        trail.serving()
        try:
            await self.app(scope, peeking_receive if peeking else receive, observing_send)
        finally:
            trail.served()
            try:
                _record(trail, scope, answer, bytes(peeked), bytes(error))
            except Exception:  # the trail never breaks a request
                LOGGER.exception("audit event not recorded")


async def _reads_trail(scope: Scope) -> bool:
    """Whether the requester may read AuditEvents (an administrator, or anyone when access is
    open): only then is the trail indexed before the request. Anyone else would make the
    process index, and wait, for an answer that leaves the trail out, or a 401/403."""
    try:
        return (await authorize(Request(scope))).admin
    except FhirError:
        return False


def _record(trail: AuditTrail, scope: Scope, answer: dict[str, Any], body: bytes, error: bytes) -> None:
    state = scope.get("state") or {}
    access = state.get("access")
    patients = [f"Patient/{p}" for p in (getattr(access, "patient", None),) if p]
    status = answer["status"]
    exchange = Exchange(
        scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"), status,
        answer.get("location"), answer.get("etag"), body, tuple(patients), state.get("bundle_type"),
    )
    described = describe(exchange)
    if isinstance(state.get("provenance"), str):  # the X-Provenance stored with the write
        described.entities.append(ev.resource_entity(state["provenance"]))
    client = scope.get("client")
    requester = ev.Requester(
        address=client[0] if client else None,
        subject=getattr(access, "subject", None),
        fhir_user=getattr(access, "fhir_user", None),
        name=described.name,
        roles=frozenset(getattr(access, "roles", ()) or ()),
    )
    trail.record(
        ev.audit_event(
            kind=described.kind, subtype=described.subtype, action=described.action, recorded=now(),
            outcome=ev.http_outcome(status), outcome_desc=_outcome_desc(status, error), requester=requester,
            observer=trail.observer, entities=described.entities,
        )
    )


def _outcome_desc(status: int, error: bytes) -> str:
    """`403 Forbidden: <the OperationOutcome's first diagnostics>`."""
    try:
        text = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        text = str(status)
    if error:
        try:
            issues = orjson.loads(error).get("issue") or [{}]
            diagnostics = issues[0].get("diagnostics")
        except (ValueError, AttributeError, TypeError):
            diagnostics = None
        if isinstance(diagnostics, str) and diagnostics:
            text += f": {diagnostics}"
    return text
