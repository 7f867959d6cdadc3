"""How pynetdicom's receive path writes a C-STORE's dataset: straight into a file in the
spool's tmp/, with the spool's own Part 10 header, so the handler only fsyncs and renames it.

pynetdicom 3 is changed in four places, all on its receive path and all measured on 296 CT
slices of 512 KiB (the receiving process's CPU per instance, this 2-core VM):
- its 4 KiB recv() calls become large reads (read_pdus_in_large_reads);
- a P-DATA-TF PDU is decoded from a memoryview, its values not copied (decode_data_pdus...);
- the temporary file it writes each dataset into is created in the spool's tmp/ and knows its
  association's AE titles (stream_received_datasets_to);
- the File Meta it writes there is encoded here, on bytes, with the AE titles (a FileMetaDataset
  built and written by pydicom was a seventh of the receiving threads' Python time), so
  nothing has to be copied behind a new header afterwards.
"""

from __future__ import annotations

import functools
import socket
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, NamedTuple, cast

from pydicom.filewriter import write_file_meta_info
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    dimse_messages,
    dul,
    evt,
)
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

LARGEST_READ = 1 << 20  # a PDU's first buffer; it doubles as bytes arrive, never ahead of them


def read_pdus_in_large_reads() -> None:
    """pynetdicom reads a PDU 4 KiB per recv(): 128 system calls for a 512 KiB CT slice, each
    giving up and taking back the GIL that every other thread of the node wants. Read what the
    socket has instead, straight into the PDU's buffer (recv_into: the kernel's copy is the only
    one; recv() and += copied every byte twice more). Same result, same errors: the bytes read,
    fewer on a closed connection. The buffer grows as bytes arrive, so a lying PDU length
    costs no memory until its bytes do.
    """

    def recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
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

    AssociationSocket.recv = recv  # type: ignore[method-assign]


_P_DATA_TF = b"\x04"
_original_decode_pdu = DULServiceProvider._decode_pdu


def decode_data_pdus_without_copies() -> None:
    """pynetdicom copies a P-DATA-TF PDU's bytes four times on its way to the file (bytes() of
    the PDU, its items, each value, the value after the control byte): 8 MiB of memcpy for a
    2 MiB MR slice, on a VM that copies at 1-5 GB/s. Decoded from a memoryview, those are
    views. Only when nothing looks at the raw PDU (no EVT_DATA_RECV handler, and pynetdicom's
    own PDU logging off, i.e. without -v)."""
    DULServiceProvider._decode_pdu = _decode_pdu  # type: ignore[method-assign]


def _decode_pdu(self: DULServiceProvider, bytestream: bytearray) -> tuple[Any, str]:
    if (
        bytestream[:1] != _P_DATA_TF
        or _config.LOG_HANDLER_LEVEL != "none"
        or self.assoc.get_handlers(evt.EVT_DATA_RECV)
    ):
        return _original_decode_pdu(self, bytestream)
    pdu_class, event = dul._PDU_TYPES[_P_DATA_TF]
    pdu = pdu_class()
    pdu.decode(memoryview(bytestream))  # type: ignore[arg-type]
    evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
    return pdu, event


def stream_received_datasets_to(folder: Path) -> None:
    """pynetdicom writes each received dataset to a temporary file as its PDUs arrive, instead
    of collecting it in memory (twice: the buffer, then the bytes the handler asks for), so a
    1 GB multi-frame instance costs the node no memory. The file goes in the spool's tmp/, not
    /tmp, which may be RAM (tmpfs); leftovers after a crash are removed with the rest of tmp/.
    The handler renames it into the spool; pynetdicom's unlink afterwards finds nothing."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined]
        _received_dataset_file, folder
    )
    dimse_messages.create_file_meta = _ReceivedMeta  # type: ignore[attr-defined]
    dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[attr-defined]


def _received_dataset_file(folder: Path, **kwargs: Any) -> Any:
    """The file pynetdicom's DUL thread writes a C-STORE's dataset into, told the titles of
    the association it serves (spool_titles; None if that cannot be found)."""
    file = tempfile.NamedTemporaryFile(dir=folder, **kwargs)  # noqa: SIM115 - pynetdicom closes it
    assoc = getattr(threading.current_thread(), "assoc", None)  # the DUL thread's association
    try:
        file.spool_titles = (
            str(assoc.ae.ae_title),  # type: ignore[union-attr]
            str(assoc.requestor.ae_title).strip(),  # type: ignore[union-attr]
            str(assoc.requestor.primitive.called_ae_title).strip(),  # type: ignore[union-attr]
        )
    except AttributeError:  # not called where pynetdicom 3 calls it: the handler adds them
        file.spool_titles = None
    return file


class _ReceivedMeta(NamedTuple):
    """What pynetdicom's create_file_meta is given, kept as it is until it is written."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def _write_file_meta(fp: Any, meta: _ReceivedMeta) -> None:
    """pynetdicom's write_file_meta_info(fp, create_file_meta(...)) with the AE titles added;
    the file is told where its dataset starts (dataset_offset), so the handler need not read
    the header again. UIDs that are not plain (a sender's odd values) go through pydicom as
    before, and the handler adds the titles (spool_header)."""
    titles = getattr(fp, "spool_titles", None)
    if titles is None or not plain_uids(*meta):
        write_file_meta_info(fp, create_file_meta(**meta._asdict()))
        return
    meta_group = file_meta(meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax, titles)
    fp.write(meta_group)
    fp.spool_dataset_offset = 132 + len(meta_group)  # after the preamble and "DICM"


