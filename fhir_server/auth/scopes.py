"""SMART on FHIR scopes (App Launch 2.0, with the 1.0 forms): what an access token allows.

A resource scope is `<context>/<type>.<permissions>[?<search>]`:

- context `patient` (confined to the Patient compartment of the token's `patient`), `user` (what
  the user may see) or `system` (a backend service);
- type a resource type or `*`;
- permissions, v2: a subset of `cruds` in that order (create, read, update, delete, search);
  v1: `read` (= `rs`), `write` (= `cud`), `*` (= `cruds`);
- an optional search (v2 granular scopes, `patient/Observation.rs?category=laboratory`) that
  narrows the resources the scope covers.

Other scopes (`openid`, `fhirUser`, `launch/patient`, `offline_access`…) grant no access to
resources and are kept as they are. Pure: parsing and decisions only; enforcement lives where
the request context is made.
"""

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl

Context = Literal["patient", "user", "system"]
ORDER = "cruds"
V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)(?:\?(.*))?")
_V2 = re.compile(r"(?=.)c?r?u?d?s?")  # a non-empty subset of cruds, in that order

class ScopeError(ValueError):
    """A scope string that looks like a resource scope but is not a valid one."""


@dataclass(frozen=True)
class Scope:
    context: Context
    resource_type: str  # a type, or "*"
    permissions: frozenset[str]
    search: tuple[tuple[str, str], ...] = ()  # a granular scope's narrowing search, else empty

    def covers(self, resource_type: str, permission: str) -> bool:
        return permission in self.permissions and self.resource_type in ("*", resource_type)

    @property
    def text(self) -> str:
        perms = "".join(p for p in ORDER if p in self.permissions)
        query = "&".join(f"{k}={v}" for k, v in self.search)
        return f"{self.context}/{self.resource_type}.{perms}" + (f"?{query}" if query else "")


def parse_scope(text: str) -> Scope | None:
    """A resource scope, or None for a scope that grants no resource access (`openid`,
    `launch/patient`…). ScopeError for a malformed resource scope (`patient/Observation.xyz`,
    permissions out of order, a v2 suffix mixed with v1 words)."""
    text = text.strip()
    if not text.startswith(("patient/", "user/", "system/")):
        return None
    match = _SCOPE.fullmatch(text)
    if match is None:
        raise ScopeError(f"'{text}' is not a SMART resource scope (context/Type.permissions)")
    context, resource_type, permissions, query = match.groups()
    if permissions in V1:
        if query:
            raise ScopeError(f"'{text}': a search narrows only SMART v2 scopes (.cruds), not .{permissions}")
        granted = V1[permissions]
    else:
        if not _V2.fullmatch(permissions):
            raise ScopeError(f"'{text}': permissions are a subset of 'cruds' in that order, or read, write or *")
        granted = permissions
    search = tuple(parse_qsl(query, keep_blank_values=True)) if query else ()
    if any(name.startswith("_") and name not in ("_id", "_tag", "_security", "_profile") for name, _ in search):
        raise ScopeError(f"'{text}': a scope's search narrows by search parameters, not result parameters (_count...)")
    return Scope(context, resource_type, frozenset(granted), search)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Access:
    """Whether a request may go on, and how far: `confined` when only patient/ scopes allow it
    (then only the Patient compartment of the token's patient), `narrowed` the granular
    searches the allowing scopes add (empty: the whole type)."""

    allowed: bool
    confined: bool = False
    narrowed: tuple[tuple[tuple[str, str], ...], ...] = ()


@dataclass(frozen=True)
class Grants:
    """The scopes of one access token."""

    scopes: tuple[Scope, ...] = ()
    other: frozenset[str] = field(default_factory=frozenset)  # openid, fhirUser, launch…

    @classmethod
    def parse(cls, text: str) -> "Grants":
        scopes, other = [], set()
        for item in text.split():
            scope = parse_scope(item)
            if scope is None:
                other.add(item)
            else:
                scopes.append(scope)
        return cls(tuple(scopes), frozenset(other))

    def access(self, resource_type: str, permission: str) -> Access:
        """What the scopes allow for `permission` on `resource_type`. An unconfined scope
        (user/ or system/) wins over patient/ ones; an unnarrowed scope over granular ones."""
        allowing = [s for s in self.scopes if s.covers(resource_type, permission)]
        if not allowing:
            return Access(False)
        unconfined = [s for s in allowing if s.context != "patient"]
        chosen = unconfined or allowing
        if any(not s.search for s in chosen):
            return Access(True, confined=not unconfined)
        return Access(True, confined=not unconfined, narrowed=tuple(s.search for s in chosen))

    @property
    def text(self) -> str:
        return " ".join(sorted({s.text for s in self.scopes} | set(self.other)))
