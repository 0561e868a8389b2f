"""Services as FastAPI dependencies (created once in the app's lifespan)."""

from fastapi import Request

from fhir_server.services.history import HistoryService
from fhir_server.services.resources import ResourceService


def resource_service(request: Request) -> ResourceService:
    return request.app.state.resources


def history_service(request: Request) -> HistoryService:
    return request.app.state.history
