"""The catalog: flat MongoDB documents describing every stored instance, so that C-FIND, C-MOVE,
C-GET and QIDO-RS never open a file.

    dicom_patients   one per PatientID + IssuerOfPatientID: the patient attributes
    dicom_studies    one per study (_id: Study Instance UID): patient and study attributes,
                     ModalitiesInStudy, SOPClassesInStudy, NumberOfStudyRelated{Series,Instances}
    dicom_series     one per series (_id: Series Instance UID), NumberOfSeriesRelatedInstances
    dicom_instances  one per instance (_id: SOP Instance UID): its file (relative path, size)
                     and transfer syntax

Each document has the attributes queries use as top-level fields (strings, numbers, arrays of
strings; `pn`: the lower-cased names and name parts), each under one index, and `json`: the
DICOM JSON of the level's attributes the headers had (mappings.dicom.catalog_attributes), from
which matches are checked exactly and responses built. The embedded database uses one index per
query, for a plain equality, `$in` or range: a query asks MongoDB for the candidates of its most
selective key alone, and every key is matched here (dicom_node/matching.py).

The indexer writes it (`record`) once FHIR has the instances. Counts grow with `$inc` by the
instances an upsert actually inserted, so a re-sent instance counts once and parallel writers
never lose one; when a batch holds an instance the catalog already had (sent again, or a retry
after a write that failed between the upsert and the `$inc`), or an instance or series changes
study, series, class or modality, the study is counted again (`recount`), as `fhir-server dicom
reindex` does for every study.
"""

import contextlib
import functools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from bson.codec_options import CodecOptions
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pymongo import ASCENDING, ReplaceOne, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.collection import Collection
from pymongo.database import Database

from dicom_node.files import FileStore
from dicom_node.matching import (
    ANY_LEVEL,
    LEVEL_OF,
    LEVELS,
    UNIQUE_KEYS,
    Condition,
    Key,
    element_json,
    level_index,
    parse_keys,
    pn_index,
    pn_text,
    response_json,
    tag_hex,
)

LOGGER = logging.getLogger(__name__)
PATIENTS, STUDIES, SERIES, INSTANCES = "dicom_patients", "dicom_studies", "dicom_series", "dicom_instances"
COLLECTION = {"PATIENT": PATIENTS, "STUDY": STUDIES, "SERIES": SERIES, "IMAGE": INSTANCES}
INDEXES = {
    PATIENTS: ("PatientID", "pn"),
    STUDIES: ("patient", "PatientID", "pn", "AccessionNumber", "StudyDate", "ModalitiesInStudy"),
    SERIES: ("StudyInstanceUID", "Modality"),
    INSTANCES: ("StudyInstanceUID", "SeriesInstanceUID"),
}
# Top-level fields copied from the headers' DICOM JSON, per document kind.
FLAT = {
    PATIENTS: ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex"),
    STUDIES: ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
              "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
              "TimezoneOffsetFromUTC"),
    SERIES: ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
             "BodyPartExamined", "Laterality", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
    INSTANCES: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows",
                "Columns", "NumberOfFrames"),
}
STUDY_TAG, SERIES_TAG = 0x0020000D, 0x0020000E
STUDY_UID, SERIES_UID = tag_hex(STUDY_TAG), tag_hex(SERIES_TAG)
PATIENT_TAGS = [tag_hex(tag) for tag, level in LEVEL_OF.items() if level == "PATIENT"]
PATIENT_COUNTS = {0x00201200, 0x00201202, 0x00201204}  # NumberOfPatientRelated{Studies,Series,Instances}
# What a view computes rather than holds (`_view`, `_patient_counts`): matched on the view only.
COMPUTED = {tag_hex(tag) for tag in PATIENT_COUNTS} | {tag_hex(int(tag_for_keyword(k) or 0)) for k in (
    "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances", "InstanceAvailability", "RetrieveAETitle")}
