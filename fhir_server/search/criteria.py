"""Parse search criteria from a query string into plain data.

Only `_id` and `identifier` exist so far; they serve conditional create, update and delete and
the type-level search. Criteria a conditional interaction cannot honour are refused, never
ignored: ignoring one would widen a conditional update or delete.
"""

from dataclasses import dataclass
from urllib.parse import parse_qsl

from fhir_server.errors import BadRequest

SUPPORTED_PARAMETERS = ("_id", "identifier")
# Result-shaping parameters: not criteria.
CONTROL_PARAMETERS = frozenset(
    {"_count", "_format", "_pretty", "_summary", "_elements", "_sort", "_total", "_offset"}
)


@dataclass(frozen=True)
class Criterion:
    """One parameter occurrence: its values are OR-ed; several criteria are AND-ed."""

    name: str
    values: tuple[str, ...]


def parse_criteria(pairs: list[tuple[str, str]], *, strict: bool = True) -> list[Criterion]:
    """Turn `(name, value)` pairs into criteria; unknown parameters raise when `strict`."""
    criteria = []
    for name, raw in pairs:
        if name in CONTROL_PARAMETERS:
            continue
        if name not in SUPPORTED_PARAMETERS:
            if strict:
                raise BadRequest(
                    f"Unsupported search parameter '{name}' (supported: {', '.join(SUPPORTED_PARAMETERS)})",
                    expression=name,
                )
            continue
        values = tuple(v for v in (_unescape(part) for part in _split_commas(raw)) if v)
        if not values:
            raise BadRequest(f"Search parameter '{name}' has no value", expression=name)
        criteria.append(Criterion(name, values))
    return criteria


def parse_query_string(query: str) -> list[Criterion]:
    """Criteria of a conditional URL or an If-None-Exist header (`identifier=a|b&_id=x`)."""
    query = query.split("?", 1)[1] if "?" in query else query
    criteria = parse_criteria(parse_qsl(query, keep_blank_values=True))
    if not criteria:
        raise BadRequest("Conditional interaction without search criteria")
    return criteria


def lock_key(resource_type: str, criteria: list[Criterion]) -> str:
    """What concurrent conditional requests that could match the same resource have in common.

    Keyed on the identifier values without their systems (so `identifier=123` and
    `identifier=urn:mrn|123` take the same lock), else on the ids, else on all criteria.
    """
    for name in ("identifier", "_id"):
        for criterion in criteria:
            if criterion.name == name:
                values = sorted({v.rsplit("|", 1)[-1] or v for v in criterion.values})
                return f"{resource_type}:{name}:{','.join(values)}"
    parts = sorted(f"{c.name}={','.join(sorted(c.values))}" for c in criteria)
    return f"{resource_type}?{'&'.join(parts)}"


def _split_commas(raw: str) -> list[str]:
    parts, current, escaped = [], "", False
    for char in raw:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current + ("\\" if escaped else ""))
    return parts


def _unescape(value: str) -> str:
    return value.replace("\\,", ",").replace("\\$", "$").replace("\\\\", "\\")
