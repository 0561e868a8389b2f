"""The pages of the built-in authorization server where people act themselves: log in to
authorize an app (`/auth/authorize`, SMART standalone launch), register as a patient
(`/auth/register`, then `/auth/confirm` from the mailed link), and reset a forgotten password
(`/auth/forgot`, then `/auth/reset` from the mailed link).

Mailed links open a page with a button: the change happens on POST only, so a mail scanner
that fetches links spends nothing. The answers to registration and to a reset request are the
same whether or not the address has an account.
"""

import logging
from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from fhir_server.auth import accounts, codes, links
from fhir_server.auth.accounts import Account, AccountError, LoginFailed
from fhir_server.auth.authorize import (
    FIELDS,
    AuthorizationRequest,
    BadClient,
    Refused,
    check_client,
    parse,
    with_query,
)
from fhir_server.auth.server import AuthServer
from fhir_server.context import base_url
from fhir_server.routes.pages import error, field, form, form_fields, hidden, message, page

router = APIRouter(prefix="/auth", tags=["SMART on FHIR: login"], include_in_schema=False)
LOGGER = logging.getLogger(__name__)
NO_MAIL = "This server sends no mail, so this page is not available. Ask an administrator."


def _server(request: Request) -> AuthServer:
    return request.app.state.auth


def _back(redirect_uri: str, state: str, refused: Refused) -> Response:
    params = {"error": refused.error, "error_description": refused.description}
    if state:
        params["state"] = state
    return RedirectResponse(with_query(redirect_uri, params), 303, headers={"Cache-Control": "no-store"})


async def _request(request: Request, params: dict[str, str]) -> AuthorizationRequest | Response:
    """The authorization request, or the answer to a bad one (a page, or a redirect)."""
    db = _server(request).db
    try:
        return await parse(db, params, base_url(request))
    except BadClient as exc:
        return message("Cannot sign in", str(exc), 400)
    except Refused as refused:
        _, redirect_uri = await check_client(db, params)
        return _back(redirect_uri, params.get("state", ""), refused)


def _login_page(auth: AuthorizationRequest, email: str = "", problem: str | None = None, status: int = 200) -> Response:
    scopes = "".join(f"<li><code>{escape(s)}</code></li>" for s in auth.scope.split())
    inner = (error(problem) + hidden(auth.fields())
             + field("email", "Email address", "email", email, "username", failed=bool(problem))
             + field("password", "Password", "password", autocomplete="current-password", failed=bool(problem)))
    deny = '<button type="submit" name="action" value="deny" formnovalidate>Cancel</button>'
    body = (f"<p>Sign in to let <strong>{escape(auth.client.name or auth.client.client_id)}</strong> use your "
            f"health records with these permissions:</p><ul>{scopes}</ul>"
            + form("/auth/authorize", inner, "Sign in and allow", [" ", deny])
            + '<p><a href="/auth/forgot">Forgot your password?</a> · <a href="/auth/register">Register</a></p>')
    return page("Sign in", body, status)


@router.get("/authorize")
async def authorize_page(request: Request) -> Response:
    params = {name: request.query_params[name] for name in FIELDS if name in request.query_params}
    found = await _request(request, params)
    if isinstance(found, Response):
        return found
    if any(len(request.query_params.getlist(name)) > 1 for name in FIELDS):
        return _back(found.redirect_uri, found.state, Refused("invalid_request", "a parameter is given twice"))
    return _login_page(found)


@router.post("/authorize")
async def authorize(request: Request) -> Response:
    fields = await form_fields(request)
    if fields is None:
        return message("Cannot sign in", "The form could not be read.", 400)
    found = await _request(request, {name: fields[name] for name in FIELDS if name in fields})
    if isinstance(found, Response):
        return found
    if fields.get("action") == "deny":
        return _back(found.redirect_uri, found.state, Refused("access_denied", "the user did not allow the app"))
    server = _server(request)
    email = fields.get("email", "")
    try:
        account = await accounts.login(server.db, email, fields.get("password", ""), server.options.lockout)
        account = await ensure_patient(request, account)
        target = await server.authorize(found, account)
    except LoginFailed as failed:
        return _login_page(found, email, failed.message, 401)
    except Refused as refused:
        return _back(found.redirect_uri, found.state, refused)
    return RedirectResponse(target, 303, headers={"Cache-Control": "no-store"})


