"""The built-in authorization server (SMART on FHIR): issues short-lived access tokens to
registered clients, and describes itself for SMART discovery.

Grants: `client_credentials` with `private_key_jwt` (SMART Backend Services: EHRs, integration
engines). Token introspection (RFC 7662) and revocation (RFC 7009) for the tokens it issued.
"""

from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from fhir_server.auth import clients
from fhir_server.auth.clients import ClientError
from fhir_server.auth.tokens import InvalidToken, SigningKey, TokenValidator, access_token, revoke

ACCESS_TOKEN_LIFETIME_S = 300  # SMART Backend Services: at most five minutes recommended


@dataclass
class AuthServer:
    """The endpoints' logic. `issuer` (e.g. http://host:8080/auth, where its endpoints are) and
    `audience` (the FHIR base) come with each call: both follow the public base URL."""

    db: AsyncDatabase
    key: SigningKey
    validator: TokenValidator
    token_lifetime_s: int = ACCESS_TOKEN_LIFETIME_S

    def smart_configuration(self, issuer: str) -> dict[str, Any]:
        """`/.well-known/smart-configuration` (SMART App Launch 2.0, 2.1)."""
        return {
            "issuer": issuer,
            "jwks_uri": f"{issuer}/jwks",
            "token_endpoint": f"{issuer}/token",
            "introspection_endpoint": f"{issuer}/introspect",
            "revocation_endpoint": f"{issuer}/revoke",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(clients.ALGORITHMS),
            "scopes_supported": ["system/*.cruds", "system/*.rs", "user/*.cruds", "user/*.rs", "patient/*.rs",
                                 "system/*.read", "user/*.read", "patient/*.read"],
            "response_types_supported": ["token"],
            "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
            "code_challenge_methods_supported": ["S256"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.public_jwk]}

    async def token(self, form: dict[str, str], issuer: str, audience: str) -> dict[str, Any]:
        """The token endpoint's answer to a form; ClientError for an OAuth error."""
        grant = form.get("grant_type")
        if grant != "client_credentials":
            raise ClientError("unsupported_grant_type", f"grant_type '{grant}' is not supported here: client_credentials")
        client = await self._client(form, issuer)
        scope = client.allowed(form.get("scope", ""))
        token, claims = access_token(self.key, issuer=issuer, audience=audience, subject=client.client_id,
                                     client_id=client.client_id, scope=scope, lifetime_s=self.token_lifetime_s,
                                     fhir_user=client.fhir_user, roles=client.roles)
        return {"access_token": token, "token_type": "bearer", "expires_in": self.token_lifetime_s, "scope": claims["scope"]}

    async def _client(self, form: dict[str, str], issuer: str) -> clients.Client:
        return await clients.authenticate(self.db, form.get("client_assertion_type"), form.get("client_assertion"),
                                          f"{issuer}/token")

    async def introspect(self, form: dict[str, str], issuer: str, audience: str) -> dict[str, Any]:
        """RFC 7662, for an authenticated client (as at the token endpoint): `active` and the
        token's claims, or only `active: false`."""
        await self._client(form, issuer)
        token = form.get("token", "")
        try:
            claims = await self.validator.validate(token, audience, issuer)
        except InvalidToken:
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
        client = await self._client(form, issuer)
        try:
            claims = await self.validator.validate(form.get("token", ""), audience, issuer)
        except InvalidToken:
            return
        if claims.issuer == issuer and claims.token_id and claims.client_id == client.client_id:
            await revoke(self.db, claims.token_id, claims.expires)

