"""The only place that turns search criteria into a MongoDB filter.

Every criterion becomes an exact clause on its parameter's keys (`p.<code>`); the most
selective one also becomes an equality or range on the flat, indexed `ix` array, placed first,
so that the database finds candidates by that index and checks the rest on them. A range on an
array is bounded on both sides only inside `$elemMatch` (MongoDB); the embedded database uses an
index only for a plain range, and then bounds it on both sides: `embedded` chooses.

Date semantics (FHIR R4, 3.1.1.4.2): a value is the inclusive range [low, high] its precision
implies (stored per value as `{l, h}`, with one more pair for `ge` and one for `le`, see the
indexer); with the search range [sl, sh]: eq low>=sl and
high<=sh; ne not eq; gt high>sh; lt low<sl; ge gt or eq (= low>=sl or high>sh); le lt or eq
(= low<sl or high<=sh); sa low>sh; eb high<sl; ap overlaps the search range widened by 10 % of
its distance to now. Numbers and quantities are points; the search value's precision sets eq's
range (100 → [99.5, 100.5)), the other prefixes compare with the value itself. `ne` matches
resources that have a value, none of them equal.
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any

from fhir_server.errors import BadRequest
from fhir_server.search import keys
from fhir_server.search.criteria import Criterion, split_escaped, unescape
from fhir_server.search.dates import ONE_MS, date_range
from fhir_server.search.indexer import reference_value
from fhir_server.validation.resource_types import supported_types

INDEX_FIELD = "ix"
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
# Token parameters with a handful of values: poor candidates for driving the index.
FEW_VALUES = frozenset({
    "status", "category", "gender", "active", "class", "intent", "priority", "type", "language",
    "_tag", "_security", "_profile", "_source", "clinical-status", "verification-status", "use",
})
MAX_EXPONENT = 6144  # Decimal128's range: larger numbers are never stored


@dataclass(frozen=True)
class Clause:
    """One value's condition on a parameter's keys.

    `keys`: matches when any stored key is one of them (exact, and usable on the index as is).
    Otherwise `exact` is the condition on the parameter's key array, `index` an optional range
    (low, high) on keys that every match has, to find candidates by, and `element` (dates) the
    condition on one stored value, so that several values can be OR-ed in one `$elemMatch`.
    """

    keys: tuple[str, ...] = ()
    exact: dict[str, Any] | None = None
    index: tuple[str, str] | None = None
    rank: int = 5  # lower is more selective
    element: dict[str, Any] | None = None
    field: str = ""  # another key array of the parameter: `:ge`, `:le` (dates)
    any_of: tuple[dict[str, Any], ...] = ()  # or one of these clauses on the keys (a top-level `$or`)


def _between(low: str, high: str) -> dict[str, Any]:
    return {"$elemMatch": {"$gte": low, "$lt": high}}


def _prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES:
        return value[:2], value[2:]
    return "eq", value


# -- strings, tokens, references, uris ---------------------------------------------------------


def _string(raw: str, modifier: str | None, tag: str = "") -> Clause:
    value = unescape(raw)
    normal = keys.normalise(value)
    if not normal:
        raise BadRequest(f"Empty string search value '{value}'")
    if modifier == "contains":
        return Clause(exact={"$regex": "^" + re.escape(tag + keys.EQ) + ".*" + re.escape(normal)}, rank=9)
    low = tag + keys.EQ + normal
    if modifier == "exact":  # candidates by the normalised form, matched as written
        return Clause(exact={"$in": [tag + keys.EXACT + value[: keys.MAX_STRING]]}, index=(low, low + "\x00"), rank=2)
    return Clause(exact=_between(low, keys.successor(low)), index=(low, keys.successor(low)), rank=3)


def _token_forms(raw: str) -> tuple[str, ...]:
    """`system|code`, `|code`, `system|` or `code`, as stored."""
    parts = split_escaped(raw, "|", 1)
    if len(parts) == 1:
        return (keys.token_part(unescape(raw)),)
    system, code = keys.token_part(unescape(parts[0])), keys.token_part(unescape(parts[1]))
    return (f"{system}|{code}",) if system or code else ()


def _token(raw: str, modifier: str | None, tag: str = "") -> Clause:
    if modifier == "text":
        low = tag + keys.TEXT + keys.normalise(unescape(raw))
        return Clause(exact=_between(low, keys.successor(low)), index=(low, keys.successor(low)), rank=4)
    if modifier == "of-type":
        parts = [unescape(p) for p in split_escaped(raw, "|")]
        if len(parts) != 3 or not all(parts[1:]):
            raise BadRequest(f"identifier:of-type takes system|code|value, not '{unescape(raw)}'")
        return Clause(keys=(tag + keys.OF_TYPE + "|".join(keys.token_part(p) for p in parts),), rank=1)
    forms = _token_forms(raw)
    if not forms:
        raise BadRequest(f"Invalid token '{unescape(raw)}'")
    return Clause(keys=tuple(tag + keys.EQ + f for f in forms), rank=1 if not raw.endswith("|") else 6)


def _reference(criterion: Criterion, raw: str, base_url: str, tag: str = "") -> Clause:
    assert criterion.param is not None
    if criterion.modifier == "identifier":
        return Clause(keys=tuple(tag + keys.OF_TYPE + f for f in _token_forms(raw)), rank=1)
    value = unescape(raw)
    if base_url and value.startswith(base_url.rstrip("/") + "/"):
        value = value[len(base_url.rstrip("/")) + 1:]
    value = reference_value(value)
    target = criterion.modifier or criterion.target
    if "/" not in value and ":" not in value:  # a bare id: any of the parameter's target types
        types = [target] if target else [t for t in criterion.param.targets if t in supported_types()]
        if not target and (not types or "Resource" in criterion.param.targets):
            types = sorted(supported_types())
        return Clause(keys=tuple(f"{tag}{keys.EQ}{t}/{value}" for t in types), rank=1)
    if target and not value.startswith(f"{target}/"):
        return Clause(keys=(), rank=1)  # `subject:Patient=Group/1` matches nothing
    return Clause(keys=(tag + keys.EQ + value,), rank=1)


def _uri(raw: str, modifier: str | None, tag: str = "") -> Clause:
    value = unescape(raw)
    if modifier == "below":  # the value itself or below it in the path: `…/fhir`, `…/fhir/x`
        low = tag + keys.EQ + value
        if value.endswith("/"):
            return Clause(exact=_between(low, keys.successor(low)), index=(low, keys.successor(low)), rank=3)
        exact = {"$regex": "^" + re.escape(low) + "(/|$)"}
        return Clause(exact=exact, index=(low, low + "0"), rank=3)  # "0" follows "/"
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
    if not number.is_finite() or (not number.is_zero() and abs(number.adjusted()) > MAX_EXPONENT):
        raise BadRequest(f"Number '{text}' for {name} is out of range", expression=name)
    return number


def _number(raw: str, name: str, tag: str) -> Clause:
    """`tag` is the key prefix of the numbers compared (`%`, or a quantity's `^system|code|`)."""
    prefix, text = _prefix(unescape(raw))
    number = _decimal(text, name)
    bottom, top = tag + "0", tag + "3"  # below and above every number key
    key = tag + keys.number_key(number)
    after = key + "\x00"  # the least key greater than `key`
    if prefix in ("eq", "ne", "ap"):
        try:
            with localcontext() as exact_context:  # enough digits for value ± half a unit of its last one
                exact_context.prec = len(number.as_tuple().digits) + 30
                precision = Decimal(1).scaleb(number.as_tuple().exponent) / 2  # type: ignore[arg-type]
                delta = abs(number) / 10 if prefix == "ap" else precision
                low, high = tag + keys.number_key(number - delta), tag + keys.number_key(number + delta)
        except (ArithmeticError, ValueError) as exc:
            raise BadRequest(f"Number '{text}' for {name} is out of range", expression=name) from exc
        if prefix == "ap":
            high += "\x00"
        if prefix == "ne":  # has a value, and none in the range
            return Clause(exact={**_between(bottom, top), "$not": _between(low, high)}, rank=9)
        return Clause(exact=_between(low, high), index=(low, high), rank=3)
    bounds = {
        "gt": (after, top), "sa": (after, top), "ge": (key, top),
        "lt": (bottom, key), "eb": (bottom, key), "le": (bottom, after),
    }[prefix]
    return Clause(exact=_between(*bounds), index=bounds, rank=5)


def _quantity(raw: str, name: str, tag: str = "") -> Clause:
    parts = split_escaped(raw, "|")
    if len(parts) == 1 or parts[1:] == [""]:
        return _number(parts[0], name, tag + keys.NUMBER)
    if len(parts) != 3:
        raise BadRequest(f"Invalid quantity '{unescape(raw)}' for {name} (number|system|code)", expression=name)
    number, system, code = parts[0], unescape(parts[1]), unescape(parts[2])
    if system and code:
        return _number(number, name, f"{tag}{keys.SYSTEM_UNIT}{system}|{code}|")
    if code:
        return _number(number, name, f"{tag}{keys.UNIT}{code}|")
    if not system:
        return _number(number, name, tag + keys.NUMBER)
    raise BadRequest(f"Quantity '{unescape(raw)}' for {name} has a system but no code", expression=name)


def _search_range(raw: str, name: str) -> tuple[str, str, str]:
    """(prefix, low key, high key) of a date search value; `ap` already widened."""
    prefix, text = _prefix(unescape(raw))
    low, high = date_range(text, name)
    if prefix == "ap":
        distance = abs(datetime.now(UTC) - low) / 10
        low = low - distance if low - datetime.min.replace(tzinfo=UTC) > distance else datetime.min.replace(tzinfo=UTC)
        high = high + distance if datetime.max.replace(tzinfo=UTC) - high > distance else datetime.max.replace(tzinfo=UTC)
    return prefix, keys.instant_key(low), keys.instant_key(high)


def _date(raw: str, name: str) -> Clause:
    """A date parameter's values are `{l, h}` pairs: every condition holds on one value."""
    prefix, sl, sh = _search_range(raw, name)
    lo, hi, end = keys.LOW, keys.HIGH, ":"  # ":" sorts after every instant key
    if prefix == "ge":  # on [greatest low, greatest high]: high >= sl and not (low < sl, high <= sh)
        exact = {"$elemMatch": {"h": {"$gte": sl}}, "$not": {"$elemMatch": {"l": {"$lt": sl}, "h": {"$lte": sh}}}}
        return Clause(exact=exact, index=(hi + sl, hi + end), rank=6, field=":ge")
    if prefix == "le":  # on [least low, least high]: low <= sh and not (low >= sl, high > sh)
        exact = {"$elemMatch": {"l": {"$lte": sh}}, "$not": {"$elemMatch": {"l": {"$gte": sl}, "h": {"$gt": sh}}}}
        return Clause(exact=exact, index=(lo + "0", lo + sh + "\x00"), rank=6, field=":le")
    element, index = {
        "eq": ({"l": {"$gte": sl}, "h": {"$lte": sh}}, (lo + sl, lo + sh + "\x00")),
        "ne": ({"l": {"$gte": sl}, "h": {"$lte": sh}}, None),
        "gt": ({"h": {"$gt": sh}}, (hi + sh + "\x00", hi + end)),
        "lt": ({"l": {"$lt": sl}}, (lo + "0", lo + sl)),
        "sa": ({"l": {"$gt": sh}}, (lo + sh + "\x00", lo + end)),
        "eb": ({"h": {"$lt": sl}}, (hi + "0", hi + sl)),
        "ap": ({"l": {"$lte": sh}, "h": {"$gte": sl}}, (hi + sl, hi + end)),
    }[prefix]
    if prefix == "ne":
        return Clause(exact={"$exists": True, "$not": {"$elemMatch": element}}, rank=9)
    return Clause(exact={"$elemMatch": element}, index=index, rank=4 if prefix == "eq" else 6, element=element)


def _composite_date(raw: str, name: str, tag: str) -> Clause:
    """A date inside a composite is stored as separate low and high keys: exact when the element
    has one date (the usual case), approximate when it has several."""
    prefix, sl, sh = _search_range(raw, name)
    lo, hi, end = tag + keys.LOW, tag + keys.HIGH, ":"
    low_from, low_before = _between(lo + sl, lo + end), _between(lo + "0", lo + sl)
    high_after, high_by = _between(hi + sh + "\x00", hi + end), _between(hi + "0", hi + sh + "\x00")
    if prefix in ("eq", "ne"):
        inside = {"$all": [low_from, high_by]}
        if prefix == "ne":  # has a date there, and it is not inside
            return Clause(exact={**_between(lo + "0", lo + end), "$not": inside}, rank=9)
        return Clause(exact=inside, index=(lo + sl, lo + sh + "\x00"), rank=6)
    if prefix == "ge":  # low >= sl or high > sh
        return Clause(any_of=(low_from, high_after), rank=9)
    if prefix == "le":  # low < sl or high <= sh
        return Clause(any_of=(low_before, high_by), rank=9)
    bounds = {
        "gt": (hi + sh + "\x00", hi + end), "sa": (lo + sh + "\x00", lo + end),
        "lt": (lo + "0", lo + sl), "eb": (hi + "0", hi + sl),
    }.get(prefix)
    if bounds is None:  # ap: overlaps the widened range
        return Clause(exact={"$all": [_between(lo + "0", lo + sh + "\x00"), _between(hi + sl, hi + end)]},
                      index=(hi + sl, hi + end), rank=6)
    return Clause(exact=_between(*bounds), index=bounds, rank=6)


# -- composite ---------------------------------------------------------------------------------


def _composite(criterion: Criterion, raw: str, base_url: str) -> Clause:
    assert criterion.param is not None
    components = criterion.param.components
    parts = split_escaped(raw, "$")
    if len(parts) != len(components):
        raise BadRequest(
            f"'{criterion.name}' takes {len(components)} values joined by '$', not '{unescape(raw)}'",
            expression=criterion.name,
        )
    tag = keys.EQ
    for component, part in zip(components[:-1], parts[:-1], strict=True):
        forms = _token_forms(part) if component.type == "token" else (unescape(part),)
        if len(forms) != 1:
            raise BadRequest(f"Invalid composite value '{unescape(raw)}'", expression=criterion.name)
        tag += forms[0] + "$"
    last = components[-1]
    if last.type == "date":
        return _composite_date(parts[-1], criterion.name, tag)
    return _simple(criterion, last.type, parts[-1], None, base_url, tag)


def _simple(
    criterion: Criterion, kind: str, raw: str, modifier: str | None, base_url: str, tag: str = ""
) -> Clause:
    name = criterion.name
    if kind == "string":
        return _string(raw, modifier, tag)
    if kind == "token":
        return _token(raw, modifier, tag)
    if kind == "reference":
        return _reference(criterion, raw, base_url, tag)
    if kind == "uri":
        return _uri(raw, modifier, tag)
    if kind == "number":
        return _number(raw, name, tag + keys.NUMBER)
    if kind == "quantity":
        return _quantity(raw, name, tag)
    if kind == "date":
        return _date(raw, name)
    raise BadRequest(f"Parameter '{name}' of type {kind} cannot be searched", expression=name)


# -- criteria → filter -------------------------------------------------------------------------


def _after(moment: datetime) -> datetime | None:
    try:
        return moment + ONE_MS
    except OverflowError:
        return None


def _special(criterion: Criterion) -> tuple[str, dict[str, Any]] | None:
    """`_id` and `_lastUpdated` live in the document itself, not in the index arrays."""
    code = criterion.code
    if code == "_id":
        if criterion.modifier == "missing":
            return "_id", {"$exists": criterion.values[0] == "false"}
        ids = [unescape(v) for v in criterion.values]
        return "_id", {"$nin" if criterion.modifier == "not" else "$in": ids}
    if code == "_lastUpdated":
        if criterion.modifier == "missing":
            return "ts", {"$exists": criterion.values[0] == "false"}
        if len(criterion.values) != 1:
            raise BadRequest("_lastUpdated takes one value per parameter (repeat it to combine)")
        prefix, text = _prefix(unescape(criterion.values[0]))
        low, high = date_range(text, "_lastUpdated")
        after = _after(high)
        within = {"$gte": low, **({"$lt": after} if after else {})}
        ranges = {
            "eq": within, "ap": within, "ne": {"$not": within},
            "gt": {"$gte": after} if after else {"$exists": False}, "ge": {"$gte": low},
            "lt": {"$lt": low}, "eb": {"$lt": low}, "le": {"$lt": after} if after else {"$exists": True},
        }
        ranges["sa"] = ranges["gt"]
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

    On an index array, element conditions (`$in`, `$elemMatch`) of several criteria join in one
    `$all`; other operators join when they differ, else go to `extra` (a `$and`).
    """
    current = filter_.get(field)
    if current is None:
        filter_[field] = clause
        return
    if not field.startswith("p."):  # `_id`, `ts`: single values
        if set(current) & set(clause):
            extra.append({field: clause})
        else:
            filter_[field] = {**current, **clause}
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


def _one_of(clauses: list[Clause], embedded: bool) -> dict[str, Any] | None:
    """Several values of one parameter (OR) as one clause on its field, when they can be."""
    if not embedded and all(c.element is not None for c in clauses):
        return {"$elemMatch": {"$or": [c.element for c in clauses]}}
    return None


def to_filter(
    criteria: list[Criterion],
    base_url: str = "",
    compartment: list[str] | None = None,
    *,
    embedded: bool = False,
) -> dict[str, Any]:
    """A filter on current, not deleted resources matching every criterion.

    Criteria must be resolved (no chains, no `_has`) by the search service first.
    `compartment`: index keys of which a resource must have one (`patient=Patient/1`, …); the
    most selective criterion there is, so it always drives the index. `embedded`: the embedded
    database's dialect (plain ranges on the index array, no `$or` inside `$elemMatch`).
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
        if all(c.exact is None and not c.any_of for c in clauses):  # equalities: one `$in`, exact on the index too
            found = [k for c in clauses for k in c.keys]
            _merge(exact, extra, field, {"$in": found})
            rank = min(c.rank for c in clauses) + (6 if code in FEW_VALUES else 0)
            candidates.append((rank, INDEX_FIELD, {"$in": [code + k for k in found]}))
            continue
        if len(clauses) == 1 and clauses[0].any_of:
            extra.append({"$or": [{field: c} for c in clauses[0].any_of]})
            continue
        if len(clauses) == 1:
            only = clauses[0]
            assert only.exact is not None
            _merge(exact, extra, field + only.field, only.exact)
            if only.index:
                low, high = code + only.index[0], code + only.index[1]
                bounds = {"$gte": low, "$lt": high}
                candidates.append((only.rank, INDEX_FIELD, bounds if embedded else {"$elemMatch": bounds}))
            continue
        combined = _one_of(clauses, embedded)
        if combined is not None:
            _merge(exact, extra, field, combined)
        else:
            extra.append({"$or": [
                alternative
                for c in clauses
                for alternative in (
                    [{field: a} for a in c.any_of] if c.any_of
                    else [{field + c.field: c.exact if c.exact is not None else {"$in": list(c.keys)}}]
                )
            ]})
    out: dict[str, Any] = {}
    if compartment is not None:
        candidates = [(-1, INDEX_FIELD, {"$in": compartment})]
    if candidates:
        _, field, clause = min(candidates, key=lambda c: c[0])
        out[field] = clause
    if not any(f.startswith("p.") and not set(c) & {"$exists", "$not", "$nin"} for f, c in exact.items()):
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


def export_filter(*, ids: list[str] | None = None, changed_from: datetime | None = None) -> dict[str, Any]:
    """Current documents in any state for a bulk export, by id or changed at or after a moment:
    the export itself decides on deleted ones and on those changed after its transaction time."""
    query: dict[str, Any] = {}
    if ids is not None:
        query["_id"] = {"$in": ids}
    if changed_from is not None:
        query["ts"] = {"$gte": changed_from}
    return query


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
