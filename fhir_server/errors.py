"""FHIR errors and the one place that turns them (and anything else) into an OperationOutcome.

Any layer raises a `FhirError` subclass; the handlers installed by `install_error_handlers`
send it. Nothing else in the code base builds an OperationOutcome.
"""

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pymongo.errors import ConnectionFailure, DocumentTooLarge
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOGGER = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json; charset=utf-8"


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue."""

    diagnostics: str
    code: str = "invalid"
    severity: str = "error"
    expression: str | None = None
    coding: tuple[str, str] | None = None  # (system, code) of `details.coding`: a machine-readable detail

    def to_json(self) -> dict[str, Any]:
        issue: dict[str, Any] = {"severity": self.severity, "code": self.code}
        if self.coding:
            issue["details"] = {"coding": [{"system": self.coding[0], "code": self.coding[1]}]}
        issue["diagnostics"] = self.diagnostics
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


def outcome_response(
    status: int, issues: list[Issue], headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(operation_outcome(issues)), status, headers=headers, media_type=FHIR_JSON
    )


class FhirError(Exception):
    """An error a client should see: HTTP status + OperationOutcome issue code."""

    status = 500
    code = "exception"

    def __init__(
        self,
        diagnostics: str,
        *,
        expression: str | None = None,
        issues: list[Issue] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.issues = issues or [Issue(diagnostics, self.code, expression=expression)]
        self.headers = headers


class BadRequest(FhirError):
    status, code = 400, "invalid"


class Unauthorized(FhirError):
    """No valid access token (RFC 6750): the client should get one; WWW-Authenticate says why."""

    status, code = 401, "login"

    def __init__(self, diagnostics: str, *, error: str | None = "invalid_token") -> None:
        challenge = 'Bearer realm="fhir"'
        if error:
            # RFC 6750 3: printable ASCII without `"` and `\` (the reason may quote the token).
            text = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in diagnostics)[:300]
            challenge += f', error="{error}", error_description="{text}"'
        super().__init__(diagnostics, headers={"WWW-Authenticate": challenge})


class Forbidden(FhirError):
    """A valid token whose scopes do not allow this."""

    status, code = 403, "forbidden"


class NotFound(FhirError):
    status, code = 404, "not-found"


class NotAcceptable(FhirError):
    status, code = 406, "not-supported"


class TooCostly(FhirError):
    """A request the server will not run because of its cost (a 400 in FHIR's terms)."""

    status, code = 400, "too-costly"


class Conflict(FhirError):
    status, code = 409, "conflict"


class Gone(FhirError):
    status, code = 410, "deleted"


class PreconditionFailed(FhirError):
    status, code = 412, "conflict"


class PayloadTooLarge(FhirError):
    status, code = 413, "too-costly"


class UnsupportedMediaType(FhirError):
    status, code = 415, "not-supported"


class Unprocessable(FhirError):
    status, code = 422, "processing"


class Unavailable(FhirError):
    """The server is short of a resource for now (memory mappings, file descriptors): try again."""

    status, code = 503, "transient"


_HTTP_CODES = {404: "not-found", 405: "not-supported", 413: "too-costly", 415: "not-supported"}


async def _fhir_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirError)
    if exc.status >= 500:
        LOGGER.error("server error: %s", exc)
    return outcome_response(exc.status, exc.issues, exc.headers)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "processing")
    return outcome_response(exc.status_code, [Issue(str(exc.detail), code)], exc.headers)


async def _request_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    issues = [
        Issue(f"{e.get('msg')}", "invalid", expression=".".join(str(p) for p in e.get("loc", ())))
        for e in exc.errors()
    ]
    return outcome_response(400, issues)


async def _database_unreachable(_: Request, exc: Exception) -> Response:
    LOGGER.error("database unreachable: %s", exc)
    issue = Issue("The database is unreachable; try again shortly", "transient")
    return outcome_response(503, [issue], {"Retry-After": "5"})


async def _too_large(_: Request, exc: Exception) -> Response:
    issue = Issue("The resource is too large to store (MongoDB holds at most 16 MiB per document)", "too-costly")
    return outcome_response(413, [issue])


class ErrorBoundaryMiddleware:
    """Anything no handler caught: log the stack trace, send the client a plain 500 outcome.

    Starlette's own 500 handler re-raises after answering, which makes the server drop the
    connection; this boundary answers and stops there.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            LOGGER.info("the client went away before its request was read")  # nobody to answer
        except FhirError as exc:  # raised outside a route (a middleware): answered as in one
            if started or scope["type"] != "http":
                raise
            await outcome_response(exc.status, exc.issues, exc.headers)(scope, receive, send)
        except Exception as exc:
            LOGGER.exception("unhandled error", exc_info=exc)
            if started or scope["type"] != "http":
                raise
            request_id = scope.get("state", {}).get("request_id", "-")
            issue = Issue(f"Internal server error (request id {request_id}: see the server log)", "exception")
            await outcome_response(500, [issue])(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; call before adding outer middleware (the access log)."""
    app.add_exception_handler(FhirError, _fhir_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(ConnectionFailure, _database_unreachable)
    app.add_exception_handler(DocumentTooLarge, _too_large)
    app.add_middleware(ErrorBoundaryMiddleware)
