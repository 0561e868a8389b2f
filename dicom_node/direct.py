"""Sending on an established association without pynetdicom's DUL reactor thread.

pynetdicom hands every PDU it sends to its DUL reactor's thread, one per loop, through queues
and the interpreter lock: a C-FIND's pending responses left one by one, some hundreds of
microseconds apart, while a reading peer idled between them. In an established association
(Sta6) a P-DATA changes no state (PS3.8 DT-1): the thread that has one sends it at once, in
order, under a lock the socket's other sends take too. A pending C-FIND, C-MOVE or C-GET
response goes further: its PDUs are framed in one pass (`encoding.pending`) and written at
once, without pynetdicom's message objects (half its cost), and without the EVT_DIMSE_SENT
event: the node's audit trail looks at final responses only (pynetdicom's debug log at every
one: with it on, they take pynetdicom's way).
"""

import threading
from typing import Any

from pynetdicom import _config
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from dicom_node import encoding

PENDING = (C_FIND, C_GET, C_MOVE)  # the responses sent many times per request
_queued_send_pdu = DULServiceProvider.send_pdu
_socket_send = AssociationSocket.send
_send_msg = DIMSEServiceProvider.send_msg


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
    if type(primitive) in PENDING and _config.LOG_HANDLER_LEVEL == "none" and _ready(self.dul):
        framed = encoding.pending(primitive, context_id, self.maximum_pdu_size)
        if framed is not None:
            self.dul.socket.send(framed)  # type: ignore[union-attr]
            return
    _send_msg(self, primitive, context_id)


def install() -> None:
    """In pynetdicom's place (idempotent)."""
    DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    AssociationSocket.send = _locked_send  # type: ignore[method-assign]
    DIMSEServiceProvider.send_msg = _send_message  # type: ignore[method-assign]
