"""Batch and transaction Bundles (`POST /fhir`): reading the entries, and transactions.

A transaction is planned, then committed in one `write_all`: every entry's target is found
(DELETE, then POST, then PUT/PATCH, as FHIR orders them; conditional targets by search, under
the same locks as single conditional interactions), `fullUrl` placeholders and conditional
references are rewritten to those targets, each resource is validated, and each change is
decided against the current version; the Appointments written are checked against double
booking (`scheduling`) under their practitioners' locks. Nothing is written before every entry
has passed, so a failing entry leaves no trace; a resource changed meanwhile by another writer
makes the plan start again, a bounded number of times. Read entries (GET, HEAD) run after the
commit.
"""

import asyncio
import base64
import random
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from fhir_server import fhir_json
from fhir_server.auth.policy import OPEN, Policy
from fhir_server.errors import BadRequest, Conflict, FhirError, Issue, PayloadTooLarge, PreconditionFailed
from fhir_server.search.criteria import criteria_key, lock_key, parse_query_string
from fhir_server.services.resources import (
    VERSION_ID,
    ResourceService,
    Result,
    delete_decision,
    kept,
    matched,
    none_matched,
    nothing_deleted,
    patch_decision,
    removed,
    update_decision,
    written,
)
from fhir_server.services.scheduling import APPOINTMENT, DoubleBooking
from fhir_server.storage.repository import Change, Planned, StaleWrite, Version
from fhir_server.validation.resource import check_id, check_type, validate_resource
from fhir_server.validation.resource_types import supported_types

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
READS = ("GET", "HEAD")
WRITE_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2}
PERMISSIONS = {"DELETE": "d", "POST": "c", "PUT": "u", "PATCH": "u"}  # SMART's, for each write
MAX_ATTEMPTS = 10
# Strings that are text, never links, even when they look like an entry's fullUrl.
TEXT_KEYS = frozenset({"value", "display", "text", "id"})
PLACEHOLDER = re.compile(r"urn:(?:uuid|oid):[A-Za-z0-9.:\-]+")


@dataclass(frozen=True)
class BundleEntry:
    """One `Bundle.entry` of a batch or transaction, its request read."""

    index: int
    method: str
    url: str  # as sent
    path: str  # relative to the FHIR base, without the query
    query: str
    full_url: str | None
    resource: Any
    if_match: str | None = None
    if_none_match: str | None = None
    if_none_exist: str | None = None
    if_modified_since: str | None = None

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"

    @property
    def label(self) -> str:
        return f"{self.where} ({self.method} {self.url})"

    @property
    def parts(self) -> list[str]:
        return [unquote(p) for p in self.path.split("/")] if self.path else []


