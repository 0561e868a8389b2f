"""Services as FastAPI dependencies (created once in the app's lifespan).

`async` on purpose: FastAPI runs plain functions in a thread pool, a thread hop per request.
"""

from fastapi import Request

from fhir_server.services.history import HistoryService
from fhir_server.services.resources import ResourceService
from fhir_server.services.search import SearchService


async def resource_service(request: Request) -> ResourceService:
    return request.app.state.resources


async def history_service(request: Request) -> HistoryService:
    return request.app.state.history


async def search_service(request: Request) -> SearchService:
    return request.app.state.search
