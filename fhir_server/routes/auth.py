"""HTTP of the built-in authorization server: SMART and OpenID Connect discovery, the token,
introspection and revocation endpoints (form-encoded, OAuth 2.0 JSON errors), and its public
keys. The pages where people log in are in routes/login.py, the admin API in routes/admin.py."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fhir_server.auth.clients import ClientError
from fhir_server.auth.server import AuthServer
from fhir_server.context import base_url, issuer
from fhir_server.routes.pages import form_items

router = APIRouter(tags=["SMART on FHIR"])
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
MAX_FORM_BYTES = 64 * 1024


def _server(request: Request) -> AuthServer:
    return request.app.state.auth


async def _form(request: Request) -> dict[str, str]:
    """The form fields (application/x-www-form-urlencoded, RFC 6749), each once."""
    items = await form_items(request, MAX_FORM_BYTES)
    if items is None:
        raise ClientError("invalid_request", "the body must be an application/x-www-form-urlencoded form of "
                          f"{MAX_FORM_BYTES >> 10} KiB at most")
    fields: dict[str, str] = {}
    for name, value in items:
        if name in fields:
            raise ClientError("invalid_request", f"'{name}' is given twice")
        fields[name] = value
    return fields


def _oauth_error(error: ClientError) -> JSONResponse:
    headers = dict(NO_STORE)
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_client"'
    return JSONResponse({"error": error.error, "error_description": error.description}, error.status, headers)


@router.get("/.well-known/smart-configuration")
@router.get("/fhir/.well-known/smart-configuration")
async def smart_configuration(request: Request) -> dict[str, Any]:
    return _server(request).smart_configuration(issuer(request))


@router.get("/auth/.well-known/openid-configuration")
async def openid_configuration(request: Request) -> dict[str, Any]:
    return _server(request).openid_configuration(issuer(request))


@router.get("/auth/jwks")
async def jwks(request: Request) -> dict[str, Any]:
    return _server(request).jwks()


@router.post("/auth/token")
async def token(request: Request) -> Response:
    try:
        answer = await _server(request).token(await _form(request), issuer(request), base_url(request))
    except ClientError as error:
        return _oauth_error(error)
    return JSONResponse(answer, headers=NO_STORE)


@router.post("/auth/introspect")
async def introspect(request: Request) -> Response:
    try:
        answer = await _server(request).introspect(await _form(request), issuer(request), base_url(request))
    except ClientError as error:
        return _oauth_error(error)
    return JSONResponse(answer, headers=NO_STORE)


@router.post("/auth/revoke")
async def revoke(request: Request) -> Response:
    try:
        await _server(request).revoke(await _form(request), issuer(request), base_url(request))
    except ClientError as error:
        return _oauth_error(error)
    return Response(status_code=200, headers=NO_STORE)
