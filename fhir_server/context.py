"""The request context every FHIR interaction depends on: who calls, with what scopes, and how
the answer should be formatted.

Access is open for now (anonymous caller, every scope); SMART on FHIR authorization plugs in here,
in `request_context`, and nowhere else.
"""

from dataclasses import dataclass

from fastapi import Request

from fhir_server.errors import NotAcceptable

JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir", "json"})
PREFER_RETURN = frozenset({"minimal", "representation", "OperationOutcome"})


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    base_url: str  # the FHIR base, e.g. http://host:8080/fhir
    subject: str | None  # the authenticated caller; None while access is open
    scopes: frozenset[str]
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


async def request_context(request: Request) -> RequestContext:
    prefer = preferences(request)
    prefer_return = prefer.get("return", "representation")
    return RequestContext(
        request_id=getattr(request.state, "request_id", "-"),
        base_url=base_url(request),
        subject=None,
        scopes=frozenset({"system/*.*"}),
        pretty=request.query_params.get("_pretty", "false").lower() == "true",
        media_type=_response_media_type(request),
        # A preference the server does not know is ignored (RFC 7240).
        prefer_return=prefer_return if prefer_return in PREFER_RETURN else "representation",
        strict=prefer.get("handling") == "strict",
    )
