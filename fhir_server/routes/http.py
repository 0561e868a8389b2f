"""Request parsing and response building shared by the FHIR routes."""

from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.responses import Response

from fhir_server import fhir_json
from fhir_server.context import RequestContext
from fhir_server.errors import (
    BadRequest,
    Issue,
    PayloadTooLarge,
    UnsupportedMediaType,
    operation_outcome,
)
from fhir_server.services.resources import VERSION_ID, WRITE_OUTCOME_SYSTEM, Result
from fhir_server.storage.repository import Version

FHIR_BODY_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
JSON_PATCH = "application/json-patch+json"


FORM = "application/x-www-form-urlencoded"


async def json_body(request: Request, allowed: frozenset[str] = FHIR_BODY_TYPES, limit: int | None = None) -> Any:
    """The request body as JSON, after checking its media type and size (`limit`: bytes, the
    resource limit by default)."""
    raw = await _body(request, allowed, limit=limit)
    if not raw:
        raise BadRequest("The request has no body")
    try:
        return fhir_json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}") from exc


async def raw_body(request: Request, limit: int) -> bytes:
    """The body as it came (any media type), at most `limit` bytes (413 beyond)."""
    return await _body(request, frozenset(), limit=limit, any_type=True)


async def form_params(request: Request) -> list[tuple[str, str]]:
    """Search parameters of `POST [type]/_search`: the form body, then the query string."""
    raw = await _body(request, frozenset({FORM}), required=True)
    try:
        body = parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise BadRequest("The form body is not UTF-8") from exc
    return body + list(request.query_params.multi_items())


async def _body(
    request: Request, allowed: frozenset[str], required: bool = False, limit: int | None = None, any_type: bool = False
) -> bytes:
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if not any_type and (kind or required) and kind not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type '{content_type}' is not supported here; send {', '.join(sorted(allowed))}"
        )
    limit = limit or request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # stop reading as soon as the limit is passed
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def version_tag(header: str | None, name: str = "If-Match") -> int | None:
    """`W/"3"`, `"3"` or `3` → 3."""
    if header is None:
        return None
    value = header.strip().removeprefix("W/").strip('"')
    if not VERSION_ID.fullmatch(value):
        raise BadRequest(f"{name} must be a version ETag such as W/\"3\", not '{header}'", expression=name)
    return int(value)


def not_modified(request: Request, version: Version) -> bool:
    """If-None-Match / If-Modified-Since on a read."""
    none_match = request.headers.get("if-none-match")
    if none_match is not None:
        tags = {t.strip().removeprefix("W/").strip('"') for t in none_match.split(",")}
        return "*" in tags or str(version.vid) in tags
    since = request.headers.get("if-modified-since")
    if since:
        try:
            return version.ts.replace(microsecond=0) <= parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False  # an unparseable date is ignored, as HTTP says
    return False


def fhir_response(
    ctx: RequestContext, body: dict[str, Any] | None, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    content = b"" if body is None else fhir_json.dumps(body, pretty=ctx.pretty)
    return Response(content, status, headers=headers, media_type=f"{ctx.media_type}; charset=utf-8")


def version_headers(ctx: RequestContext, version: Version) -> dict[str, str]:
    return {
        "ETag": f'W/"{version.vid}"',
        "Last-Modified": format_datetime(version.ts, usegmt=True),
    }


def read_response(ctx: RequestContext, request: Request, version: Version) -> Response:
    headers = version_headers(ctx, version)
    if not_modified(request, version):
        return Response(status_code=304, headers=headers)
    return fhir_response(ctx, version.resource, 200, headers)


def write_outcome(result: Result) -> dict[str, Any]:
    """A write's OperationOutcome: its message, and what happened as a code clients can test
    (created, updated, unchanged, matched, deleted, not-found)."""
    issue = Issue(result.message, "informational", "information", coding=(WRITE_OUTCOME_SYSTEM, result.code))
    return operation_outcome([issue])


def write_body(ctx: RequestContext, result: Result) -> dict[str, Any] | None:
    """What a write answers, as `Prefer: return=` asks: the resource, an OperationOutcome (also
    for a deletion), or nothing (`minimal`). Single writes and Bundle entries alike."""
    version = result.version
    if ctx.prefer_return == "minimal":
        return None
    if ctx.prefer_return == "OperationOutcome" or version is None or version.deleted:
        return write_outcome(result)
    return version.resource


def write_response(ctx: RequestContext, result: Result) -> Response:
    """The answer to create, update, patch and delete, shaped by `Prefer: return=`."""
    version = result.version
    headers: dict[str, str] = {}
    if version is not None:
        headers = version_headers(ctx, version)
        if not version.deleted:
            location = f"{ctx.base_url}/{version.type}/{version.id}/_history/{version.vid}"
            headers["Location" if result.status == 201 else "Content-Location"] = location
    body = write_body(ctx, result)
    is_delete = version is None or version.deleted
    status = 204 if body is None and is_delete else result.status
    return fhir_response(ctx, body, status, headers)
