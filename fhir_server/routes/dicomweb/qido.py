"""QIDO-RS: searches for studies, series and instances (PS3.18 10.6), answered from the catalog.

A search becomes a C-FIND identifier (a pydicom Dataset: matching keys with their values, return
keys empty) for `app.state.dicom.catalog.find_json`, so QIDO-RS and C-FIND match alike and never
open a file; the matches come back as the DICOM JSON the catalog holds. Query parameters are attributes by keyword or tag (`PatientName=DOE*`,
`00100020=123`, `StudyDate=20240101-20240131`, a sequence's attribute as
`RequestAttributesSequence.ScheduledProcedureStepID`), plus `limit`, `offset`, `includefield`
and `fuzzymatching` (the catalog's: person names matched word by word, by prefix, any case). Every result has the attributes PS3.18 Table 10.6.3-3/4/5 requires of its
level (those of the levels above too when the search is not scoped to a study or series) and a
RetrieveURL.
"""

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bson.errors import BSONError
from fastapi import APIRouter, Request
from pydicom import DataElement, Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.sequence import Sequence
from pymongo.errors import ConnectionFailure, PyMongoError
from starlette.responses import Response

from fhir_server.errors import BadRequest, FhirError, TooCostly
from fhir_server.routes.dicomweb.common import JSON_TYPES, check_uid, dicom_json, dicomweb_base, negotiate

