"""The node's association servers: pynetdicom's threaded server, with each association of a
plain port made ahead of its connection, and the contexts held once for all associations.

pynetdicom makes an association's objects and starts its two threads when a connection
arrives, 1.4 ms before the A-ASSOCIATE-RQ can be read (on a 2-core machine); here that is done
when the previous connection closes, off any request's way.
"""

import copy
import functools
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)


class Gate(threading.Event):
    """What a spare association's two threads wait for: their connection (set), or the server's
    end (set, cancelled)."""

    cancelled = False

    def open(self, cancelled: bool = False) -> None:
        self.cancelled = cancelled
        self.set()


_GATE = "_spare_gate"  # an association's attribute: its Gate, when InlineAssociationServer.make made it


def _waiting(assoc: Association) -> bool:
    """A spare association, its threads started, waiting for its connection."""
    gate: Gate | None = assoc.__dict__.get(_GATE)
    return gate is not None and not gate.is_set()


class NodeAE(AE):
    """pynetdicom's AE, whose active associations (counted against `maximum_associations`,
    aborted by `shutdown`) leave out the spare ones waiting for a connection."""

    @property
    def active_associations(self) -> list[Association]:
        return [assoc for assoc in super().active_associations if not _waiting(assoc)]


class _SpareRequestHandler(RequestHandler):
    """pynetdicom's handler of a new connection, given the server's spare association (or one
    made now, when there is none): only the connection is left to set, and its threads to let go."""

    server: "InlineAssociationServer"

    def handle(self) -> None:
        assoc = self.server.take_spare() or self.server.make()
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        assoc.requestor.address_info = self.remote
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.__dict__[_GATE].open()  # in place of assoc.start()


class InlineAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, each association made in the accepting thread (it then
    runs in its own threads): pynetdicom started a thread per connection only to make it, one
    thread start more (0.2 to 0.4 ms) before every A-ASSOCIATE-AC. A TLS connection keeps that
    thread, for its handshake (`TlsAssociationServer`).

    Making the Association object (its providers, queues, timers and the server's handlers
    bound) and starting its two threads took 1.4 ms more before the A-ASSOCIATE-RQ could be
    read. The server keeps one association made ahead, its threads started and waiting
    (`refill`: when it starts, and when a connection of its closes, off any request's way):
    all that pynetdicom makes for a connection but the connection itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, request_handler=_SpareRequestHandler, **kwargs)
        self._spare: Association | None = None
        self._spare_lock = threading.Lock()
        self._closed = False  # no spare made any more (a connection may close after the server)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.process_request_thread(request, client_address)

    def take_spare(self) -> Association | None:
        with self._spare_lock:
            assoc, self._spare = self._spare, None
        return assoc

    def refill(self) -> None:
        """Make the spare association, if there is none and the server is open."""
        if self._spare is not None or self._closed:
            return
        assoc = self.make()
        with self._spare_lock:
            if self._spare is None and not self._closed:
                self._spare = assoc
                return
        assoc.__dict__[_GATE].open(cancelled=True)  # another refill made one first, or the server has closed

    def make(self) -> Association:
        """An association as pynetdicom makes one for a connection (`_create_association`),
        but for the connection, its two threads started and waiting at its gate."""
        assoc = Association(self.ae, MODE_ACCEPTOR)
        assoc._server = self
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.ae_title
        assoc.acceptor.address_info = AddressInformation.from_tuple(self.server_address)
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = copy.deepcopy(self.contexts)
        for event, handlers in self._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        gate = assoc.__dict__[_GATE] = Gate()
        for thread in (assoc, assoc.dul):
            thread.run = functools.partial(_when_open, gate, thread.run)  # type: ignore[method-assign]
        assoc.dul.daemon = True  # as the association's own thread: a spare never holds up the process's exit
        assoc._started_dul = True
        assoc.dul.start()
        assoc.start()
        return assoc

    def server_close(self) -> None:
        with self._spare_lock:
            self._closed = True
        spare = self.take_spare()
        if spare is not None:
            spare.__dict__[_GATE].open(cancelled=True)
        super().server_close()


def _when_open(gate: Gate, run: Callable[[], None]) -> None:
    """A spare association's thread: runs once the association has its connection."""
    gate.wait()
    if not gate.cancelled:
        run()


def refill(event: evt.Event) -> None:
    """A connection closed: its server makes its spare association again, if it keeps one."""
    server = getattr(event.assoc, "_server", None)
    if isinstance(server, InlineAssociationServer):
        server.refill()


class Contexts(list):  # type: ignore[type-arg]
    """The contexts the node supports, as its server holds them: pynetdicom deep-copies them for
    every association, in case its negotiation changed them (it does not: it makes new ones for
    the answer), about 12 ms for every storage class times 13 transfer syntaxes, longer than a
    C-ECHO. Each association gets its own list of the same contexts; the one handler that
    reorders a context's transfer syntaxes (`retrieve.prefer_requestor_syntaxes`) puts a copy
    in its place first."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)
