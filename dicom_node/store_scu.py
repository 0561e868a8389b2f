"""The C-STORE sub-operations of a C-MOVE, on one blocking socket in the thread serving it.

pynetdicom opens a C-MOVE's association with the destination as any other: two threads more,
its state machine, and queues between them. On loopback that was 2.5 ms to associate, 2 ms
per C-STORE besides the destination's own time, and 1 ms to release, for a strict exchange of
requests and responses driven by one thread. Here that thread does the exchange itself, with
pynetdicom's PDU classes for the association PDUs: A-ASSOCIATE-RQ, then one C-STORE at a time
(a stored file's data set streamed from disk, after its File Meta group, in a presentation
context of its own transfer syntax: PS3.8 9.3, PS3.7 9.3.1), then A-RELEASE-RQ.

pynetdicom's C-MOVE SCP takes a `StoreAssociation` where it would take the Association it
opens (`retrieve.open_sub_associations`): it reads `is_established`, calls `send_c_store` for
each sub-operation (an exception counts it failed) and `release`.
"""

import contextlib
import functools
import logging
import os
import socket
import ssl
from io import BytesIO
from typing import Any, BinaryIO

from pydicom import Dataset
from pynetdicom import build_context
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

from dicom_node import encoding
from dicom_node.files import dataset_offset

LOGGER = logging.getLogger(__name__)
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1
ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
RELEASE_REQUEST = bytes([RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0])
ABORT_REQUEST = bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # by the service user, no reason given
COMMAND, DATA, LAST = 0x01, 0x00, 0x02  # message control header bits (PS3.8 E.2)
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
FRAGMENT_UNLIMITED = 1 << 20  # the fragment size when the destination sets no maximum
SEND_BATCH = 1 << 18  # bytes of file read and written at once
MAX_PDU_READ = 1 << 24  # a response PDU longer than this is no C-STORE response
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2: odd ids 1 to 255)


class SubAssociationError(Exception):
    """The destination ended the association, broke the protocol or timed out."""


