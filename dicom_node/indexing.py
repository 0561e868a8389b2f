"""Stored instances → the FHIR Patient and ImagingStudy they belong to, through the same
repository as the REST API (one code path for versions, history and the search index).

Runs on the server's event loop. Instances of one study are coalesced: while the study's
ImagingStudy is being written, the next instances queue up and go into the following version
together, so a sender streaming a study costs one FHIR write per batch, not per instance. The
write itself is a read-merge-write under the repository's version check, so concurrent stores
of one study (from several associations or server processes) never lose an instance.
"""

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pymongo.errors import ConnectionFailure

from dicom_node.catalog import Catalog
from dicom_node.files import FileStore
from fhir_server.search.criteria import parse_query_string
from fhir_server.services.search import SearchService
from fhir_server.storage.repository import Change, ResourceRepository, Version
from fhir_server.validation.resource import validate_resource
from mappings.dicom import (
    endpoint_resource,
    imaging_study,
    instance_facts,
    patient_identifier,
    patient_resource,
    without_instances,
)
from mappings.records import identifier_query

LOGGER = logging.getLogger(__name__)
ENDPOINT_ID = "dicomweb"
# How long a study's next ImagingStudy version waits for more instances: a sender streaming a
# study then costs a few FHIR writes, not one per instance (the A-RELEASE still waits for all).
COALESCE_S = 0.05
PATIENT_NAMESPACE = uuid.UUID("5b0c2d3e-8f1a-4c55-9a57-3d6f0f1c2a10")  # ids of Patients the node creates


