"""FHIR search: type, compartment and system level, with chaining, includes and paging.

Parse (pure) → resolve chains and `_has` into id lists (the only place search runs queries of
its own) → `to_mongo` → repository; then includes, `_summary`/`_elements` and paging links.
"""

import hashlib
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from fhir_server.auth.policy import OPEN, Policy
from fhir_server.errors import BadRequest, Forbidden, Gone, NotFound, TooCostly
from fhir_server.search.criteria import (
    Criterion,
    Include,
    SearchRequest,
    parse_criterion,
    parse_query_string,
    parse_search,
)
from fhir_server.search.indexer import references
from fhir_server.search.registry import parameter, parameters, patient_compartment
from fhir_server.search.to_mongo import reference_keys, referenced_ids, referencing, sort_spec, to_filter
from fhir_server.services.bundles import page_url, searchset_bundle, shape
from fhir_server.storage.pages import PageStore
from fhir_server.storage.repository import ResourceRepository, Version
from fhir_server.validation.resource import check_id, check_type
from fhir_server.validation.resource_types import supported_types

EVERYTHING_PARAMETERS = frozenset({"_since", "_type", "_count", "_page", "_format", "_pretty"})
MAX_CHAIN_DEPTH = 4
MAX_ITERATE = 4


def _fingerprint(path: str, applied: list[tuple[str, str]], access: Policy) -> str:
    """What a page link is bound to: the search, and the reach of the token that made it."""
    text = access.key + "|" + path + "?" + "&".join(f"{k}={v}" for k, v in sorted(applied))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SearchService:
    def __init__(
        self,
        repository: ResourceRepository,
        pages: PageStore,
        *,
        default_count: int,
        max_count: int,
        max_results: int,
        max_included: int,
    ) -> None:
        self.repository = repository
        self.pages = pages
        self.default_count = default_count
        self.max_count = max_count
        self.max_results = max_results  # matches kept for paging; the total is still exact
        self.max_included = max_included

    # -- criteria → filter -----------------------------------------------------------------------

    async def filter_for(
        self,
        resource_type: str,
        criteria: list[Criterion],
        base: str = "",
        *,
        compartment: list[str] | None = None,
        depth: int = 0,
        access: Policy = OPEN,
    ) -> dict[str, Any]:
        """The database filter of criteria, chains and `_has` resolved (within `access`)."""
        resolved = [await self._resolve(resource_type, c, base, depth, access) for c in criteria]
        return to_filter(resolved, base, compartment, embedded=self.repository.embedded)

    async def _resolve(self, resource_type: str, criterion: Criterion, base: str, depth: int, access: Policy) -> Criterion:
        """A chained or `_has` criterion as the ids it stands for; others unchanged. The inner
        searches are kept to the token's reach like any search: they would tell what they find."""
        if not (criterion.chain or criterion.has):
            return criterion
        if depth >= MAX_CHAIN_DEPTH:
            raise BadRequest(f"'{criterion.name}' chains more than {MAX_CHAIN_DEPTH} levels", expression=criterion.name)
        raw = ",".join(criterion.values)  # values keep their escapes
        limit = self.max_results
        if criterion.has:
            source, ref, rest = criterion.has
            inner = parse_criterion(source, rest, raw)
            if inner is None:
                raise BadRequest(f"Unknown search parameter '{rest}' for {source} in '{criterion.name}'",
                                 expression=criterion.name)
            query = await self._reached(source, [inner], base, access, depth=depth + 1)
            found = await self.repository.index_values(source, query, ref, limit=limit + 1)
            ids = sorted({i for ks in found for i in referenced_ids(ks, resource_type)})
            self._check_limit(len(found), criterion)
            id_param = parameter(resource_type, "_id")
            return Criterion(criterion.name, id_param, tuple(ids))
        assert criterion.param is not None and criterion.chain is not None
        first = criterion.chain.split(".")[0].split(":")[0]
        targets = [criterion.target] if criterion.target else list(criterion.param.targets)
        targets = [t for t in targets if t in supported_types() and parameter(t, first) is not None]
        if not targets:
            raise BadRequest(f"No target of '{criterion.param.code}' has a parameter '{first}'",
                             expression=criterion.name)
        refs: list[str] = []
        for target in targets:
            inner = parse_criterion(target, criterion.chain, raw)
            if inner is None:
                continue
            query = await self._reached(target, [inner], base, access, depth=depth + 1)
            ids = await self.repository.find_ids(target, query, [("_id", 1)], limit=limit + 1 - len(refs))
            refs.extend(f"{target}/{i}" for i in ids)
            self._check_limit(len(refs), criterion)  # over every target type together
        if not refs:  # no target matches: neither does the chain (as `_has` with no ids)
            return Criterion(criterion.name, parameter(resource_type, "_id"), ())
        return replace(criterion, values=tuple(refs), chain=None, target=None)

    def _check_limit(self, found: int, criterion: Criterion) -> None:
        if found > self.max_results:
            raise BadRequest(
                f"'{criterion.name}' matches more than {self.max_results} resources; narrow the search",
                expression=criterion.name,
            )

    async def matches(
        self, resource_type: str, criteria: list[Criterion], *, limit: int, access: Policy = OPEN
    ) -> list[Version]:
        """Current matches of criteria, for conditional interactions and references: within
        the token's reach (what it may search), as a search would find them."""
        query = await self._reached(resource_type, criteria, self.repository.base_url, access)
        return await self.repository.find(resource_type, query, limit=limit)

    # -- searches --------------------------------------------------------------------------------

    async def search(
        self,
        base: str,
        resource_type: str,
        params: list[tuple[str, str]],
        *,
        strict: bool,
        compartment: tuple[str, str] | None = None,
        access: Policy = OPEN,
    ) -> dict[str, Any]:
        """Type search, or compartment search with `compartment=("Patient", id)`."""
        check_type(resource_type)
        path = resource_type
        if compartment:
            owner, owner_id = compartment
            check_id(owner_id)
            path = f"{owner}/{owner_id}/{resource_type}"
            if owner != "Patient" or not patient_compartment().get(resource_type):
                raise BadRequest(f"{resource_type} is not in the {owner} compartment")
        access.require(resource_type, "s")
        request = parse_search(
            resource_type, params, strict=strict, default_count=self.default_count, max_count=self.max_count
        )
        query = None
        if not request.page:
            query = await self._reached(resource_type, request.criteria, base, access, compartment and compartment[1])
        return await self._run(base, path, request, {resource_type: query} if query else None, access=access)

    async def _reached(
        self, resource_type: str, criteria: list[Criterion], base: str, access: Policy, patient: str | None = None,
        depth: int = 0,
    ) -> dict[str, Any]:
        """The filter of a search, within what the token reaches (the type's search permission,
        a `patient/` token's compartment, a granular scope's search), at every level of its
        chains and `_has`. `patient`: a Patient compartment searched."""
        confined = access.compartment(resource_type)
        if confined is not None and patient not in (None, confined):
            raise Forbidden(f"The token reaches the compartment of Patient/{confined} only")
        patient = patient or confined
        criteria = list(criteria)
        narrowing = access.narrowing(resource_type)
        if narrowing:
            criteria += parse_query_string(resource_type, urlencode(narrowing))
        keys = None
        if patient is not None and resource_type == "Patient":
            criteria.append(Criterion("_id", parameter("Patient", "_id"), (patient,)))
        elif patient is not None:
            keys = reference_keys(list(patient_compartment()[resource_type]), [f"Patient/{patient}"])
        return await self.filter_for(resource_type, criteria, base, compartment=keys, depth=depth, access=access)

    async def system_search(
        self, base: str, params: list[tuple[str, str]], *, strict: bool, access: Policy = OPEN
    ) -> dict[str, Any]:
        """`GET /?_type=A,B&…`: the parameters every resource has, over the listed types (all
        the token may search when none is listed)."""
        request = parse_search(None, params, strict=strict, default_count=self.default_count,
                               max_count=self.max_count)
        types: list[str] = []
        for name, raw in params:
            if name == "_type":
                for t in raw.split(","):
                    check_type(t.strip())
                    access.require(t.strip(), "s")
                    types.append(t.strip())
        if not types:
            types = sorted(t for t in await self.repository.stored_types() if access.allows(t, "s"))
        queries = None
        if not request.page:
            queries = {t: await self._reached(t, request.criteria, base, access) for t in types}
        return await self._run(base, "", request, queries, access=access)

    async def everything(
        self, base: str, patient_id: str | None, params: list[tuple[str, str]], access: Policy = OPEN
    ) -> dict[str, Any]:
        """`Patient/[id]/$everything`: the Patient compartment of one patient (or of every
        patient), paged like a search, each page with the resources its matches refer to;
        the types the token may search (without a granular scope)."""
        confined = access.compartment("Patient")
        if confined is not None and patient_id != confined:
            raise Forbidden(f"The token reaches the record of Patient/{confined} only")
        values: dict[str, str] = {}
        for name, raw in params:
            if name not in EVERYTHING_PARAMETERS:
                raise BadRequest(f"$everything does not take the parameter '{name}'", expression=name)
            values[name] = raw
        compartment = patient_compartment()
        types = ["Patient", *sorted(t for t in compartment if t != "Patient" and t in supported_types())]
        types = [t for t in types if access.allows(t, "s") and not access.narrowing(t)
                 and access.compartment(t) in (None, patient_id)]  # a type confined elsewhere: left out
        if "_type" in values:
            wanted = [t.strip() for t in values["_type"].split(",") if t.strip()]
            for t in wanted:
                check_type(t)
            types = [t for t in types if t in wanted]
        else:  # the audit trail (its patient entity puts it in the compartment) grows with each call
            types = [t for t in types if t != "AuditEvent"]
        pairs = [(k, v) for k, v in params if k in ("_count", "_page", "_type", "_since")]
        request = parse_search("Patient", [(k, v) for k, v in pairs if k in ("_count", "_page")], strict=True,
                               default_count=self.default_count, max_count=self.max_count)
        request.applied = [(k, v) for k, v in pairs if k != "_page"]
        request.includes = [Include(t, "*", None, False, False) for t in types]
        path = f"Patient/{patient_id}/$everything" if patient_id else "Patient/$everything"
        if patient_id is not None:
            check_id(patient_id)
            found = await self.repository.read("Patient", patient_id)
            if found is None:
                raise NotFound(f"Patient/{patient_id} is not known")
            if found.deleted:
                raise Gone(f"Patient/{patient_id} was deleted")
        queries = None
        if not request.page:
            queries = await self._everything_queries(base, patient_id, types, values.get("_since"))
        return await self._run(base, path, request, queries, skip_included=frozenset(compartment) | {"Patient"},
                               complete=True, access=access)

    async def _everything_queries(
        self, base: str, patient_id: str | None, types: list[str], since: str | None
    ) -> dict[str, dict[str, Any]]:
        criteria = [] if since is None else [parse_criterion("Patient", "_lastUpdated", f"ge{since}")]
        if patient_id is not None:
            patients = [patient_id]
        else:
            every = await self.filter_for("Patient", [], base)
            patients = await self.repository.find_ids("Patient", every, [("_id", 1)], limit=self.max_results + 1)
            if len(patients) > self.max_results:
                raise TooCostly(f"More than {self.max_results} patients: export them with Patient/$export")
        queries: dict[str, dict[str, Any]] = {}
        for resource_type in types:
            typed = [replace(c, param=parameter(resource_type, "_lastUpdated")) for c in criteria if c is not None]
            if resource_type == "Patient":
                typed.append(Criterion("_id", parameter("Patient", "_id"), tuple(patients)))
                queries[resource_type] = await self.filter_for(resource_type, typed, base)
            else:
                keys = reference_keys(list(patient_compartment()[resource_type]), [f"Patient/{p}" for p in patients])
                queries[resource_type] = await self.filter_for(resource_type, typed, base, compartment=keys)
        return queries

    async def _run(
        self,
        base: str,
        path: str,
        request: SearchRequest,
        queries: dict[str, dict[str, Any]] | None,
        *,
        skip_included: frozenset[str] = frozenset(),
        complete: bool = False,
        access: Policy = OPEN,
    ) -> dict[str, Any]:
        """One page: from a new query (`queries`, per type) or from the snapshot `_page` names.
        `skip_included`: types `_include` does not add (they are matches already). `complete`:
        refuse (rather than page through only the first `max_results`) when there are more."""
        fingerprint = _fingerprint(path, request.applied, access)
        count = request.count
        offset = 0
        snapshot = None
        total: int | None
        if request.page:
            snapshot, offset = self.pages.parse(request.page, fingerprint)
            refs, total, stored = await self.pages.load(snapshot, offset, count)
        else:
            assert queries is not None
            if count == 0:
                total = await self._count(queries)
                return self._bundle(base, path, request, [], [], total, None, 0, 0, fingerprint)
            refs = await self._ordered_refs(queries, request.sort, self.max_results + 1)
            stored = min(len(refs), self.max_results)
            total = stored
            if len(refs) > self.max_results and complete:
                raise TooCostly(f"More than {self.max_results} resources: export them with $export")
            if len(refs) > self.max_results:
                total = await self._count(queries, listed=False)
            if len(refs) > count:
                snapshot = await self.pages.save(refs[:stored], total)
            refs = refs[:count]
        # The query kept to the token's reach; checked again, for what a page link names.
        found = [v for v in await self._fetch(refs) if access.reaches(v, "s")]
        included = await self._include(found, request.includes, skip_included, access)
        return self._bundle(base, path, request, found, included, total, snapshot, offset, stored, fingerprint)

    async def _count(self, queries: dict[str, dict[str, Any]], *, listed: bool = True) -> int:
        """Counting the listed ids is what the embedded database does fastest (its `count`
        scans the collection); beyond `max_results` the database counts."""
        if listed:
            refs = await self._ordered_refs(queries, [], self.max_results + 1, sort_ids=False)
            if len(refs) <= self.max_results:
                return len(refs)
        return sum([await self.repository.count(t, q) for t, q in queries.items()])

    async def _ordered_refs(
        self, queries: dict[str, dict[str, Any]], sort: list[tuple[str, bool]], limit: int, *, sort_ids: bool = True
    ) -> list[str]:
        """The first `limit` matches in `_sort` order. Sorted here when all of a type's matches
        fit in `limit`: the embedded database sorts by fetching each whole document again
        (twice the time of the search on the gallery's Media); by the database beyond."""
        spec = sort_spec(sort) if sort_ids else []
        rows: list[tuple[str, dict[str, Any]]] = []
        for resource_type, query in queries.items():
            docs = await self.repository.find_sort_keys(resource_type, query, spec, limit=limit, ordered=False)
            if spec and len(docs) >= limit:  # more matches than kept: the first ones, in order
                docs = await self.repository.find_sort_keys(resource_type, query, spec, limit=limit)
            rows.extend((f"{resource_type}/{d['_id']}", d) for d in docs)
        for field, direction in reversed(spec):  # stable sorts, last key first
            rows.sort(key=lambda row, f=field: _field(row, f), reverse=direction < 0)
        return [ref for ref, _ in rows[:limit]]

    async def _fetch(self, refs: list[str]) -> list[Version]:
        by_type: dict[str, list[str]] = {}
        for ref in refs:
            resource_type, _, resource_id = ref.partition("/")
            by_type.setdefault(resource_type, []).append(resource_id)
        found: dict[str, Version] = {}
        for resource_type, ids in by_type.items():
            for version in await self.repository.fetch(resource_type, ids):
                found[f"{resource_type}/{version.id}"] = version
        return [found[r] for r in refs if r in found]

    async def _include(
        self, matches: list[Version], includes: list[Include], skip: frozenset[str] = frozenset(),
        access: Policy = OPEN,
    ) -> list[Version]:
        """`_include` and `_revinclude`, then their `:iterate` forms over what was added: only
        what the token may read, and iterating from that only (else a round through a resource
        it may not see would tell what that resource refers to)."""
        if not includes or not matches:
            return []
        seen = {(v.type, v.id) for v in matches}
        added: list[Version] = []
        frontier = matches
        for round_ in range(MAX_ITERATE + 1):
            new: list[Version] = []
            for include in includes:
                if round_ > 0 and not include.iterate:
                    continue
                fetched = await (self._reverse(frontier, include) if include.reverse else self._forward(frontier, include, skip))
                for version in fetched:
                    if (version.type, version.id) not in seen and access.visible(version):
                        seen.add((version.type, version.id))
                        new.append(version)
            added.extend(new)
            frontier = new
            if not frontier or len(added) >= self.max_included:
                break
        return added[: self.max_included]

    async def _forward(self, frontier: list[Version], include: Include, skip: frozenset[str]) -> list[Version]:
        params = _reference_params(include.source, include.param)
        refs: list[str] = []
        for version in frontier:
            if version.type != include.source or version.resource is None:
                continue
            for param in params:
                for ref in references(param, version.resource, self.repository.base_url):
                    kind = ref.split("/")[0]
                    if ref.count("/") == 1 and kind in supported_types() and kind not in skip and include.target in (None, kind):
                        refs.append(ref)
        return await self._fetch(list(dict.fromkeys(refs))[: self.max_included])

    async def _reverse(self, frontier: list[Version], include: Include) -> list[Version]:
        params = _reference_params(include.source, include.param)
        targets = [f"{v.type}/{v.id}" for v in frontier if include.target in (None, v.type)]
        if not targets or not params:
            return []
        query = referencing([p.code for p in params], targets)
        return await self.repository.find(include.source, query, limit=self.max_included)

    # -- the Bundle ------------------------------------------------------------------------------

    def _bundle(
        self,
        base: str,
        path: str,
        request: SearchRequest,
        found: list[Version],
        included: list[Version],
        total: int | None,
        snapshot: str | None,
        offset: int,
        stored: int,
        fingerprint: str,
    ) -> dict[str, Any]:
        count = request.count

        def link(at: int | None) -> str:
            token = None if at is None or snapshot is None else self.pages.token(snapshot, at, fingerprint)
            return page_url(base, path, request.applied, _page=token)

        links = [("self", link(offset if request.page else None)), ("first", link(None))]
        if offset > 0 and snapshot:
            links.append(("previous", link(max(offset - count, 0)) if offset - count > 0 else link(None)))
        if snapshot and count and offset + count < stored:
            links.append(("next", link(offset + count)))
        outcome = None
        if request.ignored:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{
                    "severity": "warning",
                    "code": "not-supported",
                    "diagnostics": f"Search parameter '{name}' is not known here and was ignored",
                } for name in request.ignored],
            }
        entries = [(v, "match") for v in found] + [(v, "include") for v in included]
        shaped = [(v, shape(v.resource, request.summary, request.elements), mode) for v, mode in entries]
        return searchset_bundle(base, shaped, None if request.total == "none" else total, links, outcome)


def _field(row: tuple[str, dict[str, Any]], field: str) -> str:
    value: Any = row[1]
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, str) else ""


def _reference_params(resource_type: str, code: str) -> list[Any]:
    if code == "*":
        return [p for p in parameters(resource_type).values() if p.type == "reference"]
    param = parameter(resource_type, code)
    return [param] if param else []
