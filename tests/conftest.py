"""Test fixtures: the real embedded database and the real server, spoken to over loopback HTTP."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
from pymongo import AsyncMongoClient

from fhir_server.storage.embedded import EmbeddedDatabase

FHIR_JSON = "application/fhir+json"
# DCMTK's storescu, findscu, movescu… are the tests' peers: pynetdicom installs apps of the same
# names into the virtual environment, which come first on PATH once it is activated.
if sys.prefix != sys.base_prefix:
    os.environ["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                         if d and Path(d).resolve() != Path(sys.prefix, "bin").resolve())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`fhir-server serve` in a child process, as a user would run it."""

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, port: int | None = None, dicom_port: int | None = None
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.env = {**os.environ, **(env or {})}
        if not (env or {}).get("MONGODB_URI"):
            self.env.pop("MONGODB_URI", None)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def verify(self) -> Any:
        """How the health probe checks the server's certificate (HTTPS servers say)."""
        return True

    def start(self, timeout: float = 90.0) -> "ServerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fhir_server", "serve", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), "--dicom-port", str(self.dicom_port)],
                env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedDatabase]:
    db = EmbeddedDatabase(tmp_path_factory.mktemp("db"))
    db.start()
    yield db
    db.stop()


@pytest.fixture(scope="session")
def server(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "MONGODB_URI": database.uri,
        "FHIR_MONGODB_DB": "fhir_tests",
        "FHIR_CONDITIONAL_WAIT_S": "5",
        "FHIR_MAX_BODY_BYTES": "1000000",
    }
    proc = ServerProcess(tmp_path_factory.mktemp("server"), env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def server_in_transactions(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second server writing in multi-document transactions (the default on MongoDB replica
    sets), on the same embedded database, whose transactions are atomic but not crash-durable."""
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_tests_tx", "FHIR_WRITE_TRANSACTIONS": "on"}
    proc = ServerProcess(tmp_path_factory.mktemp("server_tx"), env).start()
    yield proc
    proc.stop()


@pytest.fixture(params=["ordered", "transactions"])
def writer(request: pytest.FixtureRequest) -> ServerProcess:
    """Each write mode's server in turn."""
    return request.getfixturevalue("server" if request.param == "ordered" else "server_in_transactions")


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as c:
        yield c


@pytest.fixture
def mongo(database: EmbeddedDatabase) -> Iterator[pymongo.database.Database]:
    """Direct access to the server's database, for set-up a client could not do and for checks."""
    with pymongo.MongoClient(database.uri) as c:
        yield c["fhir_tests"]


def unique() -> str:
    return uuid.uuid4().hex[:12]


def patient(**fields: object) -> dict[str, object]:
    return {"resourceType": "Patient", **fields}


def post(client: httpx.Client, resource: dict[str, object], **headers: str) -> httpx.Response:
    return client.post(f"/{resource['resourceType']}", json=resource,
                       headers={"Content-Type": FHIR_JSON, **headers})


def put(client: httpx.Client, resource: dict[str, object], **headers: str) -> httpx.Response:
    return client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource,
                      headers={"Content-Type": FHIR_JSON, **headers})


def assert_outcome(response: httpx.Response, status: int, text: str | None = None) -> dict:
    """The response is an OperationOutcome with `status` (and `text` in a diagnostics)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"], body
    if text is not None:
        assert any(text in i.get("diagnostics", "") for i in body["issue"]), body
    assert "Traceback" not in response.text
    return body


def run_with_database(database: EmbeddedDatabase, scenario: Callable[[Any], Awaitable[None]]) -> None:
    """Run `scenario` with a fresh database of the embedded server, through the async driver."""

    async def main() -> None:
        client: AsyncMongoClient = AsyncMongoClient(database.uri, tz_aware=True)
        try:
            await scenario(client[f"fhir_unit_{unique()}"])
        finally:
            await client.close()

    asyncio.run(main())


def ct_dataset() -> Any:
    """pydicom's CT_small.dcm as a new instance of a new study, of a new patient."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"P{unique()}"
    return ds
