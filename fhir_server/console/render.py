"""Pages of the console: Jinja2 templates (autoescaped), and the wrapper every page handler
goes through: the session (else the sign-in page), the API client with the user's token, the
page rendered, renewed tokens sent back, and any API error shown on the page rather than
raised."""

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from heroicons.jinja import heroicon_mini

from fhir_server.console import fhir_text
from fhir_server.console.api import Api, ApiError
from fhir_server.console.session import PREFIX, Session, SignInNeeded, apply, current

LOGGER = logging.getLogger(__name__)
HEADERS = {"Cache-Control": "no-store"}
# (key, label, path, Heroicons icon name)
NAVIGATION = [("dashboard", "Dashboard", "/", "home"), ("patients", "Patients", "/patients", "users"),
              ("imaging", "Imaging", "/imaging", "photo"), ("upload", "Upload", "/upload", "arrow-up-tray"),
              ("appointments", "Appointments", "/appointments", "calendar-days"),
              ("interactions", "Interactions", "/interactions", "chat-bubble-left-right"),
              ("browse", "Resources", "/browse", "circle-stack")]

ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(resources.files("fhir_server.console") / "templates")),
    autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined,
)
ENV.filters.update(fhir_text.FILTERS)
ENV.filters["tojson_attr"] = lambda value: json.dumps(value, separators=(",", ":"))
ENV.globals.update(prefix=PREFIX, navigation=NAVIGATION)
# Inline SVG from the installed heroicons package (decorative: aria-hidden), sized by console.css's .icon.
ENV.globals.update(heroicon_mini=heroicon_mini)

Handler = Callable[[Request, Session, Api], Awaitable[Response | tuple[str, dict[str, Any]]]]


def render(request: Request, template: str, context: dict[str, Any], session: Session | None = None,
           status: int = 200) -> HTMLResponse:
    html = ENV.get_template(template).render(request=request, session=session, **context)
    return HTMLResponse(html, status, headers=HEADERS)


def sign_in_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{PREFIX}/login?next={quote(target, safe='')}", 303, headers=HEADERS)


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A signed-in page: `handler` returns (template, context) or a Response."""

    async def wrapper(request: Request) -> Response:
        try:
            session = await current(request)
        except SignInNeeded:
            return sign_in_redirect(request)
        async with Api(request, session.token) as api:
            try:
                result = await handler(request, session, api)
                if not isinstance(result, Response):  # filling the template in can fail too
                    template, context = result
                    result = render(request, template, context, session, int(context.pop("status", 200)))
            except ApiError as exc:
                status = exc.status if 400 <= exc.status < 600 else 502
                result = render(request, "error.html", {"title": "Cannot show this page", "message": exc.message,
                                                        "status": exc.status}, session, status)
            except Exception:  # a defect of the console: logged, and a page rather than a bare 500
                LOGGER.exception("Console page failed", extra={"path": request.url.path})
                result = render(request, "error.html", {"title": "Cannot show this page", "status": 500,
                                                        "message": "Something went wrong on the server; it was "
                                                                   "logged. Try again, or another page."},
                                session, 500)
        return apply(result, request, session)

    # Not functools.wraps: FastAPI would read the handler's own parameters through __wrapped__.
    wrapper.__name__, wrapper.__doc__ = handler.__name__, handler.__doc__
    return wrapper
