"""The built-in authorization server (SMART on FHIR): issues short-lived access tokens to
registered clients, and describes itself for SMART discovery.

Grants: `client_credentials` with `private_key_jwt` (SMART Backend Services: EHRs, integration
engines); `authorization_code` with PKCE (SMART App Launch, standalone: an app acting for a
user who logs in, see routes/login.py), for public clients and `private_key_jwt` ones; and
`refresh_token` (rotated). Token introspection (RFC 7662) and revocation (RFC 7009) for the
tokens it issued.
"""

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from fhir_server.auth import accounts, clients, codes, links
from fhir_server.auth.accounts import Account
from fhir_server.auth.authorize import AuthorizationRequest, scope_for
from fhir_server.auth.clients import ClientError
from fhir_server.auth.codes import Authorization
from fhir_server.auth.mail import Mailer
from fhir_server.auth.tokens import InvalidToken, SigningKey, TokenValidator, access_token, revoke
from fhir_server.config import Settings

ACCESS_TOKEN_LIFETIME_S = 300  # SMART Backend Services: at most five minutes recommended
GRANT_TYPES = ["authorization_code", "client_credentials", "refresh_token"]


@dataclass(frozen=True)
class UserOptions:
    """How the flows for users behave (from Settings)."""

    code_lifetime_s: int = 60
    refresh_lifetime_s: int = 30 * 24 * 3600  # offline_access
    online_lifetime_s: int = 12 * 3600  # online_access
    link_lifetime_s: int = 3600
    registration: bool = True
    lockout: accounts.Lockout = field(default_factory=accounts.Lockout)


