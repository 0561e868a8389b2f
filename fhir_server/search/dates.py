"""FHIR date, dateTime and instant values as the inclusive instant range their precision implies."""

import re
from calendar import isleap, monthrange
from datetime import UTC, datetime, timedelta

from dateutil.parser import isoparse

from fhir_server.errors import BadRequest

_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
ONE_MS = timedelta(milliseconds=1)


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
                low, span = datetime(year, 1, 1, tzinfo=UTC), timedelta(days=366 if isleap(year) else 365)
            elif day is None:
                low = datetime(year, month, 1, tzinfo=UTC)
                span = timedelta(days=monthrange(year, month)[1])
            else:
                low = datetime(year, month, day, tzinfo=UTC)
                span = timedelta(days=1)
            return low, _last_instant(low, span)
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
    return low, _last_instant(low, step)


def _last_instant(low: datetime, span: timedelta) -> datetime:
    """The last millisecond of `span` from `low`; the end of year 9999 at the latest."""
    try:
        return low + span - ONE_MS
    except OverflowError:
        return datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
