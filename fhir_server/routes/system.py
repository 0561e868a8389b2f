"""Server-level endpoints: CapabilityStatement, system history, health probe."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from fhir_server.context import RequestContext, issuer, public_context, request_context
from fhir_server.routes.deps import Ctx, History, Searches
from fhir_server.routes.http import fhir_response
from fhir_server.services.capability import capability_statement

router = APIRouter(prefix="/fhir", dependencies=[Depends(request_context)], tags=["system"])
public = APIRouter(prefix="/fhir", tags=["system"])  # no token needed
probes = APIRouter(tags=["probes"])


@public.get("/metadata", summary="CapabilityStatement")
async def metadata(request: Request, ctx: Annotated[RequestContext, Depends(public_context)]) -> Response:
    secured = request.app.state.settings.auth
    return fhir_response(ctx, capability_statement(ctx.base_url, issuer(request) if secured else None))


@router.get("/_history", summary="History of every resource")
async def system_history(request: Request, ctx: Ctx, history: History) -> Response:
    params = list(request.query_params.multi_items())
    return fhir_response(ctx, await history.history(ctx.base_url, params, access=ctx.access))


@router.get("", summary="System search (`_type` and the parameters every resource has)")
@router.get("/", include_in_schema=False)
async def system_search(request: Request, ctx: Ctx, searches: Searches) -> Response:
    params = list(request.query_params.multi_items())
    return fhir_response(ctx, await searches.system_search(ctx.base_url, params, strict=ctx.strict, access=ctx.access))


@probes.get("/health", summary="Liveness and database reachability")
async def health(request: Request) -> Response:
    database_ok = await request.app.state.database.ping()
    return JSONResponse(
        {"status": "ok" if database_ok else "degraded", "database": "ok" if database_ok else "unreachable"},
        status_code=200 if database_ok else 503,
    )
