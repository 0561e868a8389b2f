"""The request context every FHIR interaction depends on: who calls, what the access token
allows (its `Policy`), and how the answer should be formatted.

SMART on FHIR authorization plugs in here: with `FHIR_AUTH` on, every request needs a valid
bearer token (else 401 with WWW-Authenticate); the services then ask the policy (else 403).
"""

from dataclasses import dataclass

from fastapi import Request

from fhir_server.auth.mail import public_issuer
from fhir_server.auth.policy import OPEN, Policy
from fhir_server.auth.scopes import Grants
from fhir_server.auth.tokens import InvalidToken
from fhir_server.errors import NotAcceptable, Unauthorized

JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir", "json"})
PREFER_RETURN = frozenset({"minimal", "representation", "OperationOutcome"})
NOBODY = Policy(Grants())  # no token: no access


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    base_url: str  # the FHIR base, e.g. http://host:8080/fhir
    access: Policy  # who calls (access.subject; None while access is open) and what they may do
    pretty: bool
    media_type: str  # of the response body
    prefer_return: str
    strict: bool  # Prefer: handling=strict: unknown search parameters are errors


def _response_media_type(request: Request) -> str:
    fmt = request.query_params.get("_format")
    if fmt is not None:
        kind = fmt.split(";")[0].strip().lower()
        if kind in JSON_TYPES:
            return "application/json" if kind == "application/json" else "application/fhir+json"
        raise NotAcceptable(
            f"_format '{fmt}' is not supported: this server speaks JSON only "
            "(json, application/fhir+json, application/json)"
        )
    accept = request.headers.get("accept")
    if not accept:
        return "application/fhir+json"
    ranges = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if any(r in ("*/*", "application/*", "application/fhir+json", "application/json+fhir") for r in ranges):
        return "application/fhir+json"
    if "application/json" in ranges:
        return "application/json"
    raise NotAcceptable(f"Cannot answer in '{accept}': this server speaks JSON (application/fhir+json)")


def preferences(request: Request) -> dict[str, str]:
    """The Prefer header(s) (RFC 7240: comma-separated preferences, each with `;` parameters)."""
    found: dict[str, str] = {}
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].strip().partition("=")
            found.setdefault(name.strip().lower(), value.strip().strip('"'))
    return found


def base_url(request: Request) -> str:
    configured = request.app.state.settings.base_url
    if configured:
        return configured.rstrip("/")
    return str(request.base_url).rstrip("/") + "/fhir"


def issuer(request: Request) -> str:
    """The built-in authorization server's issuer: its endpoints are under it."""
    return public_issuer(request.app.state.settings) or str(request.base_url).rstrip("/") + "/auth"


async def authorize(request: Request) -> Policy:
    """The policy of the request's bearer token; OPEN when authorization is off."""
    if not request.app.state.settings.auth:
        request.state.access = OPEN
        return OPEN
    return await bearer_policy(request)


async def bearer_policy(request: Request) -> Policy:
    """The policy of the request's bearer token, whether authorization is on or not (the
    admin API always needs one); Unauthorized without a valid one. Kept on
    `request.state.access`: once per request, and the audit trail reads who it was."""
    found = getattr(request.state, "access", None)
    if found is not None:
        return found
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("This server needs a bearer access token (SMART on FHIR)", error=None)
    try:
        claims = await request.app.state.auth.validator.validate(token.strip(), base_url(request), issuer(request))
    except InvalidToken as exc:
        raise Unauthorized(exc.reason) from exc
    policy = Policy(claims.grants, claims.patient, claims.subject, claims.fhir_user, frozenset(claims.roles),
                    request.app.state.settings.base_url or "", claims.issuer)
    request.state.access = policy
    return policy


async def request_context(request: Request) -> RequestContext:
    return _context(request, await authorize(request))


async def public_context(request: Request) -> RequestContext:
    """For what anyone may read without a token (the CapabilityStatement, SMART discovery)."""
    return _context(request, NOBODY if request.app.state.settings.auth else OPEN)


def _context(request: Request, access: Policy) -> RequestContext:
    prefer = preferences(request)
    prefer_return = prefer.get("return", "representation")
    return RequestContext(
        request_id=getattr(request.state, "request_id", "-"),
        base_url=base_url(request),
        access=access,
        pretty=request.query_params.get("_pretty", "false").lower() == "true",
        media_type=_response_media_type(request),
        # A preference the server does not know is ignored (RFC 7240).
        prefer_return=prefer_return if prefer_return in PREFER_RETURN else "representation",
        strict=prefer.get("handling") == "strict",
    )
