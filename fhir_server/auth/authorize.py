"""The authorization request of the `authorization_code` flow (RFC 6749 4.1.1, PKCE RFC 7636,
SMART App Launch 2.0 standalone launch), checked the same way when the login form is shown
and when it is sent (whose hidden fields are the request again, trusted no more than a URL).

A bad client or redirect URI is shown to the user (`BadClient`: sending anything to an
unchecked URI would make the server an open redirector); every other error goes back to the app
at its redirect URI (`Refused`, RFC 6749 4.1.2.1).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pymongo.asynchronous.database import AsyncDatabase

from fhir_server.auth import clients
from fhir_server.auth.accounts import Account
from fhir_server.auth.clients import Client, ClientError
from fhir_server.auth.codes import CHALLENGE
from fhir_server.auth.scopes import Grants

FIELDS = ("response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge",
          "code_challenge_method", "aud", "nonce")
MAX_FIELD = 2048


class BadClient(Exception):
    """An unknown client, or a redirect URI not registered for it: shown, never redirected to."""


class Refused(Exception):
    """An OAuth error to send back to the app's redirect URI."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error, self.description = error, description


@dataclass(frozen=True)
class AuthorizationRequest:
    client: Client
    redirect_uri: str
    state: str
    scope: str  # as asked for, within what the client may have
    challenge: str
    nonce: str | None = None
    aud: str | None = None

    def fields(self) -> dict[str, str]:
        """The request as the login form carries it."""
        found = {"response_type": "code", "client_id": self.client.client_id, "redirect_uri": self.redirect_uri,
                 "scope": self.scope, "state": self.state, "code_challenge": self.challenge,
                 "code_challenge_method": "S256"}
        if self.nonce:
            found["nonce"] = self.nonce
        if self.aud:
            found["aud"] = self.aud
        return found

    def back(self, **params: str) -> str:
        """The redirect URI with `params` and the state added to its query."""
        return with_query(self.redirect_uri, {**params, "state": self.state} if self.state else params)


async def check_client(db: AsyncDatabase, params: Mapping[str, str]) -> tuple[Client, str]:
    """The client and its exactly registered redirect URI; BadClient otherwise."""
    client = await clients.find(db, params.get("client_id", ""))
    if client is None:
        raise BadClient("This application is not known to this server (client_id).")
    redirect_uri = params.get("redirect_uri", "")
    if redirect_uri not in client.redirect_uris:
        raise BadClient("The application's redirect address (redirect_uri) is not one registered for it.")
    return client, redirect_uri


async def parse(db: AsyncDatabase, params: Mapping[str, str], audience: str) -> AuthorizationRequest:
    """The request the parameters make; BadClient, or Refused (with `state` to send back
    in `request_state(params)`)."""
    client, redirect_uri = await check_client(db, params)
    if any(len(params.get(name, "")) > MAX_FIELD for name in FIELDS):
        raise Refused("invalid_request", "a parameter is too long")
    if params.get("response_type") != "code":
        raise Refused("unsupported_response_type", "response_type must be code")
    if not params.get("state"):
        raise Refused("invalid_request", "state is required")
    if params.get("code_challenge_method") != "S256" or not CHALLENGE.fullmatch(params.get("code_challenge", "")):
        raise Refused("invalid_request", "PKCE is required: code_challenge (43 characters) with code_challenge_method S256")
    aud = params.get("aud") or None
    if aud is not None and aud.rstrip("/") != audience:
        raise Refused("invalid_request", f"aud must be this server's FHIR base, {audience}")
    requested = " ".join(params.get("scope", "").split())
    if not requested:
        raise Refused("invalid_scope", "scope is required")
    try:
        scope = client.allowed(requested)
    except ClientError as exc:
        raise Refused(exc.error, exc.description) from exc
    return AuthorizationRequest(client, redirect_uri, params["state"], scope, params["code_challenge"],
                                params.get("nonce") or None, aud)


def scope_for(request: AuthorizationRequest, account: Account) -> str:
    """The scopes `account` may give the app: a patient's tokens get `patient/` scopes only
    (confined to its own record), a practitioner's or administrator's `user/` scopes; none
    gets `system/` ones. Refused `invalid_scope` for anything else asked for."""
    grants = Grants.parse(request.scope)
    wanted = "patient" if account.role == "patient" else "user"
    for scope in grants.scopes:
        if scope.context != wanted:
            raise Refused("invalid_scope", f"a {account.role} account may grant {wanted}/ scopes only, not '{scope.text}'")
    if wanted == "patient" and grants.scopes and account.patient is None:
        raise Refused("access_denied", "this account is not linked to a patient record yet")
    kept = [s for s in request.scope.split() if not (wanted == "user" and s == "launch/patient")]
    return " ".join(kept)  # no patient picker here: a practitioner's launch/patient is not granted


def with_query(uri: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))
