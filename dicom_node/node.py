"""The DICOM Application Entity: Verification (C-ECHO), Storage (C-STORE) and Query/Retrieve
(C-FIND, C-MOVE, C-GET) SCP.

pynetdicom serves each association in its own thread; FHIR indexing belongs to the server's
event loop. The C-STORE handler checks the received file, places it in the file store and hands
the instance to the indexer on that loop (`run_coroutine_threadsafe`), answering at once; the
association's A-RELEASE is answered only when all its instances are in FHIR, so a sender that
has finished finds its studies indexed.

What a peer can make the node hold is bounded: datasets are received to disk
(`STORE_RECV_CHUNKED_DATASET`), and no PDU (an A-ASSOCIATE-RQ included) may be larger than the
configured limit, or the connection is dropped before it is read.

With a TLS context the node's port speaks TLS only (dicom_node/tls.py); a second, plain port
may be opened beside it for peers that cannot.
"""

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import _config, association, dimse_messages, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node import acceptor, direct, reactors
from dicom_node.files import FileStore
from dicom_node.indexing import DicomIndexer
from dicom_node.ingest import accept
from dicom_node.retrieve import query_retrieve
from dicom_node.sender import set_nodelay
from dicom_node.statuses import SUCCESS
from dicom_node.tls import TlsAssociationServer
from fhir_server.audit import dicom as audit

LOGGER = logging.getLogger(__name__)
RELEASE_WAIT_S = 25.0  # the longest an A-RELEASE waits for indexing (DCMTK gives up after 30 s)
REQUEST_LIMIT = 1 << 20  # an A-ASSOCIATE-RQ larger than this is not a real one
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]


def parse_allowed(text: str) -> dict[str, set[str] | None]:
    """`AET,AET2@host,AET2@10.0.0.5` → {AET: None (any host), AET2: {addresses}}."""
    allowed: dict[str, set[str] | None] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        title, _, host = item.partition("@")
        if not host:
            allowed[title] = None
            continue
        hosts = allowed.get(title, set())
        if hosts is not None:
            try:
                hosts.update(info[4][0] for info in socket.getaddrinfo(host, None))
            except OSError:
                LOGGER.warning("DICOM allow-list: host %s of %s does not resolve", host, title)
            allowed[title] = hosts
    return allowed


class _BoundedSocket:
    """pynetdicom reads a whole PDU of any declared length, 4 KiB at a time: bound it, and read
    in large pieces."""

    limit = 64 << 20
    _installed = False

    @classmethod
    def install(cls, limit: int) -> None:
        cls.limit = limit
        if not cls._installed:
            AssociationSocket.recv = cls.recv  # type: ignore[method-assign]
            cls._installed = True

    @staticmethod
    def recv(self: AssociationSocket, nr_bytes: int) -> bytearray:  # noqa: N805 - replaces a method
        assoc = getattr(self, "_assoc", None)
        awaiting_request = assoc is None or assoc.dul.state_machine.current_state == "Sta2"
        limit = min(REQUEST_LIMIT, _BoundedSocket.limit) if awaiting_request else _BoundedSocket.limit
        if nr_bytes > limit:
            raise OSError(f"a PDU of {nr_bytes} bytes is over the node's limit of {limit}")
        raw = self.socket
        assert raw is not None
        buffer = bytearray()
        while len(buffer) < nr_bytes:  # grows with what arrives, not with what was declared
            chunk = raw.recv(min(nr_bytes - len(buffer), 1 << 20))
            if not chunk:  # the peer closed: what was read
                break
            buffer += chunk
        return buffer


def _no_forced_collection() -> None:
    """pynetdicom's accepting loop runs a full `gc.collect()` every 60 associations and every
    30 s idle: over the server's objects (about 145 ms, holding the GIL) it stalled every
    request and association of the process. CPython's own collector frees what an association
    leaves; the objects start-up made are frozen out of it (`gc.freeze()` once started)."""


