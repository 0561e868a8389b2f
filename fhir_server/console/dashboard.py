"""The dashboard: AI readiness per site (`$ai-readiness`), recent laboratory results and
upcoming appointments, fetched together."""

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request

from fhir_server.console import readiness
from fhir_server.console.api import Api, ApiError, entries, gather
from fhir_server.console.render import page
from fhir_server.console.session import Session

router = APIRouter()
OPEN_STATUSES = "proposed,pending,booked,arrived,checked-in,waitlist"


def included(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every resource of a Bundle by `Type/id` (matches and includes)."""
    return {f"{r['resourceType']}/{r.get('id')}": r for r in entries(bundle, None)}


@page
async def dashboard(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    report, labs, upcoming = await gather(
        api.read("$ai-readiness"),
        api.search("Observation", {"category": "laboratory", "_sort": "-date", "_count": "8",
                                   "_include": "Observation:subject"}),
        api.search("Appointment", {"date": f"ge{now}", "status": OPEN_STATUSES, "_sort": "date", "_count": "8",
                                   "_include": "Appointment:patient"}),
    )
    context: dict[str, Any] = {"title": "Dashboard", "active": "dashboard", "errors": {}}
    if isinstance(report, ApiError):
        context["errors"]["readiness"] = report.message
        context["sites"], context["charts"] = [], {}
    else:
        found = readiness.sites(report)
        context["sites"], context["charts"] = found, readiness.charts(found)
    for key, bundle in (("labs", labs), ("appointments", upcoming)):
        if isinstance(bundle, ApiError):
            context["errors"][key] = bundle.message
            context[key], context[f"{key}_refs"] = [], {}
        else:
            context[key], context[f"{key}_refs"] = entries(bundle), included(bundle)
    return "dashboard.html", context


router.add_api_route("/", dashboard, methods=["GET"])
