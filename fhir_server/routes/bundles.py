"""`POST /fhir` with a batch or transaction Bundle.

Transaction writes go to the transaction service as one unit. Every other entry (all of a
batch, and the reads of a transaction) is answered by this same application as an ordinary
request, so an entry means exactly what the same request sent alone would mean.
"""

from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from fhir_server import fhir_json
from fhir_server.context import RequestContext, request_context
from fhir_server.errors import BadRequest, FhirError, operation_outcome
from fhir_server.routes.deps import Ctx
from fhir_server.routes.http import JSON_PATCH, fhir_response, json_body, write_body, write_outcome
from fhir_server.services.resources import Result
from fhir_server.services.transactions import (
    READS,
    BundleEntry,
    TransactionService,
    at_entry,
    json_patch_bytes,
    parse_bundle,
)
from fhir_server.storage.repository import instant

router = APIRouter(prefix="/fhir", dependencies=[Depends(request_context)], tags=["system"])


async def transaction_service(request: Request) -> TransactionService:
    return request.app.state.transactions


Transactions = Annotated[TransactionService, Depends(transaction_service)]


@router.post("", summary="batch or transaction Bundle")
@router.post("/", include_in_schema=False)
async def bundle(request: Request, ctx: Ctx, transactions: Transactions) -> Response:
    settings = request.app.state.settings
    body = await json_body(request, limit=settings.max_bundle_bytes)
    kind, entries = parse_bundle(body, ctx.base_url, settings.max_bundle_entries)
    request.state.bundle_type = kind  # the audit event's interaction (fhir_server/audit/http.py)
    answers: dict[int, dict[str, Any]] = {}
    if kind == "transaction":
        # One resource may not be larger than when sent alone; only a large Bundle can hold one.
        size = int(request.headers.get("content-length") or settings.max_bundle_bytes)
        entry_limit = settings.max_body_bytes if size > settings.max_body_bytes else None
        results = await transactions.transaction(entries, entry_limit, ctx.access)
        answers = {index: _result_entry(ctx, result) for index, result in results.items()}
    for entry in entries:
        if kind == "batch" or entry.method in READS:
            answers[entry.index] = await _dispatch(request, ctx, entry)
    response = {"resourceType": "Bundle", "type": f"{kind}-response"}
    if entries:
        response["entry"] = [answers[e.index] for e in entries]
    return fhir_response(ctx, response)


def _status(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


def _result_entry(ctx: RequestContext, result: Result) -> dict[str, Any]:
    """A transaction write's response entry, shaped by `Prefer: return=` like a single write;
    `response.outcome` always says what the entry did (with `minimal` too, as HAPI FHIR answers),
    since a status alone cannot tell an unchanged update or a matched create from a write."""
    version = result.version
    entry: dict[str, Any] = {}
    response: dict[str, Any] = {"status": _status(result.status)}
    if version is not None:
        if not version.deleted:
            entry["fullUrl"] = f"{ctx.base_url}/{version.type}/{version.id}"
            response["location"] = f"{version.type}/{version.id}/_history/{version.vid}"
        response["etag"] = f'W/"{version.vid}"'
        response["lastModified"] = instant(version.ts)
    body = write_body(ctx, result)
    if body is not None and version is not None and body is version.resource:
        entry["resource"] = body
    response["outcome"] = write_outcome(result)
    entry["response"] = response
    return entry


async def _dispatch(request: Request, ctx: RequestContext, entry: BundleEntry) -> dict[str, Any]:
    """One entry as its own request to this application; its answer as a response entry."""
    try:
        path, headers, body = _sub_request(request, ctx, entry)
    except FhirError as exc:
        error = at_entry(entry, exc)
        return {"response": {"status": _status(error.status), "outcome": operation_outcome(error.issues)}}
    method = "GET" if entry.method == "HEAD" else entry.method  # HEAD: the GET's answer without its body
    status, answer_headers, content = await _call(request, method, path, entry.query, headers, body)
    if entry.method == "HEAD":
        content = b""
    response: dict[str, Any] = {"status": _status(status)}
    location = answer_headers.get("location") or answer_headers.get("content-location")
    if location:
        response["location"] = location.removeprefix(ctx.base_url + "/")
    if "etag" in answer_headers:
        response["etag"] = answer_headers["etag"]
    if "last-modified" in answer_headers:
        response["lastModified"] = instant(parsedate_to_datetime(answer_headers["last-modified"]))
    result: dict[str, Any] = {}
    resource = None
    if content and "json" in answer_headers.get("content-type", ""):
        try:
            resource = fhir_json.loads(content)
        except (ValueError, RecursionError):
            resource = None
    if isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome" and (
        status >= 400 or entry.method not in READS
    ):
        response["outcome"] = resource
    elif isinstance(resource, dict) and "resourceType" in resource:
        if "id" in resource and resource["resourceType"] != "Bundle":
            result["fullUrl"] = f"{ctx.base_url}/{resource['resourceType']}/{resource['id']}"
        result["resource"] = resource
        if isinstance(resource.get("meta"), dict) and "lastUpdated" in resource["meta"]:
            response["lastModified"] = resource["meta"]["lastUpdated"]
    result["response"] = response
    return result


