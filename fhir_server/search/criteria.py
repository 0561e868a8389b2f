"""Parse a search query string into plain data (`SearchRequest`): pure, no database.

Modifiers and result parameters are checked here; values are checked by `to_mongo` when it
encodes them. Unknown parameters are ignored and reported (or refused with `strict`); a
known parameter used in a way this server does not support is always refused, since ignoring
it would widen the result.
"""

import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl

from fhir_server.errors import BadRequest
from fhir_server.search.registry import SearchParam, parameter, parameters
from fhir_server.validation.resource_types import supported_types

RESULT_PARAMETERS = frozenset(
    {"_count", "_sort", "_total", "_summary", "_elements", "_include", "_revinclude", "_page"}
)
IGNORED_PARAMETERS = frozenset({"_format", "_pretty"})
SUMMARY_MODES = ("true", "text", "data", "count", "false")
TOTAL_MODES = ("none", "estimate", "accurate")
MODIFIERS = {
    "string": {"exact", "contains"},
    "token": {"text", "not", "of-type"},
    "reference": {"identifier"},
    "uri": {"above", "below"},
}


@dataclass(frozen=True)
class Criterion:
    """One parameter occurrence; its values are OR-ed, several criteria are AND-ed.

    `chain` (`subject:Patient.name` → target Patient, chain `name`) and `has`
    (`_has:Observation:patient:code` → ("Observation", "patient", "code")) are resolved to
    plain reference or `_id` criteria by the search service before translation.
    """

    name: str
    param: SearchParam | None
    values: tuple[str, ...]
    modifier: str | None = None
    target: str | None = None
    chain: str | None = None
    has: tuple[str, str, str] | None = None

    @property
    def code(self) -> str:
        return self.param.code if self.param else "_has"


@dataclass(frozen=True)
class Include:
    source: str  # the type whose reference parameter is followed
    param: str  # a reference parameter code, or "*"
    target: str | None
    reverse: bool
    iterate: bool


@dataclass
class SearchRequest:
    resource_type: str | None
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (code, descending)
    count: int = 50
    total: str = "accurate"
    summary: str | None = None
    elements: tuple[str, ...] | None = None
    includes: list[Include] = field(default_factory=list)
    page: str | None = None
    applied: list[tuple[str, str]] = field(default_factory=list)  # what the self link shows
    ignored: list[str] = field(default_factory=list)


def split_escaped(value: str, separator: str, limit: int = -1) -> list[str]:
    """Split on `separator` where it is not escaped with `\\`; the parts keep their escapes."""
    parts, current, escaped = [], "", False
    for char in value:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator and (limit < 0 or len(parts) < limit):
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current + ("\\" if escaped else "")]


def unescape(value: str) -> str:
    """`\\,` `\\$` `\\|` `\\\\` → the character itself; any other backslash stays."""
    out, i = "", 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value) and value[i + 1] in ",$|\\":
            out += value[i + 1]
            i += 2
        else:
            out += value[i]
            i += 1
    return out