async def ensure_patient(request: Request, account: Account) -> Account:
    """A self-registered patient's own Patient record, made once its address is confirmed. Its id
    is the account's: the confirmation and a first sign-in (or two), racing, make one record."""
    if account.role != "patient" or account.fhir_user is not None or not account.confirmed:
        return account
    name = account.name.split()
    patient_id = f"account-{account.account_id}"
    patient = {"resourceType": "Patient", "id": patient_id,
               "telecom": [{"system": "email", "value": account.email, "use": "home"}]}
    if name:
        patient["name"] = [{"text": account.name, "family": name[-1], "given": name[:-1]} if len(name) > 1
                           else {"text": account.name, "family": name[0]}]
    await request.app.state.resources.update("Patient", patient_id, patient)
    db = _server(request).db
    if await accounts.link(db, account.account_id, f"Patient/{patient_id}"):
        LOGGER.info("Patient record made for a registered account", extra={"patient": patient_id})
    return await accounts.find(db, account.account_id) or account


# -- registration ------------------------------------------------------------------------------


def _register_page(values: dict[str, str] | None = None, problem: str | None = None, status: int = 200) -> Response:
    values = values or {}
    inner = (error(problem)
             + field("name", "Full name", "text", values.get("name", ""), "name")
             + field("email", "Email address", "email", values.get("email", ""), "email")
             + field("password", "Password", "password", autocomplete="new-password", failed=bool(problem),
                     hint="At least 8 characters, with upper- and lower-case letters, a digit and a special character.")
             + field("password2", "Password again", "password", autocomplete="new-password"))
    return page("Register as a patient", form("/auth/register", inner, "Register"), status)


def _mail_ready(request: Request) -> bool:
    mailer = _server(request).mailer
    return mailer is not None and mailer.enabled


@router.get("/register")
async def register_page(request: Request) -> Response:
    if not _server(request).options.registration:
        return message("Register", "Registration is closed on this server. Ask your care provider for an account.", 404)
    if not _mail_ready(request):
        return message("Register", NO_MAIL, 503)
    return _register_page()


@router.post("/register")
async def register(request: Request) -> Response:
    server = _server(request)
    if not server.options.registration or not _mail_ready(request):
        return message("Register", "Registration is not available on this server.", 404)
    fields = await form_fields(request) or {}
    values = {"name": fields.get("name", "").strip()[:200], "email": fields.get("email", "")}
    password = fields.get("password", "")
    try:
        email = accounts.check_email(values["email"])
        accounts.check_password(password)
        if password != fields.get("password2"):
            raise AccountError("The two passwords differ.")
    except AccountError as exc:
        return _register_page(values, str(exc), 400)
    assert server.mailer is not None and server.mailer.public_issuer is not None
    issuer = server.mailer.public_issuer
    try:
        account = await accounts.create(server.db, email, "patient", None, password, name=values["name"])
    except AccountError:  # the address has an account: its owner is told, nobody else
        server.mailer.send_later(email, "You already have an account",
                                 "Someone (perhaps you) tried to register again with this address.\n"
                                 f"If you forgot your password, reset it here: {issuer}/forgot\n")
    else:
        token = links.make(server.key, issuer, "confirm", account.account_id, server.options.link_lifetime_s)
        server.mailer.send_later(email, "Confirm your email address",
                                 f"Follow this link to confirm your address and finish your registration:\n\n"
                                 f"{issuer}/confirm?token={token}\n\n"
                                 "If you did not register, ignore this mail.\n")
    return message("Check your mail", f"We sent a mail to {email}. Follow its link to finish your registration.")


@router.get("/confirm")
async def confirm_page(request: Request, token: str = "") -> Response:
    server = _server(request)
    if not _mail_ready(request):
        return message("Confirm your address", NO_MAIL, 503)
    try:
        await links.check(server.db, server.key, token, _issuer(server), "confirm")
    except links.InvalidLink:
        return message("Confirm your address", "This link is not valid any more. Register again.", 400)
    return page("Confirm your address", form("/auth/confirm", hidden({"token": token}), "Confirm my address"))


