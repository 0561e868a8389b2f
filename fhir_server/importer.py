"""`fhir-server import <system> FILE…`: the records of a replaced system, each written as one
FHIR transaction through the server's HTTP API (all of a record's resources or none).

Records are read from JSON (`{kind: [records]}`, or a list for one kind) or CSV (one kind per
file, named by the file or `--kind`), validated with the system's pydantic models (a rejected
record is reported with its file, kind, row and reason), mapped by `mappings.<system>`, and
posted. Every resource is written by a conditional update on its source identifier, so importing
again creates nothing new and updates what changed in the source. The DICOM files a record holds (a system's `dicom_instances`) are sent to
the DICOM node first (C-STORE, one association for the whole import), whose own mapping makes
their ImagingStudy; the record's resources reference it. The summary counts what was created,
updated and left unchanged (by the write-outcome codes of the transaction response), the DICOM
instances stored and what was rejected; any rejection makes the exit status non-zero.
"""

import csv
import importlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from dicom_node.files import BadInstance, check_instance
from dicom_node.sender import StoreError, StoreSender
from fhir_server import fhir_json
from fhir_server.services.resources import WRITE_OUTCOME_SYSTEM
from mappings.records import DicomInstance, code_system_entry, identifier_query

SYSTEMS = ("interactions", "ehr", "assessment", "retinal")


@dataclass(frozen=True)
class SourceRecord:
    kind: str
    where: str  # file and row, for the report
    data: dict[str, Any]
    folder: Path | None = None  # of the input file: the files a record names are relative to it


