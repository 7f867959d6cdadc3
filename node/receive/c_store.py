"""C-STORE requests served by the thread that reads their association's socket.

pynetdicom passes each request through two threads and as many queues: the socket's thread
(DUL) decodes the PDU into objects, runs its state machine, and assembles a DIMSE message;
the association's thread decodes the command with pydicom, calls the handler, encodes the
response with pydicom and queues it back to the DUL thread, which encodes the PDU and sends
it. That was most of the receiving process's CPU per CT slice. Here, for associations the
node accepted, the DUL thread does it all: it reads the few command elements a C-STORE has,
writes the dataset's fragments into the spool's tmp/ behind the spool's header as they
arrive, has the node store the file (fsync, rename: StorageSCP.store_received) and sends the
C-STORE response PDU itself. A sender waits for that response, so nothing else is delayed.

A C-STORE for a SOP class that is not a storage class, or with UIDs that are not UIDs, is
answered with a failure status (pynetdicom aborted the association and left the dataset's
file behind). What breaks the upper layer protocol (a dataset fragment without its command,
a command set that cannot be read, an unknown command, a context that was not accepted)
aborts the association; some of it ended pynetdicom's socket thread with an exception.
Everything else stays pynetdicom's: negotiation, release, abort, timers, C-ECHO and any other
message. Only whole messages change hands. node/pynetdicom_patches.py puts this module's reader
in place of pynetdicom's on established associations the node accepts.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from pynetdicom import AE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node.pynetdicom_patches import (
    PduConnection,
    accepted_transfer_syntax,
    association_request,
    known_command_field,
    read_pdus_with,
)
from node.receive.received_file import even_length, file_meta, plain_uids
from node.spool import SYNC_EVERY
from node.vocabulary.status import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
)

log = logging.getLogger("dicom_node.receive")

_P_DATA_TF = 0x04
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101
_COMMAND, _LAST = 0x01, 0x02  # PDV message control header bits (PS3.8 E.2)


class Storer(Protocol):
    """What the node does with a received file (receive.StorageSCP)."""

    def store_received(self, received: Path, size: int, calling: str) -> int: ...

    def refuse(self, calling: str, why: str, status: int = ...) -> int: ...

    def room_problem(self) -> str | None: ...

    @property
    def max_instance_size(self) -> int: ...


def serve_c_store_requests(ae: AE, storer: Storer, folder: Path) -> None:
    """C-STORE requests on associations `ae` accepts are served here: received into files in
    `folder` (the spool's tmp/), stored by `storer`. Needs pynetdicom_patches.install()."""
    read_pdus_with(ae, lambda connection: _StoreStream(connection, storer, folder).serve_next_pdu)


class StoreRequest:
    """A C-STORE-RQ command set's elements, as the response and the file need them."""

    def __init__(self, context_id: int, command: bytes):
        elements = dict(_command_elements(command))
        self.context_id = context_id
        self.command_field = _us(elements.get(0x0100))
        self.message_id = _us(elements.get(0x0110))
        self.has_dataset = _us(elements.get(0x0800)) not in (None, _NO_DATASET)
        self.sop_class = _ui(elements.get(0x0002))
        self.sop_instance = _ui(elements.get(0x1000))

    def response(self, status: int) -> bytes:
        """The C-STORE-RSP command set (implicit VR little endian), as pynetdicom encodes it."""
        elements = b"".join(
            struct.pack("<HHI", 0, element, len(value)) + value
            for element, value in (
                (0x0002, _uid_value(self.sop_class)),
                (0x0100, struct.pack("<H", _C_STORE_RSP)),
                (0x0120, struct.pack("<H", self.message_id)),
                (0x0800, struct.pack("<H", _NO_DATASET)),
                (0x0900, struct.pack("<H", status)),
                (0x1000, _uid_value(self.sop_instance)),
            )
        )
        return struct.pack("<HHII", 0, 0, 4, len(elements)) + elements


def command_pdus(context_id: int, command: bytes, max_pdu_length: int) -> bytes:
    """P-DATA-TF PDUs carrying a command set, in fragments that fit the peer's maximum PDU
    length (0: no limit)."""
    size = max(max_pdu_length - 6, 1) if max_pdu_length else len(command)  # 6: PDV header
    return b"".join(
        _p_data_tf([(context_id, bytes([_COMMAND | (_LAST if at + size >= len(command) else 0)])
                     + command[at : at + size])])
        for at in range(0, len(command), size)
    )  # fmt: skip


class _PartialFile:
    """A received dataset's file in the spool's tmp/ while it is written; its fragments are
    written as they arrive. Holds no reference to the association, so that a finalizer can
    remove it when the association goes away mid-message."""

    def __init__(
        self, folder: Path, header: bytes, max_dataset: int, room: Callable[[], str | None]
    ):
        self.fd, name = tempfile.mkstemp(suffix=".dcm", dir=folder)
        self.path = Path(name)
        self.dataset_offset = len(header)
        self.written = 0
        self.problem: str | None = None  # why it is refused (0xA700); its file is gone
        self._most = len(header) + max_dataset  # bytes the file may hold
        self._room = room  # why the spool has no room (a large instance is refused midway)
        self._unsynced = 0
        self.write(header)

    @property
    def dataset_size(self) -> int:
        return self.written - self.dataset_offset

    def write(self, data: memoryview | bytes) -> None:
        if self.problem is not None:
            return  # the rest of the dataset is read and dropped
        self.problem = self._append(data)
        if self.problem is not None:
            self.discard()

    def _append(self, data: memoryview | bytes) -> str | None:
        """Write `data`; why the instance is refused from now on, or None."""
        if self.written + len(data) > self._most:  # refused now, not once it is all on disk
            return "above limits.max_instance_size"
        try:
            with memoryview(data) as view:
                while view:
                    view = view[os.write(self.fd, view) :]
            self.written += len(data)
            self._unsynced += len(data)
            if self._unsynced >= SYNC_EVERY:  # a large instance: its fsync at the end is short
                os.fdatasync(self.fd)
                self._unsynced = 0
                # refused when it is complete anyway: refused now, before the disk fills up
                return self._room()
        except OSError as exc:
            return f"cannot write it: {exc}"
        return None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class _StoreStream:
    """One accepted association's P-DATA, message by message: C-STORE requests are served
    here, other messages are returned to be passed to pynetdicom."""

    def __init__(self, connection: PduConnection, storer: Storer, folder: Path):
        self._connection = connection
        self._storer = storer
        self._folder = folder
        assoc = connection.assoc
        self._calling = assoc.requestor.ae_title.strip()
        # the node's title, the calling one, and the one the sender called (rules may route
        # on it): the same for every instance of the association
        self._titles = (
            str(assoc.ae.ae_title), self._calling,
            association_request(assoc).called_ae_title.strip(),  # type: ignore[union-attr]
        )  # fmt: skip
        self._held: list[tuple[int, bytes]] = []  # the command's PDVs (control byte first)
        self._request: StoreRequest | None = None
        self._refusal: tuple[int, str] | None = None
        self._file: _PartialFile | None = None
        self._passing = False  # the dataset of a message pynetdicom serves
        self._finalizer: weakref.finalize | None = None

    def serve_next_pdu(self) -> None:
        """Read the association's next PDU: serve the C-STOREs it carries, pass the rest on."""
        connection = self._connection
        pdu = connection.read_pdu()
        if pdu is None:  # the connection closed or the PDU was unreadable: an event is queued
            self.discard()
            return
        head, body = pdu
        if head[0] != _P_DATA_TF:  # release, abort: pynetdicom's; a message cut short is void
            self.discard()
            connection.to_pynetdicom(head + body)
            return
        try:
            theirs = self.feed(memoryview(body))
        except ValueError as exc:  # not P-DATA as PS3.8 defines it: pynetdicom aborts
            log.error("invalid P-DATA from %s: %s", connection.assoc.requestor.ae_title, exc)
            self.discard()
            connection.invalid_pdu()
            return
        if theirs:
            connection.to_pynetdicom(_p_data_tf(theirs))

    def feed(self, body: memoryview) -> list[tuple[int, bytes]]:
        """Serve what this P-DATA-TF PDU's body carries; the PDVs (context ID, control byte
        and fragment) that are pynetdicom's, in order."""
        theirs: list[tuple[int, bytes]] = []
        for context_id, pdv in _pdvs(body):
            control = pdv[0]
            if self._passing:
                theirs.append((context_id, bytes(pdv)))
                if control & (_COMMAND | _LAST) == _LAST:  # that dataset's last fragment
                    self._passing = False
            elif self._request is None:
                self._receive_command(context_id, pdv, theirs)
            elif control & _COMMAND or context_id != self._request.context_id:
                raise ValueError("a fragment of another message inside a C-STORE's dataset")
            else:
                if self._file is not None:  # None: a refusal, its dataset is dropped
                    self._file.write(pdv[1:])
                if control & _LAST:
                    self._complete()
        return theirs

    def _receive_command(self, context_id: int, pdv: memoryview, theirs: list) -> None:
        """A command fragment; a message that is not a C-STORE-RQ goes to pynetdicom whole.
        What pynetdicom would fail on (an exception that ends its socket thread and leaves
        the association hanging) is an invalid PDU here: the association is aborted."""
        if not pdv[0] & _COMMAND:
            raise ValueError("a dataset fragment where a command was expected")
        self._held.append((context_id, bytes(pdv)))
        if not pdv[0] & _LAST:
            return
        held, self._held = self._held, []
        command = b"".join(fragment[1:] for _, fragment in held)
        try:
            request = StoreRequest(context_id, command)
        except struct.error as exc:
            raise ValueError(f"a command set that cannot be read: {exc}") from None
        if not known_command_field(request.command_field):
            raise ValueError(f"a command set with CommandField {request.command_field}")
        if request.command_field != _C_STORE_RQ:
            theirs.extend(held)  # pynetdicom's message, to its end
            self._passing = request.has_dataset
            return
        self._request = request
        self._refusal = self._refusal_of(request)
        if self._refusal is None:
            try:
                header = self._file_header(request)
                partial = _PartialFile(self._folder, header, self._storer.max_instance_size,
                                       self._storer.room_problem)  # fmt: skip
            except OSError as exc:  # no file to write into: read the dataset and say so
                self._refusal = OUT_OF_RESOURCES, f"cannot create its file: {exc}"
                return
            self._file = partial
            self._finalizer = self._connection.when_gone(partial.discard)
        elif not request.has_dataset:
            self._complete()

    def _refusal_of(self, request: StoreRequest) -> tuple[int, str] | None:
        """The status and reason to refuse a C-STORE-RQ with, after reading its dataset (and
        keeping none of it), or None. pynetdicom aborted the association for the malformed
        ones, and left the dataset's file in tmp/ until a restart; a status tells the sender
        why. A spool without room is one too: none of the dataset reaches the disk."""
        assoc = self._connection.assoc
        if accepted_transfer_syntax(assoc, request.context_id) is None or None in (
            request.message_id,
            request.sop_class,
            request.sop_instance,
        ):  # nothing to answer it on, or with
            raise ValueError("a C-STORE-RQ without an accepted context or its required elements")
        if not request.has_dataset:
            return CANNOT_UNDERSTAND, "a C-STORE-RQ without a dataset"
        if not plain_uids(request.sop_class, request.sop_instance):  # type: ignore[arg-type]
            return CANNOT_UNDERSTAND, "its SOP Class or Instance UID is not a valid UID"
        service = uid_to_service_class(request.sop_class)  # type: ignore[arg-type]
        if not issubclass(service, StorageServiceClass):
            return SOP_CLASS_NOT_SUPPORTED, f"SOP class {request.sop_class} is not a storage class"
        problem = self._storer.room_problem()
        return (OUT_OF_RESOURCES, problem) if problem else None

    def _file_header(self, request: StoreRequest) -> bytes:
        """The received file's Part 10 header: the spool's, with the AE titles."""
        transfer_syntax = accepted_transfer_syntax(self._connection.assoc, request.context_id)
        meta = file_meta(request.sop_class, request.sop_instance, transfer_syntax, self._titles)  # type: ignore[arg-type]
        return b"\0" * 128 + b"DICM" + meta

    def _complete(self) -> None:
        request, partial, refusal = self._request, self._file, self._refusal
        assert request is not None
        self._request = self._file = self._refusal = None
        if self._finalizer is not None:
            self._finalizer.detach()
        if partial is not None:
            partial.close()
            if partial.problem is not None:
                refusal = OUT_OF_RESOURCES, partial.problem
        if refusal is not None:
            status = self._storer.refuse(self._calling, refusal[1], refusal[0])
        else:
            assert partial is not None  # a request has a file or a refusal
            status = self._store(partial)
        if partial is not None:
            partial.discard()  # gone already when it was stored (renamed into the spool)
        log.debug("C-STORE %s from %s: 0x%04X", request.sop_instance, self._calling, status)
        max_length = self._connection.assoc.requestor.maximum_length
        self._connection.send(
            command_pdus(request.context_id, request.response(status), max_length)
        )

    def _store(self, partial: _PartialFile) -> int:
        try:
            return self._storer.store_received(partial.path, partial.dataset_size, self._calling)
        except Exception:  # a defect, not the sender's: say so, keep serving
            log.exception("storing a C-STORE from %s failed", self._calling)
            return PROCESSING_FAILURE

    def discard(self) -> None:
        """The message being received will not complete (abort, closed connection)."""
        if self._file is not None:
            self._file.discard()
        self._request = self._file = self._refusal = None
        self._held, self._passing = [], False


def _pdvs(body: memoryview) -> Iterator[tuple[int, memoryview]]:
    """A P-DATA-TF PDU body's presentation data values: (context ID, control byte and
    fragment), views into `body`."""
    at = 0
    while at < len(body):
        if at + 6 > len(body):
            raise ValueError("a PDV item header cut short")
        (length,) = struct.unpack_from(">I", body, at)
        if length < 2 or at + 4 + length > len(body):
            raise ValueError(f"a PDV item length of {length} that does not fit its PDU")
        yield body[at + 4], body[at + 5 : at + 4 + length]
        at += 4 + length
    if at == 0:
        raise ValueError("a P-DATA-TF PDU without a PDV item")


def _p_data_tf(pdvs: list[tuple[int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of (context ID, control byte and fragment) values."""
    items = b"".join(struct.pack(">IB", len(pdv) + 1, cid) + pdv for cid, pdv in pdvs)
    return struct.pack(">BBI", _P_DATA_TF, 0, len(items)) + items


def _command_elements(command: bytes) -> Iterator[tuple[int, bytes]]:
    """(element, value) of a command set: group 0000, implicit VR little endian."""
    at = 0
    while at < len(command):
        group, element, length = struct.unpack_from("<HHI", command, at)
        if group != 0 or at + 8 + length > len(command):
            raise ValueError("not a command set")
        yield element, command[at + 8 : at + 8 + length]
        at += 8 + length


def _us(value: bytes | None) -> int | None:
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _ui(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.rstrip(b"\0 ").decode("ascii")
    except UnicodeDecodeError:
        return None


def _uid_value(uid: str | None) -> bytes:
    return even_length((uid or "").encode(), b"UI")
