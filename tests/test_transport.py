"""Transport security: HTTPS, DICOM TLS (mutual, with a CA), CORS, the security headers and the
request body cap, on real servers with certificates made here."""

import contextlib
import datetime
import io
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import ServerProcess, ct_dataset, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove, Verification

from fhir_server.config import Settings
from fhir_server.security import body_limits, cors_origins
from fhir_server.storage.embedded import EmbeddedDatabase

AET = "FHIRSERVER"
ORIGIN = "https://app.example"
REQUEST_CAP = 1 << 20  # FHIR_MAX_REQUEST_BYTES of the TLS server
DESTINATION_PORT = free_port()  # a C-MOVE destination that speaks TLS only


class Pki:
    """A CA, a server certificate for localhost and 127.0.0.1, and a client certificate."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ca_cert = self._certificate("Test CA", self.ca_key, None, ca=True)
        self.ca = self._write("ca.pem", self.ca_cert)
        self.server_cert, self.server_key = self._issue("server", "localhost",
                                                        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        self.client_cert, self.client_key = self._issue("client", "TESTSCU", [x509.DNSName("testscu.example")])

    def _certificate(self, name: str, key: rsa.RSAPrivateKey, sans: list[x509.GeneralName] | None, ca: bool = False) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if ca else self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False), critical=True)
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans or []), critical=False)
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
        return builder.sign(self.ca_key, hashes.SHA256())

    def _issue(self, stem: str, name: str, sans: list[x509.GeneralName]) -> tuple[Path, Path]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = self._write(f"{stem}.pem", self._certificate(name, key, sans))
        key_path = self.folder / f"{stem}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
        return cert, key_path

    def _write(self, name: str, cert: x509.Certificate) -> Path:
        path = self.folder / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def client_context(self, with_certificate: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_certificate:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


class TlsServer(ServerProcess):
    """`fhir-server serve` over HTTPS: the start-up probe speaks HTTPS, trusting the test CA."""

    def __init__(self, data_dir: Path, env: dict[str, str], pki: Pki, client_certificate: bool = False) -> None:
        super().__init__(data_dir, env)
        self.pki = pki
        self.client_certificate = client_certificate

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext:
        return self.pki.client_context(self.client_certificate)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(database: EmbeddedDatabase, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """HTTPS; DICOM over mutual TLS on its port and a plain port beside it; CORS for one origin;
    a 1 MiB request cap."""
    env = {
        "MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_transport", "FHIR_DICOM_AET": AET,
        "FHIR_TLS_CERTFILE": str(pki.server_cert), "FHIR_TLS_KEYFILE": str(pki.server_key),
        "FHIR_DICOM_TLS_CERTFILE": str(pki.server_cert), "FHIR_DICOM_TLS_KEYFILE": str(pki.server_key),
        "FHIR_DICOM_TLS_CA_FILE": str(pki.ca), "FHIR_DICOM_PLAIN_PORT": str(free_port()),
        "FHIR_CORS_ORIGINS": f"{ORIGIN}, https://other.example", "FHIR_MAX_REQUEST_BYTES": str(REQUEST_CAP),
        "FHIR_DICOM_DESTINATIONS": f"TLSDEST=tls://localhost:{DESTINATION_PORT}",
    }
    proc = TlsServer(tmp_path_factory.mktemp("transport"), env, pki).start()
    yield proc
    proc.stop()


@pytest.fixture
def https(tls_server: TlsServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tls_server.url, verify=tls_server.pki.client_context(False), timeout=60) as client:
        yield client


# -- HTTPS ----------------------------------------------------------------------------------------


def test_https_serves_and_plain_http_is_refused(tls_server: TlsServer, https: httpx.Client) -> None:
    response = https.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.json()["resourceType"] == "CapabilityStatement"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/fhir/metadata", timeout=10)
    assert https.get("/health").status_code == 200  # still serving


def test_https_with_a_ca_file_requires_a_client_certificate(database: EmbeddedDatabase, pki: Pki, tmp_path: Path) -> None:
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_transport_mtls",
           "FHIR_TLS_CERTFILE": str(pki.server_cert), "FHIR_TLS_KEYFILE": str(pki.server_key),
           "FHIR_TLS_CA_FILE": str(pki.ca)}
    server = TlsServer(tmp_path, env, pki, client_certificate=True).start()
    try:
        with httpx.Client(verify=pki.client_context(True)) as client:
            assert client.get(f"{server.url}/fhir/metadata").status_code == 200
        with pytest.raises(httpx.TransportError), httpx.Client(verify=pki.client_context(False)) as client:
            client.get(f"{server.url}/fhir/metadata")
    finally:
        server.stop()


@pytest.mark.parametrize("setting", ["FHIR_TLS_CERTFILE", "FHIR_DICOM_TLS_CA_FILE"])
def test_a_missing_certificate_file_stops_the_start_with_its_name(pki: Pki, tmp_path: Path, setting: str) -> None:
    env = {**os.environ, "FHIR_TLS_CERTFILE": str(pki.server_cert), "FHIR_TLS_KEYFILE": str(pki.server_key),
           "FHIR_DICOM_TLS_CERTFILE": str(pki.server_cert), "FHIR_DICOM_TLS_KEYFILE": str(pki.server_key),
           setting: str(tmp_path / "missing.pem")}
    result = subprocess.run([sys.executable, "-m", "fhir_server", "serve", "--port", str(free_port()),
                             "--data-dir", str(tmp_path / "data"), "--dicom-port", str(free_port())],
                            env=env, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert f"{setting} {tmp_path / 'missing.pem'}: no such file" in result.stderr.decode()
    assert not (tmp_path / "data" / "db").exists()  # stopped before the database started


# -- DICOM TLS ------------------------------------------------------------------------------------


def tls_echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET, tls_args=(context, "localhost") if context else None)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) == 0


def test_dicom_echo_and_store_over_mutual_tls(tls_server: TlsServer, https: httpx.Client) -> None:
    assert tls_echo(tls_server.dicom_port, tls_server.pki.client_context())
    ds = ct_dataset()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", tls_server.dicom_port, ae_title=AET,
                         tls_args=(tls_server.pki.client_context(), "localhost"))
    assert assoc.is_established
    assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    study = https.get(f"/fhir/ImagingStudy/{ds.StudyInstanceUID}")
    assert study.status_code == 200, study.text
    assert study.json()["numberOfInstances"] == 1


def test_dicom_tls_port_refuses_plain_and_certificateless_peers_and_keeps_serving(tls_server: TlsServer) -> None:
    port, pki = tls_server.dicom_port, tls_server.pki
    assert not tls_echo(port, None)  # a plain association to the TLS port
    assert not tls_echo(port, pki.client_context(with_certificate=False))  # TLS, but no client certificate
    with socket.create_connection(("127.0.0.1", port)):  # a peer that connects and says nothing...
        assert tls_echo(port, pki.client_context())  # ...holds up no one: handshakes run in their own threads
    assert "DICOM TLS connection from 127.0.0.1 refused" in tls_server.log()


def test_the_plain_port_beside_the_tls_port_speaks_plain_dicom(tls_server: TlsServer) -> None:
    plain = int(tls_server.env["FHIR_DICOM_PLAIN_PORT"])
    assert tls_echo(plain, None)
    assert not tls_echo(plain, tls_server.pki.client_context())


def test_c_move_to_a_tls_destination(tls_server: TlsServer) -> None:
    """The destination requires mutual TLS: the node checks its certificate and offers its own."""
    pki = tls_server.pki
    received: list[str] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    destination = AE(ae_title="TLSDEST")
    destination.add_supported_context(CTImageStorage, ds_syntax := pydicom.uid.ExplicitVRLittleEndian)

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    server = destination.start_server(("127.0.0.1", DESTINATION_PORT), block=False, ssl_context=context,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        ds = ct_dataset()
        assert ds.file_meta.TransferSyntaxUID == ds_syntax
        scu = AE(ae_title="TESTSCU")
        scu.add_requested_context(CTImageStorage, ds_syntax)
        scu.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = scu.associate("127.0.0.1", tls_server.dicom_port, ae_title=AET, tls_args=(pki.client_context(), "localhost"))
        assert assoc.is_established
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()  # answered once the instance is indexed
        assoc = scu.associate("127.0.0.1", tls_server.dicom_port, ae_title=AET, tls_args=(pki.client_context(), "localhost"))
        assert assoc.is_established
        query = pydicom.Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
        statuses = [int(status.Status) for status, _ in assoc.send_c_move(query, "TLSDEST", StudyRootQueryRetrieveInformationModelMove)]
        assoc.release()
        assert statuses[-1] == 0, statuses
        assert received == [ds.SOPInstanceUID]
    finally:
        server.shutdown()


def _dcmtk_tls() -> bool:
    if shutil.which("echoscu") is None or shutil.which("storescu") is None:
        return False
    help_text = subprocess.run(["echoscu", "--help"], capture_output=True, text=True).stdout
    return "+tls" in help_text


@pytest.mark.skipif(not _dcmtk_tls(), reason="DCMTK with TLS is not installed")
def test_dcmtk_echoscu_and_storescu_over_tls(tls_server: TlsServer, https: httpx.Client, tmp_path: Path) -> None:
    pki = tls_server.pki
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    port = str(tls_server.dicom_port)
    echo = subprocess.run(["echoscu", *tls, "-aec", AET, "127.0.0.1", port], capture_output=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    ds = ct_dataset()
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    store = subprocess.run(["storescu", *tls, "-aec", AET, "127.0.0.1", port, str(path)], capture_output=True, timeout=60)
    assert store.returncode == 0, store.stderr
    assert https.get(f"/fhir/ImagingStudy/{ds.StudyInstanceUID}").status_code == 200
    without = subprocess.run(["echoscu", "+tla", "+cf", str(pki.ca), "-aec", AET, "127.0.0.1", port],
                             capture_output=True, timeout=60)  # TLS without a certificate
    assert without.returncode != 0


# -- security headers and CORS --------------------------------------------------------------------


def test_security_headers_on_every_response(https: httpx.Client, server: ServerProcess) -> None:
    for response in (https.get("/fhir/metadata"), https.get("/fhir/Patient/nope"), https.get("/health")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["strict-transport-security"] == "max-age=31536000"
    docs = https.get("/docs")  # Swagger UI's scripts come from a CDN: only framing is forbidden
    assert docs.status_code == 200
    assert docs.headers["content-security-policy"] == "frame-ancestors 'none'"
    plain = httpx.get(f"{server.url}/fhir/metadata")
    assert plain.headers["x-content-type-options"] == "nosniff"
    assert "strict-transport-security" not in plain.headers  # only over HTTPS


def test_cors_preflight_and_simple_request(https: httpx.Client) -> None:
    preflight = https.options("/fhir/Patient", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, if-none-exist, prefer, x-provenance"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in ("authorization", "content-type", "if-none-exist", "if-match", "prefer"))
    refused = https.options("/fhir/Patient", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    created = https.post("/fhir/Patient", json={"resourceType": "Patient"},
                         headers={"Origin": ORIGIN, "Content-Type": "application/fhir+json"})
    assert created.status_code == 201
    assert created.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in created.headers["access-control-expose-headers"].split(",")}
    assert {"location", "etag", "content-location", "last-modified", "x-request-id", "www-authenticate"} <= exposed


def test_no_cors_headers_without_origins(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/fhir/metadata", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)


def test_cors_origins_setting() -> None:
    assert cors_origins("") == []
    assert cors_origins(" https://a.example/, https://b.example ") == ["https://a.example", "https://b.example"]
    assert cors_origins('["https://a.example", "*"]') == ["https://a.example", "*"]
    with pytest.raises(ValueError):
        cors_origins('["https://a.example"')


# -- request body cap -----------------------------------------------------------------------------


def raw_request(server: TlsServer, head: bytes, body: Iterator[bytes]) -> bytes:
    """Send a request over TLS piece by piece, stop when the server answers; its response."""
    sock = server.pki.client_context(False).wrap_socket(socket.create_connection(("127.0.0.1", server.port)),
                                                        server_hostname="localhost")
    with sock:
        sock.sendall(head)
        answer = b""
        for piece in body:
            sock.setblocking(False)  # a TLS socket is readable for handshake messages too: read to know
            with contextlib.suppress(ssl.SSLWantReadError):
                answer = sock.recv(65536)
            sock.setblocking(True)
            if answer:
                break
            sock.sendall(piece)
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_a_declared_body_over_the_cap_is_413_at_once(tls_server: TlsServer, https: httpx.Client) -> None:
    head = (b"POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\n"
            b"Content-Length: %d\r\n\r\n" % (REQUEST_CAP + 1))
    answer = raw_request(tls_server, head, iter([]))  # no body sent: the header is enough
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"resourceType":"OperationOutcome"' in answer and b"too-costly" in answer
    assert https.get("/fhir/metadata").status_code == 200


def test_a_chunked_body_over_the_cap_is_413_before_it_ends(tls_server: TlsServer, https: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        piece = b" " * 65536
        for _ in range(REQUEST_CAP // len(piece)):
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"400\r\n" + b" " * 1024 + b"\r\n"  # one KiB over; the closing chunk is never sent

    head = (b"POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    answer = raw_request(tls_server, head, chunks())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"larger than %d bytes" % REQUEST_CAP in answer
    assert https.get("/fhir/metadata").status_code == 200


def test_stow_rs_is_not_held_to_the_request_cap(https: httpx.Client) -> None:
    ds = ct_dataset()
    ds.Rows = ds.Columns = 1024
    ds.PixelData = bytes(1024 * 1024 * 2)  # 2 MiB, over the 1 MiB cap
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    body = b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue() + b"\r\n--b0undary--\r\n"
    response = https.post("/dicomweb/studies", content=body,
                          headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary',
                                   "Accept": "application/dicom+json"})
    assert response.status_code == 200, response.text


def test_body_limits_by_path() -> None:
    limit_for = body_limits(Settings(max_body_bytes=10, max_bundle_bytes=1000, upload_max_bytes=100))
    assert limit_for("POST", "/fhir") == 1000  # the largest any endpoint takes
    assert limit_for("POST", "/dicomweb/studies") is None
    assert limit_for("POST", "/dicomweb/studies/1.2.3") is None
    assert limit_for("PUT", "/dicomweb/studies/1.2.3/series") == 1000
    assert body_limits(Settings(max_request_bytes=5))("POST", "/fhir/Patient") == 5
    assert body_limits(Settings())("POST", "/auth/token") == 1 << 20
