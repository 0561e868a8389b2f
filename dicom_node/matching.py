"""C-FIND matching (DICOM PS3.4 C.2.2.2) on the catalog's DICOM JSON, and response identifiers.

Pure: no I/O. A query identifier becomes `Key`s: each requested attribute, with a `Condition`
when it has a value (a matching key) or none (a return key only). Conditions are evaluated on a
"view": the DICOM JSON (PS3.18 F.2, keyed by tag) of one entity with what the catalog computes
for it (counts, modalities in study...).

Matching rules: single value (case-sensitive, but PN case-insensitive as Orthanc and DCMTK's
dcmqrdb do), list of UIDs, wildcards `*` and `?` (on the VRs PS3.4 allows them on), date, time
and datetime ranges (`a-b`, `-b`, `a-`, a single value of reduced precision being its whole
span), universal matching (empty value, or a lone `*`), multiple values (any of them), sequence
matching (an item matches when all its keys do). Spaces around values and trailing `^` of
person names are insignificant.
"""

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from mappings.dicom import INSTANCE_ATTRIBUTES, PATIENT_ATTRIBUTES, SERIES_ATTRIBUTES, STUDY_ATTRIBUTES

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}
# What the catalog computes per level rather than reads from headers.
COMPUTED = {
    "PATIENT": ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"),
    "STUDY": ("ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
    "IMAGE": ("RetrieveAETitle", "InstanceAvailability"),
}
_ATTRIBUTES = {"PATIENT": PATIENT_ATTRIBUTES, "STUDY": STUDY_ATTRIBUTES, "SERIES": SERIES_ATTRIBUTES,
               "IMAGE": INSTANCE_ATTRIBUTES}
LEVEL_OF: dict[int, str] = {
    tag_for_keyword(keyword): level  # type: ignore[misc]
    for level in LEVELS
    for keyword in (*_ATTRIBUTES[level], *COMPUTED[level])
}
# RetrieveAETitle and InstanceAvailability belong to every level (PS3.4 C.4.1.1.3.2).
ANY_LEVEL = {tag_for_keyword("RetrieveAETitle"), tag_for_keyword("InstanceAvailability")}
# Not keys: what the identifier says about itself.
NOT_KEYS = {tag_for_keyword(k) for k in ("QueryRetrieveLevel", "SpecificCharacterSet")}
# The zone of the identifier's dates and times (PS3.4 C.4.1.1.3.2), not a value to match: the
# node does not shift queries between zones, but returns each study's offset (QIDO-RS requires it).
RETURNED_ONLY = {tag_for_keyword("TimezoneOffsetFromUTC")}

WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
NUMERIC_VRS = {"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
TEMPORAL_VRS = {"DA", "TM", "DT"}
_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_DATETIME = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?(?:[+-]\d{4})?")
_DT_WITH_OFFSET = re.compile(r"\d{10,14}(?:\.\d{1,6})?-\d{4}")


def tag_hex(tag: int) -> str:
    return f"{tag:08X}"


def level_index(level: str) -> int:
    return LEVELS.index(level)


# --- normalised values -----------------------------------------------------------------------------


def pn_groups(name: str) -> list[str]:
    """A person name's component groups (alphabetic, ideographic, phonetic), each without its
    trailing empty components, lower-cased: what PN matching compares."""
    groups = []
    for group in name.split("="):
        components = [part.strip() for part in group.split("^")]
        while components and not components[-1]:
            components.pop()
        groups.append("^".join(components).lower())
    while groups and not groups[-1]:
        groups.pop()
    return groups


def pn_text(value: Any) -> str:
    """A PN value of DICOM JSON ({"Alphabetic": …}) or a query (PersonName, str) as `a=i=p`."""
    if isinstance(value, dict):
        text = "=".join(value.get(part, "") for part in ("Alphabetic", "Ideographic", "Phonetic"))
    else:
        text = str(value)
    return text.rstrip("=")


def pn_index(values: Iterable[str]) -> list[str]:
    """The catalog's `pn` field: every group of every name, and each name component, lower-cased,
    so that both a name's start and any of its parts is found by a range on one index."""
    found: set[str] = set()
    for value in values:
        for group in pn_groups(value):
            if group:
                found.add(group)
                found.update(part for part in re.split(r"[\^\s]+", group) if part)
    return sorted(found)


def _time_bounds(text: str, vr: str) -> tuple[str, str]:
    """The earliest and latest instant a DA, TM or DT value stands for, as comparable strings
    (`1010` is 10:10:00.000000 to 10:10:59.999999). ValueError for a malformed value."""
    text = text.strip()
    if vr == "DA":
        text = text.replace(".", "") if len(text) == 10 else text  # ACR-NEMA YYYY.MM.DD
        if not _DATE.fullmatch(text):
            raise ValueError(f"'{text}' is not a DICOM date (YYYYMMDD)")
        return text, text
    pattern = _TIME if vr == "TM" else _DATETIME
    match = pattern.fullmatch(text.replace(":", "") if vr == "TM" else text)
    if not match:
        raise ValueError(f"'{text}' is not a DICOM {'time' if vr == 'TM' else 'datetime'}")
    parts = list(match.groups())
    lows = ["00", "00", "00", "000000"] if vr == "TM" else ["0000", "01", "01", "00", "00", "00", "000000"]
    highs = ["23", "59", "59", "999999"] if vr == "TM" else ["9999", "12", "31", "23", "59", "59", "999999"]
    low = "".join((p.ljust(len(d), "0") if p is not None else d) for p, d in zip(parts, lows, strict=True))
    high = "".join((p.ljust(len(d), "9") if i == len(parts) - 1 and p is not None else p if p is not None else d)
                   for i, (p, d) in enumerate(zip(parts, highs, strict=True)))
    return low, high


def _stored(element: dict[str, Any] | None) -> list[Any]:
    """The values of a DICOM JSON element, empty ones left out; PN as `a=i=p` text."""
    if not element:
        return []
    values = [v for v in element.get("Value") or [] if v is not None and v != ""]
    if element.get("vr") == "PN":
        return [text for text in map(pn_text, values) if text]
    return values


# --- conditions ------------------------------------------------------------------------------------


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)


@dataclass(frozen=True)
class Condition:
    """One matching key's values (already split: a UID list, several values) and how to compare."""

    vr: str
    values: tuple[str, ...]
    fuzzy: bool = False
    ranges: tuple[tuple[str | None, str | None], ...] = ()
    patterns: tuple[re.Pattern[str] | None, ...] = ()

    @classmethod
    def of(cls, vr: str, values: list[str], fuzzy: bool = False) -> "Condition":
        """ValueError for a value its VR cannot be matched with."""
        values = [v.strip() for v in values]
        if vr in TEMPORAL_VRS:
            return cls(vr, tuple(values), ranges=tuple(_range(v, vr) for v in values))
        if vr in NUMERIC_VRS:
            for value in values:
                _number(value)
            return cls(vr, tuple(values))
        if vr == "PN":
            values = ["=".join(pn_groups(v)) for v in values]
        patterns = tuple(_wildcard(v) if vr in WILDCARD_VRS and ("*" in v or "?" in v) else None for v in values)
        return cls(vr, tuple(values), fuzzy=fuzzy and vr == "PN", patterns=patterns)

    def matches(self, element: dict[str, Any] | None) -> bool:
        stored = _stored(element)
        if self.vr in TEMPORAL_VRS:
            return any(self._in_range(value) for value in stored)
        if self.vr in NUMERIC_VRS:
            wanted = {_number(v) for v in self.values}
            return any(_safe_number(value) in wanted for value in stored)
        if self.vr == "PN":
            return any(self._name(str(value)) for value in stored)
        texts = [str(value).strip() for value in stored]
        return any(self._text(text, i) for text in texts for i in range(len(self.values)))

    def _text(self, text: str, index: int) -> bool:
        pattern = self.patterns[index]
        return pattern.fullmatch(text) is not None if pattern is not None else text == self.values[index]

    def _name(self, name: str) -> bool:
        groups = pn_groups(name)
        if self.fuzzy:
            parts = [p for g in groups for p in re.split(r"[\^\s]+", g) if p]
            return any(all(any(part.startswith(word) for part in parts) for word in _words(value))
                       for value in self.values)
        candidates = ["=".join(groups), *groups]
        for index, value in enumerate(self.values):
            choices = candidates if "=" not in value else candidates[:1]
            if any(self._text(candidate, index) for candidate in choices):
                return True
        return False

    def _in_range(self, value: Any) -> bool:
        try:
            low, high = _time_bounds(str(value), self.vr)
        except ValueError:
            return False  # a malformed stored value matches nothing but universal matching
        return any((start is None or high >= start) and (end is None or low <= end) for start, end in self.ranges)

    def literal_prefix(self) -> str | None:
        """What every match starts with (PN, lower-cased), for an index range; None if nothing."""
        if len(self.values) != 1:
            return None
        value = self.values[0]
        prefix = re.split(r"[*?=]", value, maxsplit=1)[0]  # `pn` holds each component group alone
        if self.fuzzy:
            words = _words(value)
            return words[0] if words else None
        return prefix or None

    def regex(self) -> str | None:
        """For one wildcard value, a regular expression (case-insensitive for PN) that the
        stored text of every match satisfies: its literal pieces in order, spaces allowed around
        PN separators. A superset for the database to narrow with; `matches` decides. None when
        it would not narrow."""
        if self.fuzzy or len(self.values) != 1 or not self.patterns or self.patterns[0] is None:
            return None
        pieces = [re.escape(piece) for piece in re.split(r"[*?]+", self.values[0]) if piece]
        if self.vr == "PN":
            pieces = [re.sub(r"\\\^|=", lambda m: rf"\s*{m.group(0)}\s*", piece) for piece in pieces]
        return ".*".join(pieces) or None

    def exact(self) -> list[str] | None:
        """The values when they are all plain (no wildcard), for an index equality."""
        if self.fuzzy or any(p is not None for p in self.patterns) or self.vr in TEMPORAL_VRS | NUMERIC_VRS:
            return None
        return list(self.values)


def _words(value: str) -> list[str]:
    return [w for w in re.split(r"[\^\s=*?,]+", value) if w]


def _range(value: str, vr: str) -> tuple[str | None, str | None]:
    """A temporal matching value as (start, end); None is open. A DT's `-` may also start a
    zone offset: `20240105120000-0500` is one value, `2024-2025` a range."""
    if "-" in value and not (vr == "DT" and _DT_WITH_OFFSET.fullmatch(value)):
        for index in (i for i, c in enumerate(value) if c == "-"):
            start, end = value[:index], value[index + 1:]
            if (start or end) and all(not side or _valid(side, vr) for side in (start, end)):
                return (_time_bounds(start, vr)[0] if start else None, _time_bounds(end, vr)[1] if end else None)
        raise ValueError(f"'{value}' is not a {vr} range")
    return _time_bounds(value, vr)


def _valid(text: str, vr: str) -> bool:
    try:
        _time_bounds(text, vr)
    except ValueError:
        return False
    return True


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number") from None


def _safe_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- keys ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One attribute of the identifier: a return key, and a matching key when `condition` is set
    (or, for a sequence, when one of its item's keys is)."""

    tag: int
    vr: str
    level: str | None  # the level the catalog keeps it at; None: not kept (returned empty)
    condition: Condition | None = None
    items: tuple["Key", ...] | None = None  # a sequence's item keys; None: the whole sequence
    keyword: str = field(default="", compare=False)

    @functools.cached_property
    def hex(self) -> str:
        """The tag as DICOM JSON names it (read some 20 times a match: made once)."""
        return tag_hex(self.tag)

    @property
    def matching(self) -> bool:
        return self.condition is not None or any(k.matching for k in self.items or ())

    def matches(self, view: dict[str, Any]) -> bool:
        element = view.get(self.hex)
        if self.items is not None and any(k.matching for k in self.items):
            items = (element or {}).get("Value") or []
            return any(all(k.matches(item) for k in self.items if k.matching) for item in items)
        return self.condition is None or self.condition.matches(element)


def parse_keys(query: Dataset, fuzzy: bool = False, nested: bool = False) -> list[Key]:
    """The keys of a query identifier (or of a sequence key's item, `nested`). ValueError for
    what cannot be a query: an undecodable value, a malformed date, a sequence key with several
    items. A top-level attribute the catalog does not keep is a return key only (an optional
    key the SCP does not support: never matched, returned empty)."""
    keys = []
    for tag in query.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        if tag.element == 0 or tag.group == 0x0002 or (not nested and tag in NOT_KEYS):
            continue
        try:
            element = query[tag]
        except Exception as exc:  # noqa: BLE001 - pydicom's own errors for undecodable values
            raise ValueError(f"({tag.group:04X},{tag.element:04X}) cannot be decoded: {exc}") from exc
        keys.append(_key(element, fuzzy, nested))
    return keys


def _key(element: DataElement, fuzzy: bool, nested: bool) -> Key:
    tag, vr = int(element.tag), _vr(element)
    level = LEVEL_OF.get(tag)
    name = keyword_for_tag(tag) or f"({element.tag.group:04X},{element.tag.element:04X})"
    if element.tag.is_private or (level is None and not nested):
        return Key(tag, vr, None, keyword=name)
    if tag in RETURNED_ONLY and not nested:
        return Key(tag, vr, level, keyword=name)
    if vr == "SQ":
        items = list(element.value or [])
        if len(items) > 1:
            raise ValueError(f"{name}: a sequence matching key holds one item")
        sub = tuple(parse_keys(items[0], fuzzy, nested=True)) if items and len(items[0]) else None
        return Key(tag, vr, level, items=sub, keyword=name)
    values = _query_values(element)
    if not values or values == ["*"]:
        return Key(tag, vr, level, keyword=name)  # universal matching
    try:
        condition = Condition.of(vr, values, fuzzy)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return Key(tag, vr, level, condition, keyword=name)


def _vr(element: DataElement) -> str:
    vr = str(element.VR)
    if " or " in vr:  # ambiguous in the dictionary (US or SS...): its first reading
        vr = vr.split(" or ")[0]
    return vr


def _query_values(element: DataElement) -> list[str]:
    value = element.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, bytes):
        raise ValueError(f"{keyword_for_tag(element.tag) or element.tag}: a binary value cannot be matched")
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    texts = [pn_text(v) if isinstance(v, PersonName) else str(v) for v in values]
    return [t for t in texts if t.strip()]


# --- responses -------------------------------------------------------------------------------------


def response_json(view: dict[str, Any], keys: list[Key]) -> dict[str, Any]:
    """The requested attributes of one match as DICOM JSON: its values, or empty ones."""
    found: dict[str, Any] = {}
    for key in keys:
        element = view.get(key.hex)
        if key.vr == "SQ" and element and key.items is not None:
            element = {"vr": "SQ", "Value": [response_json(item, list(key.items)) for item in element.get("Value") or []]}
        elif key.vr == "SQ" and not (element or {}).get("Value"):
            element = {"vr": "SQ", "Value": []}  # a sequence without items, as pydicom writes it
        found[key.hex] = element if element else {"vr": key.vr}
    return found


@functools.cache
def _keyword_vr(keyword: str) -> str:
    return dictionary_VR(keyword)  # pydicom's look-up is most of a match's view when not cached


def element_json(keyword: str, values: list[Any]) -> dict[str, Any]:
    """A DICOM JSON element of `keyword` holding `values` (empty when there are none)."""
    vr = _keyword_vr(keyword)
    return {"vr": vr, "Value": values} if values else {"vr": vr}
