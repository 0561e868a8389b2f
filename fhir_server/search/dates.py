"""FHIR date, dateTime and instant values as the inclusive instant range their precision implies."""

import re
from calendar import monthrange
from datetime import UTC, datetime, timedelta

from dateutil.parser import isoparse

from fhir_server.errors import BadRequest

_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_MS = timedelta(milliseconds=1)


def date_range(value: str, name: str = "date") -> tuple[datetime, datetime]:
    """`2024` → the whole year; `2024-03-05T10:00+01:00` → that minute; always UTC, ms precision."""
    value = value.strip().replace(" ", "+")  # an unescaped "+" in a query string arrives as a space
    try:
        match = _DATE.fullmatch(value)
        if match and int(match.group(1)) < 1:
            raise ValueError("year 0")
        if match:
            year, month, day = (int(g) if g else None for g in match.groups())
            assert year is not None
            if month is None:
                low, high = datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
            elif day is None:
                low = datetime(year, month, 1, tzinfo=UTC)
                high = low + timedelta(days=monthrange(year, month)[1])
            else:
                low = datetime(year, month, day, tzinfo=UTC)
                high = low + timedelta(days=1)
            return low, high - _MS
        parsed = isoparse(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError, AssertionError) as exc:
        raise BadRequest(f"Invalid date '{value}' for {name}", expression=name) from exc
    time_part = value.split("T", 1)[1] if "T" in value else ""
    digits = re.match(r"[\d:.]*", time_part)
    clock = digits.group(0) if digits else ""
    if "." in clock:
        step = timedelta(milliseconds=1)
    elif clock.count(":") >= 2:
        step = timedelta(seconds=1)
    elif clock.count(":") == 1:
        step = timedelta(minutes=1)
    else:
        step = timedelta(hours=1)
    low = parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)
    try:
        return low, low + step - _MS
    except OverflowError as exc:
        raise BadRequest(f"Date '{value}' for {name} is out of range", expression=name) from exc
