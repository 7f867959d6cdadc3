"""Every private name of pynetdicom the node uses, and the node's patches to pynetdicom.

pynetdicom (3.0.4) serves and requests the node's associations. Where the node needs more than
its public API, it reaches into pynetdicom's internals here and nowhere else:
- method and module replacements, installed by install(): large PDU reads, the node's own
  reader of P-DATA on the associations it serves (node/receive/c_store.py), reactors that wait
  for work instead of polling, and pynetdicom's chunked C-STORE sending for deliveries;
- reads of pynetdicom's internal state, through the small named functions below.
PRIVATE_NAMES lists each name with what it is for; tests/receive/test_pynetdicom_patches.py
checks that every one still exists in the installed pynetdicom, so an upgrade that renames or
moves one fails there, not in production.

install() is idempotent: the service calls it at start, and StorageSCP and PeerSession call it
too, for the tests and benchmarks that build them without the service (a second call changes
nothing; after a test put pynetdicom's originals back, the next call installs the patches again).
This module imports nothing of the node, so every stage may use it.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom import __version__, _config, association, dul
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse_messages import _MESSAGE_TYPES
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket

log = logging.getLogger("dicom_node.receive")

LARGEST_READ = 1 << 20  # a PDU's first buffer; it doubles as bytes arrive, never ahead of them
IDLE_WAIT = 0.01  # seconds: the longest a reactor waits without a reason to wake up
REACTOR_SLEEP = 0.001  # what pynetdicom's reactor loops sleep between looks


@dataclass(frozen=True)
class PrivateName:
    """A name of pynetdicom the node depends on beyond its public API. `owner` is a module or a
    class by its dotted path; with `instance`, the attribute is set in the class's __init__, so
    only its instances have it."""

    owner: str
    name: str
    use: str
    instance: bool = False


PRIVATE_NAMES: tuple[PrivateName, ...] = (
    # replaced or set by install()
    PrivateName(
        "pynetdicom.transport.AssociationSocket",
        "recv",
        "replaced: a PDU is read with large recv_into() calls, not 4 KiB recv() ones",
    ),
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "_read_pdu_data",
        "replaced: on established associations an AE serves (read_pdus_with), the node "
        "reads the PDUs; pynetdicom's original otherwise",
    ),
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "send_pdu",
        "wrapped: wakes the accepted association's DUL thread when a primitive is queued",
    ),
    PrivateName(
        "pynetdicom.dul",
        "time",
        "replaced (the module pynetdicom's DUL sees): its reactor's sleep waits for the "
        "socket or a primitive to send",
    ),
    PrivateName(
        "pynetdicom.association",
        "time",
        "replaced (the module pynetdicom's Association sees): its reactor's sleep waits "
        "for a DIMSE message",
    ),
    PrivateName(
        "pynetdicom._config",
        "STORE_SEND_CHUNKED_DATASET",
        "set: send_c_store(path) streams the file's encoded dataset (deliveries)",
    ),
    PrivateName(
        "pynetdicom._config",
        "LOG_HANDLER_LEVEL",
        "set by use_standard_log_handlers: 'none' unless -v",
    ),
    # what the patches rely on pynetdicom doing
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "_run_loop_delay",
        "the DUL reactor sleeps this long between looks (REACTOR_SLEEP)",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.association.Association",
        "_run_reactor",
        "the acceptor's reactor, which sleeps REACTOR_SLEEP between looks",
    ),
    # read or called
    PrivateName(
        "pynetdicom.dimse_messages",
        "_MESSAGE_TYPES",
        "known_command_field: the DIMSE command fields pynetdicom knows",
    ),
    PrivateName(
        "pynetdicom.association.Association",
        "_accepted_cx",
        "accepted_transfer_syntax: the accepted contexts by ID",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.association.Association",
        "acse",
        "send_reject: the association's ACSE",
        instance=True,
    ),
    PrivateName("pynetdicom.acse.ACSE", "send_reject", "send_reject: queues A-ASSOCIATE-RJ"),
    PrivateName(
        "pynetdicom.association.Association",
        "dul",
        "the association's DUL provider (its socket, queues and state)",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.association.Association",
        "dimse",
        "the association's DIMSE provider, whose queue its reactor waits on",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.dimse.DIMSEServiceProvider",
        "msg_queue",
        "the decoded DIMSE messages the association thread waits for",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.association.ServiceUser",
        "primitive",
        "association_request: the peer's A-ASSOCIATE-RQ (None before it arrived)",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "socket",
        "the AssociationSocket: PDUs read and sent, closed, its TCP socket",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.transport.AssociationSocket",
        "socket",
        "tcp_socket: the TCP (or TLS) socket: polled, TCP_NODELAY, recv_into",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "state_machine",
        "its state: Sta6 (established), Sta3 (an A-ASSOCIATE answer not sent yet)",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.fsm.StateMachine", "current_state", "the DUL state (PS3.8 9.2)", instance=True
    ),
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "event_queue",
        "the state machine's events: that of a PDU the node passes on, Evt17 (closed), "
        "Evt19 (invalid PDU)",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "_decode_pdu",
        "decodes a PDU the node passes on, and names its event",
    ),
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "_recv_pdu",
        "the queue of decoded PDUs the state machine takes",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "to_provider_queue",
        "primitives waiting to be sent: the DUL thread does not wait while there are",
        instance=True,
    ),
    PrivateName(
        "pynetdicom.dul.DULServiceProvider",
        "to_user_queue",
        "end_acse_wait: a None ends the association thread's wait for a request",
        instance=True,
    ),
)

# Attributes the node sets on pynetdicom's objects (pynetdicom must not have them itself).
NODE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("pynetdicom.ae.ApplicationEntity", "_node_reader_for"),  # read_pdus_with
    ("pynetdicom.dul.DULServiceProvider", "_node_reader"),  # that association's PDU reader
    ("pynetdicom.dul.DULServiceProvider", "_node_waiter"),  # its DUL thread's _Waiter
)
_READER_FOR, _READER, _WAITER = (name for _, name in NODE_ATTRIBUTES)


def install() -> None:
    """Install the node's patches to pynetdicom, those not installed yet. Refuses (before it
    changes anything) a pynetdicom without one of the names they replace."""
    missing = [f"{dotted(owner)}.{name}" for (owner, name), value in ORIGINALS.items()
               if value is MISSING]  # fmt: skip
    if missing:
        raise RuntimeError(f"pynetdicom {__version__} has no {', '.join(missing)}")
    for owner, name, ours in _patches():
        if getattr(owner, name) is not ours:
            setattr(owner, name, ours)


def _patches() -> list[tuple[Any, str, Any]]:
    """(owner, name, the node's value) of everything install() sets."""
    return [
        (AssociationSocket, "recv", _recv),
        (DULServiceProvider, "_read_pdu_data", _read_pdu_data),
        (DULServiceProvider, "send_pdu", _send_pdu),
        (dul, "time", _DUL_TIME),
        (association, "time", _ASSOCIATION_TIME),
        # send_c_store(path) streams the file's encoded dataset in PDU-sized chunks instead of
        # decoding it whole: it needs a context in the file's exact syntax (PeerSession picks it)
        (_config, "STORE_SEND_CHUNKED_DATASET", True),
    ]


def dotted(owner: Any) -> str:
    """A module's or a class's dotted path, as PRIVATE_NAMES names owners."""
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return owner.__name__


def use_standard_log_handlers(standard: bool) -> None:
    """pynetdicom's standard event handlers format a description of every PDU and DIMSE
    message whether or not the logger shows it: ~15% of the receiving CPU per instance."""
    _config.LOG_HANDLER_LEVEL = "standard" if standard else "none"


# --- reads of pynetdicom's state -------------------------------------------------------------


def accepted_transfer_syntax(assoc: Association, context_id: int) -> str | None:
    """The transfer syntax of the accepted presentation context `context_id`, or None if the
    association accepted no such context (a dict lookup: pynetdicom's accepted_contexts copies
    and sorts them all)."""
    context = assoc._accepted_cx.get(context_id)
    return None if context is None else context.transfer_syntax[0]


def known_command_field(command_field: int | None) -> bool:
    """Whether pynetdicom knows a DIMSE message with this CommandField."""
    return command_field in _MESSAGE_TYPES


def association_request(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE-RQ primitive; None until it arrived."""
    return assoc.requestor.primitive


def send_reject(assoc: Association, result: int, source: int, reason: int) -> None:
    """Queue an A-ASSOCIATE-RJ for the association's DUL thread to send."""
    assoc.acse.send_reject(result, source, reason)


def awaiting_local_response(assoc: Association) -> bool:
    """The DUL still waits for the node's answer to the A-ASSOCIATE-RQ (Sta3): a queued
    A-ASSOCIATE-RJ has not left yet."""
    return assoc.dul.state_machine.current_state == "Sta3"


def close_connection(assoc: Association) -> None:
    """Close the association's socket; nothing is sent (before negotiation, Sta2)."""
    assoc.dul.socket.close()  # type: ignore[union-attr]


def end_acse_wait(assoc: Association) -> None:
    """End the association thread's wait for an A-ASSOCIATE-RQ as its timeout does."""
    assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


def tcp_socket(assoc: Association) -> socket.socket | None:
    """The association's TCP (or TLS) socket; None without a connection."""
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


# --- large PDU reads -------------------------------------------------------------------------


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """pynetdicom reads a PDU 4 KiB per recv(): 128 system calls for a 512 KiB CT slice, each
    giving up and taking back the GIL that every other thread of the node wants. Read what the
    socket has instead, straight into the PDU's buffer (recv_into: the kernel's copy is the only
    one; recv() and += copied every byte twice more). Same result, same errors: the bytes read,
    fewer on a closed connection. The buffer grows as bytes arrive, so a lying PDU length
    costs no memory until its bytes do.
    """
    sock = cast(socket.socket, self.socket)
    buffer = bytearray(min(nr_bytes, LARGEST_READ))
    got = 0
    while got < nr_bytes:
        if got == len(buffer):  # a PDU above LARGEST_READ: room for what may come next
            buffer.extend(bytes(min(nr_bytes - got, got)))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[got:])
        if not count:
            del buffer[got:]
            break
        got += count
    return buffer


# --- the node's reader of P-DATA -------------------------------------------------------------


class PduConnection:
    """An accepted association's connection as the node's PDU reader sees it: PDUs read as
    pynetdicom's _read_pdu_data reads them, PDUs handed on to pynetdicom, bytes sent."""

    def __init__(self, provider: DULServiceProvider):
        self._provider = provider

    @property
    def assoc(self) -> Association:
        return self._provider.assoc

    def read_pdu(self) -> tuple[bytes, bytearray] | None:
        """A whole PDU from the socket (header, body), with the events pynetdicom's read queues
        when it cannot (Evt17 closed, Evt19 unknown type); None after such an event."""
        provider = self._provider
        sock = provider.socket
        try:
            head = bytes(sock.recv(6))  # type: ignore[union-attr]
            if len(head) < 6:
                provider.event_queue.put("Evt17")
                return None
            pdu_type, _, length = struct.unpack(">BBL", head)
            if not 0x01 <= pdu_type <= 0x07:
                log.error("unknown PDU type 0x%02X from %s", pdu_type,
                          provider.assoc.requestor.address)  # fmt: skip
                provider.event_queue.put("Evt19")
                return None
            body = sock.recv(length)  # type: ignore[union-attr]
        except (OSError, TimeoutError):
            provider.event_queue.put("Evt17")
            return None
        if len(body) != length:
            log.error("connection closed inside a PDU (%d of %d bytes)", len(body), length)
            provider.event_queue.put("Evt17")
            return None
        return head, body

    def to_pynetdicom(self, pdu: bytes) -> None:
        """The tail of pynetdicom's _read_pdu_data: decode, queue the event and the PDU."""
        provider = self._provider
        try:
            decoded, event = provider._decode_pdu(bytearray(pdu))
        except Exception as exc:
            log.error("cannot decode a PDU: %s", exc)
            provider.event_queue.put("Evt19")
            return
        provider.event_queue.put(event)
        provider._recv_pdu.put(decoded)

    def invalid_pdu(self) -> None:
        """The peer broke the upper layer protocol: pynetdicom aborts the association."""
        self._provider.event_queue.put("Evt19")

    def send(self, data: bytes) -> None:
        self._provider.socket.send(data)  # type: ignore[union-attr]

    def when_gone(self, callback: Callable[[], None]) -> weakref.finalize:
        """Call `callback` when the association's DUL provider goes away."""
        return weakref.finalize(self._provider, callback)


PduReader = Callable[[], None]  # reads the association's next PDU and serves or passes it on


def read_pdus_with(ae: ApplicationEntity, reader_for: Callable[[PduConnection], PduReader]) -> None:
    """On the established associations `ae` accepts, `reader_for(connection)` (made once per
    association) reads the PDUs in place of pynetdicom's _read_pdu_data (install() must run)."""
    setattr(ae, _READER_FOR, reader_for)


def _read_pdu_data(self: DULServiceProvider) -> None:
    reader = _reader(self)
    if reader is None:
        _original_read_pdu_data(self)
    else:
        reader()


def _reader(provider: DULServiceProvider) -> PduReader | None:
    """The association's PDU reader when the node reads its PDUs right now, else None."""
    if provider.state_machine.current_state != "Sta6":  # established; pynetdicom otherwise
        return None
    reader = provider.__dict__.get(_READER)
    if reader is None:
        assoc = provider.assoc
        reader_for = getattr(assoc.ae, _READER_FOR, None)
        if reader_for is None or not assoc.is_acceptor:
            return None
        reader = reader_for(PduConnection(provider))
        setattr(provider, _READER, reader)
    return reader


# --- reactors that wait for work ---------------------------------------------------------------
# pynetdicom's two threads per association poll: each sleeps 1 ms, looks for work, sleeps
# again. On the receive path that is ~25 wake-ups per CT instance, each a context switch and a
# fight for the GIL, and up to 1 ms of waiting at each of the two hand-overs (a complete
# message to the association thread, its response back to the socket's thread).
#
# Here, for associations the node accepts, those sleeps become waits that end as soon as there
# is work, or after IDLE_WAIT at most (timers, release and abort are still checked by
# pynetdicom's loops, only less often when nothing happens):
# - the association thread waits for a decoded DIMSE message on its queue;
# - the socket's thread (DUL) waits for the socket to become readable or for a primitive to
#   send (send_pdu writes a byte to a per-association socket pair it also waits on).
# Associations the node requests (deliveries) keep pynetdicom's own polling: their sending
# thread pauses the reactor and waits for it to notice.


class _Time:
    """The `time` module as pynetdicom's modules see it, with sleep() replaced."""

    def __init__(self, sleep):
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _association_sleep(seconds: float) -> None:
    thread = threading.current_thread()
    if seconds != REACTOR_SLEEP or not isinstance(thread, Association) or thread.is_requestor:
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


_ASSOCIATION_TIME = _Time(_association_sleep)
_DUL_TIME = _Time(_dul_sleep)


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
    waiter = provider.__dict__.get(_WAITER)
    if waiter is not None:
        return waiter
    try:
        fd = sock.fileno()
        if fd < 0:
            return None
        waiter = _Waiter(fd)
    except OSError:
        return None
    setattr(provider, _WAITER, waiter)
    weakref.finalize(provider, waiter.close)
    return waiter


def _send_pdu(self: DULServiceProvider, primitive: Any) -> None:
    _original_send_pdu(self, primitive)
    waiter = self.__dict__.get(_WAITER)
    if waiter is not None:
        waiter.wake()


MISSING = object()
# pynetdicom's own values of what install() sets, as this module found them when imported (before
# any install): the originals the patches call on, and what a test puts back afterwards
ORIGINALS: dict[tuple[Any, str], Any] = {
    (owner, name): getattr(owner, name, MISSING) for owner, name, _ in _patches()
}
PATCHED: tuple[tuple[Any, str], ...] = tuple(ORIGINALS)  # (owner, name) of what install() sets
_original_read_pdu_data = ORIGINALS[(DULServiceProvider, "_read_pdu_data")]
_original_send_pdu = ORIGINALS[(DULServiceProvider, "send_pdu")]