def _sub_request(request: Request, ctx: RequestContext, entry: BundleEntry) -> tuple[str, list[tuple[bytes, bytes]], bytes]:
    """Path, headers and body of an entry's request; 400 for what cannot be one."""
    if not entry.path and entry.method != "GET":
        raise BadRequest("A Bundle cannot contain another batch or transaction")
    headers = [
        (b"host", request.headers.get("host", "localhost").encode("latin-1")),
        (b"accept", b"application/fhir+json"),
        (b"x-request-id", f"{ctx.request_id}-{entry.index}".encode()[:128]),
    ]
    prefer = request.headers.get("prefer")
    if prefer:
        headers.append((b"prefer", prefer.encode("latin-1")))
    for name, value in (
        ("if-match", entry.if_match),
        ("if-none-match", entry.if_none_match),
        ("if-none-exist", entry.if_none_exist),
        ("if-modified-since", entry.if_modified_since),
    ):
        if value is not None:
            headers.append((name.encode(), value.encode("utf-8")))
    body = b""
    if entry.method == "PATCH":
        body = json_patch_bytes(entry.resource)
        headers.append((b"content-type", JSON_PATCH.encode()))
    elif entry.method in ("POST", "PUT"):
        if entry.resource is None:
            raise BadRequest(f"{entry.method} needs a resource")
        try:
            body = fhir_json.dumps(entry.resource)
        except (TypeError, ValueError, RecursionError) as exc:
            raise BadRequest(f"The resource cannot be read: {exc}") from exc
        headers.append((b"content-type", b"application/fhir+json"))
    return f"/fhir/{entry.path}".rstrip("/"), headers, body


async def _call(
    request: Request, method: str, path: str, query: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Run a request through this ASGI application, in this process."""
    outer = request.scope
    scope = {
        "type": "http",
        "asgi": outer.get("asgi", {"version": "3.0"}),
        "http_version": outer.get("http_version", "1.1"),
        "method": method,
        "scheme": outer.get("scheme", "http"),
        "server": outer.get("server"),
        "client": outer.get("client"),
        "root_path": outer.get("root_path", ""),
        "path": path,
        "raw_path": path.encode("utf-8"),
        "query_string": query.encode("latin-1", errors="replace"),
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        # The Bundle's token, checked once: each entry runs under the policy it gave.
        "state": {"access": request.state.access} if hasattr(request.state, "access") else {},
    }
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": body, "more_body": False}

    status = 500
    answer_headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers.update((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await request.app(scope, receive, send)
    return status, answer_headers, b"".join(chunks)