@dataclass(frozen=True)
class Copy:
    """A file of an instance, in a study and series (where it is, or was)."""

    study: str
    series: str
    path: Path


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal but for the server-owned meta."""
    return {k: v for k, v in a.items() if k != "meta"} == {k: v for k, v in b.items() if k != "meta"}


class DicomIndexer:
    def __init__(
        self,
        repository: ResourceRepository,
        searches: SearchService,
        files: FileStore,
        *,
        patient_system: str,
        endpoint_address: str,
        catalog: Catalog,
    ) -> None:
        self.repository = repository
        self.searches = searches
        self.files = files
        self.catalog = catalog  # what query/retrieve answers from
        self.patient_system = patient_system
        self.endpoint_address = endpoint_address
        self.database_ok = True  # cleared by a lost connection, set again by a successful write
        self._pending: dict[str, list[tuple[dict[str, Any], asyncio.Future[None]]]] = {}
        self._running: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def add(self, facts: dict[str, Any]) -> None:
        """Index one placed instance; returns once FHIR has it."""
        study = facts["study"]["uid"]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(study, []).append((facts, done))
        if study not in self._running:
            self._running.add(study)
            self._spawn(self._drain(study))
        await done

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, study: str) -> None:
        batch: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        try:
            while self._pending.get(study):
                await asyncio.sleep(COALESCE_S)  # let the instances arriving meanwhile join the batch
                batch = self._pending.pop(study)
                await self._index_batch(study, batch)
                batch = []
        finally:
            self._running.discard(study)
            for _, done in batch:  # cancelled midway: nobody waits forever
                if not done.done():
                    done.set_exception(RuntimeError("indexing was interrupted"))

    async def _index_batch(self, study: str, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        """One version for the batch; if that fails for another reason than the connection,
        each instance alone, so that one bad instance does not hold the others back."""
        try:
            await self.index_study(study, [facts for facts, _ in batch])
            outcomes: list[Exception | None] = [None] * len(batch)
        except ConnectionFailure as exc:
            self._lost_database(exc)
            outcomes = [exc] * len(batch)
        except Exception:  # noqa: BLE001 - find the instance at fault
            outcomes = []
            for facts, _ in batch:
                try:
                    await self.index_study(study, [facts])
                    outcomes.append(None)
                except Exception as exc:  # noqa: BLE001 - recorded, the marker stays for reconcile
                    LOGGER.error("instance %s of study %s cannot be indexed: %s", facts["instance"]["uid"], study, exc)
                    outcomes.append(exc)
        for (facts, done), failure in zip(batch, outcomes, strict=True):
            if failure is None:
                self.database_ok = True
                self.files.indexed(facts["instance"]["uid"], self.path_of(facts))
            if not done.done():
                done.set_result(None) if failure is None else done.set_exception(failure)

    def _lost_database(self, exc: Exception) -> None:
        LOGGER.error("indexing failed, database unreachable: %s", exc)
        if self.database_ok:
            self.database_ok = False
            self._spawn(self._watch_database())

    async def _watch_database(self) -> None:
        """While the database is unreachable the node refuses instances (0xA700): ping it
        until it answers again."""
        while not self.database_ok:
            await asyncio.sleep(2.0)
            try:
                await self.repository.db.client.admin.command("ping")
            except ConnectionFailure:
                continue
            self.database_ok = True
            LOGGER.info("database reachable again: the DICOM node accepts instances")
            await self.reconcile()

    async def index_study(
        self, study: str, instances: list[dict[str, Any]], earlier: dict[str, list[Copy]] | None = None
    ) -> Version | None:
        """Merge `instances` (facts of one study) into its ImagingStudy, whose id is the Study
        Instance UID (a valid FHIR id), creating it and its Patient when needed.

        One copy per SOP Instance UID: an instance placed before elsewhere (the catalog's copy,
        or one of `earlier`, which `reconcile(everything=True)` finds) moves here. It leaves its
        former series, and former study (a new version of that ImagingStudy, deleted when none
        of its instances is left), and its former file is removed, then the catalog follows. A
        former copy newer than this one stays: its own indexing moves the instance back. An
        instance whose file is gone was replaced meanwhile by a newer copy: it is left out."""
        instances, earlier = self._current_copies(instances, earlier or {})
        if not instances:
            return None
        stale = await self._stale_copies(instances, earlier)
        patient = await self._patient(instances[0])
        endpoint = await self._endpoint()
        placed = {f["instance"]["uid"]: f["series"]["uid"] for f in instances}

        def decide(current: Version | None) -> Change | None:
            existing = current.resource if current is not None and not current.deleted else None
            moved = without_instances(existing, placed) if existing is not None else None
            merged = imaging_study(moved, patient, instances, endpoint)
            merged["id"] = study
            merged = validate_resource(merged, "ImagingStudy", url_id=study)
            if existing is not None and _same(existing, merged):
                return None  # the same instances again: no new version
            return Change(merged, "PUT")

        version, _ = await self.repository.write("ImagingStudy", study, decide)
        for former, sops in sorted(_by_study(stale, study).items()):
            await self._take_out(former, sops)
        await asyncio.to_thread(_remove, [copy.path for copy in stale])
        await self.catalog.record(instances)  # after FHIR: a failure leaves the marker, reconcile retries both
        return version

    def path_of(self, facts: dict[str, Any]) -> Path:
        """Where an instance's file is placed."""
        return self.files.path_of(facts["study"]["uid"], facts["series"]["uid"], facts["instance"]["uid"])

    def _current_copies(
        self, instances: list[dict[str, Any]], earlier: dict[str, list[Copy]]
    ) -> tuple[list[dict[str, Any]], dict[str, list[Copy]]]:
        """The instances whose file is still there, one per SOP Instance UID (a batch may hold
        an instance sent twice, into two series: the later copy wins, the other joins
        `earlier`)."""
        latest: dict[str, dict[str, Any]] = {}
        earlier = {sop: list(copies) for sop, copies in earlier.items()}
        for facts in instances:
            if not self.path_of(facts).is_file():
                continue  # replaced by a newer copy since it was placed
            sop = facts["instance"]["uid"]
            if sop in latest and self.path_of(latest[sop]) != self.path_of(facts):
                before = latest[sop]
                earlier.setdefault(sop, []).append(Copy(before["study"]["uid"], before["series"]["uid"],
                                                        self.path_of(before)))
            latest[sop] = facts
        return list(latest.values()), earlier

    async def _stale_copies(self, instances: list[dict[str, Any]], earlier: dict[str, list[Copy]]) -> list[Copy]:
        """The other copies of `instances` these replace: the catalog's and `earlier`, those not
        newer than the copy being indexed (modification time, the time it was received)."""
        copies = {sop: list(found) for sop, found in earlier.items()}
        sops = [f["instance"]["uid"] for f in instances]
        for ref in await asyncio.to_thread(lambda: self.catalog.instances(sops=sops)):
            copies.setdefault(ref.sop, []).append(Copy(ref.study, ref.series, ref.path))
        stale: list[Copy] = []
        for facts in instances:
            path = self.path_of(facts)
            received = _modified(path)
            for copy in copies.get(facts["instance"]["uid"], []):
                if copy.path == path or copy in stale:
                    continue
                modified = _modified(copy.path)
                if modified is None or received is None or modified <= received:
                    stale.append(copy)
        return stale

    async def _take_out(self, study: str, sops: set[str]) -> None:
        """Instances that moved to another study leave this study's ImagingStudy: a new version
        without them, or, when none of its instances is left, its deletion (FHIR history keeps
        every version; a study without instances is no study: DICOMweb and C-FIND no longer
        find it either, and `registered` would claim instances are coming)."""

        def decide(current: Version | None) -> Change | None:
            if current is None or current.deleted or current.resource is None:
                return None
            remaining = without_instances(current.resource, dict.fromkeys(sops))
            if remaining is current.resource:
                return None
            if not remaining.get("series"):
                return Change(None, "DELETE")
            return Change(validate_resource(remaining, "ImagingStudy", url_id=study), "PUT")

        await self.repository.write("ImagingStudy", study, decide)

    async def _patient(self, facts: dict[str, Any]) -> str:
        """The Patient of the header's PatientID (and issuer): found by identifier, else created
        with an id derived from that identifier, so that racing nodes create one."""
        identifier = patient_identifier(facts, self.patient_system)
        if identifier is None:  # no PatientID: a patient of this study alone
            key = f"study|{facts['study']['uid']}"
        else:
            query = identifier_query(identifier)  # escaped and URL-quoted: issuers may hold % or &
            found = await self.searches.matches("Patient", parse_query_string("Patient", query), limit=2)
            if found:
                if len(found) > 1:
                    LOGGER.warning("several Patients have identifier %s; using %s", query, found[0].id)
                return f"Patient/{found[0].id}"
            key = f"{identifier['system']}|{identifier['value']}"
        patient_id = str(uuid.uuid5(PATIENT_NAMESPACE, key))
        resource = validate_resource(patient_resource(facts, self.patient_system), "Patient", ignore_id=True)

        def decide(current: Version | None) -> Change | None:
            if current is not None and not current.deleted:
                return None  # created meanwhile (or earlier): the EHR's data wins
            return Change(resource, "PUT")

        await self.repository.write("Patient", patient_id, decide)
        return f"Patient/{patient_id}"

    async def _endpoint(self) -> str:
        resource = validate_resource(endpoint_resource(self.endpoint_address), "Endpoint", ignore_id=True)

        def decide(current: Version | None) -> Change | None:
            if current is not None and current.resource is not None and current.resource.get("address") == resource["address"]:
                return None
            return Change(resource, "PUT")

        current = await self.repository.read("Endpoint", ENDPOINT_ID)
        if current is None or current.deleted or decide(current) is not None:
            await self.repository.write("Endpoint", ENDPOINT_ID, decide)
        return f"Endpoint/{ENDPOINT_ID}"

    async def reconcile(self, everything: bool = False) -> int:
        """Index the instances placed but not indexed (a crash in between), or with
        `everything` every file of the store; returns how many were indexed."""
        earlier: dict[str, list[Copy]] = {}
        if everything:  # the newest copy of each instance; the others go (`index_study`)
            paths, earlier = _newest(await asyncio.to_thread(self.files.all_files))
        else:
            paths = await asyncio.to_thread(self.files.pending)
        by_study: dict[str, list[dict[str, Any]]] = {}
        for sop, path in paths:
            if not path.is_file():
                self.files.indexed(sop)  # the placing never happened
                continue
            try:
                facts = instance_facts(await asyncio.to_thread(_header, path))
            except (ValueError, OSError) as exc:
                LOGGER.error("cannot index %s: %s", path, exc)
                continue
            by_study.setdefault(facts["study"]["uid"], []).append(facts)
        for study, instances in by_study.items():
            try:
                await self.index_study(study, instances, {sop: earlier[sop] for sop in _sops(instances) if sop in earlier})
                if everything:
                    await self.catalog.recount(study)  # exact counts, whatever the catalog held before
            except Exception as exc:  # noqa: BLE001 - one study must not stop the others, nor the start
                LOGGER.error("reconcile: study %s not indexed: %s", study, exc)
                continue
            for facts in instances:
                self.files.indexed(facts["instance"]["uid"], self.path_of(facts))
        if by_study:
            LOGGER.info("reconciled %d instances of %d studies", sum(map(len, by_study.values())), len(by_study))
        return sum(map(len, by_study.values()))


