"""What one request may do: the decisions every FHIR interaction asks of its access token.

Made once per request (in `context.request_context`) from the token's claims, and handed to
the services, which ask it before and after they touch stored resources:

- `require(type, permission)`: some scope allows the interaction at all (else 403);
- `compartment(type)`: `patient/` scopes reach only the Patient compartment of the token's
  patient, so a search gets that compartment as a constraint;
- `narrowing(type)`: a granular scope (`patient/Observation.rs?category=laboratory`) adds its
  search to every search of the type;
- `visible(version)` / `reaches(version)` / `check(...)`: one resource (an include, a history
  entry, a search match, a read, the current and the new content of a write) is within what
  the scopes reach.

Beyond the Patient compartment, `patient/` scopes read only what every patient's record shares
(`SHARED_TYPES`) and their patient's Binary files. `OPEN` allows everything, when authorization
is off.
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
# What patient/ scopes may read beyond the Patient compartment: descriptions shared by every
# patient's record (who treats, where, with what), never records of other patients (a Bundle,
# a Contract, a Device of someone else's). A Binary is read when its securityContext is the
# token's patient (the upload service sets it).
SHARED_TYPES = frozenset({
    "Practitioner", "PractitionerRole", "Organization", "Location", "HealthcareService", "Endpoint",
    "Medication", "Substance", "Questionnaire", "ValueSet", "CodeSystem", "ConceptMap", "Measure", "Library",
    "ActivityDefinition", "PlanDefinition", "StructureDefinition", "SearchParameter", "OperationDefinition",
    "CapabilityStatement", "NamingSystem",
})
BINARY = "Binary"


@dataclass(frozen=True)
class Policy:
    grants: Grants | None = None  # None: access is open (authorization off)
    patient: str | None = None  # the token's patient: where patient/ scopes reach
    subject: str | None = None  # who the token speaks for (client id, or user)
    fhir_user: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    base_url: str = ""  # this server's public base, whose absolute references are local ones
    issuer: str | None = None  # of the token: `subject` is unique within it

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
        if access.confined:
            self._confined(resource_type, permission)
        if access.narrowed and permission in "cud":
            raise Forbidden(f"A granular scope (Type.cruds?search) allows reads and searches of {resource_type} only")
        return access

    def _confined(self, resource_type: str, permission: str) -> None:
        """What patient/ scopes may do: within their patient's compartment (and that
        patient's Binary files), and read what every patient's record shares."""
        if self.patient is None:
            raise Forbidden("The token has patient/ scopes but no patient")
        if _in_compartment(resource_type):
            return
        if resource_type == BINARY and permission == "r":
            return
        if resource_type not in SHARED_TYPES:
            raise Forbidden(f"patient/ scopes do not reach {resource_type} resources (not in a Patient compartment)")
        if permission not in "rs":
            raise Forbidden(f"patient/ scopes only read {resource_type} resources (shared by every patient's record)")

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
        if self.patient is None:
            return True
        if resource_type == BINARY:
            context = (resource or {}).get("securityContext") or {}
            return isinstance(context, dict) and context.get("reference") == f"Patient/{self.patient}"
        if not _in_compartment(resource_type):
            return True
        if resource_type == "Patient":
            return resource_id == self.patient
        return f"Patient/{self.patient}" in self._patients(resource_type, resource)

    def _patients(self, resource_type: str, resource: dict[str, Any] | None) -> set[str]:
        """The Patients whose compartments a resource is in."""
        found: set[str] = set()
        for code in patient_compartment()[resource_type] if resource is not None else ():
            param = parameter(resource_type, code)
            if param is not None:
                found.update(r for r in references(param, resource, self.base_url) if r.startswith("Patient/"))
        return found

    def owns(self, resource_type: str, resource_id: str, resource: dict[str, Any] | None) -> bool:
        """Whether content a patient/ token writes is of its patient only: in its compartment
        and in no other patient's (an Observation of another patient with this one as its
        performer is not written by this token)."""
        if resource_type in ("Patient", BINARY) or not _in_compartment(resource_type):
            return self.holds(resource_type, resource_id, resource)
        return self._patients(resource_type, resource) == {f"Patient/{self.patient}"}

    def visible(self, version: Version, permission: str = "r") -> bool:
        """Whether the token may see this stored version (an include, a history entry).
        A type reached only through a granular scope is not: that needs a search to decide."""
        return self.reaches(version, permission, searched=False)

    def reaches(self, version: Version, permission: str = "s", *, searched: bool = True) -> bool:
        """Whether a version is within the token's reach; `searched`: found by a query that
        held the granular scope's search already."""
        if self.grants is None:
            return True
        try:
            access = self.require(version.type, permission)
        except Forbidden:
            return False
        if access.narrowed and not searched:
            return False
        return not access.confined or self.holds(version.type, version.id, version.resource)

    def check(self, resource_type: str, resource_id: str, resource: dict[str, Any] | None, permission: str) -> None:
        """Forbidden unless `resource` (stored, or about to be) is within the token's reach."""
        access = self.require(resource_type, permission)
        if not access.confined:
            return
        reached = self.owns if permission in "cud" else self.holds
        if not reached(resource_type, resource_id, resource):
            raise Forbidden(f"{resource_type}/{resource_id} is not (only) in the compartment of Patient/{self.patient}")

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
    def principal(self) -> str | None:
        """Who the token speaks for, across issuers."""
        return None if self.subject is None else f"{self.issuer}|{self.subject}"

    @property
    def key(self) -> str:
        """What a page snapshot made under this policy is bound to."""
        if self.grants is None:
            return ""
        return f"{self.grants.text}|{self.patient or ''}"


OPEN = Policy()


def _in_compartment(resource_type: str) -> bool:
    return resource_type == "Patient" or resource_type in patient_compartment()