# A relational query gathers at most this many matching parents (an `$in` of them); beyond, each
# candidate's parent is read and checked (a query document has at most 16 MiB, and no set of
# every study matching `PatientName=*` is held in memory).
MAX_IN = 1000
MAX_CACHED = 10_000  # parents a query keeps read (their views, or whether they match)
PLAIN = CodecOptions(tz_aware=True)  # the catalog's documents: no FHIR decimals
# What `instances` reads of each instance: named fields, not "all but its DICOM JSON" (the embedded
# database answers an exclusion 0.1 ms slower a query than the whole documents, an inclusion not).
REF_FIELDS = dict.fromkeys(("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "TransferSyntaxUID",
                            "InstanceNumber", "path", "size"), 1)


@functools.cache
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return int(tag)


@functools.cache
def _hex(keyword: str) -> str:
    """The keyword's tag as DICOM JSON names it."""
    return tag_hex(_tag(keyword))


@dataclass(frozen=True)
class InstanceRef:
    """A stored instance, as retrieval needs it."""

    study: str
    series: str
    sop: str
    sop_class: str
    transfer_syntax: str
    path: Path
    size: int


def _value(attributes: dict[str, Any], keyword: str) -> Any:
    """The first value of `keyword` in DICOM JSON (a PN as `a=i=p` text); None when empty."""
    element = attributes.get(_hex(keyword)) or {}
    values = [v for v in element.get("Value") or [] if v not in (None, "")]
    if not values:
        return None
    return (pn_text(values[0]) or None) if element.get("vr") == "PN" else values[0]


