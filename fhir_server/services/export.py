"""FHIR Bulk Data export (`$export`, Bulk Data Access IG v2): kick-off, status, manifest, files.

A kick-off checks the request, fixes the transaction time and the job's types and patients, and
queues the job in MongoDB; the worker (`export_worker.py`) of any server process runs it. Status
requests read the job document, so any process answers them.
"""

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fhir_server.auth.policy import OPEN, Policy
from fhir_server.config import Settings
from fhir_server.errors import BadRequest, FhirError, Forbidden, Gone, NotFound
from fhir_server.search.dates import ONE_MS, date_range
from fhir_server.search.indexer import reference_value
from fhir_server.search.registry import patient_compartment
from fhir_server.services.export_worker import ExportWorker
from fhir_server.storage.exports import ExportFiles, ExportJobs
from fhir_server.storage.repository import ResourceRepository, instant
from fhir_server.validation.resource import check_id
from fhir_server.validation.resource_types import supported_types

OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
# IG v2 parameters this server does not apply: 400, or ignored with a warning with lenient handling.
NOT_APPLIED = ("_typeFilter", "_elements", "includeAssociatedData", "organizeOutputBy", "allowPartialManifests")
FORMAT_PARAMETERS = frozenset({"_format", "_pretty"})  # of the kick-off's own answer
SINGLE = ("_outputFormat", "_since")
INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
JOB_ID = re.compile(r"[0-9a-f]{32}")
MAX_PATIENTS = 1000
STATUS_PATH = "$export-status"
FILE_PATH = "$export-file"


@dataclass(frozen=True)
class ExportRequest:
    """A checked kick-off: `types` and `patients` None when not given."""

    types: tuple[str, ...] | None
    since: datetime | None
    patients: tuple[str, ...] | None
    warnings: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class ExportStatus:
    """A running job's progress, or a complete job's manifest (and when its files go)."""

    progress: str = ""
    manifest: dict[str, Any] | None = None
    expires: datetime | None = None


def _warning(text: str, code: str = "not-supported") -> dict[str, str]:
    return {"diagnostics": text, "code": code}


def _since(raw: str) -> datetime:
    value = raw.strip().replace(" ", "+")  # an unescaped "+" of the zone arrives as a space
    if not INSTANT.fullmatch(value):
        raise BadRequest(
            f"_since must be a FHIR instant such as 2024-01-31T12:00:00Z, not '{raw[:80]}'", expression="_since"
        )
    return date_range(value, "_since")[0]


def _types(values: list[str]) -> tuple[str, ...]:
    types = [t.strip() for raw in values for t in raw.split(",") if t.strip()]
    if not types:
        raise BadRequest("_type names no resource type", expression="_type")
    unknown = [t for t in types if t not in supported_types()]
    if unknown:
        raise BadRequest(f"_type names unknown resource types: {', '.join(u[:64] for u in unknown[:10])}",
                         expression="_type")
    return tuple(dict.fromkeys(types))


def _patients(values: list[str], base_url: str) -> tuple[str, ...]:
    ids = []
    for raw in values:
        for ref in (r.strip() for r in raw.split(",")):
            local = reference_value(ref, base_url)
            patient_id = local.removeprefix("Patient/")
            if not local.startswith("Patient/") or "/" in patient_id:
                raise BadRequest(f"patient takes Patient references, not '{ref[:80]}'", expression="patient")
            check_id(patient_id, "patient")
            ids.append(patient_id)
    if len(ids) > MAX_PATIENTS:
        raise BadRequest(f"patient names more than {MAX_PATIENTS} patients", expression="patient")
    return tuple(dict.fromkeys(ids))


