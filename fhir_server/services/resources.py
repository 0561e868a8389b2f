"""The FHIR interactions on resources: validation and versioning rules over the repository.

Knows FHIR semantics (preconditions, conditional interactions, what status each outcome has);
knows nothing of HTTP requests or MongoDB queries.
"""

import copy
import hashlib
import re
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal
from urllib.parse import urlencode

import jsonpatch
from pymongo.asynchronous.database import AsyncDatabase

from fhir_server import fhir_json
from fhir_server.auth.policy import OPEN, Policy
from fhir_server.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    Issue,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from fhir_server.search.criteria import Criterion, lock_key, parse_query_string
from fhir_server.services.scheduling import APPOINTMENT, Scheduling
from fhir_server.services.search import SearchService
from fhir_server.storage import locks
from fhir_server.storage.repository import Change, Decide, ResourceRepository, Version
from fhir_server.validation.resource import check_id, check_type, validate_resource

# A version number as it may appear in a URL or an ETag.
VERSION_ID = re.compile(r"[0-9]{1,12}")
MAX_PATCH_ATTEMPTS = 10


class _Moved(Exception):
    """The resource changed between a patch's check and its write."""


# What a write did, for clients that must tell a no-op update or a matched conditional create
# from a write (the code of an outcome's `details.coding`, as HAPI FHIR reports it).
WRITE_OUTCOME_SYSTEM = "https://fhir-server.local/CodeSystem/write-outcome"
WriteOutcome = Literal["created", "updated", "unchanged", "matched", "deleted", "not-found"]


@dataclass(frozen=True)
class Result:
    """The outcome of a write: HTTP status, the version concerned, a message, and what happened
    (`code`, required so that no write answers without saying)."""

    status: int
    version: Version | None
    message: str = ""
    _: KW_ONLY
    code: WriteOutcome


def _gone(version: Version) -> Gone:
    return Gone(
        f"{version.type}/{version.id} was deleted (version {version.vid})",
        headers={"ETag": f'W/"{version.vid}"'},
    )


def _check_precondition(current: Version | None, if_match: int | None) -> None:
    if if_match is None:
        return
    if current is None or current.deleted:
        raise PreconditionFailed(f"If-Match version {if_match} given, but the resource does not exist")
    if current.vid != if_match:
        raise PreconditionFailed(
            f"Version conflict: If-Match is {if_match}, the current version is {current.vid}"
        )


VALIDATION_MODES = (None, "create", "update", "delete")


def _validate_parameters(body: Any, mode: str | None) -> tuple[Any, str | None, str | None]:
    """(resource, mode, profile) from a `$validate` body: a resource, or Parameters."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        return body, mode, None
    resource, profile = None, None
    for parameter in body.get("parameter", []) if isinstance(body.get("parameter"), list) else []:
        if not isinstance(parameter, dict):
            continue
        name = parameter.get("name")
        if name == "resource":
            resource = parameter.get("resource")
        elif name == "mode":
            mode = parameter.get("valueCode", parameter.get("valueString"))
        elif name == "profile":
            profile = parameter.get("valueUri", parameter.get("valueCanonical"))
    return resource, mode, profile


def _content(resource: dict[str, Any]) -> bytes:
    """What an update compares: the resource without the server's id, versionId and lastUpdated."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    body = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    if meta:
        body["meta"] = meta
    return fhir_json.canonical(body)


def unchanged(current: Version | None, resource: dict[str, Any]) -> bool:
    """Whether storing `resource` would repeat the current version (a deletion never is)."""
    return current is not None and current.resource is not None and _content(current.resource) == _content(resource)


def update_decision(resource: dict[str, Any], if_match: int | None) -> Decide:
    """An update (or create with a client id), under an optional If-Match; nothing to write when
    the content is the current version's (no new version for a repeated update, as HAPI FHIR)."""

    def decide(current: Version | None) -> Change | None:
        _check_precondition(current, if_match)
        if unchanged(current, resource):
            return None
        return Change(resource, "PUT")

    return decide


def patch_decision(resource_type: str, resource_id: str, operations: Any, if_match: int | None) -> Decide:
    """A JSON Patch of the current version; the result is validated like an update."""
    try:
        patch = jsonpatch.JsonPatch(operations)
    except (jsonpatch.InvalidJsonPatch, TypeError, AttributeError) as exc:
        raise BadRequest(f"Invalid JSON Patch document: {exc}") from exc

    def decide(current: Version | None) -> Change | None:
        if current is None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        if current.deleted:
            raise _gone(current)
        _check_precondition(current, if_match)
        assert current.resource is not None
        try:
            patched = patch.apply(copy.deepcopy(current.resource))
        except jsonpatch.JsonPatchTestFailed as exc:
            raise Unprocessable(f"JSON Patch test failed: {exc}") from exc
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise Unprocessable(f"JSON Patch cannot be applied: {exc}") from exc
        patched = validate_resource(patched, resource_type, url_id=resource_id)
        return None if unchanged(current, patched) else Change(patched, "PATCH")

    return decide


