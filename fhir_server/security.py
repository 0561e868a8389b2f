"""Transport security of the HTTP API: the HTTPS options given to uvicorn (checked before
anything starts), response headers that keep browsers from sniffing, framing or leaking
referrers, CORS for browser apps on other origins, and a cap on request bodies applied before
any route reads them.
"""

import ipaddress
import json
import re
import ssl
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_server.config import Settings
from fhir_server.errors import Issue, PayloadTooLarge, outcome_response

# A response's own value of one of these wins: the defaults only fill in.
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
# Pages of the server's own (under /auth, /console) load scripts and styles from the server only.
CSP = b"default-src 'self'; frame-ancestors 'none'"
# FastAPI's /docs and /redoc load Swagger UI and ReDoc from a CDN, with inline scripts.
CSP_DOCS = b"frame-ancestors 'none'"
HSTS = (b"strict-transport-security", b"max-age=31536000")
# What FHIR clients in a browser need to read, and may send.
CORS_EXPOSED = ["Location", "ETag", "Content-Location", "Last-Modified", "X-Request-ID", "WWW-Authenticate"]
CORS_ALLOWED = ["Authorization", "Content-Type", "Accept", "If-Match", "If-None-Exist", "If-None-Match",
                "If-Modified-Since", "Prefer", "X-Request-ID", "X-Provenance"]
CORS_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# STOW-RS streams its parts to disk under its own limits (routes/dicomweb/stow.py).
STOW = re.compile(r"/dicomweb/studies(/[^/]+)?/?")
AUTH_FORM_BYTES = 1 << 20  # the authorization server reads its forms whole: far more than any form


def loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 in brackets or not) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(settings: Settings) -> dict[str, Any]:
    """uvicorn's HTTPS options, after checking that the files exist and make a context (a clear
    error at start, not a stack trace); the DICOM node's TLS files are checked too."""
    from dicom_node import tls_contexts
    from dicom_node.tls import TlsConfigError, server_context

    certfile, keyfile, ca_file = settings.tls_certfile, settings.tls_keyfile, settings.tls_ca_file
    try:
        if settings.dicom_port:
            tls_contexts(settings)
        if certfile is None:
            if keyfile is not None or ca_file is not None:
                raise SystemExit("HTTPS needs FHIR_TLS_CERTFILE (and FHIR_TLS_KEYFILE unless the key is in it)")
            return {}
        server_context(certfile, keyfile, ca_file, setting="FHIR_TLS", what="HTTPS")  # what uvicorn will load
    except TlsConfigError as exc:
        raise SystemExit(str(exc)) from exc
    options: dict[str, Any] = {"ssl_certfile": certfile, "ssl_keyfile": keyfile}
    if ca_file is not None:  # clients must present a certificate the CA signed
        options |= {"ssl_ca_certs": str(ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def cors_origins(text: str) -> list[str]:
    """`https://a.example, https://b.example` or a JSON list; ValueError for a malformed list."""
    text = text.strip()
    if text.startswith("["):
        origins = json.loads(text)
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ValueError("FHIR_CORS_ORIGINS: a JSON list of origins (strings)")
    else:
        origins = text.split(",")
    return [o.strip().rstrip("/") for o in origins if o.strip()]


class SecurityHeadersMiddleware:
    """The headers every response carries; Strict-Transport-Security only over HTTPS (a
    browser ignores it over HTTP, and a server behind a TLS proxy gets the proxy's scheme)."""

    def __init__(self, app: ASGIApp, docs_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [*HEADERS, (b"content-security-policy", CSP_DOCS if scope["path"] in self.docs_paths else CSP)]
        if scope.get("scheme") == "https":
            extra.append(HSTS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message["headers"] = headers + [(name, value) for name, value in extra if name not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestTooLarge(PayloadTooLarge):
    """A body read past the cap: raised from `receive`, answered 413 by the error handlers, and
    the connection closed (the rest of the body is not read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(_diagnostics(limit), headers={"Connection": "close"})


class BodyLimitMiddleware:
    """413 before any route reads a body larger than the cap: at once for a declared
    Content-Length, and as soon as a chunked body passes it (reading stops there)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int | None]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(limit)  # answered as every FhirError is (errors.py)
            return message

        await self.app(scope, limited_receive, send)


def _diagnostics(limit: int) -> str:
    return f"The request body is larger than {limit} bytes"


def _too_large(limit: int) -> Any:
    return outcome_response(413, [Issue(_diagnostics(limit), "too-costly")], {"Connection": "close"})


def body_limits(settings: Settings) -> Callable[[str, str], int | None]:
    """The cap of a request by method and path: none for STOW-RS, the authorization server's
    form size under /auth, else FHIR_MAX_REQUEST_BYTES (default: the largest body an endpoint
    takes)."""
    cap = settings.max_request_bytes or max(settings.max_body_bytes, settings.max_bundle_bytes,
                                            settings.upload_max_bytes)

    def limit_for(method: str, path: str) -> int | None:
        if method == "POST" and STOW.fullmatch(path):
            return None
        if path.startswith("/auth/"):
            return min(cap, AUTH_FORM_BYTES)
        return cap

    return limit_for


def install_transport_security(app: FastAPI, settings: Settings) -> None:
    """Add the middleware: call after the error handlers and before the access log, so that
    its answers (413, CORS preflights) are logged and carry the headers."""
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limits(settings))
    origins = cors_origins(settings.cors_origins)
    if origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=CORS_METHODS, allow_headers=CORS_ALLOWED,
            expose_headers=CORS_EXPOSED, allow_credentials=False, max_age=600,
        )
    docs = frozenset(p for p in (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if p)
    app.add_middleware(SecurityHeadersMiddleware, docs_paths=docs)
