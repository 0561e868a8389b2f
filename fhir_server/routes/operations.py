"""FHIR operations on types and instances: `$validate`, `Patient/$everything`, the image upload
service (`Patient/{id}/$upload-image`) and `$ai-readiness` (system and Organization level).

Registered before the resource routes, whose `/{type}/{id}` patterns would take these paths.
"""

import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from fhir_server.context import request_context
from fhir_server.errors import BadRequest, Forbidden, Issue, UnsupportedMediaType, operation_outcome
from fhir_server.routes.bundles import Transactions
from fhir_server.routes.deps import Ctx, Resources, Searches
from fhir_server.routes.http import fhir_response, json_body, raw_body, write_response
from fhir_server.services.ai_readiness import AiReadinessService, ReadinessRule
from fhir_server.services.resources import Result
from fhir_server.services.transactions import parse_bundle
from mappings.uploads import RejectedFile, check_image, image_entries

# The date of an uploaded image: a date, or an instant with its zone (DocumentReference.date is one).
UPLOAD_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))?")

router = APIRouter(prefix="/fhir", dependencies=[Depends(request_context)], tags=["operations"])
READINESS_READS = ("Patient", "Organization", "Observation", "Media", "ImagingStudy", "Measure")


@router.post("/{resource_type}/$validate", summary="$validate (type level)")
async def validate_type(resource_type: str, request: Request, ctx: Ctx, resources: Resources) -> Response:
    return await _validate(resource_type, None, request, ctx, resources)


@router.post("/{resource_type}/{resource_id}/$validate", summary="$validate (instance level)")
async def validate_instance(
    resource_type: str, resource_id: str, request: Request, ctx: Ctx, resources: Resources
) -> Response:
    return await _validate(resource_type, resource_id, request, ctx, resources)


async def _validate(
    resource_type: str, resource_id: str | None, request: Request, ctx: Ctx, resources: Resources
) -> Response:
    mode = request.query_params.get("mode")
    body = None
    if mode != "delete" or request.headers.get("content-length", "0") != "0":
        body = await json_body(request)
    issues: list[Issue] = await resources.validate(resource_type, resource_id, body, mode, ctx.access)
    return fhir_response(ctx, operation_outcome(issues))


@router.get("/Patient/$everything", summary="Patient/$everything: every patient's compartment")
async def everything_all(request: Request, ctx: Ctx, searches: Searches) -> Response:
    params = list(request.query_params.multi_items())
    return fhir_response(ctx, await searches.everything(ctx.base_url, None, params, ctx.access))


@router.get("/Patient/{patient_id}/$everything", summary="Patient/[id]/$everything: one patient's record")
async def everything(patient_id: str, request: Request, ctx: Ctx, searches: Searches) -> Response:
    params = list(request.query_params.multi_items())
    return fhir_response(ctx, await searches.everything(ctx.base_url, patient_id, params, ctx.access))


@router.post("/Patient/{patient_id}/$upload-image", summary="an image for a patient: Binary + DocumentReference")
async def upload_image(patient_id: str, request: Request, ctx: Ctx, resources: Resources, transactions: Transactions) -> Response:
    """The upload service: the raw file as the body; its type is judged by its content."""
    limit = request.app.state.settings.upload_max_bytes
    data = await raw_body(request, limit)
    try:
        media_type = check_image(data, limit)
    except RejectedFile as exc:
        raise UnsupportedMediaType(str(exc), expression="body") from exc
    await resources.read("Patient", patient_id, ctx.access)  # 404 / 410 for a patient that is not there
    query = request.query_params
    if "date" in query and not UPLOAD_DATE.fullmatch(query["date"]):
        raise BadRequest("date must be a date (YYYY-MM-DD) or an instant with its time zone", expression="date")
    entries = image_entries(
        data, media_type, f"Patient/{patient_id}",
        title=query.get("title"), date=query.get("date"), description=query.get("description"),
    )
    _, parsed = parse_bundle({"resourceType": "Bundle", "type": "transaction", "entry": entries}, ctx.base_url, len(entries))
    results = await transactions.transaction(parsed, access=ctx.access)
    document = results[1].version
    assert document is not None
    return write_response(ctx, Result(201, document, "Created", code="created"))


# -- $ai-readiness (retinal images fit for AI grading; fhir_server/services/ai_readiness.py) ------


def _readiness_service(request: Request) -> AiReadinessService:
    """The service, made at first use from the app's own (its rule from the settings)."""
    state = request.app.state
    service = getattr(state, "ai_readiness", None)
    if service is None:
        rule = ReadinessRule.from_settings(state.settings)
        service = state.ai_readiness = AiReadinessService(state.search.repository, state.resources, state.search, rule)
    return service


async def _readiness(request: Request, ctx: Ctx, organization_id: str | None) -> dict[str, Any]:
    for resource_type in READINESS_READS:  # counts over every patient: for unconfined tokens only
        if ctx.access.compartment(resource_type) is not None or ctx.access.narrowing(resource_type):
            raise Forbidden("$ai-readiness counts over every patient: it needs user/ or system/ scopes")
    body = None
    if request.method == "POST" and request.headers.get("content-length", "0") != "0":
        body = await json_body(request)
    params = list(request.query_params.multi_items())
    return await _readiness_service(request).report(organization_id, params, body)


@router.api_route("/$ai-readiness", methods=["GET", "POST"], summary="$ai-readiness: AI-ready retinal images per site")
async def ai_readiness(request: Request, ctx: Ctx) -> Response:
    return fhir_response(ctx, await _readiness(request, ctx, None))


@router.api_route("/Organization/{organization_id}/$ai-readiness", methods=["GET", "POST"],
                  summary="$ai-readiness of one site")
async def ai_readiness_site(organization_id: str, request: Request, ctx: Ctx) -> Response:
    return fhir_response(ctx, await _readiness(request, ctx, organization_id))
