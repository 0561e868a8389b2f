"""`fhir-server import <system> FILE…`: the records of a replaced system, each written as one
FHIR transaction through the server's HTTP API (all of a record's resources or none).

Records are read from JSON (`{kind: [records]}`, or a list for one kind) or CSV (one kind per
file, named by the file or `--kind`), validated with the system's pydantic models (a rejected
record is reported with its file, kind, row and reason), mapped by `mappings.<system>`, and
posted. Every resource is created conditionally on its source identifier, so importing again
creates nothing new. The summary counts what was created, what existed already and what was
rejected; any rejection makes the exit status non-zero.
"""

import csv
import importlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from fhir_server import fhir_json
from mappings.records import code_system_entry

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
    existing: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    records: int = 0

    def report(self) -> str:
        lines = [f"{self.records} records: {self.records - len(self.rejected)} imported, {len(self.rejected)} rejected"]
        if self.created:
            lines.append("created: " + ", ".join(f"{n} {t}" for t, n in sorted(self.created.items())))
        if self.existing:
            lines.append("already there: " + ", ".join(f"{n} {t}" for t, n in sorted(self.existing.items())))
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


class Importer:
    def __init__(self, module: ModuleType, client: httpx.Client) -> None:
        self.module = module
        self.client = client
        self.kinds: dict[str, type[BaseModel]] = module.KINDS

    def load_code_systems(self) -> None:
        """Our CodeSystems first: the records' codes come from them."""
        entries = [code_system_entry(cs) for cs in getattr(self.module, "CODE_SYSTEMS", [])]
        if entries:
            response = self._post(entries)
            if response.status_code != 200:
                raise RuntimeError(f"the CodeSystems could not be loaded: {_outcome(response)}")

    def run(self, records: Iterable[SourceRecord], total: int | None = None, progress: bool = True) -> Summary:
        summary = Summary()
        for record in tqdm(records, total=total, unit="rec", disable=not progress):
            summary.records += 1
            try:
                model = self.kinds[record.kind].model_validate(self._with_files(record))
                entries = self.module.bundle_entries(record.kind, model)
            except ValidationError as exc:
                summary.rejected.append((record.where, _reason(exc)))
                continue
            except ValueError as exc:
                summary.rejected.append((record.where, str(exc)))
                continue
            response = self._post(entries)
            if response.status_code != 200:
                summary.rejected.append((record.where, _outcome(response)))
                continue
            for entry, answered in zip(entries, response.json().get("entry", []), strict=False):
                kind = entry["resource"]["resourceType"] if "resource" in entry else "?"
                status = answered.get("response", {}).get("status", "")
                (summary.created if status.startswith("201") else summary.existing)[kind] += 1
        return summary

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


def import_files(system: str, paths: list[Path], url: str, kind: str | None = None, progress: bool = True) -> Summary:
    """Import files of `system` into the server at `url` (its FHIR base)."""
    module = system_module(system)
    kinds = list(module.KINDS)
    records: list[SourceRecord] = []
    for path in paths:
        records.extend(read_records(path, kinds, kind))
    order = {k: i for i, k in enumerate(kinds)}
    records.sort(key=lambda r: order[r.kind])  # earlier kinds first, whatever the files' order
    with httpx.Client(base_url=url.rstrip("/"), timeout=120) as client:
        importer = Importer(module, client)
        importer.load_code_systems()
        return importer.run(records, total=len(records), progress=progress)


def import_generated(system: str, generated: dict[str, list[dict[str, Any]]], url: str, progress: bool = True) -> Summary:
    """Import records made by a generator (`--randomize`), kinds in the system's order."""
    module = system_module(system)
    records = [
        SourceRecord(kind, f"generated {kind} #{i}", data)
        for kind in module.KINDS
        for i, data in enumerate(generated.get(kind, []), start=1)
    ]
    with httpx.Client(base_url=url.rstrip("/"), timeout=120) as client:
        importer = Importer(module, client)
        importer.load_code_systems()
        return importer.run(records, total=len(records), progress=progress)


def dumps_summary(summary: Summary) -> str:
    return json.dumps({
        "records": summary.records,
        "created": dict(summary.created),
        "existing": dict(summary.existing),
        "rejected": [{"where": w, "reason": r} for w, r in summary.rejected],
    })
