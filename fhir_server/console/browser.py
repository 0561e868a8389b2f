"""The resource browser for integration testers: any type, any search string, any resource, its
history, as raw JSON with the references between resources as links."""

from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request

from fhir_server.console import json_html
from fhir_server.console.api import Api, ApiError, entries
from fhir_server.console.render import page
from fhir_server.console.session import Session
from fhir_server.context import base_url
from fhir_server.validation.resource_types import supported_types

router = APIRouter()
MAX_QUERY = 2000


def _types() -> list[str]:
    return sorted(supported_types())


@page
async def search(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    """`type` (a resource type, or a path such as `Patient/1/$everything`) and `q` (the search string)."""
    kind = request.query_params.get("type", "").strip().strip("/")
    text = request.query_params.get("q", "").strip().lstrip("?")
    context: dict[str, Any] = {"title": "Resource browser", "active": "browse", "types": _types(), "kind": kind,
                               "q": text, "error": "", "bundle": None, "json": "", "found": []}
    if not kind:
        return "browser.html", context
    if len(text) > MAX_QUERY:
        context.update(error="The search string is too long.", status=400)
        return "browser.html", context
    try:
        bundle = await api.read(kind, parse_qsl(text, keep_blank_values=True))
    except ApiError as exc:
        context.update(error=f"{exc.status}: {exc.message}", status=exc.status if exc.status < 500 else 502,
                       json=json_html.to_html(exc.body, base_url(request)) if exc.body else "")
        return "browser.html", context
    context.update(bundle=bundle, found=entries(bundle, None), json=json_html.to_html(bundle, base_url(request)))
    return "browser.html", context


@page
async def resource(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    """One resource (`Type/id`, or `Type/id/_history[/vid]`)."""
    path = request.path_params["path"].strip("/")
    context: dict[str, Any] = {"title": path, "active": "browse", "path": path, "error": "", "json": "",
                               "resource": None}
    try:
        found = await api.read(path)
    except ApiError as exc:
        context.update(error=f"{exc.status}: {exc.message}", status=exc.status if exc.status < 500 else 502,
                       json=json_html.to_html(exc.body, base_url(request)) if exc.body else "")
        return "resource.html", context
    context.update(resource=found, json=json_html.to_html(found, base_url(request)))
    return "resource.html", context


router.add_api_route("/browse", search, methods=["GET"])
router.add_api_route("/browse/{path:path}", resource, methods=["GET"])
