"""pynetdicom's reactors woken by what they wait for, instead of polling.

Each association has two threads that loop: its DUL reactor (reads PDUs, sends the primitives
queued for it) and its association reactor (serves DIMSE requests, notices a release or an
abort). pynetdicom sleeps between their idle loops (1 ms, or less: then more loops): a PDU or a
request waited part of a loop in each, and an open association spun its two threads, a fifth
of a core per idle association (measured: 21 % for one, 58 % for three), taken from the
database and the peers on a 2-core machine. Here:

- the DUL reactor waits (`select`) on its socket and on a wake-up socket, written when another
  thread queues a primitive or an event for it, or stops it;
- the association reactor waits on an Event, set when its DUL queues a DIMSE message or an
  A-RELEASE or A-ABORT for it, when a sender pauses it (clears its checkpoint), when it is
  killed and when its DUL ends.

Both wait at most WAIT_S, for their timers (ARTIM, network timeout). pynetdicom's other sleeps
(a sender waiting for the reactor's pause, a stop for a thread's end) are capped at POLL_S.

`pause_handshake` closes a race of that pause, for the node and for any pynetdicom SCU of the
project (the importer's sender; the benchmarks' clients, which otherwise lose a response now
and then to it, and wait out their DIMSE timeout).
"""

import contextlib
import queue
import select
import socket
import ssl
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from pynetdicom import association, dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

POLL_S = 0.0002
WAIT_S = 0.05
REACTOR_SLEEP_S = 0.001  # the association reactor's own sleep, which tells it from pynetdicom's others


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls `wake` after each put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _Checkpoint(threading.Event):
    """The association reactor's checkpoint: clearing it (a sender pausing the reactor) wakes
    the reactor, which then pauses at once."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake.set()


class _Wakeup:
    """A socket pair: a byte written to it ends the DUL reactor's `select`. Python socket
    objects refuse to write once closed (no descriptor reused by another file is written)."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (the reactor has ended)
            self.writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.recv(4096)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _association_wake(assoc: Any) -> threading.Event:
    return assoc.__dict__.setdefault("_wake", threading.Event())  # made by whichever comes first


def _dul_init(self: DULServiceProvider, assoc: Any) -> None:
    _original["dul_init"](self, assoc)
    wakeup = _Wakeup()
    self.__dict__["_wakeup"] = wakeup

    def from_others() -> None:
        if threading.current_thread() is not self:
            wakeup.wake()

    self._run_loop_delay = WAIT_S
    self.to_provider_queue = _WakingQueue(from_others)
    self.event_queue = _WakingQueue(from_others)
    self.to_user_queue = _WakingQueue(_association_wake(assoc).set)


def _run_dul(self: DULServiceProvider) -> None:
    try:
        _original["run_dul"](self)
    finally:
        self.__dict__["_wakeup"].close()
        _association_wake(self.assoc).set()  # its reactor notices the DUL has ended


def _dul_sleep(seconds: float) -> None:
    """The DUL reactor's idle wait, on its socket and its wake-up; a short sleep for others."""
    provider = threading.current_thread()
    wakeup = provider.__dict__.get("_wakeup") if isinstance(provider, DULServiceProvider) else None
    if wakeup is None:
        time.sleep(min(seconds, POLL_S))
        return
    raw = getattr(provider.socket, "socket", None)
    if isinstance(raw, ssl.SSLSocket) and raw.pending():  # decrypted bytes select cannot see
        return
    try:
        select.select([wakeup.reader, *([raw] if raw is not None else [])], [], [], seconds)
    except (OSError, ValueError):  # the socket is closed: the reactor is about to end
        time.sleep(POLL_S)
        return
    wakeup.drain()


def _association_init(self: Association, *args: Any, **kwargs: Any) -> None:
    _original["association_init"](self, *args, **kwargs)
    wake = _association_wake(self)
    self.dimse.msg_queue = _WakingQueue(wake.set)
    checkpoint = _Checkpoint(wake)
    if self._reactor_checkpoint.is_set():
        checkpoint.set()
    self._reactor_checkpoint = checkpoint