@router.post("/confirm")
async def confirm(request: Request) -> Response:
    server = _server(request)
    fields = await form_fields(request) or {}
    if not _mail_ready(request):
        return message("Confirm your address", NO_MAIL, 503)
    try:
        claims = await links.use(server.db, server.key, fields.get("token", ""), _issuer(server), "confirm")
    except links.InvalidLink:
        return message("Confirm your address", "This link is not valid any more. Register again.", 400)
    account = await accounts.confirm(server.db, str(claims["sub"]))
    if account is None:
        return message("Confirm your address", "This account does not exist any more.", 400)
    await ensure_patient(request, account)
    return message("Address confirmed", "Thank you. You can now sign in from your health app.")


def _issuer(server: AuthServer) -> str:
    assert server.mailer is not None and server.mailer.public_issuer is not None
    return server.mailer.public_issuer


# -- password reset ----------------------------------------------------------------------------


@router.get("/forgot")
async def forgot_page(request: Request) -> Response:
    if not _mail_ready(request):
        return message("Forgot your password?", NO_MAIL, 503)
    inner = field("email", "Email address", "email", autocomplete="email")
    return page("Forgot your password?", "<p>We will mail you a link to choose a new one.</p>"
                + form("/auth/forgot", inner, "Send the link"))


@router.post("/forgot")
async def forgot(request: Request) -> Response:
    server = _server(request)
    if not _mail_ready(request):
        return message("Forgot your password?", NO_MAIL, 503)
    fields = await form_fields(request) or {}
    email = accounts.normalize_email(fields.get("email", ""))[:254]
    found = await accounts.find_by_email(server.db, email)
    if found is not None and not found[0].disabled:
        send_reset(server, found[0], found[1])
    return message("Check your mail", f"If {email} has an account here, we sent it a link to choose a new password.")


def send_reset(server: AuthServer, account: Account, document: dict, invitation: bool = False) -> None:
    """Mail a link to (re)set the password; it works once, and not after another change."""
    assert server.mailer is not None
    issuer = _issuer(server)
    token = links.make(server.key, issuer, "reset", account.account_id, server.options.link_lifetime_s,
                       stamp=accounts.password_stamp(document))
    if invitation:
        subject, text = "Your account", "An account was made for you. Choose your password here:"
    else:
        subject, text = "Reset your password", "Follow this link to choose a new password:"
    server.mailer.send_later(account.email, subject, f"{text}\n\n{issuer}/reset?token={token}\n\n"
                             "If you did not ask for this, ignore this mail.\n")


def _reset_page(token: str, problem: str | None = None, status: int = 200) -> Response:
    inner = (error(problem) + hidden({"token": token})
             + field("password", "New password", "password", autocomplete="new-password", failed=bool(problem),
                     hint="At least 8 characters, with upper- and lower-case letters, a digit and a special character.")
             + field("password2", "New password again", "password", autocomplete="new-password"))
    return page("Choose a new password", form("/auth/reset", inner, "Save the password"), status)


@router.get("/reset")
async def reset_page(request: Request, token: str = "") -> Response:
    server = _server(request)
    if not _mail_ready(request):
        return message("Choose a new password", NO_MAIL, 503)
    try:
        await links.check(server.db, server.key, token, _issuer(server), "reset")
    except links.InvalidLink:
        return message("Choose a new password", "This link is not valid any more. Ask for a new one.", 400)
    return _reset_page(token)


@router.post("/reset")
async def reset(request: Request) -> Response:
    server = _server(request)
    if not _mail_ready(request):
        return message("Choose a new password", NO_MAIL, 503)
    fields = await form_fields(request) or {}
    token, password = fields.get("token", ""), fields.get("password", "")
    invalid = message("Choose a new password", "This link is not valid any more. Ask for a new one.", 400)
    try:
        await links.check(server.db, server.key, token, _issuer(server), "reset")
        accounts.check_password(password)
        if password != fields.get("password2"):
            raise AccountError("The two passwords differ.")
        claims = await links.use(server.db, server.key, token, _issuer(server), "reset")
    except links.InvalidLink:
        return invalid
    except AccountError as exc:
        return _reset_page(token, str(exc), 400)
    if not await accounts.set_password(server.db, str(claims["sub"]), password, str(claims.get("stamp", ""))):
        return invalid
    await codes.revoke_account(server.db, str(claims["sub"]))  # whoever held its sessions holds them no more
    return message("Password changed", "Your new password is saved. Sign in again from your health app.")
