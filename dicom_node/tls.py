"""DICOM over TLS (PS3.15 B.1, the Basic TLS Secure Transport Connection Profile): the node's
server context, the client context of the associations it opens, and an association server
that does each TLS handshake in the association's own thread, with a deadline.

pynetdicom wraps an accepted socket in its one accepting thread, handshake included and with no
timeout: a peer that connects and sends nothing would stop the node accepting anyone.
"""

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

LOGGER = logging.getLogger(__name__)
HANDSHAKE_S = 15.0  # a TLS handshake longer than this is dropped


class TlsConfigError(ValueError):
    """A certificate, key or CA file that is missing or unusable (the node does not start)."""


def server_context(certfile: Path, keyfile: Path | None, ca_file: Path | None = None, *,
                   setting: str = "FHIR_DICOM_TLS", what: str = "DICOM TLS") -> ssl.SSLContext:
    """A server's TLS (the node's; HTTPS's is checked with it): its certificate; with `ca_file`,
    peers must present one signed by it. TlsConfigError names the setting (`{setting}_CERTFILE`...)
    of a file that is missing, or says the files cannot be used."""
    for suffix, path in (("CERTFILE", certfile), ("KEYFILE", keyfile), ("CA_FILE", ca_file)):
        if path is not None and not path.is_file():
            raise TlsConfigError(f"{setting}_{suffix} {path}: no such file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
        if ca_file is not None:
            context.load_verify_locations(ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{what}: the certificate, key or CA file cannot be used: {exc}") from exc
    return context


def client_context(certfile: Path | None, keyfile: Path | None, ca_file: Path | None) -> ssl.SSLContext:
    """For the associations the node opens (C-MOVE destinations marked TLS): the peer is checked
    against `ca_file` (else the system's CAs) and its host name; the node's own certificate, when
    it has one, is offered for peers that require mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is not None and keyfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, its TLS handshakes moved off the accepting thread."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None and self.ssl_context is not None
        client, address = self.socket.accept()
        wrapped = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        assert isinstance(request, ssl.SSLSocket)
        previous = request.gettimeout()
        try:
            request.settimeout(HANDSHAKE_S)
            request.do_handshake()
            request.settimeout(previous)
        except OSError as exc:  # ssl.SSLError, a timeout, a reset: not a TLS peer, or not one we trust
            LOGGER.warning("DICOM TLS connection from %s refused: %s", client_address[0], exc)
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)
