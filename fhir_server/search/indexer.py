"""Search index values, extracted from a resource when it is written.

Each parameter's values become keys (see `keys`), stored with the current version as:

- `ix`: one flat array of `code + key` strings under one multikey index, which serves the most
  selective criterion of any search (equality, prefix or range on strings);
- `p`: the same keys by parameter (`p.birthdate`), which the other criteria of a search match;
- `sa` / `sd`: per parameter, the least and the greatest key, for ascending and descending `_sort`.

One index of flat strings is also the shape the embedded database plans well.
"""

from datetime import datetime
from typing import Any

from fhir_server.errors import FhirError
from fhir_server.search import keys
from fhir_server.search.dates import date_range
from fhir_server.search.paths import Found
from fhir_server.search.registry import SearchParam, indexed_parameters

NAME_PARTS = ("text", "family", "given", "prefix", "suffix")
ADDRESS_PARTS = ("text", "line", "city", "district", "state", "postalCode", "country")


def _strings(value: Any) -> list[str]:
    """The searchable strings of a string, HumanName or Address."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, dict):
        return []
    out: list[str] = []
    for part in NAME_PARTS + ADDRESS_PARTS:
        item = value.get(part)
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            out.extend(v for v in item if isinstance(v, str))
    return out


def string_keys(found: list[Found]) -> list[str]:
    out = []
    for value, _ in found:
        for text in _strings(value):
            out.append(keys.EQ + keys.normalise(text))
            out.append(keys.EXACT + text[: keys.MAX_STRING])
    return out


def _code_forms(system: Any, code: Any) -> list[str]:
    has_system = isinstance(system, str) and bool(system)
    system = keys.token_part(system) if has_system else ""
    if not isinstance(code, str) or not code:
        return [keys.EQ + system + "|"] if has_system else []
    code = keys.token_part(code)
    if has_system:
        return [keys.EQ + code, f"{keys.EQ}{system}|{code}", f"{keys.EQ}{system}|"]
    return [keys.EQ + code, f"{keys.EQ}|{code}"]


def _text(value: Any) -> list[str]:
    return [keys.TEXT + keys.normalise(value)] if isinstance(value, str) and value.strip() else []


def _coding(coding: Any) -> list[str]:
    if not isinstance(coding, dict):
        return []
    return _code_forms(coding.get("system"), coding.get("code")) + _text(coding.get("display"))


def token_keys(found: list[Found]) -> list[str]:
    out: list[str] = []
    for value, _ in found:
        if isinstance(value, bool):
            out.append(keys.EQ + ("true" if value else "false"))
        elif isinstance(value, str):
            out.extend(_code_forms(None, value))
        elif isinstance(value, dict):
            if "coding" in value or ("text" in value and "value" not in value and "code" not in value):
                for coding in value.get("coding") or []:
                    out.extend(_coding(coding))
                out.extend(_text(value.get("text")))
            elif "value" in value:  # Identifier, ContactPoint
                out.extend(_code_forms(value.get("system"), value.get("value")))
                kind = value.get("type")
                if isinstance(kind, dict) and isinstance(value.get("value"), str):
                    for coding in kind.get("coding") or []:
                        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                            parts = (coding.get("system") or "", coding["code"], value["value"])
                            out.append(keys.OF_TYPE + "|".join(keys.token_part(p) for p in parts))
                    out.extend(_text(kind.get("text")))
            else:  # Coding
                out.extend(_coding(value))
    return out


def date_bounds(value: Any, hint: str | None) -> list[tuple[str, str]]:
    """Inclusive [low, high] keys of a date, dateTime, instant, Period or Timing."""
    try:
        if isinstance(value, str):
            if hint in ("string", "String", "Age", "Range"):
                return []
            low, high = date_range(value)
            return [(keys.instant_key(low), keys.instant_key(high))]
        if not isinstance(value, dict):
            return []
        if "start" in value or "end" in value:  # Period
            low = date_range(value["start"])[0] if "start" in value else None
            high = date_range(value["end"])[1] if "end" in value else None
            return [(
                keys.instant_key(low) if low else keys.MIN_INSTANT,
                keys.instant_key(high) if high else keys.MAX_INSTANT,
            )]
        if "event" in value or "repeat" in value:  # Timing
            out = [b for event in value.get("event", []) for b in date_bounds(event, None)]
            bounds = (value.get("repeat") or {}).get("boundsPeriod")
            return out + (date_bounds(bounds, "Period") if bounds else [])
    except (FhirError, KeyError, TypeError):
        return []
    return []


def date_keys(found: list[Found]) -> list[str]:
    """Low and high keys, as a date inside a composite is stored."""
    out = []
    for value, hint in found:
        for low, high in date_bounds(value, hint):
            out.extend((keys.LOW + low, keys.HIGH + high))
    return out


def date_pairs(found: list[Found]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(pair for value, hint in found for pair in date_bounds(value, hint)))


def number_keys(found: list[Found]) -> list[str]:
    out = []
    for value, _ in found:
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool) or hasattr(value, "is_finite"):
                out.append(keys.NUMBER + keys.number_key(value))
        except ValueError:
            continue
    return out


def quantity_keys(found: list[Found]) -> list[str]:
    out = []
    for value, hint in found:
        if not isinstance(value, dict) or hint == "Range" or "value" not in value:
            continue
        try:
            number = keys.number_key(value["value"])
        except (ValueError, TypeError):
            continue
        out.append(keys.NUMBER + number)
        system, code, unit = value.get("system"), value.get("code") or value.get("currency"), value.get("unit")
        if isinstance(system, str) and isinstance(code, str):
            out.append(f"{keys.SYSTEM_UNIT}{system}|{code}|{number}")
        for name in {code, unit} - {None}:
            if isinstance(name, str):
                out.append(f"{keys.UNIT}{name}|{number}")
    return out


def reference_value(ref: str, base_url: str = "") -> str:
    """`Patient/1/_history/2` → `Patient/1`; canonical `url|version` → `url`; an absolute URL
    of this server (`base_url/Patient/1`) → `Patient/1`."""
    if base_url and ref.startswith(base_url.rstrip("/") + "/"):
        ref = ref[len(base_url.rstrip("/")) + 1:]
    return ref.split("/_history/")[0].split("|")[0]


def reference_keys(found: list[Found], base_url: str = "") -> list[str]:
    out = []
    for value, _ in found:
        if isinstance(value, str):  # canonical, uri
            out.append(keys.EQ + value)
            if "|" in value:
                out.append(keys.EQ + reference_value(value))
        elif isinstance(value, dict):
            ref = value.get("reference")
            if isinstance(ref, str) and not ref.startswith("#"):
                out.append(keys.EQ + reference_value(ref, base_url))
            ident = value.get("identifier")
            if isinstance(ident, dict):
                out.extend(keys.OF_TYPE + k[1:] for k in _code_forms(ident.get("system"), ident.get("value")))
    return out


def uri_keys(found: list[Found]) -> list[str]:
    return [keys.EQ + v for v, _ in found if isinstance(v, str)]


EXTRACTORS = {
    "string": string_keys,
    "token": token_keys,
    "date": date_keys,
    "number": number_keys,
    "quantity": quantity_keys,
    "reference": reference_keys,
    "uri": uri_keys,
}


def composite_keys(param: SearchParam, resource: dict[str, Any]) -> list[str]:
    """`code$value` pairs taken from the same element: `=http://loinc.org|8480-6$%2…`."""
    out: list[str] = []
    for path in param.paths:
        for element, _ in path(resource):
            if not isinstance(element, dict):
                continue
            combined = [keys.EQ]
            for i, component in enumerate(param.components):
                extract = EXTRACTORS.get(component.type)
                if extract is None:
                    combined = []
                    break
                found = extract(component.path(element))
                if i < len(param.components) - 1:  # inner components join by their equality forms
                    found = [k[1:] for k in found if k.startswith(keys.EQ) and not k.endswith("|")]
                    combined = [f"{c}{k}$" for c in combined for k in found]
                else:
                    combined = [c + k for c in combined for k in found]
            out.extend(combined)
    return out


def _found(param: SearchParam, resource: dict[str, Any]) -> list[Found]:
    return [found for path in param.paths for found in path(resource)]


def param_keys(param: SearchParam, resource: dict[str, Any], base_url: str = "") -> list[str]:
    if param.type == "composite":
        return composite_keys(param, resource)
    if param.type == "reference":
        return reference_keys(_found(param, resource), base_url)
    extract = EXTRACTORS.get(param.type)
    return extract(_found(param, resource)) if extract else []


def _sort_range(param: SearchParam, values: list[str]) -> tuple[str, str] | None:
    tag = keys.NUMBER if param.type in ("number", "quantity") else keys.EQ
    chosen = [v[1:] for v in values if v[0] == tag and (param.type != "token" or "|" not in v)]
    return (min(chosen), max(chosen)) if chosen else None


def index_document(resource: dict[str, Any], last_updated: datetime, base_url: str = "") -> dict[str, Any]:
    """The `ix`, `p`, `sa` and `sd` fields of a stored resource. A date parameter's `p` values
    are `{l, h}` pairs (its range per value); `base_url`: this server's public base, whose
    absolute references are indexed as local ones."""
    flat: list[str] = []
    by_param: dict[str, list[Any]] = {}
    ascending: dict[str, str] = {}
    descending: dict[str, str] = {}
    for param in indexed_parameters(resource["resourceType"]):
        if param.type == "date":
            pairs = date_pairs(_found(param, resource))
            if pairs:
                by_param[param.code] = [{"l": low, "h": high} for low, high in pairs]
                # `ge` holds for some value iff it holds for [greatest low, greatest high], `le`
                # iff for [least low, least high]: one pair each answers them exactly.
                by_param[f"{param.code}:ge"] = [{"l": max(p[0] for p in pairs), "h": max(p[1] for p in pairs)}]
                by_param[f"{param.code}:le"] = [{"l": min(p[0] for p in pairs), "h": min(p[1] for p in pairs)}]
                flat.extend(f"{param.code}{keys.LOW}{low}" for low, _ in pairs)
                flat.extend(f"{param.code}{keys.HIGH}{high}" for _, high in pairs)
                ascending[param.code] = min(low for low, _ in pairs)
                descending[param.code] = max(high for _, high in pairs)
            continue
        values = list(dict.fromkeys(param_keys(param, resource, base_url)))
        if not values:
            continue
        by_param[param.code] = values
        flat.extend(param.code + v for v in values)
        if param.sortable:
            bounds = _sort_range(param, values)
            if bounds:
                ascending[param.code], descending[param.code] = bounds
    moment = keys.instant_key(last_updated)
    ascending["_lastUpdated"] = descending["_lastUpdated"] = moment
    return {"ix": flat, "p": by_param, "sa": ascending, "sd": descending}


def references(param: SearchParam, resource: dict[str, Any], base_url: str = "") -> list[str]:
    """Relative references (`Type/id`) a reference parameter finds in a resource: for `_include`."""
    return [k[1:] for k in reference_keys(_found(param, resource), base_url) if k[0] == keys.EQ]
