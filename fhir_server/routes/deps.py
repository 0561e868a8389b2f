"""Services as FastAPI dependencies (created once in the app's lifespan).

`async` on purpose: FastAPI runs plain functions in a thread pool, a thread hop per request.
"""

from typing import Annotated

from fastapi import Depends, Request

from fhir_server.context import RequestContext, request_context
from fhir_server.services.history import HistoryService
from fhir_server.services.resources import ResourceService
from fhir_server.services.search import SearchService


async def resource_service(request: Request) -> ResourceService:
    return request.app.state.resources


async def history_service(request: Request) -> HistoryService:
    return request.app.state.history


async def search_service(request: Request) -> SearchService:
    return request.app.state.search


Ctx = Annotated[RequestContext, Depends(request_context)]
Resources = Annotated[ResourceService, Depends(resource_service)]
History = Annotated[HistoryService, Depends(history_service)]
Searches = Annotated[SearchService, Depends(search_service)]
