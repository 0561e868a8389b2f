"""How FHIR data reads on a page: names, codes, dates, quantities, and the badge each status or
interpretation gets. Pure functions, used as template filters."""

from datetime import UTC, date, datetime
from typing import Any

# Observation.interpretation (v3 ObservationInterpretation) → badge style.
INTERPRETATION = {"N": "ok", "A": "warn", "AA": "bad", "H": "warn", "L": "warn", "HH": "bad", "LL": "bad",
                  "HU": "bad", "LU": "bad", "POS": "warn", "NEG": "ok"}
STATUS = {"booked": "info", "fulfilled": "ok", "cancelled": "muted", "noshow": "bad", "proposed": "info",
          "pending": "info", "arrived": "info", "checked-in": "info", "waitlist": "info",
          "entered-in-error": "muted", "final": "ok", "amended": "ok", "corrected": "ok", "preliminary": "warn",
          "registered": "warn", "cancelled-obs": "muted", "active": "ok", "completed": "ok", "finished": "ok",
          "in-progress": "info", "stopped": "muted", "on-hold": "warn", "available": "ok"}


def human_name(resource: dict[str, Any] | None) -> str:
    """A person's name as written (text, else given + family), else their id."""
    if not resource:
        return "—"
    for name in resource.get("name", []) or []:
        if name.get("text"):
            return str(name["text"])
        parts = [*name.get("given", []), name.get("family", "")]
        text = " ".join(p for p in parts if p)
        if text:
            return text
    if isinstance(resource.get("name"), str):  # Organization, Location
        return str(resource["name"])
    for item in resource.get("identifier", []) or []:  # e.g. the retinal system's patients have no name
        if item.get("value"):
            return f"No name ({item['value']})"
    return f"{resource.get('resourceType', '')}/{resource.get('id', '')}"


def concept(value: dict[str, Any] | list[Any] | None) -> str:
    """A CodeableConcept (or a list of them) as text: its text, else a coding's display, else the code."""
    if isinstance(value, list):
        return ", ".join(t for t in (concept(v) for v in value) if t)
    if not value:
        return ""
    if value.get("text"):
        return str(value["text"])
    for coding in value.get("coding", []) or []:
        if coding.get("display"):
            return str(coding["display"])
    codes = [c.get("code", "") for c in value.get("coding", []) or []]
    return ", ".join(c for c in codes if c)


def code(value: dict[str, Any] | None) -> str:
    """The first coding's code."""
    for coding in (value or {}).get("coding", []) or []:
        if coding.get("code"):
            return str(coding["code"])
    return ""


def when(value: str | None) -> str:
    """A FHIR date or dateTime, readably (to the minute, in UTC)."""
    if not value:
        return ""
    if len(value) <= 10:
        return value
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M") + (" UTC" if moment.tzinfo is not None else "")


def age(birth_date: str | None, today: date | None = None) -> int | None:
    if not birth_date:
        return None
    try:
        born = date.fromisoformat(birth_date[:10]) if len(birth_date) >= 10 else date(int(birth_date[:4]), 7, 1)
    except ValueError:
        return None
    today = today or date.today()
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def value(observation: dict[str, Any]) -> str:
    """An Observation's value (or its components'), as text with its unit."""
    if "valueQuantity" in observation:
        quantity = observation["valueQuantity"]
        number = quantity.get("value", "")
        return f"{number} {quantity.get('unit') or quantity.get('code') or ''}".strip()
    for kind in ("valueString", "valueInteger", "valueBoolean", "valueDateTime"):
        if kind in observation:
            return str(observation[kind])
    if "valueCodeableConcept" in observation:
        return concept(observation["valueCodeableConcept"])
    components = observation.get("component") or []
    if components:
        return "; ".join(f"{concept(c.get('code'))}: {value(c)}" for c in components)
    return ""


def numeric(observation: dict[str, Any]) -> float | None:
    number = observation.get("valueQuantity", {}).get("value")
    return float(number) if isinstance(number, int | float) else None


def interpretation_badge(observation: dict[str, Any]) -> tuple[str, str] | None:
    """(text, style) of the first interpretation, or None."""
    for item in observation.get("interpretation", []) or []:
        found = code(item)
        if found:
            return concept(item) or found, INTERPRETATION.get(found, "info")
    return None


def status_style(status: str | None) -> str:
    return STATUS.get(status or "", "info")


def reference_id(reference: dict[str, Any] | None) -> str:
    """The id of a literal reference `Type/id` (empty for anything else)."""
    text = (reference or {}).get("reference", "")
    parts = text.split("/")
    return parts[-1] if len(parts) >= 2 else ""


def effective(resource: dict[str, Any]) -> str:
    """When an Observation (or the like) happened."""
    return str(resource.get("effectiveDateTime") or resource.get("effectivePeriod", {}).get("start")
               or resource.get("issued") or resource.get("authoredOn") or resource.get("recordedDate") or "")


def size(number: int | float | None) -> str:
    if number is None:
        return ""
    for unit in ("B", "KiB", "MiB"):
        if number < 1024 or unit == "MiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return ""


FILTERS = {"name": human_name, "concept": concept, "code": code, "when": when, "age": age, "value": value,
           "badge": interpretation_badge, "status_style": status_style, "ref_id": reference_id,
           "effective": effective, "size": size}