@dataclass
class Summary:
    created: Counter[str] = field(default_factory=Counter)  # by resource type
    updated: Counter[str] = field(default_factory=Counter)  # the source record changed since the last import
    unchanged: Counter[str] = field(default_factory=Counter)  # there already, as the record has it
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    records: int = 0
    dicom: int = 0  # DICOM instances stored by the node

    def count(self, resource_type: str, outcome: str) -> None:
        """One transaction entry, by the server's write-outcome code."""
        {"created": self.created, "updated": self.updated}.get(outcome, self.unchanged)[resource_type] += 1

    def report(self) -> str:
        lines = [f"{self.records} records: {self.records - len(self.rejected)} imported, {len(self.rejected)} rejected"]
        for name, counts in (("created", self.created), ("updated", self.updated), ("unchanged", self.unchanged)):
            if counts:
                lines.append(f"{name}: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
        if self.dicom:
            lines.append(f"DICOM instances stored by the node: {self.dicom}")
        lines += [f"rejected {where}: {reason}" for where, reason in self.rejected]
        return "\n".join(lines)


def system_module(system: str) -> ModuleType:
    if system not in SYSTEMS:
        raise ValueError(f"unknown system '{system}': one of {', '.join(SYSTEMS)}")
    return importlib.import_module(f"mappings.{system}")


def _kind_of(name: str, kinds: Iterable[str]) -> str | None:
    """`appointments`, `appointment`, `Laboratory-Results` → the kind they name."""
    wanted = name.lower().replace("-", "_")
    for kind in kinds:
        if wanted in (kind, kind + "s", kind + "es") or wanted == kind.removesuffix("y") + "ies":
            return kind
    return None


def read_records(path: Path, kinds: list[str], kind: str | None = None) -> Iterator[SourceRecord]:
    """The records of one file, in the order of the system's kinds."""
    if path.suffix.lower() == ".csv":
        found = kind or _kind_of(path.stem, kinds)
        if found is None:
            raise ValueError(f"{path}: which kind of record? name the file after one ({', '.join(kinds)}) or give --kind")
        with path.open(newline="", encoding="utf-8-sig") as handle:
            for row, data in enumerate(csv.DictReader(handle), start=2):  # row 1 is the header
                yield SourceRecord(found, f"{path.name} row {row}", {k: v for k, v in data.items() if v not in ("", None)},
                                   path.parent)
        return
    document = fhir_json.loads(path.read_bytes())
    if isinstance(document, list):
        if kind is None and len(kinds) != 1:
            raise ValueError(f"{path}: a list of records needs --kind ({', '.join(kinds)})")
        document = {kind or kinds[0]: document}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected an object {{kind: [records]}} or a list of records")
    groups: dict[str, list[Any]] = {}
    for name, items in document.items():
        found = _kind_of(name, kinds)
        if found is None or not isinstance(items, list):
            raise ValueError(f"{path}: '{name}' is not a list of records of a known kind ({', '.join(kinds)})")
        groups[found] = items
    for found in kinds:
        for index, data in enumerate(groups.get(found, []), start=1):
            yield SourceRecord(found, f"{path.name} {found} #{index}", data if isinstance(data, dict) else {"_": data},
                               path.parent)


def _reason(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in error.errors())


def _outcome(response: httpx.Response) -> str:
    try:
        body = response.json()
        return "; ".join(i.get("diagnostics", "") for i in body.get("issue", [])) or response.text[:300]
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"


@dataclass(frozen=True)
class Destination:
    """The server records go to: its FHIR base, and its DICOM node (for DICOM files)."""

    url: str
    dicom_host: str | None = None  # default: the FHIR base's host
    dicom_port: int = 11112
    dicom_aet: str = "FHIRSERVER"
    token: str | None = None  # a bearer access token, when the server needs one

    def sender(self) -> StoreSender:
        host = self.dicom_host or urlsplit(self.url).hostname or "127.0.0.1"
        return StoreSender(host, self.dicom_port, self.dicom_aet)


# C-STORE statuses of a stored instance: success, and the warnings (coercion of data elements,
# elements discarded, data set does not match the SOP class) of PS3.4 Table B.2-1.
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def _conditional_references(value: Any) -> set[str]:
    """The conditional references (`Type?criteria`) in the resources of transaction entries."""
    found: set[str] = set()
    if isinstance(value, dict):
        reference = value.get("reference")
        if isinstance(reference, str) and "?" in reference and "/" not in reference.partition("?")[0]:
            found.add(reference)
        for item in value.values():
            found |= _conditional_references(item)
    elif isinstance(value, list):
        for item in value:
            found |= _conditional_references(item)
    return found


def _check_whole(data: bytes) -> None:
    """The node's own completeness check on the file as the record held it (rewriting its header
    would hide a truncation); ValueError when it fails."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "instance.dcm"
        path.write_bytes(data)
        try:
            check_instance(path)
        except BadInstance as exc:
            raise ValueError(f"the DICOM file is refused: {exc}") from exc


def _outcome_code(response: dict[str, Any]) -> str:
    """What the server did with an entry: the write-outcome code of its `outcome` (created,
    updated, unchanged, matched), else judged by the status."""
    for issue in (response.get("outcome") or {}).get("issue", []):
        for coding in (issue.get("details") or {}).get("coding", []):
            if coding.get("system") == WRITE_OUTCOME_SYSTEM:
                return str(coding.get("code"))
    return "created" if str(response.get("status", "")).startswith("201") else "unchanged"


@dataclass(frozen=True)
class _Sent:
    """A DICOM instance the node accepted, to be found indexed once the association is released."""

    where: str
    instance: DicomInstance
    patient: str  # Patient/<id>


class Importer:
    def __init__(self, module: ModuleType, client: httpx.Client, dicom: StoreSender | None = None) -> None:
        self.module = module
        self.client = client
        self.dicom = dicom
        self.kinds: dict[str, type[BaseModel]] = module.KINDS
        self.found: dict[str, str] = {}  # conditional reference → the one resource it names (searched once)
        self.sent: list[_Sent] = []

    def load_code_systems(self) -> None:
        """Our CodeSystems first: the records' codes come from them."""
        entries = [code_system_entry(cs) for cs in getattr(self.module, "CODE_SYSTEMS", [])]
        if entries:
            response = self._post(entries)
            if response.status_code != 200:
                raise RuntimeError(f"the CodeSystems could not be loaded: {_outcome(response)}")

    def run(self, records: Iterable[SourceRecord], total: int | None = None, progress: bool = True) -> Summary:
        """Import `records`, then `finish`: the summary is complete once the DICOM node has
        indexed what it was sent."""
        summary = Summary()
        for record in tqdm(records, total=total, unit="rec", disable=not progress):
            summary.records += 1
            try:
                entries, instances = self._mapped(record)
                stored = self._store(record.where, entries, instances)
            except ValidationError as exc:
                summary.rejected.append((record.where, _reason(exc)))
                continue
            except ValueError as exc:
                summary.rejected.append((record.where, str(exc)))
                continue
            summary.dicom += stored
            if not entries:  # all of it went to the DICOM node
                continue
            response = self._post(entries)
            if response.status_code != 200:
                kept = " (its DICOM file was stored: importing the record again completes it)" if stored else ""
                summary.rejected.append((record.where, _outcome(response) + kept))
                continue
            for entry, answered in zip(entries, response.json().get("entry", []), strict=False):
                kind = entry["resource"]["resourceType"] if "resource" in entry else "?"
                summary.count(kind, _outcome_code(answered.get("response", {})))
        self.finish(summary)
        return summary

    def finish(self, summary: Summary) -> None:
        """Release the DICOM association (the node answers once it has indexed every instance),
        then check that each one is in its ImagingStudy, of the record's Patient."""
        if self.dicom is not None:
            self.dicom.close()
        for sent in self.sent:
            study = self.client.get(f"/ImagingStudy/{sent.instance.study}")
            body = study.json() if study.status_code == 200 else {}
            sops = {i.get("uid") for series in body.get("series", []) for i in series.get("instance", [])}
            if body.get("subject", {}).get("reference") != sent.patient or sent.instance.sop not in sops:
                summary.rejected.append((sent.where, f"the DICOM node stored instance {sent.instance.sop} but did not index "
                                                     f"it in ImagingStudy/{sent.instance.study} of {sent.patient}"))
        self.sent.clear()

    def _mapped(self, record: SourceRecord) -> tuple[list[dict[str, Any]], list[DicomInstance]]:
        """The record's transaction entries and DICOM files (ValueError or ValidationError: it
        is rejected; a mapping failing otherwise on odd input is a rejection too, not a crash)."""
        try:
            model = self.kinds[record.kind].model_validate(self._with_files(record))
            entries = self.module.bundle_entries(record.kind, model)
            instances = getattr(self.module, "dicom_instances", lambda kind, record: [])(record.kind, model)
        except (ValidationError, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - reported with the record, the import goes on
            raise ValueError(f"the record cannot be mapped: {type(exc).__name__}: {exc}") from exc
        return entries, instances

    def _store(self, where: str, entries: list[dict[str, Any]], instances: list[DicomInstance]) -> int:
        """C-STORE a record's DICOM files to the node (ValueError: the record is rejected).

        First, so that a file is not stored for a record that cannot be: every conditional
        reference of the record's entries, and its Patient, must name one existing resource
        (the node would otherwise create a Patient of its own from the header), and each file
        must be whole."""
        if not instances:
            return 0
        if self.dicom is None:
            raise ValueError("the record holds a DICOM file, and no DICOM node is configured to store it")
        for query in sorted(_conditional_references(entries)):
            self._one(query)
        for instance in instances:
            patient = self._one(f"Patient?{identifier_query(instance.patient)}")
            _check_whole(instance.source)
            try:
                status = self.dicom.send(instance.data)
            except StoreError as exc:
                raise ValueError(str(exc)) from exc
            if status not in STORED:
                raise ValueError(f"the DICOM node refused the file: status 0x{status:04X}")
            self.sent.append(_Sent(where, instance, patient))
        return len(instances)

    def _one(self, query: str) -> str:
        """`Type/id` of the one resource a conditional reference names; ValueError otherwise."""
        if query not in self.found:
            resource_type = query.partition("?")[0]
            answer = self.client.get(f"/{query}&_elements=id&_count=2")
            matches = answer.json().get("entry", []) if answer.status_code == 200 else []
            if len(matches) != 1:
                raise ValueError(f"'{query}' names {len(matches) or 'no'} resources, not one")
            self.found[query] = f"{resource_type}/{matches[0]['resource']['id']}"
        return self.found[query]

    def _with_files(self, record: SourceRecord) -> dict[str, Any]:
        """The record with the files it names read in (the system's `FILES`: kind → (path
        field, content field)), each at most one byte over the system's limit, so that the
        model can tell a file too large."""
        fields = getattr(self.module, "FILES", {}).get(record.kind)
        name = record.data.get(fields[0]) if fields else None
        if not fields or not isinstance(name, str) or record.folder is None:
            return record.data
        limit = getattr(self.module, "MAX_FILE_BYTES", 10 * 1024 * 1024)
        try:
            path = (record.folder / name).resolve()
            if not path.is_relative_to(record.folder.resolve()) or not path.is_file():
                raise ValueError(f"{fields[0]}: '{name}' is not a file beside the input file")
            with path.open("rb") as handle:
                return {**record.data, fields[1]: handle.read(limit + 1)}
        except OSError as exc:
            raise ValueError(f"{fields[0]}: '{name}' cannot be read: {exc.strerror}") from exc

    def _post(self, entries: list[dict[str, Any]]) -> httpx.Response:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        return self.client.post(
            "", content=fhir_json.dumps(bundle),
            headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"},
        )


def import_files(
    system: str, paths: list[Path], to: Destination | str, kind: str | None = None, progress: bool = True
) -> Summary:
    """Import files of `system` into the server `to` (or at the FHIR base `to`)."""
    kinds = list(system_module(system).KINDS)
    records: list[SourceRecord] = []
    for path in paths:
        records.extend(read_records(path, kinds, kind))
    order = {k: i for i, k in enumerate(kinds)}
    records.sort(key=lambda r: order[r.kind])  # earlier kinds first, whatever the files' order
    return _import(system, records, to, progress)


def import_generated(
    system: str, generated: dict[str, list[dict[str, Any]]], to: Destination | str, progress: bool = True
) -> Summary:
    """Import records made by a generator (`--randomize`), kinds in the system's order."""
    records = [
        SourceRecord(kind, f"generated {kind} #{i}", data)
        for kind in system_module(system).KINDS
        for i, data in enumerate(generated.get(kind, []), start=1)
    ]
    return _import(system, records, to, progress)


def _import(system: str, records: list[SourceRecord], to: Destination | str, progress: bool) -> Summary:
    destination = Destination(to) if isinstance(to, str) else to
    module = system_module(system)
    with (
        httpx.Client(base_url=destination.url.rstrip("/"), timeout=120,
                     headers={"Authorization": f"Bearer {destination.token}"} if destination.token else None) as client,
        destination.sender() as sender,  # released last: returns once the node has indexed all
    ):
        importer = Importer(module, client, sender)
        importer.load_code_systems()
        return importer.run(records, total=len(records), progress=progress)


def dumps_summary(summary: Summary) -> str:
    return json.dumps({
        "records": summary.records,
        "created": dict(summary.created),
        "updated": dict(summary.updated),
        "unchanged": dict(summary.unchanged),
        "dicom": summary.dicom,
        "rejected": [{"where": w, "reason": r} for w, r in summary.rejected],
    })
