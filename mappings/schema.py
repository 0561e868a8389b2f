"""What the mappings of replaced systems (`interactions`, `assessment`, `ehr`) ask of every source record.

The rules, and why:

- Text is stripped and never blank, and holds no control characters: a blank CSV cell is no value,
  and FHIR strings may not carry control characters. Ids and answers may come as JSON numbers, and
  are then their text.
- A record is a set of known fields (`SourceRecord`): an unknown field is refused rather than lost,
  and a field that is None or blank (an empty CSV cell) is absent.
- A list or object may come as JSON text (a CSV cell holds no other structure); decimals keep their
  digits (37.20 stays 37.20, as FHIR decimals do).
- A date is YYYY-MM-DD. A time must carry its UTC offset (+hh:mm or Z): FHIR's dateTime needs one
  with a time, and a guessed time zone would move the instant by hours; without an offset, give
  the date alone. The offset must be one FHIR can hold: at most ±14:00, in whole minutes.

Pure: no I/O.
"""

import json
import re
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    StringConstraints,
    model_validator,
)

CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}.*")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
MAX_OFFSET = timedelta(hours=14)


def number_as_text(value: object) -> object:
    """Ids and answers may come as JSON numbers."""
    return str(value) if isinstance(value, int | float | Decimal) and not isinstance(value, bool) else value


def no_control_characters(value: str) -> str:
    if CONTROL.search(value):
        raise ValueError("contains control characters")
    return value


Text = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1),
    BeforeValidator(number_as_text),
    AfterValidator(no_control_characters),
]


def iso_date(text: str) -> date:
    """`text`, already of the form YYYY-MM-DD, as a date: a day that exists."""
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"'{text}' is not a date: {exc}") from None


def offset_checked(value: datetime, missing: str) -> datetime:
    """`value` if it has a UTC offset FHIR can hold; `missing` says what is wrong without one."""
    offset = value.utcoffset()
    if offset is None:
        raise ValueError(f"'{value.isoformat()}' {missing}")
    if abs(offset) > MAX_OFFSET or offset.seconds % 60:
        raise ValueError(
            f"'{value.isoformat()}' has a UTC offset FHIR cannot hold (at most ±14:00, whole minutes)"
        )
    return value


def when(value: object) -> date | datetime:
    """A date (YYYY-MM-DD), or a date and time with its UTC offset (FHIR's dateTime needs one)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if DATE.fullmatch(text):
                return date.fromisoformat(text)
            if not DATE_TIME.fullmatch(text):
                raise ValueError("expected YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+hh:mm")
            value = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"'{text[:40]}' is not a date or a date and time: {exc}") from None
    if isinstance(value, datetime):
        return offset_checked(
            value,
            "has a time but no UTC offset (+hh:mm or Z); give the date alone when the time zone is unknown",
        )
    if isinstance(value, date):
        return value
    raise ValueError("must be a date (YYYY-MM-DD) or a date and time with its UTC offset")


When = Annotated[date | datetime, PlainValidator(when)]


def json_text(value: object) -> object:
    """A list or object given as JSON text (a CSV cell)."""
    if isinstance(value, str):
        try:
            return json.loads(value, parse_float=Decimal)  # decimals keep their digits: 37.20
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON: {exc.msg} at character {exc.pos}") from None
    return value


def present(data: Mapping[Any, Any]) -> dict[Any, Any]:
    """`data` without the values that are None or blank text."""
    return {k: v for k, v in data.items() if v is not None and not (isinstance(v, str) and not v.strip())}


class SourceRecord(BaseModel):
    """A record as JSON or a CSV row gives it: unknown fields are refused, blank cells are absent."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _blank_is_absent(cls, data: Any) -> Any:
        return present(data) if isinstance(data, dict) else data


def check_kind(system: str, kinds: Mapping[str, type[BaseModel]], kind: str, record: BaseModel) -> None:
    """Refuses a record that is not a validated record of `kind`, one of `system`'s `kinds`."""
    if kind not in kinds or not isinstance(record, kinds[kind]):
        raise ValueError(f"Not a record of a kind of {system}: {kind!r} {type(record).__name__}")