def _values(name: str, raw: str) -> tuple[str, ...]:
    """The comma-separated values (OR) of one parameter, escapes kept for the later splits."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in raw):
        raise BadRequest(f"Search parameter '{name}' has a control character in its value", expression=name)
    values = tuple(v for v in split_escaped(raw, ",") if v)
    if not values:
        raise BadRequest(f"Search parameter '{name}' has no value", expression=name)
    return values


def _check_type(resource_type: str, name: str) -> None:
    if resource_type not in supported_types():
        raise BadRequest(f"Unknown resource type '{resource_type}' in '{name}'", expression=name)


def parse_criterion(resource_type: str, name: str, raw: str) -> Criterion | None:
    """One `name=value` pair, or None when the parameter is unknown to `resource_type`."""
    if name.startswith("_has:"):
        parts = name.split(":", 3)
        if len(parts) != 4 or not all(parts[1:]):
            raise BadRequest(f"Invalid _has parameter '{name}' (_has:Type:reference:parameter)", expression=name)
        _, source, ref, rest = parts
        _check_type(source, name)
        ref_param = parameter(source, ref)
        if ref_param is None or ref_param.type != "reference":
            raise BadRequest(f"'{ref}' is not a reference parameter of {source}", expression=name)
        return Criterion(name, None, _values(name, raw), has=(source, ref, rest))
    head, _, chain = name.partition(".")
    code, _, modifier = head.partition(":")
    param = parameter(resource_type, code)
    if param is None:
        return None
    criterion = Criterion(name, param, _values(name, raw), modifier or None)
    if chain:
        if param.type != "reference":
            raise BadRequest(f"'{code}' is not a reference parameter: it cannot be chained", expression=name)
        target = modifier or None
        if target is not None:
            _check_type(target, name)
        return replace(criterion, modifier=None, target=target, chain=chain)
    if modifier:
        _check_modifier(criterion, modifier)
    return criterion


def _check_modifier(criterion: Criterion, modifier: str) -> None:
    assert criterion.param is not None
    kind = criterion.param.type
    if modifier == "missing":
        if any(v not in ("true", "false") for v in criterion.values) or len(criterion.values) != 1:
            raise BadRequest(f"':missing' takes true or false ({criterion.name})", expression=criterion.name)
        return
    if kind == "reference" and modifier in supported_types():
        return
    if criterion.param.code == "_id" and modifier != "not":
        raise BadRequest(f"Modifier ':{modifier}' is not supported on _id", expression=criterion.name)
    if modifier not in MODIFIERS.get(kind, set()) or (modifier == "of-type" and criterion.param.code != "identifier"):
        raise BadRequest(
            f"Modifier ':{modifier}' is not supported on {kind} parameter '{criterion.param.code}'",
            expression=criterion.name,
        )


def parse_criteria(
    resource_type: str, pairs: list[tuple[str, str]], *, strict: bool = True
) -> tuple[list[Criterion], list[str]]:
    """Criteria among `(name, value)` pairs, skipping result parameters; returns (criteria,
    names of unknown parameters). Unknown parameters raise when `strict`."""
    criteria, ignored = [], []
    for name, raw in pairs:
        if name in RESULT_PARAMETERS or name in IGNORED_PARAMETERS or name.startswith(("_include", "_revinclude")):
            continue
        if name in ("_contained", "_containedType"):
            raise BadRequest(f"'{name}' is not supported: contained resources are not searched", expression=name)
        criterion = parse_criterion(resource_type, name, raw)
        if criterion is None:
            if strict:
                raise BadRequest(f"Unknown search parameter '{name}' for {resource_type}", expression=name)
            ignored.append(name)
            continue
        criteria.append(criterion)
    return criteria, ignored


def parse_query_string(resource_type: str, query: str) -> list[Criterion]:
    """Criteria of a conditional URL or an If-None-Exist header; every parameter must be known."""
    query = query.split("?", 1)[1] if "?" in query else query
    criteria, _ = parse_criteria(resource_type, parse_qsl(query, keep_blank_values=True))
    if not criteria:
        raise BadRequest("Conditional interaction without search criteria")
    return criteria


def _include(resource_type: str | None, name: str, raw: str) -> Include:
    reverse = name.startswith("_revinclude")
    iterate = name.endswith((":iterate", ":recurse"))
    if raw == "*":
        if resource_type is None or reverse:
            raise BadRequest(f"'{name}=*' is not supported: name the type and parameter", expression=name)
        return Include(resource_type, "*", None, reverse, iterate)
    parts = raw.split(":")
    if len(parts) not in (2, 3):
        raise BadRequest(f"Invalid {name} value '{raw}' (Type:parameter[:targetType])", expression=name)
    source, code = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    _check_type(source, name)
    if target is not None:
        _check_type(target, name)
    if code != "*":
        ref = parameter(source, code)
        if ref is None or ref.type != "reference":
            raise BadRequest(f"'{code}' is not a reference parameter of {source}", expression=name)
    if not reverse and not iterate and resource_type is not None and source != resource_type:
        raise BadRequest(f"_include of {source} in a search of {resource_type} (use :iterate)", expression=name)
    return Include(source, code, target, reverse, iterate)


def _sort(resource_type: str | None, raw: str) -> list[tuple[str, bool]]:
    out = []
    for item in raw.split(","):
        item = item.strip()
        descending = item.startswith("-")
        code = item.lstrip("-")
        if code in ("_id", "_lastUpdated"):
            out.append((code, descending))
            continue
        param = parameter(resource_type, code) if resource_type else None
        if param is None or not param.sortable:
            raise BadRequest(f"Cannot sort by '{code}'", expression="_sort")
        out.append((code, descending))
    return out


def page_size(raw: str | None, default: int, maximum: int) -> int:
    """`_count` (of a search or a history), capped; 0 asks for the total only."""
    if raw is None:
        return min(default, maximum)
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise BadRequest(f"_count must be a non-negative integer, not '{raw[:40]}'", expression="_count")
    return min(int(raw), maximum)


def parse_search(
    resource_type: str | None,
    pairs: list[tuple[str, str]],
    *,
    strict: bool,
    default_count: int,
    max_count: int,
) -> SearchRequest:
    """A whole search request: criteria and result parameters. `resource_type` None: a
    system search, where only the parameters every resource has apply."""
    lookup_type = resource_type or "Resource"
    request = SearchRequest(resource_type, count=min(default_count, max_count))
    if resource_type is None:
        allowed = {c for c in parameters("Patient") if c.startswith("_")}
        pairs_for_criteria = []
        for name, raw in pairs:
            if name == "_type" or name.split(":")[0] in allowed or name in RESULT_PARAMETERS:
                pairs_for_criteria.append((name, raw))
            elif name not in IGNORED_PARAMETERS and not name.startswith(("_include", "_revinclude")):
                if strict:
                    raise BadRequest(f"Unknown system-level search parameter '{name}'", expression=name)
                request.ignored.append(name)
        pairs = pairs_for_criteria
        lookup_type = "Patient"  # any type: the common parameters are the same
    criteria, ignored = parse_criteria(lookup_type, [(n, v) for n, v in pairs if n != "_type"], strict=strict)
    request.criteria = criteria
    request.ignored.extend(ignored)
    used = {c.name for c in criteria}
    for name, raw in pairs:
        if name == "_count":
            request.count = page_size(raw, default_count, max_count)
        elif name == "_sort":
            request.sort = _sort(resource_type, raw)
        elif name == "_total":
            if raw not in TOTAL_MODES:
                raise BadRequest(f"_total must be one of {', '.join(TOTAL_MODES)}", expression=name)
            request.total = raw
        elif name == "_summary":
            if raw not in SUMMARY_MODES:
                raise BadRequest(f"_summary must be one of {', '.join(SUMMARY_MODES)}", expression=name)
            request.summary = None if raw == "false" else raw
        elif name == "_elements":
            request.elements = tuple(e.strip() for e in raw.split(",") if e.strip())
        elif name.startswith(("_include", "_revinclude")):
            request.includes.append(_include(resource_type, name, raw))
        elif name == "_page":
            request.page = raw
            continue
        elif name != "_type" and name not in used:
            continue
        request.applied.append((name, raw))
    if request.summary == "count":
        request.count = 0
    return request


def lock_key(resource_type: str, criteria: list[Criterion]) -> str:
    """What concurrent conditional requests that could match the same resource have in common.

    Keyed on the identifier values without their systems (so `identifier=123` and
    `identifier=urn:mrn|123` take the same lock), else on the ids, else on all criteria.
    """
    for code in ("identifier", "_id"):
        for criterion in criteria:
            if criterion.param is not None and criterion.code == code and not criterion.modifier:
                values = sorted({v.rsplit("|", 1)[-1] or v for v in criterion.values})
                return f"{resource_type}:{code}:{','.join(values)}"
    return criteria_key(resource_type, criteria)


def criteria_key(resource_type: str, criteria: list[Criterion]) -> str:
    """One text for the same criteria however they were written (order of parameters and values)."""
    parts = sorted(f"{c.name}={','.join(sorted(c.values))}" for c in criteria)
    return f"{resource_type}?{'&'.join(parts)}"