router = APIRouter()
RESERVED = frozenset({"limit", "offset", "fuzzymatching", "includefield", "accept", "charset"})
MAX_RESULTS = 5000  # at most this many results per response (a Warning says when more exist)
TAG = re.compile(r"[0-9A-Fa-f]{8}")
BINARY_NUMBERS = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float}
# PS3.18 Table 10.6.3-3, -4 and -5: returned whether or not asked for.
REQUIRED = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
              "ReferringPhysicianName", "TimezoneOffsetFromUTC", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "StudyDescription"),
    "SERIES": ("Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
               "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
               "PerformedProcedureStepStartTime", "RequestAttributesSequence.ScheduledProcedureStepID",
               "RequestAttributesSequence.RequestedProcedureID"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "TimezoneOffsetFromUTC", "InstanceNumber",
              "Rows", "Columns", "BitsAllocated", "NumberOfFrames"),
}
UNIQUE = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
UNIQUE_LEVELS = ("STUDY", "SERIES", "IMAGE")
UID_TAGS = {"STUDY": "0020000D", "SERIES": "0020000E", "IMAGE": "00080018"}
SEGMENTS = {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
QUERY_RETRIEVE_LEVEL = "00080052"
MORE_RESULTS = "There are additional results that can be requested."


@dataclass(frozen=True)
class Search:
    level: str  # STUDY, SERIES or IMAGE
    levels: tuple[str, ...]  # whose required attributes are returned
    study: str | None = None
    series: str | None = None


def _tags(key: str) -> list[int]:
    """`PatientName`, `00100010` or `Sequence.Attribute` → tags; 400 for an unknown one."""
    tags = []
    for part in key.split("."):
        tag = int(part, 16) if TAG.fullmatch(part) else tag_for_keyword(part)
        if tag is None or not _known(tag):
            raise BadRequest(f"{key!r} is not a search parameter nor a DICOM attribute keyword or tag")
        tags.append(tag)
    return tags


def _known(tag: int) -> bool:
    try:
        dictionary_VR(tag)
    except KeyError:
        return False
    return True


def _vr(tag: int) -> str:
    return dictionary_VR(tag).split(" or ")[0]  # an ambiguous VR: its first reading


def _value(tag: int, vr: str, text: str | None) -> object:
    """The query value as the identifier holds it: a QIDO list of UIDs (`a,b`) is a C-FIND
    multi-value (`a\\b`); binary numbers are numbers."""
    if vr == "SQ":
        raise BadRequest(f"{keyword_for_tag(tag)} is a sequence: match one of its items' attributes (Sequence.Attribute)")
    if text is None or text == "":
        return None if vr in BINARY_NUMBERS else ""
    if vr == "UI":
        uids = text.replace(",", "\\")
        if not all(len(u) <= 64 and re.fullmatch(r"[0-9.*?]+", u) for u in uids.split("\\")):
            raise BadRequest(f"{keyword_for_tag(tag) or tag} takes UIDs")
        return uids
    if vr in BINARY_NUMBERS:
        try:
            return BINARY_NUMBERS[vr](text)
        except ValueError:
            raise BadRequest(f"{keyword_for_tag(tag) or tag} takes a number") from None
    return text


def _put(query: Dataset, tags: list[int], text: str | None) -> None:
    """Add a key at `tags` (through one item of each sequence on the way)."""
    target = query
    for tag in tags[:-1]:
        if _vr(tag) != "SQ":
            raise BadRequest(f"{keyword_for_tag(tag) or f'{tag:08X}'} is not a sequence")
        if tag not in target:
            target.add(DataElement(tag, "SQ", Sequence([Dataset()])))
        elif not target[tag].value:
            target[tag].value = Sequence([Dataset()])
        target = target[tag].value[0]
    tag = tags[-1]
    vr = _vr(tag)
    if tag in target and text is None:
        return  # a return key already there (as a key, perhaps with a value)
    if tag in target:
        raise BadRequest(f"{keyword_for_tag(tag) or f'{tag:08X}'} is given more than once")
    try:
        target.add(DataElement(tag, vr, _value(tag, vr, text) if vr != "SQ" or text is not None else Sequence()))
    except (ValueError, TypeError, OverflowError) as exc:  # pydicom's own checks (IS, DS...)
        raise BadRequest(f"{keyword_for_tag(tag) or f'{tag:08X}'}: {exc}") from None


def _count(params: dict[str, str], name: str, least: int) -> int | None:
    if name not in params:
        return None
    text = params[name].strip()
    if not text.isdigit() or int(text) < least:
        raise BadRequest(f"{name} is an integer of at least {least}")
    return int(text)


def _fuzzy(params: dict[str, str]) -> bool:
    value = params.get("fuzzymatching", "false").strip().lower()
    if value not in ("true", "false"):
        raise BadRequest("fuzzymatching is true or false")
    return value == "true"


def _include_fields(request: Request) -> list[str]:
    """`includefield` values (repeated or comma-separated)."""
    return [f.strip() for value in request.query_params.getlist("includefield") for f in value.split(",") if f.strip()]


def build_query(request: Request, search: Search) -> Dataset:
    """The C-FIND identifier of a QIDO-RS request."""
    query = Dataset()
    if search.study is not None:
        _put(query, [tag_for_keyword("StudyInstanceUID")], check_uid(search.study, "Study Instance UID"))  # type: ignore[list-item]
    if search.series is not None:
        _put(query, [tag_for_keyword("SeriesInstanceUID")], check_uid(search.series, "Series Instance UID"))  # type: ignore[list-item]
    for key, value in request.query_params.multi_items():
        if key.lower() in RESERVED:
            continue
        _put(query, _tags(key), value)
    fields = _include_fields(request)
    if any(f.lower() == "all" for f in fields):
        fields = [f for f in fields if f.lower() != "all"] + _every_attribute(search.levels)
    for name in (*_required(search), *fields):
        _put(query, _tags(name), None)
    return query


def _required(search: Search) -> Iterable[str]:
    for level in search.levels:
        yield from REQUIRED[level]
    for level in ("STUDY", "SERIES", "IMAGE")[: ("STUDY", "SERIES", "IMAGE").index(search.level) + 1]:
        yield UNIQUE[level]  # what the RetrieveURL is made of


def _every_attribute(levels: tuple[str, ...]) -> list[str]:
    """`includefield=all`: every attribute the catalog keeps for the levels searched."""
    from dicom_node.matching import LEVEL_OF

    wanted = {*levels, "PATIENT"} if "STUDY" in levels else set(levels)
    return [f"{tag:08X}" for tag, level in LEVEL_OF.items() if level in wanted]


def _retrieve_url(base: str, level: str, item: dict[str, Any]) -> str | None:
    """The match's WADO-RS URL, from its UIDs (None when one is missing)."""
    url = base
    for lvl in UNIQUE_LEVELS[: UNIQUE_LEVELS.index(level) + 1]:
        uid = _first_value(item, UID_TAGS[lvl])
        if uid is None:
            return None
        url += f"/{SEGMENTS[lvl]}/{uid}"
    return url


def _first_value(item: dict[str, Any], tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values and values[0] else None


async def _search(request: Request, search: Search) -> Response:
    negotiate(request, JSON_TYPES)
    params = {k.lower(): v for k, v in request.query_params.items()}
    limit, offset = _count(params, "limit", 1), _count(params, "offset", 0) or 0
    fuzzy = _fuzzy(params)
    query = build_query(request, search)
    catalog = request.app.state.dicom.catalog
    wanted = min(limit or MAX_RESULTS, MAX_RESULTS)
    try:  # DICOM JSON as the catalog holds it: no Dataset made and converted back per match
        found = await asyncio.to_thread(  # the catalog's synchronous reader, off the event loop
            lambda: list(catalog.find_json(search.level, query, limit=wanted + 1, offset=offset, fuzzy=fuzzy)))
    except ValueError as exc:
        raise BadRequest(f"Invalid search: {exc}") from exc
    except BSONError as exc:  # a query larger than a database document
        raise TooCostly(f"The search is too large for the database: {exc}") from exc
    except ConnectionFailure:
        raise  # 503, as every route answers a database that cannot be reached
    except PyMongoError as exc:
        raise FhirError(f"The DICOM catalog could not be searched: {exc}") from exc
    headers = None
    if len(found) > wanted and (limit is None or limit > MAX_RESULTS):  # PS3.18 8.3.4.4
        headers = {"Warning": f'299 {request.url.hostname or "-"}: "{MORE_RESULTS}"'}
    base = dicomweb_base(request)
    results = []
    for item in found[:wanted]:
        item.pop(QUERY_RETRIEVE_LEVEL, None)  # C-FIND's, not QIDO-RS's
        url = _retrieve_url(base, search.level, item)
        if url is not None:
            item["00081190"] = {"vr": "UR", "Value": [url]}
        results.append(dict(sorted(item.items())))
    return dicom_json(results, headers=headers)


@router.get("/studies")
async def search_studies(request: Request) -> Response:
    return await _search(request, Search("STUDY", ("STUDY",)))


@router.get("/series")
async def search_series(request: Request) -> Response:
    return await _search(request, Search("SERIES", ("STUDY", "SERIES")))


@router.get("/studies/{study}/series")
async def search_study_series(request: Request, study: str) -> Response:
    return await _search(request, Search("SERIES", ("SERIES",), study))


@router.get("/instances")
async def search_instances(request: Request) -> Response:
    return await _search(request, Search("IMAGE", ("STUDY", "SERIES", "IMAGE")))


@router.get("/studies/{study}/instances")
async def search_study_instances(request: Request, study: str) -> Response:
    return await _search(request, Search("IMAGE", ("SERIES", "IMAGE"), study))


@router.get("/studies/{study}/series/{series}/instances")
async def search_series_instances(request: Request, study: str, series: str) -> Response:
    return await _search(request, Search("IMAGE", ("IMAGE",), study, series))
