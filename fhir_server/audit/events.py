"""AuditEvent resources in IHE BALP's shape (pure: no I/O).

One event says what happened (`type`, `subtype`, `action`), when (`recorded`), how it ended
(`outcome` 0, 4 or 8 with `outcomeDesc`), who asked and from where (`agent`, the requester, with
`network.address`), who observed it (`source`: this server) and what it concerned (`entity`:
the resource or DICOM study, the search as `query`, the Patient, so that an administrator can
search `AuditEvent?patient=`). The codes are FHIR's and DICOM's (PS3.16 DCM, PS3.15 A.5).
"""

import base64
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fhir_server.storage.repository import instant

EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
# What neither FHIR nor DICOM names: DIMSE services, auth endpoints, token roles.
LOCAL_SUBTYPE = "https://fhir-server.local/CodeSystem/audit-subtype"
LOCAL_ROLE = "https://fhir-server.local/CodeSystem/role"
DICOM_UID = "urn:dicom:uid"


def dcm(code: str, display: str) -> dict[str, str]:
    return {"system": DCM, "code": code, "display": display}


REST = {"system": EVENT_TYPE, "code": "rest", "display": "Restful Operation"}
INSTANCES_TRANSFERRED = dcm("110104", "DICOM Instances Transferred")
QUERY = dcm("110112", "Query")
SECURITY_ALERT = dcm("110113", "Security Alert")
USER_AUTHENTICATION = dcm("110114", "User Authentication")
LOGIN = dcm("110122", "Login")
LOGOUT = dcm("110123", "Logout")
SOURCE_ROLE = dcm("110153", "Source Role ID")  # the requesting side
APPLICATION_SERVER = {"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}

# action: C create, R read (also search and history), U update, D delete, E execute.
ACTIONS = {
    "create": "C", "read": "R", "vread": "R", "update": "U", "patch": "U", "delete": "D",
    "history-system": "R", "history-type": "R", "history-instance": "R", "search-system": "R",
    "search-type": "R", "capabilities": "R", "operation": "E", "batch": "E", "transaction": "E",
}


def interaction(code: str) -> dict[str, str]:
    return {"system": INTERACTION, "code": code, "display": code}


def local(code: str) -> dict[str, str]:
    return {"system": LOCAL_SUBTYPE, "code": code, "display": code}


def http_outcome(status: int) -> str:
    """0 success, 4 minor failure (the request's fault: 4xx), 8 serious failure (5xx)."""
    return "0" if status < 400 else "4" if status < 500 else "8"


@dataclass(frozen=True)
class Requester:
    """Who asked: the token's subject (client id or user) and fhirUser, or a name the request
    gave (an AE title, a client id in a form), and the network address it came from."""

    address: str | None
    subject: str | None = None
    fhir_user: str | None = None
    name: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)


def agent(requester: Requester) -> dict[str, Any]:
    found: dict[str, Any] = {"type": {"coding": [SOURCE_ROLE]}}
    who: dict[str, Any] = {}
    if requester.fhir_user:
        who["reference"] = requester.fhir_user
    if requester.subject:
        who["identifier"] = {"value": requester.subject}
        found["altId"] = requester.subject
    name = requester.name or requester.subject
    who["display"] = name or "anonymous"
    found["who"] = who
    found["name"] = name or "anonymous"
    if requester.roles:
        found["role"] = [{"coding": [{"system": LOCAL_ROLE, "code": r}]} for r in sorted(requester.roles)]
    found["requestor"] = True
    if requester.address:
        found["network"] = {"address": requester.address, "type": "2"}  # 2: IP address
    return found


def source(observer: str) -> dict[str, Any]:
    return {"observer": {"display": observer}, "type": [APPLICATION_SERVER]}


def resource_entity(reference: str) -> dict[str, Any]:
    """The resource acted on (`Type/id`, or the version `Type/id/_history/n`); a Patient is
    also BALP's patient entity."""
    if reference.startswith("Patient/"):
        return patient_entity(reference)
    return {
        "what": {"reference": reference},
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
    }


def patient_entity(reference: str) -> dict[str, Any]:
    return {
        "what": {"reference": reference},
        "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
        "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
    }


def patient_identifier_entity(system: str | None, value: str) -> dict[str, Any]:
    """A patient known by an identifier only (a DICOM PatientID)."""
    identifier = {"system": system, "value": value} if system else {"value": value}
    return {**patient_entity(""), "what": {"identifier": identifier}}


def query_entity(query: str) -> dict[str, Any]:
    return {
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
        "query": base64.b64encode(query.encode()).decode(),
    }


def study_entity(uid: str, instance: str | None = None) -> dict[str, Any]:
    """A DICOM study by its Study Instance UID (`entity:identifier=urn:dicom:uid|urn:oid:…`)."""
    entity: dict[str, Any] = {
        "what": {"identifier": {"type": {"coding": [dcm("110180", "Study Instance UID")]},
                                "system": DICOM_UID, "value": f"urn:oid:{uid}"}},
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
    }
    if instance:
        entity["detail"] = [{"type": "SOPInstanceUID", "valueString": instance}]
    return entity


def audit_event(
    *,
    kind: dict[str, str],
    subtype: dict[str, str] | None,
    action: str | None,
    recorded: datetime,
    outcome: str,
    outcome_desc: str,
    requester: Requester,
    observer: str,
    entities: list[dict[str, Any]],
) -> dict[str, Any]:
    event: dict[str, Any] = {"resourceType": "AuditEvent", "type": kind}
    if subtype:
        event["subtype"] = [subtype]
    if action:
        event["action"] = action
    event["recorded"] = instant(recorded)
    event["outcome"] = outcome
    if outcome_desc:
        event["outcomeDesc"] = outcome_desc[:1000]
    event["agent"] = [agent(requester)]
    event["source"] = source(observer)
    if entities:
        event["entity"] = entities
    return event
