"""What one request may do: the decisions every FHIR interaction asks of its access token.

Made once per request (in `context.request_context`) from the token's claims, and handed to
the services, which ask it before and after they touch stored resources:

- `require(type, permission)`: some scope allows the interaction at all (else 403);
- `compartment(type)`: `patient/` scopes reach only the Patient compartment of the token's
  patient, so a search gets that compartment as a constraint;
- `narrowing(type)`: a granular scope (`patient/Observation.rs?category=laboratory`) adds its
  search to every search of the type;
- `visible(version)` / `check(version)`: one resource (a read, an include, a history entry, the
  current and the new content of a write) is within what the scopes reach.

Types outside the Patient compartment (Practitioner, Organization, Medication…) are not
confined by `patient/` scopes: they describe no one patient. `OPEN` allows everything, when
authorization is off.
"""

from dataclasses import dataclass, field
from typing import Any

from fhir_server.auth.scopes import Access, Grants
from fhir_server.errors import Forbidden
from fhir_server.search.indexer import references
from fhir_server.search.registry import parameter, patient_compartment
from fhir_server.storage.repository import Change, Decide, Version

READ_ONLY_BY_ADMINS = frozenset({"AuditEvent"})  # the audit trail: admins read it, nobody writes it
ADMIN = "admin"


@dataclass(frozen=True)
class Policy:
    grants: Grants | None = None  # None: access is open (authorization off)
    patient: str | None = None  # the token's patient: where patient/ scopes reach
    subject: str | None = None  # who the token speaks for (client id, or user)
    fhir_user: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    base_url: str = ""  # this server's public base, whose absolute references are local ones

    @property
    def open(self) -> bool:
        return self.grants is None

    @property
    def admin(self) -> bool:
        return self.open or ADMIN in self.roles

    def require(self, resource_type: str, permission: str) -> Access:
        """What the scopes allow for `permission` on `resource_type`; Forbidden when nothing."""
        if resource_type in READ_ONLY_BY_ADMINS and permission in "cud":
            raise Forbidden(f"{resource_type} resources are written by the server only")
        if self.grants is None:
            return Access(True)
        if resource_type in READ_ONLY_BY_ADMINS and not self.admin:
            raise Forbidden(f"Only administrators may read {resource_type} resources")
        access = self.grants.access(resource_type, permission)
        if not access.allowed:
            raise Forbidden(f"The token's scopes do not allow '{permission}' on {resource_type}"
                            f" (it has: {self.grants.text or 'none'})")
        if access.confined and self.patient is None and _in_compartment(resource_type):
            raise Forbidden("The token has patient/ scopes but no patient")
        if access.narrowed and permission in "cud":
            raise Forbidden(f"A granular scope (Type.cruds?search) allows reads and searches of {resource_type} only")
        return access

    def allows(self, resource_type: str, permission: str) -> bool:
        try:
            self.require(resource_type, permission)
        except Forbidden:
            return False
        return True

    def compartment(self, resource_type: str, permission: str = "s") -> str | None:
        """The patient whose compartment a search of `resource_type` is confined to, or None."""
        access = self.require(resource_type, permission)
        if access.confined and _in_compartment(resource_type):
            return self.patient
        return None

    def narrowing(self, resource_type: str, permission: str = "s") -> tuple[tuple[str, str], ...]:
        """The search a granular scope adds to searches of `resource_type` (empty: none).
        Several granular scopes would be a union of searches; one is asked for instead."""
        narrowed = self.require(resource_type, permission).narrowed
        if len(set(narrowed)) > 1:
            raise Forbidden(f"Several granular scopes cover {resource_type}: a token may have one per type here")
        return narrowed[0] if narrowed else ()

    def holds(self, resource_type: str, resource_id: str, resource: dict[str, Any] | None) -> bool:
        """Whether a resource is within the token's patient compartment (always, when the
        token is not confined for this type)."""
        if self.patient is None or not _in_compartment(resource_type):
            return True
        if resource_type == "Patient":
            return resource_id == self.patient
        if resource is None:
            return False
        wanted = f"Patient/{self.patient}"
        for code in patient_compartment()[resource_type]:
            param = parameter(resource_type, code)
            if param is not None and wanted in references(param, resource, self.base_url):
                return True
        return False

    def visible(self, version: Version, permission: str = "r") -> bool:
        """Whether the token may see this stored version (an include, a history entry).
        A type reached only through a granular scope is not: that needs a search to decide."""
        if self.grants is None:
            return True
        try:
            access = self.require(version.type, permission)
        except Forbidden:
            return False
        if access.narrowed:
            return False
        return not access.confined or self.holds(version.type, version.id, version.resource)

    def check(self, resource_type: str, resource_id: str, resource: dict[str, Any] | None, permission: str) -> None:
        """Forbidden unless `resource` (stored, or about to be) is within the token's reach."""
        access = self.require(resource_type, permission)
        if access.confined and not self.holds(resource_type, resource_id, resource):
            raise Forbidden(f"{resource_type}/{resource_id} is not in the compartment of Patient/{self.patient}")

    def guard(self, resource_type: str, resource_id: str, permission: str, decide: Decide) -> Decide:
        """`decide`, checked against what the write reads and what it would store: a
        confined token can neither change a resource outside its compartment nor move one out."""
        if self.grants is None:
            return decide

        def guarded(current: Version | None) -> Change | None:
            if current is not None and not current.deleted:
                self.check(resource_type, resource_id, current.resource, permission)
            change = decide(current)
            if change is not None and change.resource is not None:
                self.check(resource_type, resource_id, change.resource, permission)
            return change

        return guarded

    @property
    def key(self) -> str:
        """What a page snapshot made under this policy is bound to."""
        if self.grants is None:
            return ""
        return f"{self.grants.text}|{self.patient or ''}"


OPEN = Policy()


def _in_compartment(resource_type: str) -> bool:
    return resource_type == "Patient" or resource_type in patient_compartment()