def _header(path: Path) -> Any:
    return dcmread(path, stop_before_pixels=True)


def _sops(instances: list[dict[str, Any]]) -> list[str]:
    return [facts["instance"]["uid"] for facts in instances]


def _modified(path: Path) -> int | None:
    """When the file was written (placing keeps the received file's time); None if it is gone."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _by_study(copies: list[Copy], except_study: str) -> dict[str, set[str]]:
    """The SOP Instance UIDs of `copies` per study, but `except_study`'s (whose ImagingStudy
    the indexed version already rearranges)."""
    found: dict[str, set[str]] = {}
    for copy in copies:
        if copy.study != except_study:
            found.setdefault(copy.study, set()).add(copy.path.stem)
    return found


def _remove(paths: list[Path]) -> None:
    """Remove replaced copies. Their emptied folders stay: removing one could race a placement
    into it (its `mkdir`, then the rename), and an empty folder lists no instance."""
    for path in paths:
        path.unlink(missing_ok=True)


def _newest(paths: list[Path]) -> tuple[list[tuple[str, Path]], dict[str, list[Copy]]]:
    """(SOP Instance UID, file) of the newest copy of each instance in the store
    (`store/<study>/<series>/<sop>.dcm`), and the older copies of each."""
    by_sop: dict[str, list[tuple[int, Path]]] = {}
    for path in paths:
        by_sop.setdefault(path.stem, []).append((_modified(path) or 0, path))
    newest: list[tuple[str, Path]] = []
    earlier: dict[str, list[Copy]] = {}
    for sop, found in by_sop.items():
        found.sort(reverse=True)
        newest.append((sop, found[0][1]))
        if len(found) > 1:
            earlier[sop] = [Copy(path.parent.parent.name, path.parent.name, path) for _, path in found[1:]]
    return newest, earlier

