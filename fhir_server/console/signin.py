"""Sign-in through the server's own authorization server (authorization_code with PKCE, the
console being a public client registered on first use), sign-out, and the profile page."""

import secrets
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pymongo.errors import PyMongoError

from fhir_server.auth import clients
from fhir_server.console import session as sessions
from fhir_server.console.api import Api, ApiError
from fhir_server.console.render import HEADERS, page, render
from fhir_server.console.session import FLOW, FLOW_LIFETIME_S, PREFIX, SEED, Session, SignInNeeded
from fhir_server.security import loopback

router = APIRouter()


def _signed_out(request: Request, message: str = "", failed: bool = False, status: int = 200) -> Response:
    return render(request, "signed_out.html", {"title": "Sign in", "message": message, "failed": failed}, None, status)


@router.get("/login")
async def login(request: Request, next: str = f"{PREFIX}/") -> Response:
    """Register the console's redirect URI, then send the browser to the login page."""
    uri = sessions.callback_uri(request)
    # Without FHIR_BASE_URL the redirect URI is the request's own address, which a forged Host
    # header could choose: it is trusted on loopback addresses only.
    if not request.app.state.settings.base_url and not loopback(request.url.hostname or ""):
        return _signed_out(request, "Sign-in to the console from another address needs the server's public "
                                    "address: set FHIR_BASE_URL.", True, 503)
    try:
        await clients.ensure_public(request.app.state.auth.db, sessions.CLIENT_ID, sessions.CLIENT_NAME,
                                    sessions.SCOPE, uri, sessions.REFRESH_REUSE_S)
    except ValueError as exc:
        return _signed_out(request, f"The console cannot sign in here: {exc}", True, 503)
    except PyMongoError:
        return _signed_out(request, "The database cannot be reached. Try again shortly.", True, 503)
    target, flow = sessions.start_flow(request, next)
    response = RedirectResponse(target, 303, headers=HEADERS)
    sessions.set_cookie(response, request, FLOW, flow, FLOW_LIFETIME_S)
    return response


@router.get("/callback")
async def callback(request: Request, code: str = "", state: str = "", error: str = "",
                   error_description: str = "") -> Response:
    if error:
        text = ("This console is for practitioners: your account cannot grant it access."
                if error == "invalid_scope" else f"Sign-in was refused: {error_description or error}")
        return _signed_out(request, text, True, 400)
    try:
        tokens, next_page = await sessions.finish_flow(request, code, state)
    except ValueError as exc:
        return _signed_out(request, str(exc), True, 400)
    response = RedirectResponse(next_page, 303, headers=HEADERS)
    response.delete_cookie(FLOW, path=PREFIX)
    seed = secrets.token_urlsafe(32)
    for name, value in ((sessions.ACCESS, tokens["access_token"]), (sessions.REFRESH, tokens.get("refresh_token", "")),
                        (SEED, seed)):
        sessions.set_cookie(response, request, name, value, sessions.SESSION_LIFETIME_S)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Revoke the tokens and forget the cookies (a form with the CSRF token)."""
    try:
        current: Session | None = await sessions.current(request)
    except SignInNeeded:
        current = None
    form = await request.form()
    if current is not None and not current.check_csrf(str(form.get("csrf", ""))):
        return render(request, "error.html", {"title": "Not signed out", "status": 403,
                                              "message": "The form was out of date. Reload the page and try again."},
                      current, 403)
    if current is not None:
        await sessions.revoke(request, current.refresh, current.token)
    response = _signed_out(request, "You are signed out.")
    sessions.clear_cookies(response)
    return response


@router.get("/signed-out")
async def signed_out(request: Request) -> Response:
    return _signed_out(request)


@page
async def profile(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    user, error = None, ""
    if session.claims.fhir_user:
        try:
            user = await api.read(session.claims.fhir_user)
        except ApiError as exc:
            error = f"{session.claims.fhir_user} cannot be read: {exc.message}"
    expires = datetime.fromtimestamp(session.claims.expires, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "profile.html", {"title": "Profile", "active": "profile", "user": user, "error": error,
                            "expires": expires, "auth_on": request.app.state.settings.auth}


router.add_api_route("/profile", profile, methods=["GET"])
