"""pynetdicom's two threads per association poll: each sleeps 1 ms, looks for work, sleeps
again. On the receive path that is ~25 wake-ups per CT instance, each a context switch and a
fight for the GIL, and up to 1 ms of waiting at each of the two hand-overs (a complete
message to the association thread, its response back to the socket's thread).

Here, for associations the node accepts, those sleeps become waits that end as soon as there is
work, or after IDLE_WAIT at most (timers, release and abort are still checked by pynetdicom's
loops, only less often when nothing happens):
- the association thread waits for a decoded DIMSE message on its queue;
- the socket's thread (DUL) waits for the socket to become readable or for a primitive to
  send (send_pdu writes a byte to a per-association socket pair it also waits on).
Associations the node requests (deliveries) keep pynetdicom's own polling: their sending
thread pauses the reactor and waits for it to notice.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
import weakref
from typing import Any

from pynetdicom import association, dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

IDLE_WAIT = 0.01  # seconds: the longest a reactor waits without a reason to wake up
_REACTOR_SLEEP = 0.001  # what pynetdicom's loops sleep between looks

_original_send_pdu = DULServiceProvider.send_pdu


class _Time:
    """The `time` module as pynetdicom's modules see it, with sleep() replaced."""

    def __init__(self, sleep):
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def wake_reactors_on_work() -> None:
    association.time = _Time(_association_sleep)  # type: ignore[attr-defined]
    dul.time = _Time(_dul_sleep)  # type: ignore[attr-defined]
    DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]


def _association_sleep(seconds: float) -> None:
    thread = threading.current_thread()
    if seconds != _REACTOR_SLEEP or not isinstance(thread, Association) or thread.is_requestor:
        time.sleep(seconds)
        return
    messages = thread.dimse.msg_queue
    with messages.not_empty:  # the queue's own lock: a put() in between cannot be missed
        if not messages.queue:
            messages.not_empty.wait(IDLE_WAIT)


def _dul_sleep(seconds: float) -> None:
    provider = threading.current_thread()
    if not isinstance(provider, DULServiceProvider) or provider.assoc.is_requestor:
        time.sleep(seconds)
        return
    sock = getattr(provider.socket, "socket", None)
    if sock is None:
        time.sleep(seconds)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes waiting: poll() cannot see them
    waiter = _waiter(provider, sock)
    if waiter is None:
        time.sleep(seconds)
        return
    if not provider.to_provider_queue.empty():  # after the waiter exists: no lost wake-up
        return
    waiter.wait(IDLE_WAIT)


class _Waiter:
    """One accepted association's DUL thread waits here: its socket, or a wake-up byte that
    send_pdu writes to a socket pair when there is a primitive to send."""

    def __init__(self, fd: int):
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN | select.POLLPRI)
        self._poller.register(self._wake_r, select.POLLIN)

    def wait(self, timeout: float) -> None:
        for fd, _ in self._poller.poll(timeout * 1000):
            if fd == self._wake_r.fileno():
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (it is woken anyway) or closed
            self._wake_w.send(b"\0")

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


def _waiter(provider: DULServiceProvider, sock: socket.socket) -> _Waiter | None:
    waiter = provider.__dict__.get("_node_waiter")
    if waiter is not None:
        return waiter
    try:
        fd = sock.fileno()
        if fd < 0:
            return None
        waiter = _Waiter(fd)
    except OSError:
        return None
    provider._node_waiter = waiter  # type: ignore[attr-defined]
    weakref.finalize(provider, waiter.close)
    return waiter


def _send_pdu(self: DULServiceProvider, primitive: Any) -> None:
    _original_send_pdu(self, primitive)
    waiter = self.__dict__.get("_node_waiter")
    if waiter is not None:
        waiter.wake()