def delete_decision(if_match: int | None) -> Decide:
    """A logical delete; nothing to write when the resource is absent or already deleted."""

    def decide(current: Version | None) -> Change | None:
        _check_precondition(current, if_match)
        if current is None or current.deleted:
            return None
        return Change(None, "DELETE")

    return decide


def nothing_deleted(resource_type: str, resource_id: str, previous: Version | None) -> Result:
    message = "already deleted" if previous else "does not exist"
    return Result(200, previous, f"{resource_type}/{resource_id} {message}; nothing to delete", code="not-found")


def written(version: Version, verb: str = "Updated") -> Result:
    """The answer to a stored update or patch: 201 when it (re)created the resource."""
    if version.created:
        return Result(201, version, "Created", code="created")
    return Result(200, version, f"{verb} {version.type}/{version.id} to version {version.vid}", code="updated")


def kept(current: Version) -> Result:
    """The answer to an update or patch that changed nothing: the current version, as it is."""
    message = f"No changes: {current.type}/{current.id} is already at version {current.vid}"
    return Result(200, current, message, code="unchanged")


def matched(version: Version) -> Result:
    """The answer to a conditional create that found its match."""
    return Result(200, version, "A matching resource exists; nothing was created", code="matched")


def removed(version: Version) -> Result:
    """The answer to a delete that stored a deletion."""
    return Result(200, version, f"Deleted {version.type}/{version.id} (version {version.vid})", code="deleted")


def none_matched(resource_type: str, query: str) -> Result:
    """The answer to a conditional delete that matched nothing."""
    return Result(200, None, f"No {resource_type} matches '{query}'; nothing to delete", code="not-found")


def stored(version: Version | None, previous: Version | None, verb: str = "Updated") -> Result:
    """The answer to `repository.write` of an update or patch: `version` None when the decision
    found nothing to write (`previous` is then the current version)."""
    if version is None:
        assert previous is not None
        return kept(previous)
    return written(version, verb)


