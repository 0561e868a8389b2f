"""The embedded database: a SecantusDB daemon (`secantusd-py`) on a free loopback port.

Run as a child process rather than in-process so that WiredTiger works on the other core and the
server's event loop is not slowed by the database's Python code. The child gets SIGTERM if the
server dies, so a killed server does not leave the data folder locked.
"""

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pymongo
from pymongo.errors import PyMongoError

LOGGER = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0


class EmbeddedDatabaseError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The daemon's Python, its collector tuned before SecantusDB starts. Its heap is large and
# long-lived; under queries of 100 documents a full collection of it (150 to 430 ms, freeing
# nothing: measured) ran every few hundred ms, stalling every query meanwhile (a QIDO page's p95
# was 6 times its median). Full collections are made 100 times rarer (after 1,000 collections of
# the middle generation, not 10); the young generations are collected as before.
DAEMON = "import gc, sys; gc.set_threshold(700, 10, 1000); from secantus.cli import main; sys.exit(main(sys.argv[1:]))"


def _daemon_command() -> list[str]:
    if importlib.util.find_spec("secantus") is not None:  # installed with this server
        return [sys.executable, "-c", DAEMON]
    script = Path(sys.executable).with_name("secantusd-py")
    if script.exists():
        return [str(script)]
    found = shutil.which("secantusd-py")
    if found:
        return [found]
    raise EmbeddedDatabaseError(
        "MONGODB_URI is unset and the embedded database is not installed: "
        "install the 'embedded' extra (pip install 'fhir-server[embedded]') or set MONGODB_URI"
    )


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the daemon when the server process dies (no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EmbeddedDatabase:
    """A `secantusd-py` child process storing its files under `storage_path`."""

    def __init__(self, storage_path: Path, cache_size: str = "256M", port: int = 0) -> None:
        self.storage_path = storage_path
        self.cache_size = cache_size
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> "EmbeddedDatabase":
        self.storage_path.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port
        for _ in range(3):  # a free port can be taken between probing and binding
            self.port = fixed_port or _free_port()
            if self._launch():
                return self
            if fixed_port:
                break
        if self._in_use():
            raise EmbeddedDatabaseError(
                f"the embedded database's data folder {self.storage_path} is in use by another process (a server "
                "running on it?): stop that first, or point this command at it with MONGODB_URI"
            )
        raise EmbeddedDatabaseError(
            f"the embedded database did not start (data folder {self.storage_path}); "
            f"see {self._log_path()}"
        )

    def _in_use(self) -> bool:
        """Whether the last start failed on WiredTiger's lock of the folder (its log says so)."""
        try:
            with open(self._log_path(), "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 4096))
                return b"resource busy" in log.read()
        except OSError:
            return False

    def _log_path(self) -> Path:
        return self.storage_path / "secantusd.log"

    def _launch(self) -> bool:
        command = _daemon_command() + [
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-path", str(self.storage_path),
            "--cache-size", self.cache_size,
            "--log-level", "WARNING",
        ]
        log = open(self._log_path(), "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        log.close()
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=250, connectTimeoutMS=250
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                try:
                    client.admin.command("ping")
                    LOGGER.info("embedded database on port %d, files in %s", self.port, self.storage_path)
                    return True
                except PyMongoError:
                    time.sleep(0.1)
        finally:
            client.close()
        self.stop()
        return False

    def stop(self, timeout: float = 15.0) -> None:
        """Stop cleanly (SIGTERM: WiredTiger checkpoints and closes), killing it if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            LOGGER.warning("embedded database did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would (used by durability tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