def _association_sleep(seconds: float) -> None:
    """The association reactor's idle wait, on its Event; a short sleep for pynetdicom's others."""
    thread = threading.current_thread()
    if seconds == REACTOR_SLEEP_S and isinstance(thread, Association):
        wake = _association_wake(thread)
        wake.wait(WAIT_S)
        wake.clear()  # then the reactor looks at everything a wake-up may be for
        return
    time.sleep(min(seconds, POLL_S))


def _waking_flag(name: str, wake: Callable[[Any], None]) -> property:
    """An attribute that wakes its reactor when set true (`_kill`, `_kill_thread`)."""

    def get(self: Any) -> bool:
        return bool(self.__dict__.get(name, False))

    def put(self: Any, value: bool) -> None:
        self.__dict__[name] = value
        if value:
            wake(self)

    return property(get, put)


def _wake_dul(provider: Any) -> None:
    wakeup = provider.__dict__.get("_wakeup")
    if wakeup is not None:
        wakeup.wake()


def _clock(sleep: Callable[[float], None]) -> types.SimpleNamespace:
    """The `time` module, with `sleep` replaced."""
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    clock.sleep = sleep
    return clock


def pause_handshake() -> None:
    """Close a race in pynetdicom's reactor pause (its issue #875): a thread that sends on an
    association (an SCU's C-STORE or C-FIND, a release) clears the reactor's checkpoint and
    waits for `_is_paused`; but the reactor may have passed its checkpoint with `_is_paused`
    still true, then takes the awaited response off the queue as if it were a request
    ("Received unexpected C-STORE service message"): the request fails after the DIMSE timeout.
    Here leaving the pause waits while the checkpoint is clear, under a lock that reading the
    flag takes too, so the reactor never reads the queue after a sender saw it paused. (The
    faster the peer answers, the likelier the race.)"""
    if isinstance(getattr(association.Association, "_is_paused", None), property):
        return

    def lock(assoc: Any) -> threading.Lock:
        return assoc.__dict__.setdefault("_pause_lock", threading.Lock())  # set first in __init__

    def get(assoc: Any) -> bool:
        with lock(assoc):
            return bool(assoc.__dict__.get("_paused", False))

    def put(assoc: Any, paused: bool) -> None:
        checkpoint: threading.Event = assoc._reactor_checkpoint
        guard = lock(assoc)
        guard.acquire()
        try:
            while not paused and not checkpoint.is_set():  # a sender paused it meanwhile: stay paused
                assoc.__dict__["_paused"] = True
                guard.release()
                try:
                    checkpoint.wait()
                finally:
                    guard.acquire()
            assoc.__dict__["_paused"] = paused
        finally:
            guard.release()

    association.Association._is_paused = property(get, put)  # type: ignore[attr-defined]


_original: dict[str, Any] = {}


def install() -> None:
    """In pynetdicom's place, for the associations made from now on (idempotent), with the
    pause handshake."""
    if _original:
        return
    pause_handshake()
    _original.update(dul_init=DULServiceProvider.__init__, run_dul=DULServiceProvider.run_reactor,
                     association_init=Association.__init__)
    DULServiceProvider.__init__ = _dul_init  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _run_dul  # type: ignore[method-assign]
    DULServiceProvider._kill_thread = _waking_flag("_kill_flag", _wake_dul)  # type: ignore[assignment]
    dul.time = _clock(_dul_sleep)  # type: ignore[assignment]
    Association.__init__ = _association_init  # type: ignore[method-assign]
    Association._kill = _waking_flag("_kill_flag", lambda assoc: _association_wake(assoc).set())  # type: ignore[assignment]
    association.time = _clock(_association_sleep)  # type: ignore[assignment]
