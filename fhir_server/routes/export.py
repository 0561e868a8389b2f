"""Bulk Data export: `$export` kick-off (system, Patient, Group), the job's status URL and its files.

Registered before the resource routes, whose `/{type}/{id}` patterns would take these paths. The
status and file routes do not depend on the request context: a bulk client asks for files with
`Accept: application/fhir+ndjson`, which the FHIR routes would refuse.
"""

from email.utils import format_datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import FileResponse, Response

from fhir_server import fhir_json
from fhir_server.auth.policy import Policy
from fhir_server.context import authorize, base_url, preferences, request_context
from fhir_server.errors import BadRequest, Issue, operation_outcome
from fhir_server.routes.deps import Ctx
from fhir_server.routes.http import fhir_response, json_body
from fhir_server.services.export import FILE_PATH, STATUS_PATH, ExportService

NDJSON = "application/fhir+ndjson"
RETRY_AFTER_S = 2

router = APIRouter(prefix="/fhir", dependencies=[Depends(request_context)], tags=["bulk export"])
jobs = APIRouter(prefix="/fhir", tags=["bulk export"])


async def export_service(request: Request) -> ExportService:
    return request.app.state.exports


Exports = Annotated[ExportService, Depends(export_service)]
Access = Annotated[Policy, Depends(authorize)]  # the token, without the FHIR routes' Accept check


async def _parameters(request: Request) -> list[tuple[str, str]]:
    """A POST kick-off's Parameters resource as (name, value) pairs, then the query string."""
    body = await json_body(request)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("The body of a POST $export must be a Parameters resource")
    parameters = body.get("parameter") or []
    if not isinstance(parameters, list):
        raise BadRequest("Parameters.parameter must be a list")
    pairs: list[tuple[str, str]] = []
    for parameter in parameters:
        name = parameter.get("name") if isinstance(parameter, dict) else None
        values = [v for k, v in parameter.items() if k.startswith("value")] if isinstance(name, str) else []
        value: Any = values[0] if len(values) == 1 else None
        if isinstance(value, dict):  # valueReference
            value = value.get("reference")
        if not isinstance(value, str):
            raise BadRequest("Each parameter of a $export needs a name and one string, code, instant or reference value")
        pairs.append((name, value))
    return pairs + list(request.query_params.multi_items())


async def _kick_off(
    request: Request, ctx: Ctx, exports: ExportService, level: str, group_id: str | None = None
) -> Response:
    prefer = preferences(request)
    if "respond-async" not in prefer:
        raise BadRequest("$export runs asynchronously: send 'Prefer: respond-async'")
    params = await _parameters(request) if request.method == "POST" else list(request.query_params.multi_items())
    query = f"?{request.url.query}" if request.url.query else ""
    url = ctx.base_url + request.url.path.removeprefix("/fhir") + query
    # The Bulk Data IG: parameters the server does not apply are errors, unless the client
    # asks for lenient handling (then they are ignored, with a warning).
    strict = prefer.get("handling") != "lenient"
    job_id, warnings = await exports.kick_off(level, params, url=url, strict=strict, group_id=group_id,
                                              access=ctx.access)
    issues = [Issue(f"Export job {job_id} accepted: poll its status at the Content-Location URL",
                    "informational", "information")]
    issues += [Issue(w["diagnostics"], w["code"], "warning") for w in warnings]
    location = f"{ctx.base_url}/{STATUS_PATH}/{job_id}"
    return fhir_response(ctx, operation_outcome(issues), 202, {"Content-Location": location})


@router.get("/$export", summary="$export: every resource (Bulk Data, asynchronous)")
@router.post("/$export", include_in_schema=False)
async def export_system(request: Request, ctx: Ctx, exports: Exports) -> Response:
    return await _kick_off(request, ctx, exports, "system")


@router.get("/Patient/$export", summary="Patient/$export: the compartments of every patient")
@router.post("/Patient/$export", include_in_schema=False)
async def export_patients(request: Request, ctx: Ctx, exports: Exports) -> Response:
    return await _kick_off(request, ctx, exports, "patient")


@router.get("/Group/{group_id}/$export", summary="Group/[id]/$export: the compartments of the group's patients")
@router.post("/Group/{group_id}/$export", include_in_schema=False)
async def export_group(group_id: str, request: Request, ctx: Ctx, exports: Exports) -> Response:
    return await _kick_off(request, ctx, exports, "group", group_id)


@jobs.get(f"/{STATUS_PATH}/{{job_id}}", summary="Status of an export: 202 while running, then the manifest")
async def export_status(job_id: str, request: Request, exports: Exports, access: Access) -> Response:
    status = await exports.status(job_id, base_url(request), access)
    if status.manifest is None:
        return Response(status_code=202, headers={"X-Progress": status.progress, "Retry-After": str(RETRY_AFTER_S)})
    headers = {"Expires": format_datetime(status.expires, usegmt=True)} if status.expires else None
    return Response(fhir_json.dumps(status.manifest), 200, headers=headers, media_type="application/json")


@jobs.delete(f"/{STATUS_PATH}/{{job_id}}", status_code=202, summary="Cancel an export, or delete its files")
async def export_cancel(job_id: str, exports: Exports, access: Access) -> Response:
    await exports.cancel(job_id, access)
    return Response(status_code=202)


@jobs.get(f"/{FILE_PATH}/{{job_id}}/{{name}}", summary="One NDJSON file of a complete export")
async def export_file(job_id: str, name: str, exports: Exports, access: Access) -> Response:
    return FileResponse(await exports.file(job_id, name, access), media_type=NDJSON)