@dataclass
class AuthServer:
    """The endpoints' logic. `issuer` (e.g. http://host:8080/auth, where its endpoints are) and
    `audience` (the FHIR base) come with each call: both follow the public base URL."""

    db: AsyncDatabase
    key: SigningKey
    validator: TokenValidator
    token_lifetime_s: int = ACCESS_TOKEN_LIFETIME_S
    options: UserOptions = field(default_factory=UserOptions)
    mailer: Mailer | None = None

    async def enable_users(self, settings: Settings) -> None:
        """Accounts and the authorization_code flow: their settings, mail and indexes."""
        self.options = UserOptions(settings.auth_code_lifetime_s, settings.auth_refresh_lifetime_s,
                                   settings.auth_online_lifetime_s, settings.auth_link_lifetime_s,
                                   settings.auth_registration,
                                   accounts.Lockout(settings.auth_max_failures, settings.auth_lockout_s))
        self.mailer = Mailer.from_settings(self.db, settings)
        await accounts.prepare(self.db)
        await codes.prepare(self.db)
        await links.prepare(self.db)
        await self.mailer.prepare()

    def smart_configuration(self, issuer: str) -> dict[str, Any]:
        """`/.well-known/smart-configuration` (SMART App Launch 2.0, 2.1)."""
        return {
            **_endpoints(issuer),
            "introspection_endpoint": f"{issuer}/introspect",
            "revocation_endpoint": f"{issuer}/revoke",
            "grant_types_supported": GRANT_TYPES,
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": list(clients.ALGORITHMS),
            "scopes_supported": ["openid", "fhirUser", "launch/patient", "offline_access", "online_access",
                                 "system/*.cruds", "system/*.rs", "user/*.cruds", "user/*.rs", "patient/*.cruds",
                                 "patient/*.rs", "system/*.read", "user/*.read", "patient/*.read"],
            "response_types_supported": ["code"],
            "capabilities": ["launch-standalone", "client-public", "client-confidential-asymmetric",
                             "context-standalone-patient", "permission-offline", "permission-online",
                             "permission-patient", "permission-user", "permission-v1", "permission-v2",
                             "sso-openid-connect"],
            "code_challenge_methods_supported": ["S256"],
        }

    def openid_configuration(self, issuer: str) -> dict[str, Any]:
        """OpenID Connect discovery, for the id_token this server issues (sso-openid-connect)."""
        return {
            **_endpoints(issuer),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "scopes_supported": ["openid", "fhirUser"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "fhirUser"],
            "grant_types_supported": GRANT_TYPES,
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "code_challenge_methods_supported": ["S256"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.public_jwk]}

    async def token(self, form: dict[str, str], issuer: str, audience: str) -> dict[str, Any]:
        """The token endpoint's answer to a form; ClientError for an OAuth error."""
        grant = form.get("grant_type")
        if grant == "authorization_code":
            return await self._authorization_code(form, issuer, audience)
        if grant == "refresh_token":
            return await self._refresh(form, issuer, audience)
        if grant != "client_credentials":
            raise ClientError("unsupported_grant_type",
                              f"grant_type '{grant}' is not supported here: {', '.join(GRANT_TYPES)}")
        client = await self._client(form, issuer)
        scope = client.allowed(form.get("scope", ""))
        token, claims = access_token(self.key, issuer=issuer, audience=audience, subject=client.client_id,
                                     client_id=client.client_id, scope=scope, lifetime_s=self.token_lifetime_s,
                                     fhir_user=client.fhir_user, roles=client.roles)
        return {"access_token": token, "token_type": "bearer", "expires_in": self.token_lifetime_s, "scope": claims["scope"]}

    async def _client(self, form: dict[str, str], issuer: str) -> clients.Client:
        return await clients.authenticate(self.db, form.get("client_assertion_type"), form.get("client_assertion"),
                                          f"{issuer}/token")

    async def _app(self, form: dict[str, str], issuer: str) -> clients.Client:
        """The client of a user's grant: a confidential one by its assertion, a public one by
        its client_id alone (PKCE stands in for a secret)."""
        if "client_assertion" in form or "client_assertion_type" in form:
            client = await self._client(form, issuer)
            if form.get("client_id", client.client_id) != client.client_id:
                raise ClientError("invalid_client", "client_id differs from the assertion's", 401)
            return client
        client = await clients.find(self.db, form.get("client_id", ""))
        if client is None or not client.public:
            raise ClientError("invalid_client", "unknown client, or a confidential client without its client_assertion", 401)
        return client

    async def authorize(self, request: AuthorizationRequest, account: Account) -> str:
        """Where the user's browser goes once logged in: the app's redirect URI with a code
        (and the state). Refused for scopes the account may not give."""
        scope = scope_for(request, account)
        grant = Authorization(request.client.client_id, account.account_id, scope, nonce=request.nonce)
        code = await codes.issue_code(self.db, grant, request.redirect_uri, request.challenge,
                                      self.options.code_lifetime_s)
        return request.back(code=code)

    async def _authorization_code(self, form: dict[str, str], issuer: str, audience: str) -> dict[str, Any]:
        client = await self._app(form, issuer)
        grant = await codes.redeem_code(self.db, form.get("code", ""), client.client_id, form.get("redirect_uri", ""),
                                        form.get("code_verifier", ""))
        answer, claims = await self._user_tokens(grant, issuer, audience)
        await codes.note_access_token(self.db, grant.family, claims)
        return answer

    async def _refresh(self, form: dict[str, str], issuer: str, audience: str) -> dict[str, Any]:
        client = await self._app(form, issuer)
        asked = form.get("scope", "")
        grant = await codes.rotate_refresh(self.db, form.get("refresh_token", ""), client.client_id, asked,
                                           client.refresh_reuse_s)
        if asked:  # narrower scopes only (RFC 6749 6), checked before the token was spent
            grant = Authorization(grant.client_id, grant.account_id, " ".join(sorted(set(asked.split()))), grant.family)
        answer, _ = await self._user_tokens(grant, issuer, audience, refreshed=True)
        return answer

    async def _user_tokens(self, grant: Authorization, issuer: str, audience: str,
                           refreshed: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """The token response for a user's grant (the account as it is now: a disabled one
        gets nothing), and the access token's claims."""
        account = await accounts.find(self.db, grant.account_id)
        if account is None or account.disabled or not account.confirmed:
            raise ClientError("invalid_grant", "the account is not active")
        scopes = grant.scope.split()
        token, claims = access_token(self.key, issuer=issuer, audience=audience, subject=account.account_id,
                                     client_id=grant.client_id, scope=grant.scope, lifetime_s=self.token_lifetime_s,
                                     patient=account.patient, fhir_user=account.fhir_user, roles=account.roles)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s,
                                  "scope": claims["scope"]}
        if account.patient:
            answer["patient"] = account.patient
        if "openid" in scopes and not refreshed:
            answer["id_token"] = self._id_token(account, grant, issuer, audience)
        lifetime = (self.options.refresh_lifetime_s if "offline_access" in scopes
                    else self.options.online_lifetime_s if "online_access" in scopes else 0)
        if lifetime:
            answer["refresh_token"] = await codes.issue_refresh(self.db, grant, lifetime, claims)
        return answer, claims

    def _id_token(self, account: Account, grant: Authorization, issuer: str, audience: str) -> str:
        """OpenID Connect: who logged in, for the app (`fhirUser` as an absolute URL)."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": issuer, "sub": account.account_id, "aud": grant.client_id, "iat": now,
                                  "exp": now + self.token_lifetime_s, "jti": uuid.uuid4().hex}
        if grant.nonce:
            claims["nonce"] = grant.nonce
        if account.fhir_user and "fhirUser" in grant.scope.split():
            claims["fhirUser"] = f"{audience}/{account.fhir_user}"
        return self.key.sign(claims)

    async def _client_or_app(self, form: dict[str, str], issuer: str) -> clients.Client:
        """For introspection and revocation: a confidential client, or a public app."""
        if "client_assertion" not in form and "client_assertion_type" not in form and form.get("client_id"):
            return await self._app(form, issuer)
        return await self._client(form, issuer)

    async def introspect(self, form: dict[str, str], issuer: str, audience: str) -> dict[str, Any]:
        """RFC 7662, for an authenticated client (as at the token endpoint): `active` and the
        token's claims, or only `active: false`. A public app learns only about its own tokens."""
        client = await self._client_or_app(form, issuer)
        token = form.get("token", "")
        try:
            claims = await self.validator.validate(token, audience, issuer)
        except InvalidToken:
            return {"active": False}
        if client.public and claims.client_id != client.client_id:
            return {"active": False}
        found = {"active": True, "scope": claims.grants.text, "client_id": claims.client_id, "sub": claims.subject,
                 "exp": claims.expires, "iss": claims.issuer, "token_type": "bearer"}
        if claims.patient:
            found["patient"] = claims.patient
        if claims.fhir_user:
            found["fhirUser"] = claims.fhir_user
        return found

    async def revoke(self, form: dict[str, str], issuer: str, audience: str) -> None:
        """RFC 7009, for the client the token was issued to: an unknown or invalid token, or
        another client's, is not an error and changes nothing."""
        client = await self._client_or_app(form, issuer)
        if await codes.revoke_refresh(self.db, form.get("token", ""), client.client_id):
            return
        try:
            claims = await self.validator.validate(form.get("token", ""), audience, issuer)
        except InvalidToken:
            return
        if claims.issuer == issuer and claims.token_id and claims.client_id == client.client_id:
            await revoke(self.db, claims.token_id, claims.expires)


def _endpoints(issuer: str) -> dict[str, str]:
    """What the SMART and the OpenID Connect discovery documents both name."""
    return {"issuer": issuer, "jwks_uri": f"{issuer}/jwks", "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token"}
