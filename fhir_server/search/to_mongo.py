"""The only place that turns search criteria into a MongoDB filter.

Every criterion becomes an exact clause on its parameter's keys (`p.<code>`); the most
selective one also becomes an equality or range on the flat, indexed `ix` array, placed first,
so that the database answers from that index and checks the rest on the documents it finds.
Ranges on an array are exact only inside `$elemMatch`, so a range on `ix` is always paired
with the exact clause.

Date semantics (FHIR R4, 3.1.1.4.2): a value is the inclusive range [low, high] its precision
implies; with the search range [sl, sh]: eq low>=sl and high<=sh; ne not eq; gt high>sh;
lt low<sl; ge gt or eq (= low>=sl or high>sh); le lt or eq (= low<sl or high<=sh);
sa low>sh; eb high<sl; ap overlap with the search range widened by 10 % of its distance to now.
Numbers and quantities are points; the search value's precision sets eq's range (100 → [99.5,
100.5)), the other prefixes compare with the value itself.
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from fhir_server.errors import BadRequest
from fhir_server.search import keys
from fhir_server.search.criteria import Criterion
from fhir_server.search.dates import date_range
from fhir_server.search.indexer import reference_value
from fhir_server.validation.resource_types import supported_types

INDEX_FIELD = "ix"
# Token parameters with a handful of values: poor candidates for driving the index.
FEW_VALUES = frozenset({
    "status", "category", "gender", "active", "class", "intent", "priority", "type", "language",
    "_tag", "_security", "_profile", "_source", "clinical-status", "verification-status", "use",
})
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_MS = timedelta(milliseconds=1)


@dataclass(frozen=True)
class Clause:
    """One value's condition on a parameter's keys.

    `keys`: matches when any stored key is one of them (exact, and usable on the index as is).
    Otherwise `exact` is the condition on the parameter's key array and `index` an optional
    range (low, high) on keys that every match has, to find candidates by.
    """

    keys: tuple[str, ...] = ()
    exact: dict[str, Any] | None = None
    index: tuple[str, str] | None = None
    rank: int = 5  # lower is more selective


def _between(low: str, high: str) -> dict[str, Any]:
    return {"$elemMatch": {"$gte": low, "$lt": high}}


def _all(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {"$all": [c for c in conditions]}


def _prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and not value[:2].isdigit():
        return value[:2], value[2:]
    return "eq", value


# -- strings, tokens, references, uris ---------------------------------------------------------


def _string(value: str, modifier: str | None, tag: str = "") -> Clause:
    if modifier == "exact":
        return Clause(keys=(tag + keys.EXACT + value,), rank=2)
    normal = keys.normalise(value)
    if not normal:
        raise BadRequest(f"Empty string search value '{value}'")
    if modifier == "contains":
        return Clause(exact={"$regex": "^" + re.escape(tag + keys.EQ) + ".*" + re.escape(normal)}, rank=9)
    low = tag + keys.EQ + normal
    return Clause(exact=_between(low, keys.successor(low)), index=(low, keys.successor(low)), rank=3)


def _token_forms(value: str) -> tuple[str, ...]:
    if "|" in value:
        system, code = value.split("|", 1)
        return (f"{system}|{code}",) if system or code else ()
    return (value,)


def _token(value: str, modifier: str | None, tag: str = "") -> Clause:
    if modifier == "text":
        low = tag + keys.TEXT + keys.normalise(value)
        return Clause(exact=_between(low, keys.successor(low)), index=(low, keys.successor(low)), rank=4)
    if modifier == "of-type":
        if value.count("|") != 2:
            raise BadRequest(f"identifier:of-type takes system|code|value, not '{value}'")
        return Clause(keys=(tag + keys.OF_TYPE + value,), rank=1)
    forms = _token_forms(value)
    if not forms:
        raise BadRequest(f"Invalid token '{value}'")
    return Clause(keys=tuple(tag + keys.EQ + f for f in forms), rank=1 if not value.endswith("|") else 6)


def _reference(criterion: Criterion, value: str, base_url: str, tag: str = "") -> Clause:
    assert criterion.param is not None
    if criterion.modifier == "identifier":
        forms = _token_forms(value)
        return Clause(keys=tuple(tag + keys.OF_TYPE + f for f in forms), rank=1)
    if base_url and value.startswith(base_url.rstrip("/") + "/"):
        value = value[len(base_url.rstrip("/")) + 1:]
    value = reference_value(value)
    target = criterion.modifier or criterion.target
    if "/" not in value and ":" not in value:  # a bare id: any of the parameter's target types
        types = [target] if target else [t for t in criterion.param.targets if t in supported_types()]
        if not types or "Resource" in criterion.param.targets:
            types = sorted(supported_types()) if not target else [target]
        return Clause(keys=tuple(f"{tag}{keys.EQ}{t}/{value}" for t in types), rank=1)
    if target and not value.startswith(f"{target}/"):
        return Clause(keys=(), rank=1)  # `subject:Patient=Group/1` matches nothing
    return Clause(keys=(tag + keys.EQ + value,), rank=1)


def _uri(value: str, modifier: str | None, tag: str = "") -> Clause:
    if modifier == "below":
        low = tag + keys.EQ + value
        return Clause(exact=_between(low, keys.successor(low)), index=(low, keys.successor(low)), rank=3)
    if modifier == "above":
        parts = value.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return Clause(keys=tuple(tag + keys.EQ + p for p in prefixes if p), rank=2)
    return Clause(keys=(tag + keys.EQ + value,), rank=1)


# -- numbers, quantities, dates ----------------------------------------------------------------


def _decimal(text: str, name: str) -> Decimal:
    try:
        number = Decimal(text)
    except InvalidOperation as exc:
        raise BadRequest(f"Invalid number '{text}' for {name}", expression=name) from exc
    if not number.is_finite():
        raise BadRequest(f"Invalid number '{text}' for {name}", expression=name)
    return number


def _number(value: str, name: str, tag: str) -> Clause:
    """`tag` is the key prefix of the numbers compared (`%`, or a quantity's `^system|code|`)."""
    prefix, text = _prefix(value)
    number = _decimal(text, name)
    bottom, top = tag + "0", tag + "3"  # below and above every number key
    key = tag + keys.number_key(number)
    after = key + "\x00"  # the least key greater than `key`
    if prefix in ("eq", "ne", "ap"):
        precision = Decimal(1).scaleb(number.as_tuple().exponent) / 2  # type: ignore[arg-type]
        delta = abs(number) / 10 if prefix == "ap" else precision
        low, high = tag + keys.number_key(number - delta), tag + keys.number_key(number + delta)
        if prefix == "ap":
            high += "\x00"
        if prefix == "ne":
            return Clause(exact={"$not": _between(low, high)}, rank=9)
        return Clause(exact=_between(low, high), index=(low, high), rank=3)
    bounds = {
        "gt": (after, top), "sa": (after, top), "ge": (key, top),
        "lt": (bottom, key), "eb": (bottom, key), "le": (bottom, after),
    }[prefix]
    return Clause(exact=_between(*bounds), index=bounds, rank=5)


def _quantity(value: str, name: str, tag: str = "") -> Clause:
    if value.count("|") not in (0, 2):
        raise BadRequest(f"Invalid quantity '{value}' for {name} (number|system|code)", expression=name)
    number, _, unit = value.partition("|")
    if not unit:
        return _number(number, name, tag + keys.NUMBER)
    system, _, code = unit.partition("|")
    if system and code:
        return _number(number, name, f"{tag}{keys.SYSTEM_UNIT}{system}|{code}|")
    if code or system:
        return _number(number, name, f"{tag}{keys.UNIT}{code or system}|")
    raise BadRequest(f"Invalid quantity '{value}' for {name}", expression=name)


def _date(value: str, name: str, tag: str = "") -> Clause:
    prefix, text = _prefix(value)
    low_dt, high_dt = date_range(text, name)
    if prefix == "ap":
        distance = abs(datetime.now(UTC) - low_dt) / 10
        try:
            low_dt, high_dt = low_dt - distance, high_dt + distance
        except OverflowError as exc:
            raise BadRequest(f"Date '{text}' for {name} is out of range", expression=name) from exc
    sl, sh = keys.instant_key(low_dt), keys.instant_key(high_dt)
    lo, hi = tag + keys.LOW, tag + keys.HIGH
    end = ":"  # after every instant key
    low_at_least = _between(lo + sl, lo + end)
    high_at_most = _between(hi + "0", hi + sh + "\x00")
    if prefix == "eq":
        return Clause(exact=_all(low_at_least, high_at_most), index=(lo + sl, lo + sh + "\x00"), rank=4)
    if prefix == "ne":
        return Clause(exact={"$not": _all(low_at_least, high_at_most)}, rank=9)
    if prefix in ("gt", "lt", "sa", "eb"):
        bounds = {
            "gt": (hi + sh + "\x00", hi + end),
            "lt": (lo + "0", lo + sl),
            "sa": (lo + sh + "\x00", lo + end),
            "eb": (hi + "0", hi + sl),
        }[prefix]
        return Clause(exact=_between(*bounds), index=bounds, rank=6)
    if prefix == "ge":  # high >= sl (every match has it), and not (low < sl and high <= sh)
        exact = {**_between(hi + sl, hi + end), "$not": _all(_between(lo + "0", lo + sl), high_at_most)}
        return Clause(exact=exact, index=(hi + sl, hi + end), rank=6)
    if prefix == "le":  # low <= sh (every match has it), and not (low >= sl and high > sh)
        exact = {**_between(lo + "0", lo + sh + "\x00"), "$not": _all(low_at_least, _between(hi + sh + "\x00", hi + end))}
        return Clause(exact=exact, index=(lo + "0", lo + sh + "\x00"), rank=6)
    # ap: overlaps the widened range
    return Clause(exact=_all(_between(lo + "0", lo + sh + "\x00"), _between(hi + sl, hi + end)),
                  index=(hi + sl, hi + end), rank=6)


# -- composite ---------------------------------------------------------------------------------


def _split_composite(value: str) -> list[str]:
    parts, current, escaped = [], "", False
    for char in value:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "$":
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _composite(criterion: Criterion, value: str, base_url: str) -> Clause:
    assert criterion.param is not None
    components = criterion.param.components
    parts = _split_composite(value)
    if len(parts) != len(components):
        raise BadRequest(
            f"'{criterion.name}' takes {len(components)} values joined by '$', not '{value}'",
            expression=criterion.name,
        )
    tag = keys.EQ
    for component, part in zip(components[:-1], parts[:-1], strict=True):
        forms = _token_forms(part) if component.type == "token" else (part,)
        if len(forms) != 1:
            raise BadRequest(f"Invalid composite value '{value}'", expression=criterion.name)
        tag += forms[0] + "$"
    last = components[-1]
    return _simple(criterion, last.type, parts[-1], None, base_url, tag)


def _simple(
    criterion: Criterion, kind: str, value: str, modifier: str | None, base_url: str, tag: str = ""
) -> Clause:
    name = criterion.name
    if kind == "string":
        return _string(value, modifier, tag)
    if kind == "token":
        return _token(value, modifier, tag)
    if kind == "reference":
        return _reference(criterion, value, base_url, tag)
    if kind == "uri":
        return _uri(value, modifier, tag)
    if kind == "number":
        return _number(value, name, tag + keys.NUMBER)
    if kind == "quantity":
        return _quantity(value, name, tag)
    if kind == "date":
        return _date(value, name, tag)
    raise BadRequest(f"Parameter '{name}' of type {kind} cannot be searched", expression=name)


# -- criteria → filter -------------------------------------------------------------------------


def _special(criterion: Criterion) -> tuple[str, dict[str, Any]] | None:
    """`_id` and `_lastUpdated` live in the document itself, not in the index arrays."""
    code = criterion.code
    if code == "_id":
        if criterion.modifier == "missing":
            return "_id", {"$exists": criterion.values[0] == "false"}
        return "_id", {"$in": list(criterion.values)}
    if code == "_lastUpdated":
        if criterion.modifier == "missing":
            return "ts", {"$exists": criterion.values[0] == "false"}
        if len(criterion.values) != 1:
            raise BadRequest("_lastUpdated takes one value per parameter (repeat it to combine)")
        prefix, text = _prefix(criterion.values[0])
        low, high = date_range(text, "_lastUpdated")
        after = high + _MS
        ranges = {
            "eq": {"$gte": low, "$lt": after}, "gt": {"$gte": after}, "sa": {"$gte": after},
            "ge": {"$gte": low}, "lt": {"$lt": low}, "eb": {"$lt": low}, "le": {"$lt": after},
            "ap": {"$gte": low, "$lt": after}, "ne": {"$not": {"$gte": low, "$lt": after}},
        }
        return "ts", ranges[prefix]
    return None


def criterion_clauses(criterion: Criterion, base_url: str) -> list[Clause]:
    assert criterion.param is not None
    param = criterion.param
    if param.type == "composite":
        return [_composite(criterion, v, base_url) for v in criterion.values]
    if param.type == "token" and criterion.modifier == "not":
        forms = [k for v in criterion.values for k in _token(v, None).keys]
        return [Clause(exact={"$nin": forms}, rank=9)]
    return [_simple(criterion, param.type, v, criterion.modifier, base_url) for v in criterion.values]


def _merge(filter_: dict[str, Any], extra: list[dict[str, Any]], field: str, clause: dict[str, Any]) -> None:
    """AND `clause` into the filter on `field`, keeping one top-level entry per field where the
    operators allow: the embedded database plans only filters without top-level `$and`.

    Element conditions (`$in`, `$elemMatch`) of several criteria join in one `$all`; other
    operators join when they differ, else go to `extra` (a `$and`).
    """
    current = filter_.get(field)
    if current is None:
        filter_[field] = clause
        return
    if not field.startswith("p."):  # `_id`, `ts`: single values
        extra.append({field: clause})
        return
    elements: list[dict[str, Any]] = []
    others: dict[str, Any] = {}
    for part in (current, clause):
        for op, arg in part.items():
            if op == "$all":
                elements.extend(arg)
            elif op == "$elemMatch":
                elements.append({"$elemMatch": arg})
            elif op == "$in":
                elements.append({"$elemMatch": {"$in": arg}})
            elif op in others:
                extra.append({field: {op: arg}})
            else:
                others[op] = arg
    filter_[field] = {**({"$all": elements} if elements else {}), **others}


def to_filter(
    criteria: list[Criterion], base_url: str = "", compartment: list[str] | None = None
) -> dict[str, Any]:
    """A filter on current, not deleted resources matching every criterion.

    Criteria must be resolved (no chains, no `_has`) by the search service first.
    `compartment`: index keys of which a resource must have one (`patient=Patient/1`, …); the
    most selective criterion there is, so it always drives the index.
    """
    exact: dict[str, Any] = {}
    extra: list[dict[str, Any]] = []
    candidates: list[tuple[int, str, dict[str, Any]]] = []  # (rank, field, index clause)
    for criterion in criteria:
        if criterion.chain or criterion.has:
            raise AssertionError("chained criteria must be resolved before translation")
        special = _special(criterion)
        if special is not None:
            field, clause = special
            _merge(exact, extra, field, clause)
            if field == "_id" and "$in" in clause:
                candidates.append((0, "_id", clause))
            continue
        field = f"p.{criterion.code}"
        if criterion.modifier == "missing":
            _merge(exact, extra, field, {"$exists": criterion.values[0] == "false"})
            continue
        clauses = criterion_clauses(criterion, base_url)
        code = criterion.code
        if all(c.exact is None for c in clauses):  # equalities: one `$in`, exact on the index too
            found = [k for c in clauses for k in c.keys]
            _merge(exact, extra, field, {"$in": found})
            rank = min(c.rank for c in clauses) + (6 if code in FEW_VALUES else 0)
            candidates.append((rank, INDEX_FIELD, {"$in": [code + k for k in found]}))
            continue
        if len(clauses) == 1:
            only = clauses[0]
            _merge(exact, extra, field, only.exact)  # type: ignore[arg-type]
            if only.index:
                low, high = only.index
                candidates.append((only.rank, INDEX_FIELD, {"$gte": code + low, "$lt": code + high}))
            continue
        extra.append({"$or": [{field: c.exact if c.exact is not None else {"$in": list(c.keys)}} for c in clauses]})
    out: dict[str, Any] = {}
    if compartment is not None:
        candidates = [(-1, INDEX_FIELD, {"$in": compartment})]
    if candidates:
        _, field, clause = min(candidates, key=lambda c: c[0])
        out[field] = clause
    if not any(f.startswith("p.") and "$exists" not in c and "$not" not in c and "$nin" not in c
               for f, c in exact.items()):
        out["del"] = False  # a resource with index keys is not deleted: only needed otherwise
    for field, clause in exact.items():
        if field == "_id" and "_id" in out:
            if out["_id"] != clause:
                extra.append({"_id": clause})
            continue
        out[field] = clause
    if extra:
        out["$and"] = extra
    return out


def reference_keys(codes: list[str], targets: list[str]) -> list[str]:
    """Index keys of resources whose parameters `codes` point at `targets` (`Type/id`): the
    Patient compartment, `_revinclude`."""
    return [f"{code}{keys.EQ}{target}" for code in codes for target in targets]


def referencing(codes: list[str], targets: list[str]) -> dict[str, Any]:
    """A filter on resources whose parameters `codes` point at any of `targets`."""
    return {INDEX_FIELD: {"$in": reference_keys(codes, targets)}, "del": False}


def referenced_ids(found: list[str], resource_type: str) -> set[str]:
    """The ids of `resource_type` among a reference parameter's stored keys."""
    prefix = f"{keys.EQ}{resource_type}/"
    return {k[len(prefix):] for k in found if k.startswith(prefix)}


def index_keys() -> list[list[tuple[str, int]]]:
    """Indexes of every resource collection: the flat search keys, and the update time."""
    return [[(INDEX_FIELD, 1)], [("ts", 1)]]


def sort_spec(sort: list[tuple[str, bool]]) -> list[tuple[str, int]]:
    """`_sort` as a MongoDB sort: the least key ascending, the greatest descending, then `_id`."""
    spec: list[tuple[str, int]] = []
    for code, descending in sort:
        if code == "_id":
            spec.append(("_id", -1 if descending else 1))
            continue
        spec.append((f"sd.{code}" if descending else f"sa.{code}", -1 if descending else 1))
    if not any(field == "_id" for field, _ in spec):
        spec.append(("_id", 1))
    return spec