class StoreAssociation:
    """An association with a C-MOVE destination, as requestor, for C-STOREs only."""

    def __init__(self, sock: socket.socket | None, accepted: dict[tuple[str, str], int], max_pdu: int,
                 dimse_timeout_s: float, acse_timeout_s: float, peer: str) -> None:
        self.sock = sock
        self.accepted = accepted  # (SOP class, transfer syntax) -> presentation context id
        self.fragment = max_pdu - 6 if max_pdu else FRAGMENT_UNLIMITED  # PDV item: length, context id, header
        self.dimse_timeout_s, self.acse_timeout_s = dimse_timeout_s, acse_timeout_s
        self.peer = peer
        self.is_established = sock is not None

    # pynetdicom closes a refused association's socket as `dul.socket.close()`.
    @property
    def dul(self) -> "StoreAssociation":
        return self

    @property
    def socket(self) -> "StoreAssociation":
        return self

    def send_c_store(self, dataset: Dataset, msg_id: int = 1, originator_aet: str | None = None,
                     originator_id: int | None = None) -> Dataset:
        """C-STORE the stored file `dataset` names (a `retrieve.StoredInstance`); the response's
        command set (its Status). ValueError when the destination accepted no context for the
        file's SOP class in its transfer syntax; SubAssociationError when the association ends."""
        if not self.is_established or self.sock is None:
            raise SubAssociationError(f"the association with {self.peer} has ended")
        ref = dataset.stored
        context_id = self.accepted.get((ref.sop_class, ref.transfer_syntax))
        if context_id is None:
            LOGGER.warning("instance %s (%s) not sent to %s: it accepted no presentation context for it",
                           ref.sop, ref.transfer_syntax or "no transfer syntax", self.peer)
            raise ValueError(f"{self.peer} accepted no presentation context for {ref.sop_class} in {ref.transfer_syntax}")
        with contextlib.ExitStack() as closing:
            try:  # checked before anything is sent: the association goes on without this instance
                file = closing.enter_context(ref.path.open("rb"))
                start = dataset_offset(file.read(144))
                size = os.fstat(file.fileno()).st_size - start
                if size <= 0:
                    raise ValueError("the file holds no data set")
            except (OSError, ValueError) as exc:
                LOGGER.warning("instance %s not sent to %s: %s", ref.sop, self.peer, exc)
                raise
            command = encoding.store_request(msg_id, ref.sop_class, ref.sop, originator_aet, originator_id)
            try:
                self._send(context_id, command, file, start, size)
                return self._response(msg_id)
            except (OSError, SubAssociationError, ValueError) as exc:
                self.abort()  # a message cut short cannot be resumed
                raise SubAssociationError(f"C-STORE of {ref.sop} to {self.peer}: {exc}") from exc

    def release(self) -> None:
        """A-RELEASE-RQ, and the connection closed once the destination answers (or aborted
        when it does not within the ACSE timeout)."""
        if not self.is_established or self.sock is None:
            return
        try:
            self.sock.settimeout(self.acse_timeout_s)
            self.sock.sendall(RELEASE_REQUEST)
            while (kind := _read_pdu(self.sock)[0]) == P_DATA:  # a late response: nothing waits for it
                pass
            if kind != RELEASE_RP:
                raise SubAssociationError(f"PDU type {kind:#04x} in answer to A-RELEASE-RQ")
        except (OSError, SubAssociationError) as exc:
            LOGGER.warning("release of the association with %s failed: %s", self.peer, exc)
            self.abort()
            return
        self.close()

    def abort(self) -> None:
        if self.sock is not None and self.is_established:
            with contextlib.suppress(OSError):
                self.sock.sendall(ABORT_REQUEST)
        self.close()

    def close(self) -> None:
        self.is_established = False
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def _send(self, context_id: int, command: bytes, file: BinaryIO, start: int, remaining: int) -> None:
        """The command, then the file's data set (`remaining` bytes from `start` on), in P-DATA-TF
        PDUs of one fragment each, written some hundreds of kilobytes at a time."""
        assert self.sock is not None
        self.sock.settimeout(self.dimse_timeout_s)
        file.seek(start)
        pending = self._framed(context_id, command, COMMAND, last=True)
        while remaining > 0:
            chunk = file.read(min(remaining, max(self.fragment, SEND_BATCH // self.fragment * self.fragment)))
            if not chunk:
                raise ValueError("the file is shorter than it was")
            remaining -= len(chunk)
            pending += self._framed(context_id, chunk, DATA, last=not remaining)
            self.sock.sendall(b"".join(pending))
            pending = []

    def _framed(self, context_id: int, data: bytes, header: int, last: bool) -> list[bytes]:
        """`data` in P-DATA-TF PDUs of one fragment each, the last one marked as such when `last`."""
        return [encoding.pdata(context_id, header | (LAST if last and at + self.fragment >= len(data) else 0),
                               data[at:at + self.fragment]) for at in range(0, len(data), self.fragment)]

    def _response(self, msg_id: int) -> Dataset:
        """The C-STORE-RSP to `msg_id`: its command set."""
        assert self.sock is not None
        command, data_expected, data_done = bytearray(), None, False
        while data_expected is None or (data_expected and not data_done):
            kind, pdu = _read_pdu(self.sock)
            if kind != P_DATA:
                raise SubAssociationError({ABORT: "the destination aborted the association",
                                           RELEASE_RQ: "the destination asked to release the association"}.get(
                                              kind, f"PDU type {kind:#04x} instead of a C-STORE response"))
            at = 6
            while at + 6 <= len(pdu):  # PDV items: length, context id, message control header
                length, header = int.from_bytes(pdu[at:at + 4], "big"), pdu[at + 5]
                fragment, at = pdu[at + 6:at + 4 + length], at + 4 + length
                if header & COMMAND:
                    command += fragment
                    if header & LAST:
                        try:
                            response = decode(BytesIO(bytes(command)), True, True)
                            data_expected = response.get("CommandDataSetType", NO_DATA_SET) != NO_DATA_SET
                        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on garbled bytes
                            raise SubAssociationError(f"a response that does not decode: {exc}") from exc
                elif header & LAST:
                    data_done = True
        if response.get("CommandField") != C_STORE_RSP or response.get("MessageIDBeingRespondedTo") != msg_id:
            raise SubAssociationError(f"a response that is not the C-STORE-RSP to message {msg_id}")
        if "Status" not in response:
            raise SubAssociationError("a C-STORE-RSP without a status")
        return response


def associate(
    host: str, port: int, *, calling_aet: str, called_aet: str, contexts: tuple[tuple[str, str], ...], max_pdu: int,
    implementation: tuple[str, str | None], connect_timeout_s: float, acse_timeout_s: float, dimse_timeout_s: float,
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> StoreAssociation:
    """An association with the destination, proposing `contexts` ((SOP class, transfer syntax)
    each); one that is not established when the destination cannot be reached, rejects or
    aborts."""
    peer = f"{called_aet} at {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout_s)
    except OSError as exc:
        LOGGER.warning("C-MOVE destination %s cannot be reached: %s", peer, exc)
        return StoreAssociation(None, {}, 0, dimse_timeout_s, acse_timeout_s, peer)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls[0].wrap_socket(sock, server_hostname=tls[1])
        sock.settimeout(acse_timeout_s)
        sock.sendall(_request(calling_aet, called_aet, contexts, max_pdu, implementation))
        kind, pdu = _read_pdu(sock)
        if kind != ASSOCIATE_AC:
            raise SubAssociationError("rejected the association" if kind == ASSOCIATE_RJ else f"answered PDU type {kind:#04x}")
        results, peer_max = _accepted(pdu)
    except (OSError, SubAssociationError, ValueError) as exc:  # a garbled answer too (`_accepted`)
        LOGGER.warning("C-MOVE destination %s: no association: %s", peer, exc)
        sock.close()
        return StoreAssociation(None, {}, 0, dimse_timeout_s, acse_timeout_s, peer)
    proposed = {2 * i + 1: pair for i, pair in enumerate(contexts)}
    accepted = {proposed[cid]: cid for cid, syntax in results if cid in proposed and syntax == proposed[cid][1]}
    return StoreAssociation(sock, accepted, peer_max, dimse_timeout_s, acse_timeout_s, peer)


# The same destinations are asked for the same contexts again and again, and answer alike:
# pynetdicom's PDU objects (some hundreds of µs a request and an answer) are made once each.
@functools.lru_cache(maxsize=256)
def _request(calling_aet: str, called_aet: str, pairs: tuple[tuple[str, str], ...], max_pdu: int,
             implementation: tuple[str, str | None]) -> bytes:
    """The A-ASSOCIATE-RQ PDU (PS3.8 9.3.2): one context per (SOP class, transfer syntax),
    numbered 1, 3, 5..."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title, primitive.called_ae_title = calling_aet, called_aet
    contexts = [build_context(sop_class, syntax) for sop_class, syntax in pairs]
    for i, context in enumerate(contexts):
        context.context_id = 2 * i + 1
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = implementation[0]
    items: list[Any] = [length, class_uid]
    if implementation[1]:
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = implementation[1]
        items.append(version)
    primitive.user_information = items
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


@functools.lru_cache(maxsize=256)
def _accepted(pdu: bytes) -> tuple[tuple[tuple[int, str], ...], int]:
    """An A-ASSOCIATE-AC PDU's accepted contexts (id, transfer syntax) and the peer's largest
    PDU (0: no limit). ValueError for one that does not decode."""
    try:
        answer = A_ASSOCIATE_AC()
        answer.decode(pdu)
        primitive = answer.to_primitive()
        results = tuple((int(r.context_id), str(r.transfer_syntax[0]))
                        for r in primitive.presentation_context_definition_results_list
                        if r.result == 0 and r.transfer_syntax and r.context_id is not None)
        peer_max = next((item.maximum_length_received for item in primitive.user_information
                         if isinstance(item, MaximumLengthNotification)), 0) or 0
        return results, int(peer_max)
    except Exception as exc:  # noqa: BLE001 - pynetdicom's decoding asserts, and fails on items in the wrong place
        raise ValueError(f"an A-ASSOCIATE-AC that does not decode: {exc!r}") from exc


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU, whole: its type and its bytes (header included)."""
    header = _read_exactly(sock, 6)
    length = int.from_bytes(header[2:6], "big")
    if length > MAX_PDU_READ:
        raise SubAssociationError(f"a PDU of {length} bytes")
    return header[0], header + _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        count = sock.recv_into(view[got:])
        if not count:
            raise SubAssociationError("the destination closed the connection")
        got += count
    return bytes(buffer)