def _keep_early_cancels() -> None:
    """Close a race in pynetdicom's C-CANCEL: it empties the association's received C-CANCELs
    when it starts serving a request (stale ones, for requests answered before), and again when
    done; a C-CANCEL that the SCU sent right behind its C-FIND, read before that start, was
    dropped, and the whole answer sent (half the time, measured). Each message is numbered as it
    is received (in order, by the DUL thread); the first emptying keeps the C-CANCEL for the
    request being served that came after it, and empties in place (one read meanwhile is kept
    too); the second empties all."""
    if isinstance(getattr(DIMSEServiceProvider, "cancel_req", None), property):
        return
    received = itertools.count()
    to_primitive = dimse_messages.DIMSEMessage.message_to_primitive
    serve = association.Association._serve_request

    def numbered(self: Any) -> Any:
        primitive = to_primitive(self)
        primitive._received = next(received)
        return primitive

    def serving(self: Any, msg: Any, context_id: int) -> None:
        self.dimse.__dict__["_serving"] = msg
        try:
            serve(self, msg, context_id)
        finally:
            self.dimse.__dict__["_serving"] = None

    def get(dimse: Any) -> dict[int, Any]:
        return dimse.__dict__.setdefault("_cancels", {})

    def number(primitive: Any) -> int:
        return getattr(primitive, "_received", -1)

    def put(dimse: Any, value: dict[int, Any]) -> None:
        cancels, request = get(dimse), dimse.__dict__.pop("_serving", None)  # only the first emptying keeps
        for msg_id, cancel in list(cancels.items()):
            if request is None or msg_id != request.MessageID or number(cancel) < number(request):
                del cancels[msg_id]
        cancels.update(value)

    dimse_messages.DIMSEMessage.message_to_primitive = numbered  # type: ignore[method-assign]
    association.Association._serve_request = serving  # type: ignore[method-assign]
    DIMSEServiceProvider.cancel_req = property(get, put)  # type: ignore[assignment]


