"""Sending on an established association without pynetdicom's DUL reactor thread.

pynetdicom hands every PDU it sends to its DUL reactor's thread, one per loop, through queues
and the interpreter lock: a C-FIND's pending responses left one by one, some hundreds of
microseconds apart, while a reading peer idled between them. In an established association
(Sta6) a P-DATA changes no state (PS3.8 DT-1): the thread that has one sends it at once, in
order, under a lock the socket's other sends take too. A C-FIND, C-MOVE or C-GET response,
pending or final, goes further: it is framed in one pass (`encoding.response`: its command and
data set in one PDU when they fit, half the PDUs a peer reads) and written at once, without
pynetdicom's message objects (half a millisecond a response), and
without the EVT_DIMSE_SENT event (pynetdicom's debug log at every one: with it on, they take
pynetdicom's way). What the event told of a final response goes to the observers of
`on_final_response` instead, whichever way it was sent (the node's audit trail).
"""

import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import _config
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from dicom_node import encoding

QUERY_RETRIEVE = (C_FIND, C_GET, C_MOVE)  # their responses: many per request, then a final one
_queued_send_pdu = DULServiceProvider.send_pdu
_socket_send = AssociationSocket.send
_send_msg = DIMSEServiceProvider.send_msg
_final_observers: list[Callable[[Any, Any], None]] = []


def _ready(dul: DULServiceProvider) -> bool:
    """Established, with nothing queued for the reactor to send before."""
    return dul.state_machine.current_state == "Sta6" and not dul.to_provider_queue.queue


def _send_pdu(self: DULServiceProvider, primitive: Any) -> None:
    if isinstance(primitive, P_DATA) and _ready(self):
        self._send(P_DATA_TF(primitive))
    else:
        _queued_send_pdu(self, primitive)


def _locked_send(self: AssociationSocket, data: bytes) -> None:
    with self.__dict__.setdefault("_send_lock", threading.Lock()):
        _socket_send(self, data)


def _send_message(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    if type(primitive) not in QUERY_RETRIEVE:
        _send_msg(self, primitive, context_id)
        return
    framed = None
    if _config.LOG_HANDLER_LEVEL == "none" and _ready(self.dul):
        framed = encoding.response(primitive, context_id, self.maximum_pdu_size)
    if framed is not None:
        self.dul.socket.send(framed)  # type: ignore[union-attr]
    else:
        _send_msg(self, primitive, context_id)
    if primitive.MessageIDBeingRespondedTo is not None and primitive.Status not in (None, *encoding.PENDING_STATUSES):
        for observer in _final_observers:
            observer(self.assoc, primitive)


def on_final_response(observer: Callable[[Any, Any], None]) -> None:
    """Have `observer(association, primitive)` called once each final C-FIND, C-MOVE or C-GET
    response of this process is sent (idempotent)."""
    if observer not in _final_observers:
        _final_observers.append(observer)


def install() -> None:
    """In pynetdicom's place (idempotent)."""
    DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    AssociationSocket.send = _locked_send  # type: ignore[method-assign]
    DIMSEServiceProvider.send_msg = _send_message  # type: ignore[method-assign]