def parse_export(level: str, params: list[tuple[str, str]], *, strict: bool, base_url: str = "") -> ExportRequest:
    """Check the kick-off parameters: unknown types and formats are errors; parameters this
    server does not apply are errors when `strict`, warnings otherwise."""
    given: dict[str, list[str]] = {}
    for name, value in params:
        given.setdefault(name, []).append(value)
    for name in SINGLE:
        if len(given.get(name, ())) > 1:
            raise BadRequest(f"{name} may be given once", expression=name)
    output_format = given.get("_outputFormat", ["application/fhir+ndjson"])[0].strip().replace(" ", "+")
    if output_format not in OUTPUT_FORMATS:
        raise BadRequest(
            f"_outputFormat '{output_format[:80]}' is not supported: use application/fhir+ndjson",
            expression="_outputFormat",
        )
    warnings = []
    for name in given:
        if name in ("_outputFormat", "_since", "_type", "patient") or name in FORMAT_PARAMETERS:
            continue
        known = name in NOT_APPLIED
        text = f"{'Parameter' if known else 'Unknown parameter'} '{name[:64]}' is not applied by this server"
        if strict:
            raise BadRequest(text, expression=name)
        warnings.append(_warning(text + ": ignored"))
    patients = None
    if "patient" in given:
        if level == "system":
            raise BadRequest("patient applies to Patient and Group exports only", expression="patient")
        patients = _patients(given["patient"], base_url)
    return ExportRequest(
        types=_types(given["_type"]) if "_type" in given else None,
        since=_since(given["_since"][0]) if "_since" in given else None,
        patients=patients,
        warnings=tuple(warnings),
    )


def _now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def check_job_id(job_id: str) -> None:
    if not JOB_ID.fullmatch(job_id):
        raise NotFound(f"No export job '{job_id[:64]}'")


