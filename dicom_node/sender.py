"""A C-STORE client (SCU) for Part 10 files held in memory: how the importer hands DICOM images
to the node, so that they are stored and indexed exactly as a modality's would be.

One association serves many files; it is opened on first use, and opened again with one more
presentation context when a file's SOP class and transfer syntax were not accepted. Releasing
it waits for the node to have indexed what it received (the node holds the A-RELEASE until
then), so after `close()` the ImagingStudies are searchable. With a TLS context the association
is made over TLS, the node's certificate checked against the host name.
"""

import io
import logging
import socket
import ssl
from types import TracebackType

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, Association, build_context, evt

from dicom_node import reactors
from dicom_node.store_scu import MAX_CONTEXTS

LOGGER = logging.getLogger(__name__)


class StoreError(Exception):
    """The node could not be reached, or refused the association."""


def set_nodelay(event: evt.Event) -> None:
    """pynetdicom leaves Nagle's algorithm on: 40 ms more per instance without this."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StoreSender:
    def __init__(
        self, host: str, port: int, called_aet: str, calling_aet: str = "FHIRIMPORT", timeout_s: float = 60,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port, self.called_aet = host, port, called_aet
        self.tls_args = (tls, host) if tls is not None else None
        reactors.install()  # no polling, and no response taken for a request (pynetdicom's issue #875)
        self.ae = AE(ae_title=calling_aet)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_s
        self.contexts: list[tuple[str, str]] = []
        self.assoc: Association | None = None

    def __enter__(self) -> "StoreSender":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def send(self, data: bytes) -> int:
        """C-STORE one Part 10 file in its transfer syntax; the status the node answered.
        ValueError for bytes that are not a Part 10 file; StoreError when the node cannot be
        reached."""
        try:
            dataset = dcmread(io.BytesIO(data))
            pair = (str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID))
        except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError) as exc:
            raise ValueError(f"not a DICOM Part 10 file: {exc}") from exc
        assoc = self._association(pair)
        try:
            answer = assoc.send_c_store(dataset)  # encoded again in its own transfer syntax
        except (AttributeError, ValueError) as exc:
            raise ValueError(f"the DICOM file cannot be sent: {exc}") from exc
        except RuntimeError as exc:  # the association ended between the check and the send
            self._drop()
            raise StoreError(f"the association with the DICOM node at {self.host}:{self.port} ended: {exc}") from exc
        if "Status" not in answer:
            self._drop()
            raise StoreError(f"the DICOM node at {self.host}:{self.port} did not answer the C-STORE")
        return int(answer.Status)

    def close(self) -> None:
        """Release the association: returns once the node has indexed every instance sent."""
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None

    def _association(self, pair: tuple[str, str]) -> Association:
        if self.assoc is not None and self.assoc.is_established and self._accepted(pair):
            return self.assoc
        if pair not in self.contexts:
            if len(self.contexts) >= MAX_CONTEXTS:
                self.contexts.clear()
            self.contexts.append(pair)
        self.close()
        contexts = [build_context(sop, syntax) for sop, syntax in self.contexts]
        assoc = self.ae.associate(self.host, self.port, contexts, ae_title=self.called_aet,
                                  evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)], tls_args=self.tls_args)
        if not assoc.is_established:
            raise StoreError(f"the DICOM node {self.called_aet} at {self.host}:{self.port} refused or cannot be reached")
        self.assoc = assoc
        if not self._accepted(pair):
            raise ValueError(f"the DICOM node accepts no SOP class {pair[0]} in transfer syntax {pair[1]}")
        return assoc

    def _accepted(self, pair: tuple[str, str]) -> bool:
        assert self.assoc is not None
        return any((c.abstract_syntax, c.transfer_syntax[0]) == pair for c in self.assoc.accepted_contexts)

    def _drop(self) -> None:
        if self.assoc is not None:
            self.assoc.abort()
        self.assoc = None
