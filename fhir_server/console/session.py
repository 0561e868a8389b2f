"""Who is signed in to the console: the tokens of the server's own authorization_code flow,
kept in the browser (HttpOnly, SameSite=Lax cookies, Secure under HTTPS), never in process
memory, so that any server process sharing the database serves any console request.

The access token lives five minutes; an expired one is replaced with the refresh token
(`online_access`) on the next page, and the new cookies go out with that page. Forms that
write carry a CSRF token derived from a random per-session cookie the page's origin alone can
read.
"""

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from fastapi import Request, Response
from pymongo.errors import PyMongoError

from fhir_server.auth.codes import s256
from fhir_server.auth.tokens import Claims, InvalidToken
from fhir_server.console.api import Api, ApiError, checked
from fhir_server.context import base_url, issuer

PREFIX = "/console"
CLIENT_ID = "fhir-console"
CLIENT_NAME = "Web console"
SCOPE = "openid fhirUser online_access user/*.cruds"
ACCESS, REFRESH, SEED, FLOW = "console_at", "console_rt", "console_seed", "console_flow"
FLOW_LIFETIME_S = 600
SESSION_LIFETIME_S = 12 * 3600  # the online_access refresh token's lifetime
RENEW_BEFORE_S = 90  # a page renews a token this close to expiry, so that its images find it valid
REFRESH_REUSE_S = 30  # two tabs renewing at once present one refresh token: the second is not a replay


class SignInNeeded(Exception):
    """No usable session: the browser goes to the sign-in page."""


@dataclass
class Session:
    """The signed-in user's tokens and claims; `cookies` are new tokens to send back."""

    token: str
    claims: Claims
    seed: str
    refresh: str | None = None
    cookies: dict[str, str] = field(default_factory=dict)

    @property
    def csrf(self) -> str:
        return csrf_token(self.seed)

    def check_csrf(self, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(self.csrf, sent or "")


def csrf_token(seed: str) -> str:
    return hashlib.sha256(f"console-csrf:{seed}".encode()).hexdigest()


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="lax",
                        secure=secure(request))


def clear_cookies(response: Response) -> None:
    for name in (ACCESS, REFRESH, SEED, FLOW):
        response.delete_cookie(name, path=PREFIX)


def apply(response: Response, request: Request, session: Session | None) -> Response:
    """Send the session's renewed tokens with the page."""
    if session is not None:
        for name, value in session.cookies.items():
            set_cookie(response, request, name, value, SESSION_LIFETIME_S)
    return response


def callback_uri(request: Request) -> str:
    """Where the authorization server sends the browser back: the configured public base when
    there is one, else the request's own (a loopback address, or https)."""
    return base_url(request).removesuffix("/fhir") + f"{PREFIX}/callback"


async def current(request: Request, renew: bool = True) -> Session:
    """The valid session of the request's cookies; SignInNeeded otherwise. With `renew`, an
    access token that expired or is about to is replaced through the refresh token. Requests
    a page makes by itself (its images) do not renew: a refresh token works once, and several
    of them at a time would spend it together (which revokes the session). A renewal that fails
    while the access token is still valid keeps the session (the next page tries again)."""
    token, refresh, seed = (request.cookies.get(n) for n in (ACCESS, REFRESH, SEED))
    if not seed:
        raise SignInNeeded
    valid = await _validated(request, token, seed, refresh) if token else None
    if valid is not None and not (renew and refresh and valid.claims.expires - time.time() < RENEW_BEFORE_S):
        return valid
    if not (renew and refresh):
        raise SignInNeeded
    tokens = await _refreshed(request, refresh)
    if tokens is None:
        if valid is None:
            raise SignInNeeded
        return valid
    renewed = await _validated(request, tokens["access_token"], seed, tokens.get("refresh_token", refresh))
    if renewed is None:
        if valid is None:
            raise SignInNeeded
        renewed = Session(valid.token, valid.claims, seed, tokens.get("refresh_token", refresh))
    # The refresh token was spent: its successor goes to the browser even when the new access
    # token could not be checked, or the next renewal would replay the spent one (and be revoked).
    renewed.cookies = {ACCESS: tokens["access_token"], REFRESH: renewed.refresh or ""}
    return renewed


async def _validated(request: Request, token: str, seed: str, refresh: str | None) -> Session | None:
    """The session of a valid access token; None for an invalid one, or one the database could
    not check."""
    validator = request.app.state.auth.validator
    try:
        claims = await validator.validate(token, base_url(request), issuer(request))
    except (InvalidToken, PyMongoError):
        return None
    return Session(token, claims, seed, refresh)


async def _refreshed(request: Request, refresh: str) -> dict[str, Any] | None:
    """The token endpoint's new tokens for a refresh token; None when it refused or failed."""
    try:
        async with Api(request, None) as api:
            answer = await api.call("POST", "/auth/token", data={"grant_type": "refresh_token", "client_id": CLIENT_ID,
                                                               "refresh_token": refresh})
        tokens = answer.json() if answer.status_code == 200 else None
    except (httpx.HTTPError, PyMongoError, ValueError):
        return None
    return tokens if isinstance(tokens, dict) and isinstance(tokens.get("access_token"), str) else None


# -- the authorization_code flow -----------------------------------------------------------------


def start_flow(request: Request, next_page: str) -> tuple[str, str]:
    """The authorization URL to send the browser to, and the flow cookie (state, PKCE verifier
    and the page to return to) that the callback checks."""
    state, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    challenge = s256(verifier)
    query = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": callback_uri(request), "scope": SCOPE,
             "state": state, "code_challenge": challenge, "code_challenge_method": "S256", "aud": base_url(request)}
    return f"/auth/authorize?{urlencode(query)}", f"{state} {verifier} {safe_next(next_page)}"


def safe_next(page: str) -> str:
    """A console page to return to (never another site)."""
    return page if page.startswith(f"{PREFIX}/") and not page.startswith("//") and "\\" not in page else f"{PREFIX}/"


async def finish_flow(request: Request, code: str, state: str) -> tuple[dict[str, Any], str]:
    """The token answer for the callback's code, and the page to go to; ValueError with a
    message to show when the flow cannot finish."""
    flow = (request.cookies.get(FLOW) or "").split(" ")
    if len(flow) != 3 or not hmac.compare_digest(flow[0], state):
        raise ValueError("This sign-in was not started here, or took too long. Please sign in again.")
    async with Api(request, None) as api:
        answer = await api.call("POST", "/auth/token", data={
            "grant_type": "authorization_code", "client_id": CLIENT_ID, "code": code,
            "redirect_uri": callback_uri(request), "code_verifier": flow[1]})
    try:
        return checked(answer), flow[2]
    except ApiError as exc:
        raise ValueError(f"Sign-in failed: {exc.message}") from exc


async def revoke(request: Request, *tokens: str | None) -> None:
    """Sign-out: the tokens stop working at once (the refresh token's family too)."""
    async with Api(request, None) as api:
        for token in tokens:
            if token:
                await api.call("POST", "/auth/revoke", data={"client_id": CLIENT_ID, "token": token})