class DicomNode:
    def __init__(
        self,
        indexer: DicomIndexer,
        files: FileStore,
        loop: asyncio.AbstractEventLoop,
        *,
        ae_title: str,
        host: str,
        port: int,
        allowed: str = "",
        max_associations: int = 16,
        max_pdu_bytes: int = 64 << 20,
        fsync: bool = True,
        destinations: str = "",
        connection_timeout_s: float = 10.0,
        dimse_timeout_s: float = 60.0,
        tls: ssl.SSLContext | None = None,
        plain_port: int = 0,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.indexer = indexer
        self.files = files
        self.loop = loop
        self.address = (host, port)
        self.tls = tls
        # Beside a TLS port only: a plain one for peers that cannot do TLS (0: none).
        self.plain_address = (host, plain_port) if tls is not None and plain_port else None
        self.allowed = parse_allowed(allowed)
        self.fsync = fsync
        self._waiting: dict[int, list[concurrent.futures.Future[None]]] = {}
        self._lock = threading.Lock()
        self.ae = acceptor.NodeAE(ae_title=ae_title)
        # Large PDUs (a 5 MB instance in one is 55 % faster than in 16 KiB ones), but bounded: a
        # peer offered 0 (unlimited) may send a whole instance of any size in one PDU.
        self.ae.maximum_pdu_size = max_pdu_bytes
        self.ae.maximum_associations = max_associations
        self.ae.network_timeout = 60
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = dimse_timeout_s
        # The associations the node requests (C-MOVE's to its destinations): a host that drops
        # packets would otherwise hold the retrieve for the system's SYN retries (minutes).
        self.ae.connection_timeout = connection_timeout_s
        self.ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        # C-FIND, C-MOVE and C-GET from the catalog (dicom_node/query.py, retrieve.py).
        self.query_retrieve = query_retrieve(self.ae, indexer.catalog, destinations, client_tls)
        self.max_pdu_bytes = max_pdu_bytes
        self.server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        """Listen (in pynetdicom's threads); received datasets go to the store's incoming folder."""
        self.files.prepare()  # what a crash left in `incoming` was swept by `recover` before
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pydicom checks each value it reads or makes (a UID: a regular expression; some 40 per
        # association) against its VR and only warns of what fails: a tenth of an association's
        # CPU. What the node relies on it checks itself (files.check_instance, matching.py).
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        # pynetdicom decodes each C-FIND request again and formats every identifier for its log
        # lines, whatever the log level: more than a match's own cost.
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
        # Its standard handlers write every PDU and DIMSE message out as text for the debug log
        # (an association request's every context), whatever the level: about a tenth of a
        # C-FIND response's cost. Bound only when that log is on.
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            _config.LOG_HANDLER_LEVEL = "none"
        # pynetdicom's temporary files in the store's file system: then placing is a rename.
        dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined]
            tempfile.NamedTemporaryFile, dir=self.files.incoming
        )
        _BoundedSocket.install(self.max_pdu_bytes)
        reactors.install()
        direct.install()
        _keep_early_cancels()
        handlers: list[tuple[Any, Callable[..., Any]]] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACSE_RECV, self._on_acse),
            (evt.EVT_RELEASED, self._forget),
            (evt.EVT_ABORTED, self._forget),
            (evt.EVT_CONN_CLOSE, self._forget),
            (evt.EVT_CONN_CLOSE, acceptor.refill),
            *self.query_retrieve,
        ]
        handlers = audit.observed(handlers)  # associations, C-FIND, C-MOVE, C-GET in the audit trail
        direct.on_final_response(audit.answered)
        self.server = self._listen(self.address, handlers, self.tls)
        if self.plain_address is not None:
            self._listen(self.plain_address, handlers, None)

    def _listen(self, address: tuple[str, int], handlers: list[Any], tls: ssl.SSLContext | None) -> ThreadedAssociationServer:
        """One listening port of the AE (a TLS one does its handshakes in the associations'
        threads: `TlsAssociationServer`)."""
        # What `start_server(block=False)` does, with the node's server classes.
        server = self.ae.make_server(address, ssl_context=tls, evt_handlers=handlers,
                                     server_class=TlsAssociationServer if tls else acceptor.InlineAssociationServer)
        threading.Thread(target=make_target(server.serve_forever), name=f"DicomServer@{address[1]}", daemon=True).start()
        self.ae._servers.append(server)  # stopped with the others by `ae.shutdown()`
        server.contexts = acceptor.Contexts(server.contexts)
        server.service_actions = _no_forced_collection  # type: ignore[method-assign]
        if isinstance(server, acceptor.InlineAssociationServer):
            server.refill()
        LOGGER.info("DICOM node %s listening on %s:%d%s", self.ae.ae_title, *address, " (TLS)" if tls else "")
        return server

    def stop(self) -> None:
        """Stop listening and abort the associations still open (their instances are placed
        and marked: the next start indexes them)."""
        if self.server is not None:
            self.ae.shutdown()
            self.server = None

    # -- association ------------------------------------------------------------------------------

    def _on_open(self, event: evt.Event) -> None:
        """No Nagle delay (`set_nodelay`)."""
        set_nodelay(event)

    def _on_requested(self, event: evt.Event) -> None:
        """The allow-list: an unknown calling AE title, or a known one from another host, is
        rejected with 'calling AE title not recognised'."""
        if not self.allowed:
            return
        title = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        hosts = self.allowed.get(title, set())
        address = event.assoc.requestor.address
        if title not in self.allowed or (hosts is not None and address not in hosts):
            LOGGER.warning("DICOM association from %s at %s refused: not on the allow-list", title, address)
            audit.rejected(event, "calling AE title not recognised")
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()  # waits until the A-ASSOCIATE-RJ is out, as pynetdicom's own rejections do

    def _on_acse(self, event: evt.Event) -> None:
        """Hold the A-RELEASE response until the association's instances are indexed."""
        primitive = event.primitive
        if not isinstance(primitive, A_RELEASE) or primitive.result is not None:
            return
        with self._lock:
            waiting = self._waiting.pop(id(event.assoc), [])
        done, not_done = concurrent.futures.wait(waiting, timeout=RELEASE_WAIT_S)
        failed = sum(1 for f in done if f.cancelled() or f.exception() is not None)
        if failed or not_done:
            LOGGER.error("%d instances of an association are not indexed yet (they will be on reconcile)",
                         failed + len(not_done))

    def _forget(self, event: evt.Event) -> None:
        """The association is over: drop its waiters and any dataset it left half-received."""
        with self._lock:
            self._waiting.pop(id(event.assoc), None)
        message = getattr(event.assoc.dimse, "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is not None:
            with contextlib.suppress(OSError):
                partial.close()
                Path(partial.name).unlink(missing_ok=True)

    # -- C-STORE ----------------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int:
        accepted = accept(self.indexer, event.dataset_path, str(event.request.AffectedSOPInstanceUID),
                          fsync=self.fsync, loop=self.loop)
        audit.stored(event, accepted.status, accepted.facts)
        if accepted.indexed is not None:
            with self._lock:
                self._waiting.setdefault(id(event.assoc), []).append(accepted.indexed)
        return accepted.status
