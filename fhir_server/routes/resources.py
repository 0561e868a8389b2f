"""FHIR type- and instance-level interactions: create, read, vread, update, patch, delete,
conditional variants, and type search."""

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import Response

from fhir_server.context import request_context
from fhir_server.routes.deps import Ctx, History, Resources, Searches
from fhir_server.routes.http import (
    JSON_PATCH,
    fhir_response,
    form_params,
    json_body,
    read_response,
    version_tag,
    write_response,
)
from fhir_server.search.criteria import IGNORED_PARAMETERS, RESULT_PARAMETERS

router = APIRouter(prefix="/fhir", dependencies=[Depends(request_context)], tags=["resources"])


def _conditional_query(request: Request) -> str:
    return request.url.query


def _criteria_in_query(request: Request) -> str | None:
    """Search criteria in a POST's query string (as fhirpy sends a conditional create), if any."""
    has_criteria = any(
        name not in RESULT_PARAMETERS and name not in IGNORED_PARAMETERS for name in request.query_params
    )
    return request.url.query if has_criteria else None


@router.get("/{resource_type}/_history", summary="History of every resource of a type")
async def type_history(resource_type: str, request: Request, ctx: Ctx, history: History) -> Response:
    params = list(request.query_params.multi_items())
    return fhir_response(ctx, await history.history(ctx.base_url, params, resource_type, access=ctx.access))


@router.get("/{resource_type}/{resource_id}/_history", summary="History of one resource")
async def instance_history(
    resource_type: str, resource_id: str, request: Request, ctx: Ctx, history: History
) -> Response:
    params = list(request.query_params.multi_items())
    bundle = await history.history(ctx.base_url, params, resource_type, resource_id, ctx.access)
    return fhir_response(ctx, bundle)


@router.get("/{resource_type}/{resource_id}/_history/{vid}", summary="vread: one version")
async def vread(
    resource_type: str, resource_id: str, vid: str, request: Request, ctx: Ctx, resources: Resources
) -> Response:
    version = await resources.vread(resource_type, resource_id, vid, ctx.access)
    return read_response(ctx, request, version)


@router.get("/{resource_type}/{resource_id}", summary="read")
async def read(
    resource_type: str, resource_id: str, request: Request, ctx: Ctx, resources: Resources
) -> Response:
    return read_response(ctx, request, await resources.read(resource_type, resource_id, ctx.access))


@router.get("/{resource_type}/{resource_id}/{compartment_type}", summary="compartment search")
async def compartment_search(
    resource_type: str, resource_id: str, compartment_type: str, request: Request, ctx: Ctx, searches: Searches
) -> Response:
    params = list(request.query_params.multi_items())
    bundle = await searches.search(
        ctx.base_url, compartment_type, params, strict=ctx.strict, compartment=(resource_type, resource_id),
        access=ctx.access,
    )
    return fhir_response(ctx, bundle)


@router.get("/{resource_type}", summary="search")
async def search(resource_type: str, request: Request, ctx: Ctx, searches: Searches) -> Response:
    params = list(request.query_params.multi_items())
    return fhir_response(ctx, await searches.search(ctx.base_url, resource_type, params, strict=ctx.strict,
                                                   access=ctx.access))


@router.post("/{resource_type}/_search", summary="search with a form body")
async def search_form(resource_type: str, request: Request, ctx: Ctx, searches: Searches) -> Response:
    params = await form_params(request)
    return fhir_response(ctx, await searches.search(ctx.base_url, resource_type, params, strict=ctx.strict,
                                                   access=ctx.access))


@router.post(
    "/{resource_type}",
    status_code=201,
    summary="create (conditional with If-None-Exist, or with criteria in the query string)",
)
async def create(
    resource_type: str,
    request: Request,
    ctx: Ctx,
    resources: Resources,
    if_none_exist: Annotated[str | None, Header()] = None,
) -> Response:
    body = await json_body(request)
    condition = if_none_exist or _criteria_in_query(request)
    return write_response(ctx, await resources.create(resource_type, body, condition, ctx.access))


@router.put("/{resource_type}/{resource_id}", summary="update (If-Match: versioned)")
async def update(
    resource_type: str,
    resource_id: str,
    request: Request,
    ctx: Ctx,
    resources: Resources,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    body = await json_body(request)
    result = await resources.update(resource_type, resource_id, body, version_tag(if_match), ctx.access)
    return write_response(ctx, result)


@router.put("/{resource_type}", summary="conditional update")
async def conditional_update(
    resource_type: str,
    request: Request,
    ctx: Ctx,
    resources: Resources,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    body = await json_body(request)
    result = await resources.conditional_update(
        resource_type, _conditional_query(request), body, version_tag(if_match), ctx.access
    )
    return write_response(ctx, result)


@router.patch("/{resource_type}/{resource_id}", summary="patch (JSON Patch)")
async def patch(
    resource_type: str,
    resource_id: str,
    request: Request,
    ctx: Ctx,
    resources: Resources,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    operations = await json_body(request, frozenset({JSON_PATCH}))
    result = await resources.patch(resource_type, resource_id, operations, version_tag(if_match), ctx.access)
    return write_response(ctx, result)


@router.delete("/{resource_type}/{resource_id}", summary="delete")
async def delete(
    resource_type: str,
    resource_id: str,
    ctx: Ctx,
    resources: Resources,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    result = await resources.delete(resource_type, resource_id, version_tag(if_match), ctx.access)
    return write_response(ctx, result)


@router.delete("/{resource_type}", summary="conditional delete")
async def conditional_delete(
    resource_type: str, request: Request, ctx: Ctx, resources: Resources
) -> Response:
    result = await resources.conditional_delete(resource_type, _conditional_query(request), ctx.access)
    return write_response(ctx, result)
