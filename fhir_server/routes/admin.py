"""A small JSON API to manage the built-in authorization server: list, create, disable and
enable accounts and clients. It needs a bearer token of the built-in server whose `roles`
include `admin` (401 without a valid token, 403 with another); answers and errors are JSON
(`{"error", "error_description"}` as in OAuth)."""

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fhir_server.auth import accounts, clients, codes
from fhir_server.auth.accounts import AccountError
from fhir_server.auth.policy import ADMIN
from fhir_server.auth.scopes import Grants, ScopeError
from fhir_server.auth.server import AuthServer
from fhir_server.context import bearer_policy
from fhir_server.errors import Unauthorized
from fhir_server.routes.login import send_reset

router = APIRouter(prefix="/auth/admin", tags=["Administration"])
NO_STORE = {"Cache-Control": "no-store"}


class NewAccount(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    email: str
    role: Literal["admin", "practitioner", "patient"]
    fhir_user: str | None = Field(default=None, alias="fhirUser")
    name: str = ""
    password: str | None = None  # none: the account is invited by mail to choose one


class NewClient(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9\-._~]{1,64}$")
    name: str
    scope: str
    redirect_uris: list[str] = Field(default_factory=list, alias="redirectUris")
    public: bool = False
    jwks: dict[str, Any] | None = None
    jwks_url: str | None = Field(default=None, alias="jwksUrl")
    fhir_user: str | None = Field(default=None, alias="fhirUser")


def _error(status: int, error: str, description: str) -> JSONResponse:
    headers = dict(NO_STORE)
    if status == 401:
        headers["WWW-Authenticate"] = f'Bearer realm="admin", error="{error}"'
    return JSONResponse({"error": error, "error_description": description}, status, headers)


async def _refused(request: Request) -> Response | None:
    """None for an administrator's request; the 401 or 403 answer otherwise."""
    try:
        policy = await bearer_policy(request)
    except Unauthorized as exc:
        missing = "authorization" not in request.headers
        return _error(401, "invalid_token", "a bearer token of an administrator is needed" if missing else str(exc))
    if ADMIN not in policy.roles:  # roles come from this server's own tokens only
        return _error(403, "insufficient_scope", "only administrators of this server may do this")
    return None


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(await request.json())
    except (ValueError, ValidationError) as exc:
        raise AccountError(f"the body is not a valid {model.__name__}: {exc}") from exc


@router.get("/accounts")
async def list_accounts(request: Request) -> Response:
    if refused := await _refused(request):
        return refused
    found = await accounts.all_accounts(request.app.state.auth.db)
    return JSONResponse({"accounts": [a.public() for a in found]}, headers=NO_STORE)


@router.post("/accounts")
async def create_account(request: Request) -> Response:
    if refused := await _refused(request):
        return refused
    server: AuthServer = request.app.state.auth
    try:
        body: NewAccount = await _body(request, NewAccount)
        account = await accounts.create(server.db, body.email, body.role, body.fhir_user, body.password,
                                        name=body.name, confirmed=body.password is not None)
    except AccountError as exc:
        return _error(400, "invalid_request", str(exc))
    invited = False
    if body.password is None and server.mailer is not None and server.mailer.enabled:
        found = await accounts.find_by_email(server.db, account.email)
        if found is not None:
            send_reset(server, account, found[1], invitation=True)
            invited = True
    return JSONResponse({**account.public(), "invited": invited}, 201, headers=NO_STORE)


@router.post("/accounts/{account_id}/{action}")
async def change_account(request: Request, account_id: str, action: Literal["disable", "enable"]) -> Response:
    if refused := await _refused(request):
        return refused
    server: AuthServer = request.app.state.auth
    account = await accounts.set_disabled(server.db, account_id, action == "disable")
    if account is None:
        return _error(404, "not_found", f"no account '{account_id}'")
    if account.disabled:
        await codes.revoke_account(server.db, account_id)
    return JSONResponse(account.public(), headers=NO_STORE)


@router.get("/clients")
async def list_clients(request: Request) -> Response:
    if refused := await _refused(request):
        return refused
    found = await clients.all_clients(request.app.state.auth.db)
    return JSONResponse({"clients": [c.public_view() for c in found]}, headers=NO_STORE)


@router.post("/clients")
async def create_client(request: Request) -> Response:
    if refused := await _refused(request):
        return refused
    server: AuthServer = request.app.state.auth
    try:
        body: NewClient = await _body(request, NewClient)
        Grants.parse(body.scope)
        client = clients.Client(body.id or clients.new_client_id(), body.name, body.scope, body.jwks, body.jwks_url,
                                tuple(body.redirect_uris), body.fhir_user, public=body.public)
        await clients.register(server.db, client)
    except (AccountError, ScopeError, ValueError) as exc:
        return _error(400, "invalid_request", str(exc))
    return JSONResponse(client.public_view(), 201, headers=NO_STORE)


@router.post("/clients/{client_id}/{action}")
async def change_client(request: Request, client_id: str, action: Literal["disable", "enable"]) -> Response:
    if refused := await _refused(request):
        return refused
    if not await clients.set_disabled(request.app.state.auth.db, client_id, action == "disable"):
        return _error(404, "not_found", f"no client '{client_id}'")
    return JSONResponse({"id": client_id, "disabled": action == "disable"}, headers=NO_STORE)