class ExportService:
    def __init__(self, repository: ResourceRepository, settings: Settings) -> None:
        self.repository = repository
        self.jobs = ExportJobs(repository.db)
        self.files = ExportFiles(settings.data_dir / "exports")
        self.worker = ExportWorker(repository, self.jobs, self.files, settings)

    async def start(self) -> None:
        await self.jobs.prepare()
        self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()

    # -- kick-off ------------------------------------------------------------------------------

    async def kick_off(
        self, level: str, params: list[tuple[str, str]], *, url: str, strict: bool, group_id: str | None = None,
        access: Policy = OPEN,
    ) -> tuple[str, list[dict[str, str]]]:
        """Queue an export (`level`: system, patient or group); returns its id and the warnings.
        Under a token: user/ or system/ read scopes for every type exported (a patient/ token
        reads its record with `Patient/[id]/$everything`); the job is the token subject's."""
        if access.compartment("Patient", "r") is not None:
            raise Forbidden("$export needs user/ or system/ scopes (a patient/ token: Patient/[id]/$everything)")
        if group_id is not None:
            access.require("Group", "r")
        request = parse_export(level, params, strict=strict, base_url=self.repository.base_url)
        warnings = list(request.warnings)
        members: list[str] | None = None
        if group_id is not None:
            members = await self._group_members(group_id, request.patients, warnings)
        elif request.patients is not None:
            members = await self._known_patients(request.patients, warnings)
        types = await self._types(level, request.types, warnings, access)
        job_id = uuid.uuid4().hex
        now = _now()
        # Before any transaction still being applied: its versions are stamped earlier than they
        # appear, and this export (and a later one `_since` this time) must hold them.
        in_flight = await self.repository.in_flight_since()
        moment = now if in_flight is None else min(now, in_flight - ONE_MS)
        await self.jobs.create({
            "_id": job_id, "request": url, "level": level, "group": group_id, "types": types,
            "since": request.since, "transactionTime": moment, "members": members, "warnings": warnings,
            "created": now, "requester": access.principal, "secured": not access.open,
        })
        self.worker.wake()
        return job_id, warnings

    async def _types(
        self, level: str, requested: tuple[str, ...] | None, warnings: list[dict[str, str]], access: Policy
    ) -> list[str]:
        eligible = supported_types() if level == "system" else supported_types() & set(patient_compartment())
        if requested is None:
            stored = set(await self.repository.stored_types())
            return sorted(t for t in stored & eligible if access.allows(t, "r") and _whole(access, t))
        for resource_type in requested:
            if not _whole(access, resource_type):  # also refuses a type the token may not read
                raise Forbidden(f"$export of {resource_type} needs a user/ or system/ scope without a search")
        for resource_type in requested:
            if resource_type not in eligible:
                warnings.append(_warning(f"{resource_type} is not in the Patient compartment: not exported"))
        return [t for t in requested if t in eligible]

    async def _group_members(
        self, group_id: str, requested: tuple[str, ...] | None, warnings: list[dict[str, str]]
    ) -> list[str]:
        """The Group's active Patient members (and of those, the `patient` ones if given)."""
        check_id(group_id)
        version = await self.repository.read("Group", group_id)
        if version is None:
            raise NotFound(f"Group/{group_id} is not known")
        if version.resource is None:
            raise Gone(f"Group/{group_id} was deleted")
        members: list[str] = []
        others = 0
        for member in version.resource.get("member", []):
            ref = (member.get("entity") or {}).get("reference")
            if member.get("inactive") is True or not isinstance(ref, str):
                continue
            local = reference_value(ref, self.repository.base_url)
            if local.startswith("Patient/") and "/" not in local[len("Patient/"):]:
                members.append(local[len("Patient/"):])
            else:
                others += 1
        if others:
            warnings.append(_warning(f"Group/{group_id} has {others} members that are not Patients: not exported"))
        if requested is None:
            return sorted(set(members))
        outside = [p for p in requested if p not in set(members)]
        for patient_id in outside[:20]:
            warnings.append(_warning(f"Patient/{patient_id} is not a member of Group/{group_id}", "not-found"))
        return sorted(set(requested) & set(members))

    async def _known_patients(self, requested: tuple[str, ...], warnings: list[dict[str, str]]) -> list[str]:
        known = []
        for patient_id in requested:
            version = await self.repository.read("Patient", patient_id)
            if version is None or version.resource is None:
                warnings.append(_warning(f"Patient/{patient_id} is not known: not exported", "not-found"))
            else:
                known.append(patient_id)
        return known

    # -- status, files, cancel -----------------------------------------------------------------

    async def _job(self, job_id: str, access: Policy) -> dict[str, Any]:
        """The job, for the token that started it (another token is told it does not exist)."""
        check_job_id(job_id)
        job = await self.jobs.get(job_id)
        if job is None or (job.get("secured") and job.get("requester") != access.principal):
            raise NotFound(f"No export job '{job_id}' (unknown, cancelled or expired)")
        return job

    async def status(self, job_id: str, base_url: str, access: Policy = OPEN) -> ExportStatus:
        job = await self._job(job_id, access)
        if job["status"] == "failed":
            raise FhirError(job.get("error") or "The export failed")
        if job["status"] != "complete":
            return ExportStatus(progress=_progress(job))
        files_url = f"{base_url}/{FILE_PATH}/{job_id}"
        output = [
            {"type": resource_type, "url": f"{files_url}/{f['name']}", "count": f["count"]}
            for resource_type in job["types"]
            for f in job["done"].get(resource_type, [])
        ]
        errors = [
            {"type": "OperationOutcome", "url": f"{files_url}/{f['name']}", "count": f["count"]}
            for f in job.get("errors", [])
        ]
        manifest = {
            "transactionTime": instant(job["transactionTime"]),
            "request": job["request"],
            "requiresAccessToken": bool(job.get("secured")),
            "output": output,
            "error": errors,
        }
        return ExportStatus(manifest=manifest, expires=job["expires"].astimezone(UTC))

    async def file(self, job_id: str, name: str, access: Policy = OPEN) -> Path:
        """A file of a complete job's manifest."""
        job = await self._job(job_id, access)
        listed = {f["name"] for files in job["done"].values() for f in files}
        listed.update(f["name"] for f in job.get("errors", []))
        path = self.files.path(job_id, name)
        if job["status"] != "complete" or name not in listed or not path.is_file():
            raise NotFound(f"Export job '{job_id}' has no file '{name[:80]}'")
        return path

    async def cancel(self, job_id: str, access: Policy = OPEN) -> None:
        """Delete the job and its files; a worker running it stops."""
        await self._job(job_id, access)
        await self.jobs.delete(job_id)
        self.worker.cancelled(job_id)
        await self.files.remove(job_id)


def _whole(access: Policy, resource_type: str) -> bool:
    """Whether the token reads every resource of the type (an export is not filtered)."""
    return access.compartment(resource_type, "r") is None and not access.narrowing(resource_type, "r")


def _progress(job: dict[str, Any]) -> str:
    """The X-Progress text (under 100 characters)."""
    progress = job.get("progress")
    done, total = len(job["done"]), len(job["types"])
    if job["status"] == "queued" or not progress or not progress.get("type"):
        return f"queued: {total} types to export" if job["status"] == "queued" else f"started: {done} of {total} types done"
    about = f" of about {progress['about']}" if progress["about"] >= progress["written"] else ""
    return (f"{progress['type'][:40]}: {progress['written']}{about} resources "
            f"(type {progress['index']} of {progress['types']})")
