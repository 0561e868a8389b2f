"""FHIR JSON in and out, keeping decimals exactly as written.

FHIR decimals carry their precision (`1.50` is not `1.5`), so numbers with a fraction or an
exponent are read as `Decimal` (stored as BSON Decimal128) and written back verbatim; orjson
writes everything else.
"""

import json
from decimal import Decimal
from typing import Any

import orjson

INT64_DIGITS = 18  # any integer literal this long fits in a signed 64-bit BSON integer


def _integer(text: str) -> int | Decimal:
    # Longer literals stay exact as Decimal: BSON has no integer wider than 64 bits.
    return int(text) if len(text.lstrip("-")) <= INT64_DIGITS else Decimal(text)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: bytes) -> Any:
    """Parse a request body; raises ValueError for anything that is not strict JSON."""
    return json.loads(raw, parse_float=Decimal, parse_int=_integer, parse_constant=_no_constants)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value).encode())
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: Any, *, pretty: bool = False) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_INDENT_2 if pretty else 0)


def canonical(value: Any) -> bytes:
    """One spelling per content (keys sorted, decimals as written): equal bytes, equal content."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_SORT_KEYS)