def _flat(kind: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {keyword: _value(attributes, keyword) for keyword in FLAT[kind]}


def _merged(kind: str, attributes: dict[str, Any]) -> dict[str, Any]:
    """`$set` of a study, series or patient: the attributes this instance has, each alone (as
    the ImagingStudy takes the latest instance's value where it has one, keeping the others)."""
    fields = {keyword: value for keyword, value in _flat(kind, attributes).items() if value is not None}
    if isinstance(fields.get("StudyDate"), str):  # ACR-NEMA YYYY.MM.DD: ranges compare YYYYMMDD
        fields["StudyDate"] = fields["StudyDate"].replace(".", "")
    return {**fields, **{f"json.{tag}": element for tag, element in attributes.items()}, "updated": datetime.now(UTC)}


def _folded(group: list[dict[str, Any]], level: str, series: str | None = None) -> dict[str, Any]:
    """A level's attributes over a batch's instances (of `series`), later instances winning."""
    folded: dict[str, Any] = {}
    for facts in group:
        if series is None or facts["series"]["uid"] == series:
            folded.update(facts["dicom"][level])
    return folded


def _uid_element(uid: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [uid]}


def patient_key(patient_id: str | None, issuer: str | None) -> str:
    """The patient document's id: PatientID in the namespace of its issuer."""
    return json.dumps([patient_id or "", issuer or ""])


class Catalog:
    """Written on the event loop (`record`, `recount`: the indexer's), read (`find_json`,
    `instances`) through `read`, the collections of the synchronous client `reader`, in the DICOM node's association threads
    themselves (QIDO-RS and the indexer call them in a worker thread): a C-FIND or C-MOVE then
    makes no trip to the event loop and back, and does not wait on what the loop is doing (traced
    in the node, a C-FIND of 10 matches spent 0.5 to 0.8 ms less from its request to its first
    match than through the loop's asynchronous driver)."""

    def __init__(self, db: AsyncDatabase, reader: Database, files: FileStore | None = None,
                 ae_title: str | None = None) -> None:
        # Without the FHIR decimals' codec: the catalog holds none, and with a type registry
        # the driver decodes every answer through Python (a fifth of a C-FIND's database time).
        self.db = db.with_options(codec_options=PLAIN)
        # pymongo makes a Collection object per `database[name]` (0.05 ms a query): made once.
        plain = reader.with_options(codec_options=PLAIN)
        self.read: dict[str, Collection] = {name: plain[name] for name in INDEXES}
        self.files = files
        self.ae_title = ae_title  # RetrieveAETitle of every match
        self.patients: AsyncCollection = self.db[PATIENTS]
        self.studies: AsyncCollection = self.db[STUDIES]
        self.series: AsyncCollection = self.db[SERIES]
        self.instances_: AsyncCollection = self.db[INSTANCES]
        self._prepared = False

    async def prepare(self) -> None:
        """One index per queried field (the embedded database plans with one index per query)."""
        for name, fields in INDEXES.items():
            for field in fields:
                await self.db[name].create_index([(field, ASCENDING)])
        self._prepared = True

    async def _ready(self) -> None:
        if not self._prepared:
            await self.prepare()

    # -- writing ------------------------------------------------------------------------------------

    async def record(self, instances: list[dict[str, Any]]) -> None:
        """Catalogue indexed instances (facts from mappings.dicom.instance_facts, with `path`
        and `size` of the file when the catalog has no file store); idempotent."""
        await self._ready()
        by_study: dict[str, dict[str, dict[str, Any]]] = {}
        for facts in instances:
            if "dicom" not in facts:
                raise ValueError("the facts lack the catalog's attributes (mappings.dicom.catalog_attributes)")
            by_study.setdefault(facts["study"]["uid"], {})[facts["instance"]["uid"]] = facts  # the last copy wins
        for study, group in by_study.items():
            await self._record_study(study, list(group.values()))

    async def _record_study(self, study: str, group: list[dict[str, Any]]) -> None:
        series_uids = sorted({f["series"]["uid"] for f in group})
        before = {d["_id"]: d async for d in self.instances_.find(
            {"_id": {"$in": [f["instance"]["uid"] for f in group]}},
            {"StudyInstanceUID": 1, "SeriesInstanceUID": 1, "SOPClassUID": 1})}
        series_before = {d["_id"]: d async for d in self.series.find(
            {"_id": {"$in": series_uids}}, {"StudyInstanceUID": 1, "Modality": 1})}
        docs = [self._instance_doc(f) for f in group]
        result = await self.instances_.bulk_write(
            [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs], ordered=False)
        inserted = {docs[i]["_id"] for i in result.upserted_ids}
        placed = {d["_id"]: (d["StudyInstanceUID"], d["SeriesInstanceUID"], d["SOPClassUID"]) for d in docs}
        recount = {d["StudyInstanceUID"] for sop, d in before.items()
                   if (d["StudyInstanceUID"], d["SeriesInstanceUID"], d.get("SOPClassUID")) != placed[sop]}
        if before:
            # An instance already catalogued may not have been counted: a write that failed after
            # the instances' upsert and before the counts' `$inc` (retried by the one-by-one
            # fallback, the marker pass or a sender) finds it there and would add nothing.
            recount.add(study)
        new_series = 0
        for uid in series_uids:
            attributes = _folded(group, "series", uid)
            attributes[STUDY_UID] = _uid_element(study)
            changes = _merged(SERIES, attributes)
            previous = series_before.get(uid)
            if previous is not None and (previous.get("StudyInstanceUID"), previous.get("Modality")) != (
                    study, changes.get("Modality", previous.get("Modality"))):
                recount.update({previous.get("StudyInstanceUID"), study})
            added = sum(1 for f in group if f["series"]["uid"] == uid and f["instance"]["uid"] in inserted)
            outcome = await self.series.update_one(
                {"_id": uid}, {"$set": changes, "$inc": {"NumberOfSeriesRelatedInstances": added}}, upsert=True)
            new_series += outcome.upserted_id is not None
        await self._record_study_doc(study, group, len(inserted), new_series)
        for uid in sorted(filter(None, recount)):
            await self.recount(uid)

    async def _record_study_doc(self, study: str, group: list[dict[str, Any]], new_instances: int, new_series: int) -> None:
        # The patient is the latest instance's: a study sent again for another patient moves, and
        # keeps none of the earlier patient's attributes.
        patient = group[-1]["dicom"]["patient"]
        attributes = {**_folded(group, "study"), **patient, STUDY_UID: _uid_element(study)}
        changes = _merged(STUDIES, attributes)
        patient_id, issuer = _value(patient, "PatientID"), _value(patient, "IssuerOfPatientID")
        key = patient_key(patient_id, issuer)
        name = _value(attributes, "PatientName")
        identity = {"PatientID": patient_id, "IssuerOfPatientID": issuer, "patient": key}
        modalities = sorted({m for f in group for m in [_value(f["dicom"]["series"], "Modality")] if m})
        classes = sorted({f["instance"]["sopClass"] for f in group})
        previous = await self.studies.find_one_and_update(
            {"_id": study},
            {"$set": {**changes, **identity, **({"pn": pn_index([name])} if name else {})},
             "$inc": {"NumberOfStudyRelatedSeries": new_series, "NumberOfStudyRelatedInstances": new_instances},
             "$addToSet": {"ModalitiesInStudy": {"$each": modalities}, "SOPClassesInStudy": {"$each": classes}}},
            projection={"patient": 1}, upsert=True, return_document=ReturnDocument.BEFORE)
        await self.patients.update_one(
            {"_id": key},
            {"$set": {**_merged(PATIENTS, patient), "PatientID": patient_id, "IssuerOfPatientID": issuer,
                      **({"pn": pn_index([name])} if name else {})}},
            upsert=True)
        if previous is not None and previous.get("patient") not in (None, key):
            stale = {f"json.{tag}": "" for tag in PATIENT_TAGS if tag not in patient}
            await self.studies.update_one({"_id": study}, {"$unset": stale})
            await self._drop_patient_if_unused(previous["patient"])

    def _instance_doc(self, facts: dict[str, Any]) -> dict[str, Any]:
        study, series, sop = facts["study"]["uid"], facts["series"]["uid"], facts["instance"]["uid"]
        attributes = {**facts["dicom"]["instance"], STUDY_UID: _uid_element(study), SERIES_UID: _uid_element(series)}
        path, size = self._file_of(facts)
        return {
            "_id": sop, **_flat(INSTANCES, attributes),
            "StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop,
            "SOPClassUID": facts["instance"]["sopClass"],
            "TransferSyntaxUID": facts["dicom"].get("transferSyntax") or "",
            "path": path, "size": size, "json": attributes, "updated": datetime.now(UTC),
        }

    def _file_of(self, facts: dict[str, Any]) -> tuple[str, int]:
        """The file's path (relative to the store's root when there is one) and size."""
        if self.files is None:
            return str(facts.get("path", "")), int(facts.get("size", 0))
        path = Path(facts["path"]) if facts.get("path") else self.files.path_of(
            facts["study"]["uid"], facts["series"]["uid"], facts["instance"]["uid"])
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        return (path.relative_to(self.files.root).as_posix() if path.is_relative_to(self.files.root) else str(path)), size

    async def recount(self, study: str) -> None:
        """Count a study's series and instances again, and its modalities and SOP classes;
        drop what no longer has instances."""
        await self._ready()
        modalities: set[str] = set()
        live = 0
        async for series in self.series.find({"StudyInstanceUID": study}, {"Modality": 1}):
            count = await self.instances_.count_documents({"SeriesInstanceUID": series["_id"], "StudyInstanceUID": study})
            if count == 0:
                await self.series.delete_one({"_id": series["_id"], "StudyInstanceUID": study})
                continue
            live += 1
            await self.series.update_one({"_id": series["_id"]}, {"$set": {"NumberOfSeriesRelatedInstances": count}})
            if series.get("Modality"):
                modalities.add(series["Modality"])
        total = await self.instances_.count_documents({"StudyInstanceUID": study})
        if total == 0:
            previous = await self.studies.find_one_and_delete({"_id": study}, projection={"patient": 1})
            if previous is not None and previous.get("patient") is not None:
                await self._drop_patient_if_unused(previous["patient"])
            return
        classes = sorted(await self.instances_.distinct("SOPClassUID", {"StudyInstanceUID": study}))
        await self.studies.update_one({"_id": study}, {"$set": {
            "NumberOfStudyRelatedSeries": live, "NumberOfStudyRelatedInstances": total,
            "ModalitiesInStudy": sorted(modalities), "SOPClassesInStudy": classes}})

    async def _drop_patient_if_unused(self, key: str) -> None:
        if await self.studies.find_one({"patient": key}, {"_id": 1}) is None:
            await self.patients.delete_one({"_id": key})

    # -- queries --------------------------------------------------------------------------------------

    def find_json(
        self, level: str, query: Dataset, *, limit: int | None = None, offset: int = 0, fuzzy: bool = False,
        root: str = "STUDY",
    ) -> Iterator[dict[str, Any]]:
        """The matches of a C-FIND identifier at `level`, one response identifier each, as DICOM
        JSON (what C-FIND encodes and QIDO-RS answers with, no pydicom Dataset made per match):
        the requested keys (values, or empty), QueryRetrieveLevel, the unique keys of this level
        and those above it (PatientID above studies in the Patient Root model,
        `root="PATIENT"`), SpecificCharacterSet when a value is not ASCII. ValueError for an
        invalid query. The elements may be shared with other matches: read them, do not change
        them."""
        level = str(level).strip().upper()
        if level not in LEVELS:
            raise ValueError(f"QueryRetrieveLevel '{level}' is not PATIENT, STUDY, SERIES or IMAGE")
        keys = parse_keys(query, fuzzy)
        _check_levels(level, keys)
        uniques = [UNIQUE_KEYS[lvl] for lvl in LEVELS[1 if root != "PATIENT" else 0:level_index(level) + 1]]
        uniques = uniques if level != "PATIENT" else ["PatientID"]
        returned = keys + [_return_key(k) for k in uniques if _tag(k) not in {key.tag for key in keys}]
        skipped = 0
        sent = 0
        if limit is not None and limit <= 0:
            return
        with contextlib.closing(self._matches(level, keys, returned)) as matches:  # closes its cursor
            for view in matches:
                if skipped < offset:
                    skipped += 1
                    continue
                yield _response(level, view, returned)
                sent += 1
                if limit is not None and sent >= limit:
                    return

    def _matches(
        self, level: str, keys: list[Key], returned: list[Key], restrict: dict[str, set[str]] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Views of the entities at `level` (whose parents are in `restrict`) every matching key
        matches. Keys of higher levels (a relational query) first become the set of matching
        parents, studies then series, found with the unique keys given for them (a query scoped
        to a study reads that study alone); more than MAX_IN parents are not gathered (nor sent
        as one `$in`, which would grow past what MongoDB takes): each candidate's parent is
        checked instead."""
        own = [k for k in keys if k.matching and _evaluated_at(k, level) == level]
        restrict = dict(restrict or {})
        per_document: list[tuple[str, list[Key]]] = []
        for parent in ("STUDY", "SERIES"):
            parent_keys = [k for k in keys if k.matching and _evaluated_at(k, level) == parent]
            if not parent_keys or level_index(parent) >= level_index(level):
                continue
            found = self._parent_uids(parent, [*parent_keys, *_unique_keys_of(keys, parent)], restrict)
            if found is None:
                per_document.append((parent, parent_keys))
            elif not found:
                return
            else:
                restrict[UNIQUE_KEYS[parent]] = found
        wants_parents = any(_evaluated_at(k, level) != level for k in returned if k.level is not None)
        counts = _wants_counts(level, [*own, *returned])
        parents: dict[tuple[str, str], dict[str, Any] | None] = {}
        verdicts: dict[tuple[str, str], bool] = {}
        stored_keys = [k for k in own if k.hex not in COMPUTED]
        with self.read[COLLECTION[level]].find(_prefilter(level, own, restrict)) as cursor:  # closed if left early
            for doc in cursor:
                if any(doc.get(field) not in allowed for field, allowed in restrict.items()):
                    continue
                stored = doc.get("json", {})
                if not all(k.matches(stored) for k in stored_keys if k.hex in stored):
                    continue  # refused on what it holds, before its view is made
                view = self._full_view(level, doc, counts)
                if not all(k.matches(view) for k in own):
                    continue
                if per_document and not self._parents_match(doc, per_document, verdicts):
                    continue
                if wants_parents:
                    view = self._with_parents(level, doc, view, parents)
                yield view

    def _parent_uids(self, parent: str, keys: list[Key], restrict: dict[str, set[str]]) -> set[str] | None:
        """The UIDs of the `parent` entities `keys` match, or None when there are more than MAX_IN."""
        found: set[str] = set()
        with contextlib.closing(self._matches(parent, keys, [], restrict)) as views:
            for view in views:
                found.add(view["_id"])
                if len(found) > MAX_IN:
                    return None
        return found

    def _full_view(self, level: str, doc: dict[str, Any], counts: bool) -> dict[str, Any]:
        """The entity's view, with its patient's counts when asked for (`_wants_counts`)."""
        view = self._view(level, doc)
        if counts:
            view.update(self._patient_counts(doc["_id"] if level == "PATIENT" else doc.get("patient", "")))
        return view

    def _parents_match(
        self, doc: dict[str, Any], checks: list[tuple[str, list[Key]]], verdicts: dict[tuple[str, str], bool]
    ) -> bool:
        """Whether the document's parents match their keys (each parent read once per query)."""
        for parent, keys in checks:
            uid = doc.get(UNIQUE_KEYS[parent], "")
            if (parent, uid) not in verdicts:
                found = self.read[COLLECTION[parent]].find_one({"_id": uid})
                view = self._full_view(parent, found, _wants_counts(parent, keys)) if found is not None else None
                matched = view is not None and all(k.matches(view) for k in keys)
                _remember(verdicts, (parent, uid), matched)
            if not verdicts[(parent, uid)]:
                return False
        return True

    def _view(self, level: str, doc: dict[str, Any]) -> dict[str, Any]:
        """The entity's DICOM JSON with what the catalog computes for it."""
        view = {**doc.get("json", {}), "_id": doc["_id"]}
        computed: dict[str, list[Any]] = {}
        if level == "STUDY":
            computed = {
                "ModalitiesInStudy": sorted(doc.get("ModalitiesInStudy") or []),
                "SOPClassesInStudy": sorted(doc.get("SOPClassesInStudy") or []),
                "NumberOfStudyRelatedSeries": [doc.get("NumberOfStudyRelatedSeries", 0)],
                "NumberOfStudyRelatedInstances": [doc.get("NumberOfStudyRelatedInstances", 0)],
            }
        elif level == "SERIES":
            computed = {"NumberOfSeriesRelatedInstances": [doc.get("NumberOfSeriesRelatedInstances", 0)]}
        computed["InstanceAvailability"] = ["ONLINE"]
        if self.ae_title:
            computed["RetrieveAETitle"] = [self.ae_title]
        for keyword, values in computed.items():
            view[_hex(keyword)] = element_json(keyword, values)
        if level in ("SERIES", "IMAGE"):
            view.setdefault(STUDY_UID, _uid_element(doc["StudyInstanceUID"]))
        if level == "IMAGE":
            view.setdefault(SERIES_UID, _uid_element(doc["SeriesInstanceUID"]))
        return view

    def _with_parents(
        self, level: str, doc: dict[str, Any], view: dict[str, Any], cache: dict[tuple[str, str], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """The view with its series' and study's attributes (for return keys of higher levels)."""
        merged = dict(view)
        for parent, field in (("SERIES", "SeriesInstanceUID"), ("STUDY", "StudyInstanceUID")):
            if level_index(parent) >= level_index(level):
                continue
            uid = doc.get(field)
            if (parent, uid) not in cache:
                found = self.read[COLLECTION[parent]].find_one({"_id": uid})
                _remember(cache, (parent, uid), self._view(parent, found) if found is not None else None)
            for tag, element in (cache[(parent, uid)] or {}).items():
                merged.setdefault(tag, element)
        return merged

    def _patient_counts(self, key: str) -> dict[str, Any]:
        studies = series = instances = 0
        for study in self.read[STUDIES].find({"patient": key}, {"NumberOfStudyRelatedSeries": 1,
                                                                  "NumberOfStudyRelatedInstances": 1}):
            studies += 1
            series += study.get("NumberOfStudyRelatedSeries", 0)
            instances += study.get("NumberOfStudyRelatedInstances", 0)
        counts = {"NumberOfPatientRelatedStudies": studies, "NumberOfPatientRelatedSeries": series,
                  "NumberOfPatientRelatedInstances": instances}
        return {_hex(k): element_json(k, [v]) for k, v in counts.items()}

    # -- retrieval ------------------------------------------------------------------------------------

    def instances(
        self, *, patient_id: str | None = None, issuer: str | None = None, study: str | None = None,
        series: str | None = None, sops: list[str] | None = None,
    ) -> list[InstanceRef]:
        """The stored instances every given criterion selects (at least one is needed), in study,
        series and instance number order. A patient with an `issuer` is that issuer's PatientID
        alone (the same PatientID of another issuer is another patient); without one, the
        PatientID of any issuer."""
        criteria: dict[str, Any] = {}
        if sops is not None:
            criteria["_id"] = {"$in": list(sops)}
        if series is not None:
            criteria["SeriesInstanceUID"] = series
        if study is not None:
            criteria["StudyInstanceUID"] = study
        if patient_id is not None:
            whose = {"patient": patient_key(patient_id, issuer)} if issuer else {"PatientID": patient_id}
            studies = [d["_id"] for d in self.read[STUDIES].find(whose, {"_id": 1})]
            criteria.setdefault("StudyInstanceUID", {"$in": studies})
            if study is not None and study not in studies:
                return []
        if not criteria:
            raise ValueError("which instances: a patient, study, series or SOP Instance UIDs")
        first = next(iter(criteria))  # one index: the most selective criterion; the rest checked here
        refs = []
        for doc in self.read[INSTANCES].find({first: criteria[first]}, REF_FIELDS):
            if all(_satisfies(doc.get(field), wanted) for field, wanted in criteria.items()):
                refs.append(doc)
        refs.sort(key=lambda d: (d["StudyInstanceUID"], d["SeriesInstanceUID"],
                                 d.get("InstanceNumber") is None, d.get("InstanceNumber") or 0, d["_id"]))
        return [self._ref(doc) for doc in refs]

    def _ref(self, doc: dict[str, Any]) -> InstanceRef:
        path = Path(doc.get("path", ""))
        if self.files is not None and not path.is_absolute():
            path = self.files.root / path
        return InstanceRef(doc["StudyInstanceUID"], doc["SeriesInstanceUID"], doc["_id"], doc["SOPClassUID"],
                           doc.get("TransferSyntaxUID", ""), path, int(doc.get("size", 0)))


def _unique_keys_of(keys: list[Key], parent: str) -> list[Key]:
    """The matching unique keys of `parent` and the levels above it among a lower level's keys
    (StudyInstanceUID for a study; and SeriesInstanceUID for a series): what narrows the parents
    of a relational query to those the query names."""
    wanted = {_tag(UNIQUE_KEYS[lvl]) for lvl in ("STUDY", "SERIES")[: level_index(parent)]}
    return [k for k in keys if k.tag in wanted and k.condition is not None]


def _wants_counts(level: str, keys: list[Key]) -> bool:
    """Whether the patient's counts are asked for (computed per patient: only when needed)."""
    return level in ("PATIENT", "STUDY") and any(k.tag in PATIENT_COUNTS for k in keys)


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """A per-query cache of parents, emptied at MAX_CACHED entries (memory stays bounded on a
    scan of many parents; an entry read again costs one more lookup)."""
    if len(cache) >= MAX_CACHED:
        cache.clear()
    cache[key] = value


def _return_key(keyword: str) -> Key:
    tag = _tag(keyword)
    return Key(tag, dictionary_VR(tag), LEVEL_OF.get(tag), keyword=keyword)


def _satisfies(value: Any, wanted: Any) -> bool:
    return value in wanted["$in"] if isinstance(wanted, dict) else value == wanted


def _evaluated_at(key: Key, level: str) -> str:
    """Where a key is matched: the entity's own document holds its level's attributes, the
    patient's at study level, and the unique keys of the levels above it; other attributes of
    higher levels are matched on the parents."""
    if key.level is None or key.tag in ANY_LEVEL or key.tag in (STUDY_TAG, SERIES_TAG):
        return level
    if key.level == "PATIENT":  # the study documents hold the patient's attributes
        return "STUDY" if level != "PATIENT" else level
    return key.level if level_index(key.level) < level_index(level) else level


def _check_levels(level: str, keys: list[Key]) -> None:
    """A matching key below the query level cannot be answered at that level (PS3.4 C.4.1.2.1):
    an invalid query rather than an ignored key."""
    for key in keys:
        below = key.level is not None and key.tag not in ANY_LEVEL and level_index(key.level) > level_index(level)
        if key.matching and below:
            raise ValueError(f"{key.keyword} is a {str(key.level).lower()}-level key: it cannot be matched at "
                             f"the {level.lower()} level")


def _prefilter(level: str, own: list[Key], restrict: dict[str, set[str]]) -> dict[str, Any]:
    """The MongoDB filter of the most selective key that an index answers (every key is
    checked again on the documents it returns)."""
    by_keyword = {k.keyword: k.condition for k in own if k.condition is not None}
    candidates: list[tuple[int, dict[str, Any]]] = []

    def exact(keyword: str, field: str, rank: int) -> None:
        condition = by_keyword.get(keyword)
        values = condition.exact() if condition is not None else None
        if values:
            candidates.append((rank, {field: {"$in": values}}))

    def leading(keyword: str, field: str, rank: int) -> None:
        """A wildcard value's literal start (`BENCH-01*`) as an index range."""
        condition = by_keyword.get(keyword)
        if condition is None or condition.fuzzy or len(condition.values) != 1 or condition.patterns[0] is None:
            return
        start = re.split(r"[*?]", condition.values[0], maxsplit=1)[0]
        if start:
            candidates.append((rank, {field: {"$gte": start, "$lt": start + "\U0010ffff"}}))

    unique = UNIQUE_KEYS[level]
    exact(unique, "_id" if level != "PATIENT" else "PatientID", 0)
    if level == "IMAGE":
        exact("SeriesInstanceUID", "SeriesInstanceUID", 1)
    if level in ("SERIES", "IMAGE"):
        exact("StudyInstanceUID", "StudyInstanceUID", 3)
    for rank, field in ((2, "SeriesInstanceUID"), (4, "StudyInstanceUID")):
        if field in restrict and level != field.removesuffix("InstanceUID").upper():
            candidates.append((rank, {field: {"$in": sorted(restrict[field])}}))
    if level in ("PATIENT", "STUDY"):
        exact("PatientID", "PatientID", 5)
        leading("PatientID", "PatientID", 6)
        name = by_keyword.get("PatientName")
        prefix = name.literal_prefix() if name is not None else None
        if prefix:
            candidates.append((6, {"pn": {"$gte": prefix, "$lt": prefix + "\U0010ffff"}}))
    if level == "STUDY":
        exact("AccessionNumber", "AccessionNumber", 5)
        leading("AccessionNumber", "AccessionNumber", 6)
        _date_range(by_keyword.get("StudyDate"), candidates)
        exact("ModalitiesInStudy", "ModalitiesInStudy", 8)
    if level == "SERIES":
        exact("Modality", "Modality", 8)
    chosen = dict(min(candidates, key=lambda c: c[0])[1]) if candidates else {}
    for keyword in FLAT[COLLECTION[level]]:  # wildcards narrowed in the database: fewer documents sent
        condition = by_keyword.get(keyword)
        pattern = condition.regex() if condition is not None else None
        if pattern is not None and keyword not in chosen:  # beside its own index range, it costs the index
            chosen[keyword] = {"$regex": pattern, "$options": "i" if condition.vr == "PN" else ""}
    return chosen


def _date_range(condition: Condition | None, candidates: list[tuple[int, dict[str, Any]]]) -> None:
    if condition is None or len(condition.ranges) != 1:
        return
    start, end = condition.ranges[0]
    bounds = {op: value[:8] for op, value in (("$gte", start), ("$lte", end)) if value}
    if bounds:
        candidates.append((7, {"StudyDate": bounds}))


QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET = tag_hex(0x00080052), tag_hex(0x00080005)


def _response(level: str, view: dict[str, Any], keys: list[Key]) -> dict[str, Any]:
    """One match's response identifier as DICOM JSON."""
    found = response_json(view, [k for k in keys if k.hex != QUERY_RETRIEVE_LEVEL])
    found[QUERY_RETRIEVE_LEVEL] = {"vr": "CS", "Value": [level]}
    if not orjson.dumps(found).isascii():
        found[SPECIFIC_CHARACTER_SET] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    return found


