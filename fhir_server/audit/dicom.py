"""The DICOM node's audit hooks, called in pynetdicom's association threads (PS3.15 A.5):

- an association accepted or rejected: User Authentication (110114), subtype A-ASSOCIATE, the
  calling AE title and its address, outcome 0 or 4;
- each C-STORE received: DICOM Instances Transferred (110104), action C, the study (and the
  SOP Instance UID), the patient's PatientID, the status sent;
- each C-FIND: Query (110112), action E; each C-MOVE and C-GET: Instances Transferred, action R;
  the studies the identifier names, and the final status (with the sub-operations' counts).

They record into the process's running trail (`trail.active()`); without one they do nothing.
"""

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pynetdicom import evt

from fhir_server.audit import events as ev
from fhir_server.audit.trail import active, now

LOGGER = logging.getLogger(__name__)
Hook = TypeVar("Hook", bound=Callable[..., None])
SERVICES = {evt.EVT_C_FIND: "C-FIND", evt.EVT_C_MOVE: "C-MOVE", evt.EVT_C_GET: "C-GET"}
ASSOCIATE = ev.local("A-ASSOCIATE")
# The C-FIND, C-MOVE and C-GET requests being answered: (association, message id) → (service,
# Study Instance UIDs), from the handler's start to its final response.
_running: dict[tuple[int, int], tuple[str, list[str]]] = {}


def dimse_outcome(status: int) -> str:
    """0 success; 8 the node's own trouble (out of resources, processing failure); 4 the rest
    (warnings, cancels, refusals of what the peer sent)."""
    if status == 0:
        return "0"
    return "8" if 0xA700 <= status <= 0xA7FF or status == 0x0110 else "4"


def _safe(hook: Hook) -> Hook:
    """A hook never disturbs the association it observes."""

    @functools.wraps(hook)
    def safe(*args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            LOGGER.exception("DICOM audit event not recorded")

    return safe  # type: ignore[return-value]


def observed(handlers: list[Any]) -> list[Any]:
    """The node's handlers with C-FIND, C-MOVE and C-GET noted, and the audit's own."""
    noted = [(item[0], _noting(item[1], SERVICES[item[0]]), *item[2:]) if item[0] in SERVICES else item
             for item in handlers]
    return [*noted, (evt.EVT_CONN_OPEN, _opened), (evt.EVT_ACCEPTED, _accepted),
            (evt.EVT_REJECTED, _rejected_by_pynetdicom), (evt.EVT_CONN_CLOSE, _closed)]


@_safe
def _opened(event: evt.Event) -> None:
    """A connection is a request being served, as an HTTP one is: the trail indexes (in this
    process, competing for the interpreter) only when none is, or once its batches lag."""
    trail = active()
    if trail is not None:
        event.assoc.__dict__["_audit_serving"] = trail
        trail.serving()


@_safe
def rejected(event: evt.Event, reason: str) -> None:
    """An association the node refused (its allow-list)."""
    title = str(event.assoc.requestor.primitive.calling_ae_title).strip()
    _record(ev.USER_AUTHENTICATION, ASSOCIATE, "E", "4", f"association rejected: {reason}", event.assoc, title, [])


@_safe
def stored(event: evt.Event, status: int, facts: dict[str, Any] | None) -> None:
    """A C-STORE answered with `status`; `facts` of the instance when it was stored."""
    instance = str(event.request.AffectedSOPInstanceUID)
    entities = []
    if facts:
        entities.append(ev.study_entity(facts["study"]["uid"], instance))
        patient = facts.get("patient") or {}
        if patient.get("id"):
            entities.append(ev.patient_identifier_entity(patient.get("issuer"), patient["id"]))
    desc = f"C-STORE status 0x{status:04X}" + ("" if facts else f" (SOP Instance UID {instance})")
    _record(ev.INSTANCES_TRANSFERRED, ev.local("C-STORE"), "C", dimse_outcome(status), desc, event.assoc, None, entities)


@_safe
def _accepted(event: evt.Event) -> None:
    _record(ev.USER_AUTHENTICATION, ASSOCIATE, "E", "0", "association accepted", event.assoc, None, [])


@_safe
def _rejected_by_pynetdicom(event: evt.Event) -> None:
    """Rejections pynetdicom makes itself (too many associations, no acceptable context)."""
    _record(ev.USER_AUTHENTICATION, ASSOCIATE, "E", "4", "association rejected", event.assoc, None, [])


def _noting(handler: Callable[..., Iterator[Any]], service: str) -> Callable[..., Iterator[Any]]:
    def noting(event: evt.Event, *args: Any) -> Iterator[Any]:
        try:
            values = getattr(event.identifier, "StudyInstanceUID", None) or []
            studies = [str(v).strip() for v in (values if isinstance(values, list | tuple) else [values])]
        except Exception:  # an identifier that does not decode: the handler answers it
            studies = []
        _running[(id(event.assoc), event.request.MessageID)] = (service, [s for s in studies if s])
        yield from handler(event, *args)

    return noting


@_safe
def answered(assoc: Any, primitive: Any) -> None:
    """A final C-FIND, C-MOVE or C-GET response, once sent (`dicom_node.direct.on_final_response`):
    its event, with the status sent."""
    status = int(primitive.Status)
    found = _running.pop((id(assoc), int(primitive.MessageIDBeingRespondedTo)), None)
    if found is None:  # its request was noted when it came: an answer to nothing
        return
    service, studies = found
    desc = f"{service} status 0x{status:04X}"
    counts = [(name, getattr(primitive, f"NumberOf{name.title()}Suboperations", None))
              for name in ("completed", "failed", "warning")]
    if any(n is not None for _, n in counts):
        desc += ", sub-operations: " + ", ".join(f"{n} {name}" for name, n in counts if n is not None)
    kind, action = (ev.QUERY, "E") if service == "C-FIND" else (ev.INSTANCES_TRANSFERRED, "R")
    entities = [ev.study_entity(uid) for uid in studies]
    _record(kind, ev.local(service), action, dimse_outcome(status), desc, assoc, None, entities)


@_safe
def _closed(event: evt.Event) -> None:
    trail = event.assoc.__dict__.pop("_audit_serving", None)
    if trail is not None:
        trail.served()
    for key in [k for k in list(_running) if k[0] == id(event.assoc)]:
        _running.pop(key, None)


def _record(
    kind: dict[str, str], subtype: dict[str, str], action: str, outcome: str, desc: str,
    assoc: Any, title: str | None, entities: list[dict[str, Any]],
) -> None:
    trail = active()
    if trail is None:
        return
    requestor = assoc.requestor
    name = title or str(requestor.ae_title).strip() or None
    requester = ev.Requester(address=requestor.address or None, name=name)
    trail.record(
        ev.audit_event(kind=kind, subtype=subtype, action=action, recorded=now(), outcome=outcome,
                       outcome_desc=desc, requester=requester, observer=trail.dicom_observer, entities=entities)
    )
