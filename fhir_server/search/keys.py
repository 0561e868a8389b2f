"""Index keys: every searchable value as a string whose order is the value's order.

Shared by the indexer (write) and `to_mongo` (query), so a value is encoded one way only.
A key is a tag character then the encoded value; in the flat index array it is prefixed with
the parameter code (`birthdate<1970-01-01T00:00:00.000`).
"""

import unicodedata
from datetime import datetime
from decimal import Decimal, InvalidOperation

# Tags: what a key holds.
EQ = "="  # token code forms, normalised string, reference, uri, composite
EXACT = "!"  # string as written
TEXT = "~"  # token display / text, normalised
OF_TYPE = "#"  # identifier type|value; reference identifier forms
LOW = "<"  # lower bound of a date range
HIGH = ">"  # upper bound of a date range
NUMBER = "%"  # number or quantity value
SYSTEM_UNIT = "^"  # quantity `system|code|` + number
UNIT = "&"  # quantity `code|` or `unit|` + number
MAX_STRING = 200  # longer strings are indexed by their first characters


def token_part(text: str) -> str:
    """A system, code or value inside a `system|code` key, its own `|` and `\\` escaped, so
    that value `a|b` and system `a` with value `b` give different keys."""
    return text.replace("\\", "\\\\").replace("|", "\\|")


def normalise(text: str) -> str:
    """Case- and accent-insensitive form: `Müller` → `muller`."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.casefold().split())[:MAX_STRING]


def instant_key(moment: datetime) -> str:
    """UTC, fixed width, millisecond precision: sorts as the instant does."""
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:"
        f"{moment.second:02d}.{moment.microsecond // 1000:03d}"
    )


MIN_INSTANT = "0001-01-01T00:00:00.000"
MAX_INSTANT = "9999-12-31T23:59:59.999"


def number_key(value: Decimal | int | float | str) -> str:
    """A decimal as a string that sorts numerically: sign, biased exponent, digits.

    `0` → `1`; positive → `2` + (exponent + 10000) + digits; negative → `0` + (10000 - exponent)
    + nines' complement of the digits + `~`, so that larger magnitudes sort first. Exponents stay
    within Decimal128's ±6144.
    """
    try:
        number = Decimal(value) if not isinstance(value, Decimal) else value
    except InvalidOperation as exc:
        raise ValueError(f"not a number: {value}") from exc
    if not number.is_finite():
        raise ValueError(f"not a finite number: {value}")
    if number.is_zero():
        return "1"
    sign, digits, _ = number.normalize().as_tuple()
    exponent = number.adjusted()
    text = "".join(str(d) for d in digits).rstrip("0") or "0"
    if not sign:
        return f"2{exponent + 10000:05d}{text}"
    complement = "".join(str(9 - int(d)) for d in text)
    return f"0{10000 - exponent:05d}{complement}~"


def successor(prefix: str) -> str:
    """The least string greater than every string starting with `prefix` (half-open bound)."""
    while prefix and ord(prefix[-1]) == 0x10FFFF:
        prefix = prefix[:-1]
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"
