"""The dashboard: recent laboratory results and upcoming appointments, fetched together, and AI
readiness per site (`$ai-readiness`, an aggregation over every graded image: about half a second
on 2,000 images), which the page loads after it is shown, from its fragment route (or, without
scripts, as a page of its own)."""

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
    labs, upcoming = await gather(
        api.search("Observation", {"category": "laboratory", "_sort": "-date", "_count": "8",
                                   "_include": "Observation:subject"}),
        api.search("Appointment", {"date": f"ge{now}", "status": OPEN_STATUSES, "_sort": "date", "_count": "8",
                                   "_include": "Appointment:patient"}),
    )
    context: dict[str, Any] = {"title": "Dashboard", "active": "dashboard", "errors": {}}
    for key, bundle in (("labs", labs), ("appointments", upcoming)):
        if isinstance(bundle, ApiError):
            context["errors"][key] = bundle.message
            context[key], context[f"{key}_refs"] = [], {}
        else:
            context[key], context[f"{key}_refs"] = entries(bundle), included(bundle)
    return "dashboard.html", context


@page
async def ai_readiness(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    """The readiness section: the dashboard's fragment (`?fragment=1`), or a page."""
    context: dict[str, Any] = {"title": "AI readiness", "active": "dashboard", "errors": {}, "sites": [], "charts": {}}
    try:
        found = readiness.sites(await api.read("$ai-readiness"))
        context.update(sites=found, charts=readiness.charts(found))
    except ApiError as exc:
        context["errors"]["readiness"] = exc.message
    fragment = request.query_params.get("fragment") == "1"
    return ("readiness_fragment.html" if fragment else "readiness.html"), context


router.add_api_route("/", dashboard, methods=["GET"])
router.add_api_route("/readiness", ai_readiness, methods=["GET"])