class ResourceService:
    def __init__(
        self,
        repository: ResourceRepository,
        db: AsyncDatabase,
        searches: SearchService,
        conditional_wait_s: float = 20.0,
    ) -> None:
        self.repository = repository
        self.db = db
        self.searches = searches
        self.conditional_wait_s = conditional_wait_s
        self.scheduling = Scheduling(searches, db, conditional_wait_s)  # no double booking of Appointments

    # -- reads -------------------------------------------------------------------------------

    async def read(self, resource_type: str, resource_id: str, access: Policy = OPEN) -> Version:
        check_type(resource_type)
        check_id(resource_id)
        access.require(resource_type, "r")
        version = await self.repository.read(resource_type, resource_id)
        if version is None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        if version.deleted:
            raise _gone(version)
        await self.check_visible(version, access)
        return version

    async def check_visible(self, version: Version, access: Policy, permission: str = "r") -> None:
        """Forbidden unless the token reaches this version: within its patient's compartment,
        and matching a granular scope's search (asked of the database: search decides it)."""
        access.check(version.type, version.id, version.resource, permission)
        narrowing = access.narrowing(version.type, permission)
        if narrowing:
            criteria = parse_query_string(version.type, urlencode([("_id", version.id), *narrowing]))
            if not await self.searches.matches(version.type, criteria, limit=1):
                raise Forbidden(f"{version.type}/{version.id} is outside the token's granular scope")

    async def vread(self, resource_type: str, resource_id: str, vid: str, access: Policy = OPEN) -> Version:
        check_type(resource_type)
        check_id(resource_id)
        access.require(resource_type, "r")
        if not VERSION_ID.fullmatch(vid) or int(vid) < 1:
            raise NotFound(f"{resource_type}/{resource_id} has no version '{vid}'")
        version = await self.repository.read_version(resource_type, resource_id, int(vid))
        if version is None:
            raise NotFound(f"{resource_type}/{resource_id} has no version {vid}")
        if version.deleted:
            raise _gone(version)
        await self.check_visible(version, access)
        return version

    # -- $validate ---------------------------------------------------------------------------

    async def validate(
        self, resource_type: str, resource_id: str | None, body: Any, mode: str | None, access: Policy = OPEN
    ) -> list[Issue]:
        """`$validate`: what a create, update or delete (or, without `mode`, any use) of this
        content would say, without storing anything. Raises the validation error. Needs the
        permission of the interaction it stands for (read, without a mode)."""
        check_type(resource_type)
        if resource_id is not None:
            check_id(resource_id)
        resource, mode, profile = _validate_parameters(body, mode)
        if mode not in VALIDATION_MODES:
            known = ", ".join(m for m in VALIDATION_MODES if m)
            raise BadRequest(f"mode must be one of {known} (or absent), not '{mode}'", expression="mode")
        access.require(resource_type, {"create": "c", "update": "u", "delete": "d"}.get(mode or "", "r"))
        if mode == "delete":
            if resource_id is None:
                raise BadRequest("mode=delete validates an existing resource: use [type]/[id]/$validate")
            access.check(resource_type, resource_id, (await self.read(resource_type, resource_id, access)).resource, "d")
            return [Issue(f"{resource_type}/{resource_id} can be deleted", "informational", "information")]
        if resource is None:
            raise BadRequest("$validate needs a resource (the body, or the 'resource' parameter)")
        url_id = resource_id
        if mode == "update":
            url_id = resource_id or (resource.get("id") if isinstance(resource, dict) else None)
            if url_id is None:
                raise BadRequest("mode=update needs the resource's id", expression=f"{resource_type}.id")
        try:
            validate_resource(resource, resource_type, url_id=url_id, ignore_id=mode == "create")
        except BadRequest as exc:  # the content is invalid: the operation itself worked
            raise PreconditionFailed(exc.issues[0].diagnostics, issues=exc.issues) from exc
        issues = [Issue("The resource is valid", "informational", "information")]
        if profile and profile != f"http://hl7.org/fhir/StructureDefinition/{resource_type}":
            issues.append(Issue(f"Profile '{profile}' was not checked: only the base R4 definition is",
                                "not-supported", "warning"))
        return issues

    # -- writes ------------------------------------------------------------------------------

    async def create(
        self, resource_type: str, body: Any, if_none_exist: str | None = None, access: Policy = OPEN
    ) -> Result:
        """201 with the new version; with If-None-Exist, 200 with the one existing match."""
        check_type(resource_type)
        access.require(resource_type, "c")
        resource = validate_resource(body, resource_type, ignore_id=True)
        if not if_none_exist:
            return await self._create(resource_type, resource, access)
        criteria = parse_query_string(resource_type, if_none_exist)
        async with self.lock(resource_type, criteria):
            matches = await self._matches(resource_type, criteria, access)
            if len(matches) > 1:
                raise PreconditionFailed(
                    f"If-None-Exist '{if_none_exist}' matches {len(matches)} resources"
                )
            if matches:
                await self.check_visible(matches[0], access)  # the answer shows the match: it must be readable
                return matched(matches[0])
            return await self._create(resource_type, resource, access)

    async def _create(self, resource_type: str, resource: dict[str, Any], access: Policy = OPEN) -> Result:
        new_id = str(uuid.uuid4())
        access.check(resource_type, new_id, resource, "c")

        def decide(current: Version | None) -> Change:
            return Change(resource, "POST")

        async with self.scheduling.booked(resource_type, {new_id: resource}):
            version, _ = await self.repository.write(resource_type, new_id, decide, new_id=True)
        assert version is not None
        return Result(201, version, "Created", code="created")

    async def update(
        self, resource_type: str, resource_id: str, body: Any, if_match: int | None = None, access: Policy = OPEN
    ) -> Result:
        """200 for a new version of an existing resource, 201 when this creates it."""
        check_type(resource_type)
        check_id(resource_id)
        access.require(resource_type, "u")
        resource = validate_resource(body, resource_type, url_id=resource_id)
        return await self._update(resource_type, resource_id, resource, if_match, access)

    async def _update(
        self, resource_type: str, resource_id: str, resource: dict[str, Any], if_match: int | None,
        access: Policy = OPEN,
    ) -> Result:
        decide = access.guard(resource_type, resource_id, "u", update_decision(resource, if_match))
        async with self.scheduling.booked(resource_type, {resource_id: resource}):
            version, previous = await self.repository.write(resource_type, resource_id, decide)
        return stored(version, previous)

    async def conditional_update(
        self, resource_type: str, query: str, body: Any, if_match: int | None = None, access: Policy = OPEN
    ) -> Result:
        """Update the one match; create when none matches; 412 when several do."""
        check_type(resource_type)
        access.require(resource_type, "u")
        criteria = parse_query_string(resource_type, query)
        resource = validate_resource(body, resource_type)
        async with self.lock(resource_type, criteria):
            matches = await self._matches(resource_type, criteria, access)
            if len(matches) > 1:
                raise PreconditionFailed(f"'{query}' matches {len(matches)} resources")
            body_id = resource.get("id")
            if matches:
                found = matches[0]
                if body_id is not None and body_id != found.id:
                    raise BadRequest(
                        f"The id '{body_id}' in the body is not the id '{found.id}' of the match",
                        expression=f"{resource_type}.id",
                    )
                return await self._update(resource_type, found.id, resource, if_match, access)
            if body_id is not None:
                existing = await self.repository.read(resource_type, body_id)
                if existing is not None and not existing.deleted:
                    raise Conflict(
                        f"{resource_type}/{body_id} exists but does not match '{query}'",
                        expression=f"{resource_type}.id",
                    )
                return await self._update(resource_type, body_id, resource, if_match, access)
            return await self._create(resource_type, resource, access)

    async def patch(
        self, resource_type: str, resource_id: str, operations: Any, if_match: int | None = None,
        access: Policy = OPEN,
    ) -> Result:
        """Apply a JSON Patch to the current version; the result is validated like an update."""
        check_type(resource_type)
        check_id(resource_id)
        access.require(resource_type, "u")
        decide = access.guard(resource_type, resource_id, "u", patch_decision(resource_type, resource_id, operations, if_match))
        if resource_type == APPOINTMENT:  # the result is checked against double booking first
            return await self._patch_booking(resource_type, resource_id, decide)
        version, previous = await self.repository.write(resource_type, resource_id, decide)
        return stored(version, previous, "Patched")

    async def _patch_booking(self, resource_type: str, resource_id: str, decide: Decide) -> Result:
        """A patch whose result must be checked before it is written: patched from the version
        read, checked, and written only if that version is still the current one."""
        for _ in range(MAX_PATCH_ATTEMPTS):
            current = await self.repository.read(resource_type, resource_id)
            change = decide(current)
            assert current is not None
            if change is None:  # the patch changes nothing: no booking to check
                return kept(current)

            def pinned(now: Version | None, read: Version = current, change: Change = change) -> Change:
                if now is None or now.vid != read.vid:
                    raise _Moved
                return change

            try:
                async with self.scheduling.booked(resource_type, {resource_id: change.resource}):
                    version, _ = await self.repository.write(resource_type, resource_id, pinned)
            except _Moved:
                continue
            assert version is not None  # `pinned` always has a change
            return written(version, "Patched")
        raise Conflict(f"{resource_type}/{resource_id} is being changed by other writers; try again",
                       headers={"Retry-After": "1"})

    async def delete(
        self, resource_type: str, resource_id: str, if_match: int | None = None, access: Policy = OPEN
    ) -> Result:
        """A logical delete: a new version marks the resource deleted; history keeps the rest."""
        check_type(resource_type)
        check_id(resource_id)
        access.require(resource_type, "d")
        decide = access.guard(resource_type, resource_id, "d", delete_decision(if_match))
        version, previous = await self.repository.write(resource_type, resource_id, decide)
        if version is None:
            return nothing_deleted(resource_type, resource_id, previous)
        return removed(version)

    async def conditional_delete(self, resource_type: str, query: str, access: Policy = OPEN) -> Result:
        """Delete the one match; nothing to do when none matches; 412 when several do."""
        check_type(resource_type)
        access.require(resource_type, "d")
        criteria = parse_query_string(resource_type, query)
        async with self.lock(resource_type, criteria):
            matches = await self._matches(resource_type, criteria, access)
            if len(matches) > 1:
                raise PreconditionFailed(f"'{query}' matches {len(matches)} resources")
            if not matches:
                return none_matched(resource_type, query)
            # Only the version that matched: an update in between makes this a 412, not a
            # deletion of something that may no longer match.
            return await self.delete(resource_type, matches[0].id, if_match=matches[0].vid, access=access)

    async def _matches(self, resource_type: str, criteria: list[Criterion], access: Policy) -> list[Version]:
        """A conditional interaction's matches: a search, so within what the token may search."""
        return await self.searches.matches(resource_type, criteria, limit=2, access=access)

    def lock(self, resource_type: str, criteria: list[Criterion]) -> AbstractAsyncContextManager[None]:
        """Serialises conditional interactions on the same criteria, across server processes."""
        digest = hashlib.sha256(lock_key(resource_type, criteria).encode()).hexdigest()
        key = f"conditional:{resource_type}:{digest}"
        return locks.hold(self.db, key, wait_s=self.conditional_wait_s)
