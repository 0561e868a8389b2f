"""What every mapping of a replaced system's records shares: identifiers for source ids, the
transaction entries a record becomes, and references to resources of earlier records.

A system's module (`mappings/interactions.py`, …) declares:

- `KINDS`: record kind → the pydantic model of the source system's schema, in import order
  (a kind may refer to records of the kinds before it);
- `bundle_entries(kind, record)`: the transaction entries of one validated record, every
  resource written by a conditional update on its source identifier (`upsert_entry`: a
  re-import creates nothing new, and updates what changed in the source),
  the record's own resources linked by `urn:uuid:` fullUrls, earlier records' resources by
  conditional references;
- `CODE_SYSTEMS`: the CodeSystem resources of ours its codes come from (loaded first).
- optionally `dicom_instances(kind, record)`: the DICOM files of a record, which the importer
  sends to the DICOM node (C-STORE) before the record's transaction (`DicomInstance`).
"""

import io
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pydicom

from mappings import dicom

SOURCE = "urn:fhir-server:source"  # identifiers of source records: urn:fhir-server:source:<system>:<kind>


def source_system(system: str, kind: str) -> str:
    return f"{SOURCE}:{system}:{kind}"


def source_identifier(system: str, kind: str, source_id: object) -> dict[str, str]:
    """The identifier that keeps a source record's id on the resource made from it."""
    return {"system": source_system(system, kind), "value": str(source_id)}


def _escape(value: str) -> str:
    """A token part of a search value: `,`, `|`, `$` and `\\` escaped."""
    return "".join("\\" + c if c in ",|$\\" else c for c in value)


def identifier_query(identifier: dict[str, str]) -> str:
    """`identifier=system|value`, as a search's query string (the server URL-decodes it)."""
    return "identifier=" + quote(f"{_escape(identifier['system'])}|{_escape(identifier['value'])}", safe=":/|")


def conditional_reference(resource_type: str, identifier: dict[str, str]) -> dict[str, str]:
    """A Reference to the one resource with that identifier (resolved by the transaction)."""
    return {"reference": f"{resource_type}?{identifier_query(identifier)}"}


def placeholder() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def upsert_entry(
    resource: dict[str, Any], full_url: str, identifier: dict[str, str] | None = None, *, query: str | None = None
) -> dict[str, Any]:
    """A conditional update on the source `identifier` (default: the resource's first), or on
    `query`: creates the resource on the first import, updates it when the source record has
    changed since, and stores nothing when it has not (the server keeps the version: no-op
    updates), so that importing again is idempotent."""
    query = query or identifier_query(identifier or resource["identifier"][0])
    return {"fullUrl": full_url, "resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}?{query}"}}


def create_entry(resource: dict[str, Any], full_url: str, identifier: dict[str, str] | None = None) -> dict[str, Any]:
    """A POST entry, conditional on `identifier` (default: the resource's first identifier):
    for a resource found or created (a Patient by insurance number), never changed by a record."""
    identifier = identifier or resource["identifier"][0]
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": identifier_query(identifier)},
    }


def code_system_entry(code_system: dict[str, Any]) -> dict[str, Any]:
    """A CodeSystem of ours, by its canonical url (updated when ours has changed)."""
    return {"resource": code_system, "request": {"method": "PUT", "url": f"CodeSystem?url={quote(code_system['url'], safe=':/')}"}}


@dataclass(frozen=True)
class DicomInstance:
    """A DICOM file a record holds, which a system's `dicom_instances(kind, record)` hands to the
    importer: it is C-STOREd to the DICOM node before the record's transaction, so that the
    node's own mapping (`mappings.dicom`) makes its ImagingStudy, which the record's resources
    reference. `patient`: the identifier of the record's Patient; it must exist before the file
    is sent, or the node would create a Patient of its own from the header. `source`: the file
    as the record held it (checked whole before sending: rewriting a header can hide a
    truncation)."""

    data: bytes
    patient: dict[str, str]
    study: str
    sop: str
    source: bytes


def dicom_instance(source: bytes, patient: dict[str, str], fill: dict[str, str] | None = None) -> DicomInstance:
    """The file with the record's patient set (PatientID and IssuerOfPatientID, so that the node
    finds the imported Patient by that identifier) and the attributes of `fill` added where the
    header has none. ValueError for a file that is no storable DICOM instance, or a patient the
    header cannot name exactly (a PatientID is at most 64 characters of the default repertoire,
    without a backslash, which separates values)."""
    for part in ("value", "system"):
        text = patient[part]
        if len(text) > 64 or "\\" in text or not (text.isascii() and text.isprintable()):
            raise ValueError(f"the patient {part} '{text[:80]}' cannot go in a DICOM header "
                             "(at most 64 printable ASCII characters, no backslash)")
    data = dicom.coerced(source, replace={"PatientID": patient["value"], "IssuerOfPatientID": patient["system"]},
                         fill=fill or {})
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        named = dicom.patient_identifier(dicom.instance_facts(ds), "")
        study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    except Exception as exc:  # noqa: BLE001 - any header pydicom cannot take is a refusal, not a crash
        raise ValueError(f"the DICOM file cannot be read: {exc}") from exc
    if named != patient:
        raise ValueError(f"the DICOM header would name the patient {named}, not {patient}")
    return DicomInstance(data, patient, study, sop, source)