def parse_bundle(body: Any, base: str, max_entries: int) -> tuple[str, list[BundleEntry]]:
    """('batch' | 'transaction', entries) of a request Bundle; 400 for anything else."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise BadRequest("POST to the FHIR base takes a Bundle of type batch or transaction")
    kind = body.get("type")
    if kind not in ("batch", "transaction"):
        raise BadRequest(f"Bundle.type must be batch or transaction, not '{kind}'", expression="Bundle.type")
    raw_entries = body.get("entry", [])
    if not isinstance(raw_entries, list):
        raise BadRequest("Bundle.entry must be an array", expression="Bundle.entry")
    if len(raw_entries) > max_entries:
        raise PayloadTooLarge(f"The Bundle has {len(raw_entries)} entries; at most {max_entries} are processed")
    return kind, [_entry(i, raw, base) for i, raw in enumerate(raw_entries)]


def _entry(index: int, raw: Any, base: str) -> BundleEntry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise BadRequest(f"{where} has no request", expression=f"{where}.request")
    request = raw["request"]
    method, url = request.get("method"), request.get("url")
    if method not in METHODS:
        raise BadRequest(f"{where}.request.method must be one of {', '.join(METHODS)}", expression=f"{where}.request.method")
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}.request.url is missing", expression=f"{where}.request.url")
    relative = url.removeprefix(base + "/") if url.startswith(base + "/") else url
    path, _, query = relative.lstrip("/").partition("?")
    full_url = raw.get("fullUrl")
    strings = {k: request.get(k) for k in ("ifMatch", "ifNoneMatch", "ifNoneExist", "ifModifiedSince")}
    for name, value in [("fullUrl", full_url), *strings.items()]:
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{where} {name} must be a string", expression=f"{where}.{name}")
    return BundleEntry(
        index, method, url, path.rstrip("/"), query, full_url, raw.get("resource"),
        strings["ifMatch"], strings["ifNoneMatch"], strings["ifNoneExist"], strings["ifModifiedSince"],
    )


def at_entry(entry: BundleEntry, exc: FhirError) -> FhirError:
    """The same error, naming the entry it comes from."""
    issues = [
        Issue(
            f"{entry.label}: {issue.diagnostics}",
            issue.code,
            issue.severity,
            f"{entry.where}.resource.{issue.expression.partition('.')[2]}".rstrip(".") if issue.expression else entry.where,
        )
        for issue in exc.issues
    ]
    error = type(exc)(issues[0].diagnostics, issues=issues, headers=exc.headers)
    error.status = exc.status
    return error


def _version_tag(entry: BundleEntry) -> int | None:
    if entry.if_match is None:
        return None
    value = entry.if_match.strip().removeprefix("W/").strip('"')
    if not VERSION_ID.fullmatch(value):
        raise BadRequest(f"ifMatch must be a version ETag such as W/\"3\", not '{entry.if_match}'")
    return int(value)


@dataclass
class _Target:
    """What one write entry does: its resource, and a fixed result when nothing is written."""

    entry: BundleEntry
    type: str
    id: str | None
    body: dict[str, Any] | None = None
    result: Result | None = None  # ifNoneExist matched, a delete or update with nothing to write
    read_current: bool = True
    same_as: "_Target | None" = None  # a conditional create repeating an earlier one of the Bundle
    matched: int | None = None  # the version a conditional entry's search found


class TransactionService:
    def __init__(self, resources: ResourceService) -> None:
        self.resources = resources
        self.repository = resources.repository
        self.searches = resources.searches

    async def transaction(
        self, entries: list[BundleEntry], entry_limit: int | None = None, access: Policy = OPEN
    ) -> dict[int, Result]:
        """Commit every write entry or none; the result of each, by entry index. `entry_limit`:
        the most bytes one resource may have (as when sent alone). Each entry is checked
        against the token as when sent alone: one refused entry refuses the transaction."""
        writes = sorted((e for e in entries if e.method not in READS), key=lambda e: (WRITE_ORDER[e.method], e.index))
        conditions: dict[str, tuple[str, list[Any]]] = {}  # one lock per key, even for two queries
        for entry in writes:
            resource_type, query = self._condition(entry)
            if query is not None:
                try:
                    criteria = parse_query_string(resource_type, query)
                except FhirError as exc:
                    raise at_entry(entry, exc) from exc
                conditions[lock_key(resource_type, criteria)] = (resource_type, criteria)
        for attempt in range(MAX_ATTEMPTS):
            async with AsyncExitStack() as stack:
                for key in sorted(conditions):  # one order for all: no deadlock
                    await stack.enter_async_context(self.resources.lock(*conditions[key]))
                targets = await self._targets(writes, entry_limit, access)
                try:
                    planned, unchanged = await self._plan(targets, access)
                    async with self._bookings(targets, planned):
                        versions = await self.repository.write_all(planned, unchanged)
                except StaleWrite:
                    pass
                else:
                    return self._results(targets, versions)
            await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise Conflict(f"The resources of this transaction were changed by other writers {MAX_ATTEMPTS} times; try again")

    @asynccontextmanager
    async def _bookings(self, targets: list[_Target], planned: list[Planned]) -> AsyncIterator[None]:
        """The Appointments written checked against double booking (see `scheduling`), their
        practitioners locked while the transaction commits."""
        changes = {p.id: p.change.resource for p in planned if p.type == APPOINTMENT}
        if not changes:
            yield
            return
        entries = {t.id: t.entry for t in targets if t.type == APPOINTMENT and t.id in changes and t.same_as is None}
        labels = {i: entry.label for i, entry in entries.items()}
        try:
            async with self.resources.scheduling.booked(APPOINTMENT, changes, labels):
                yield
        except DoubleBooking as exc:
            if exc.appointment_id not in entries:
                raise
            raise at_entry(entries[exc.appointment_id], exc) from exc

    def _condition(self, entry: BundleEntry) -> tuple[str, str | None]:
        """The search a write entry depends on (conditional create, update, patch, delete)."""
        resource_type = entry.parts[0] if entry.parts else ""
        if entry.method == "POST":
            return resource_type, entry.if_none_exist
        return resource_type, entry.query if entry.query and len(entry.parts) == 1 else None

    # -- planning --------------------------------------------------------------------------------

    async def _targets(self, writes: list[BundleEntry], entry_limit: int | None, access: Policy) -> list[_Target]:
        """Each write entry's resource; conditional ones found by search."""
        targets: list[_Target] = []
        deleted: set[tuple[str, str]] = set()  # by earlier entries: later searches no longer find them
        creates: dict[str, _Target] = {}  # conditional creates by their criteria
        for entry in writes:
            try:
                key = None
                if entry.method == "POST" and entry.if_none_exist and entry.parts:
                    key = criteria_key(entry.parts[0], parse_query_string(entry.parts[0], entry.if_none_exist))
                if key in creates:
                    first = creates[key]
                    targets.append(_Target(entry, first.type, first.id, result=first.result, same_as=first))
                    continue
                target = await self._target(entry, deleted, access)
            except FhirError as exc:
                raise at_entry(entry, exc) from exc
            targets.append(target)
            if key is not None:
                creates[key] = target
            if entry.method == "DELETE" and target.id is not None:
                deleted.add((target.type, target.id))
        seen: dict[tuple[str, str], BundleEntry] = {}
        for target in targets:
            if target.id is None or target.result is not None or target.same_as is not None:
                continue
            key = (target.type, target.id)
            if key in seen:
                raise BadRequest(
                    f"{target.entry.label} and {seen[key].label} both change {target.type}/{target.id}",
                    expression=target.entry.where,
                )
            seen[key] = target.entry
        references: dict[str, str] = {}
        for target in targets:
            if target.entry.full_url and target.id is not None:
                if target.entry.full_url in references and target.same_as is None:
                    raise BadRequest(f"{target.entry.label}: fullUrl '{target.entry.full_url}' is used twice",
                                     expression=f"{target.entry.where}.fullUrl")
                references[target.entry.full_url] = f"{target.type}/{target.id}"
        # Conditional references may name a conditional create of the same Bundle.
        created = {key: f"{t.type}/{t.id}" for key, t in creates.items() if t.id is not None}
        resolved: dict[str, str] = {}
        for target in targets:
            if target.body is None or target.same_as is not None:
                continue
            try:
                if entry_limit is not None and len(_serialised(target.body)) > entry_limit:
                    raise PayloadTooLarge(f"The resource is larger than {entry_limit} bytes")
                try:
                    body = await self._rewrite(target.body, references, created, resolved, deleted, access)
                except RecursionError as exc:
                    raise BadRequest("The resource is nested too deeply") from exc
                if target.entry.method == "POST":
                    target.body = validate_resource(body, target.type, ignore_id=True)
                elif target.entry.query:  # conditional update: the body's id was checked against the match
                    target.body = validate_resource(body, target.type)
                else:
                    target.body = validate_resource(body, target.type, url_id=target.id)
            except FhirError as exc:
                raise at_entry(target.entry, exc) from exc
        return targets

    async def _target(self, entry: BundleEntry, deleted: set[tuple[str, str]], access: Policy) -> _Target:
        parts = entry.parts
        if not parts or any(p.startswith(("$", "_")) for p in parts):
            raise BadRequest(f"'{entry.url}' is not a resource a transaction can {entry.method}")
        resource_type = parts[0]
        check_type(resource_type)
        access.require(resource_type, PERMISSIONS[entry.method])
        needs_body = entry.method in ("POST", "PUT")
        if needs_body and (not isinstance(entry.resource, dict) or entry.resource.get("resourceType") != resource_type):
            raise BadRequest(f"The entry needs a {resource_type} resource")
        if entry.method == "POST":
            if len(parts) != 1:
                raise BadRequest("POST takes the type only (Patient, not Patient/id)")
            if entry.if_none_exist:
                found = await self._matches(resource_type, entry.if_none_exist, "ifNoneExist", deleted, access)
                if found:
                    await self.resources.check_visible(found, access)  # the answer shows the match
                    return _Target(entry, resource_type, found.id, result=matched(found))
            return _Target(entry, resource_type, str(uuid.uuid4()), dict(entry.resource), read_current=False)
        if len(parts) == 2:
            check_id(parts[1])
            body = dict(entry.resource) if entry.method == "PUT" else None
            return _Target(entry, resource_type, parts[1], body)
        if len(parts) != 1 or not entry.query:
            raise BadRequest(f"{entry.method} takes Type/id or Type?criteria")
        found = await self._matches(resource_type, entry.query, "criteria", deleted, access)
        if entry.method == "DELETE" and found is None:
            return _Target(entry, resource_type, None, result=none_matched(resource_type, entry.query))
        if entry.method == "PATCH" and found is None:
            raise PreconditionFailed(f"No {resource_type} matches '{entry.query}'")
        body = dict(entry.resource) if entry.method == "PUT" else None
        if found is not None:
            if body is not None and body.get("id") not in (None, found.id):
                raise BadRequest(f"The id '{body['id']}' in the body is not the id '{found.id}' of the match")
            return _Target(entry, resource_type, found.id, body, matched=found.vid)
        body_id = (body or {}).get("id")
        if isinstance(body_id, str):
            check_id(body_id, f"{resource_type}.id")
            existing = await self.repository.read(resource_type, body_id)
            if existing is not None and not existing.deleted:
                raise Conflict(f"{resource_type}/{body_id} exists but does not match '{entry.query}'")
            return _Target(entry, resource_type, body_id, body)
        return _Target(entry, resource_type, str(uuid.uuid4()), body, read_current=False)

    async def _matches(
        self, resource_type: str, query: str, what: str, deleted: set[tuple[str, str]], access: Policy
    ) -> Version | None:
        """The one match of conditional criteria, None for none; 412 for several. Resources
        deleted by earlier entries of the transaction are gone for these searches."""
        criteria = parse_query_string(resource_type, query)
        found = await self.searches.matches(resource_type, criteria, limit=2 + len(deleted), access=access)
        found = [v for v in found if (resource_type, v.id) not in deleted]
        if len(found) > 1:
            raise PreconditionFailed(f"{what} '{query}' matches {len(found)} resources")
        return found[0] if found else None

    async def _rewrite(
        self,
        body: dict[str, Any],
        references: dict[str, str],
        created: dict[str, str],
        resolved: dict[str, str],
        deleted: set[tuple[str, str]],
        access: Policy,
    ) -> dict[str, Any]:
        """`fullUrl`s of the Bundle and conditional references → the ids they stand for (found
        within what the token may search)."""

        async def reference(value: str) -> str:
            if value in references:
                return references[value]
            if PLACEHOLDER.fullmatch(value):
                raise BadRequest(f"Reference '{value}' is not the fullUrl of any entry of the Bundle")
            resource_type, question, query = value.partition("?")
            if not question or resource_type not in supported_types():
                return value
            if value not in resolved:
                criteria = parse_query_string(resource_type, query)
                key = criteria_key(resource_type, criteria)
                if key in created:
                    resolved[value] = created[key]
                else:
                    found = await self.searches.matches(resource_type, criteria, limit=2 + len(deleted), access=access)
                    found = [v for v in found if (resource_type, v.id) not in deleted]
                    if len(found) != 1:
                        raise PreconditionFailed(
                            f"Conditional reference '{value}' matches {len(found)} resources; it must match one"
                        )
                    resolved[value] = f"{resource_type}/{found[0].id}"
            return resolved[value]

        def narrative(div: str) -> str:
            return PLACEHOLDER.sub(lambda m: references.get(m.group(0), m.group(0)), div)

        async def walk(node: Any, key: str = "") -> Any:
            if isinstance(node, dict):
                return {k: await walk(v, k) for k, v in node.items()}
            if isinstance(node, list):
                return [await walk(v, key) for v in node]
            if isinstance(node, str):
                if key == "reference":
                    return await reference(node)
                if key == "div":
                    return narrative(node)
                if key not in TEXT_KEYS and node in references:  # uri, url, oid, uuid elements
                    return references[node]
            return node

        return await walk(body)

    async def _plan(self, targets: list[_Target], access: Policy) -> tuple[list[Planned], list[Version]]:
        """Each change decided against the current version (preconditions checked here); and
        the current versions that updates and patches changing nothing leave as they are (they
        answer with them, so the commit checks they are still current)."""
        planned: list[Planned] = []
        unchanged: list[Version] = []
        for target in targets:
            if target.result is not None or target.id is None or target.same_as is not None:
                continue
            entry = target.entry
            try:
                current = await self.repository.read(target.type, target.id) if target.read_current else None
                if target.matched is not None and (current is None or current.vid != target.matched):
                    raise StaleWrite("the match changed after the search")  # search again
                if entry.method == "POST":
                    change: Change | None = Change(target.body, "POST")
                elif entry.method == "PUT":
                    assert target.body is not None
                    change = update_decision(target.body, _version_tag(entry))(current)
                elif entry.method == "PATCH":
                    change = patch_decision(target.type, target.id, _patch_operations(entry), _version_tag(entry))(current)
                else:
                    change = delete_decision(_version_tag(entry))(current)
                permission = PERMISSIONS[entry.method]
                if current is not None and not current.deleted:
                    access.check(target.type, target.id, current.resource, permission)
                if change is not None and change.resource is not None:
                    access.check(target.type, target.id, change.resource, permission)
            except FhirError as exc:
                raise at_entry(entry, exc) from exc
            if change is None and entry.method == "DELETE":
                target.result = nothing_deleted(target.type, target.id, current)
                continue
            if change is None:
                assert current is not None
                target.result = kept(current)
                unchanged.append(current)
                continue
            planned.append(Planned(target.type, target.id, current, change))
        return planned, unchanged

    def _results(self, targets: list[_Target], versions: list[Version]) -> dict[int, Result]:
        stored = iter(versions)
        results: dict[int, Result] = {}
        for target in targets:
            if target.same_as is not None:
                first = results[target.same_as.entry.index]
                assert first.version is not None
                results[target.entry.index] = matched(first.version)
                continue
            if target.result is not None:
                results[target.entry.index] = target.result
                continue
            version = next(stored)
            if target.entry.method == "POST":
                results[target.entry.index] = Result(201, version, "Created", code="created")
            elif target.entry.method == "DELETE":
                results[target.entry.index] = removed(version)
            else:
                results[target.entry.index] = written(version, "Patched" if target.entry.method == "PATCH" else "Updated")
        return results


def _serialised(resource: dict[str, Any]) -> bytes:
    try:
        return fhir_json.dumps(resource)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"The resource cannot be read: {exc}") from exc


def json_patch_bytes(resource: Any) -> bytes:
    """A PATCH entry's JSON Patch document: R4 Bundles carry it as a Binary."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Binary":
        raise BadRequest("A PATCH entry carries a Binary resource with an application/json-patch+json document")
    content_type = resource.get("contentType")
    if not isinstance(content_type, str) or content_type.split(";")[0].strip() != "application/json-patch+json":
        raise BadRequest("Only JSON Patch (Binary.contentType application/json-patch+json) is supported")
    data = resource.get("data", "")
    if not isinstance(data, str):
        raise BadRequest("Binary.data must be base64 text")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise BadRequest(f"Binary.data is not base64: {exc}") from exc


def _patch_operations(entry: BundleEntry) -> Any:
    try:
        return fhir_json.loads(json_patch_bytes(entry.resource))
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"The Binary does not hold a JSON Patch document: {exc}") from exc