def file_meta(
    sop_class: str, sop_instance: str, transfer_syntax: str, titles: tuple[str, str, str]
) -> bytes:
    """The spool's File Meta Information group, group length first, as pydicom would write
    pynetdicom's, plus the AE titles (node, calling, called). The UIDs must be plain_uids."""
    group = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", sop_class.encode()),
            _element(0x0003, b"UI", sop_instance.encode()),
            _element(0x0010, b"UI", transfer_syntax.encode()),
            _element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode()),
            _element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode()),
            _ae_titles(*titles),
        )
    )
    return _element(0x0000, b"UL", struct.pack("<I", len(group))) + group


def written_in_place(request: Any) -> int | None:
    """Where the dataset starts in the file a C-STORE request was received into, when that
    file already has the spool's header (_write_file_meta wrote it); else None."""
    return getattr(getattr(request, "_dataset_file", None), "spool_dataset_offset", None)


def plain_uids(*uids: str) -> bool:
    """UIDs file_meta can write as they are (pydicom handles the others)."""
    return all(isinstance(uid, str) and len(uid) <= 64 and uid.isascii() for uid in uids)


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 2 element, explicit VR little endian, padded to even length as pydicom
    pads: UI with NUL, text with a space."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH", 2, element) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", 2, element) + vr + struct.pack("<H", len(value)) + value


def _ae_titles(node_ae: str, calling: str, called: str) -> bytes:
    """Source (the node), Sending (calling) and Receiving (called) Application Entity Title."""
    return b"".join(
        _element(element, b"AE", title.encode("ascii", "replace")[:16])
        for element, title in ((0x0016, node_ae), (0x0017, calling), (0x0018, called))
    )


def spool_header(received: Path, node_ae: str, calling: str, called: str) -> tuple[bytes, int]:
    """The Part 10 header for the spool file and where the dataset starts in `received`; the
    header is b"" when `received` already starts with it (_write_file_meta wrote it).

    Otherwise pydicom wrote pynetdicom's File Meta Information (up to (0002,0013)): the node
    appends Source (its own), Sending (calling) and Receiving (called) Application Entity
    Title, (0002,0016)-(0002,0018), and corrects the group length; the caller then copies the
    dataset behind it.
    """
    with received.open("rb") as f:
        head = f.read(144)
        if len(head) < 144 or head[128:138] != b"DICM\x02\x00\x00\x00UL":
            raise ValueError("the received file does not start with a File Meta group length")
        (length,) = struct.unpack("<I", head[140:144])
        group = f.read(length)
    if len(group) != length:
        raise ValueError("the received file ends inside its File Meta Information")
    if _last_meta_element(group) >= 0x0016:
        return b"", 144 + length
    extra = _ae_titles(node_ae, calling, called)
    group_length = head[132:140] + struct.pack("<I", length + len(extra))
    return b"\0" * 128 + b"DICM" + group_length + group + extra, 144 + length


def _last_meta_element(group: bytes) -> int:
    """The highest element number in an explicit VR little endian group-2 byte string."""
    at, last = 0, 0
    while at + 8 <= len(group):
        _, element = struct.unpack("<HH", group[at : at + 4])
        vr = group[at + 4 : at + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (size,) = struct.unpack("<I", group[at + 8 : at + 12])
            at += 12 + size
        else:
            (size,) = struct.unpack("<H", group[at + 6 : at + 8])
            at += 8 + size
        last = max(last, element)
    return last
