"""The head of a received C-STORE's file: the spool's File Meta Information that goes in front of
its dataset (node/receive/c_store.py writes it, then the dataset's fragments as they arrive). The
same File Meta encoder writes the spliced outputs' group (node/transcode/output_file.py).
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION


def file_meta(
    sop_class: str, sop_instance: str, transfer_syntax: str, titles: tuple[str, str, str]
) -> bytes:
    """The spool's File Meta Information group, as pydicom would write pynetdicom's, plus the
    AE titles (node, calling, called). The UIDs must be plain_uids."""
    implementation = (PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
    return meta_group(sop_class, sop_instance, transfer_syntax, implementation, titles)


def meta_group(
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    implementation: tuple[str, str],
    titles: tuple[str | None, str | None, str | None],
) -> bytes:
    """A File Meta Information group, group length first, byte for byte as pydicom writes one
    with these elements: (implementation class UID, version name), and the Source, Sending and
    Receiving AE titles (a None title is left out). AE titles longer than 16 characters are cut,
    anything not ASCII becomes '?'."""
    group = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", sop_class.encode()),
            _element(0x0003, b"UI", sop_instance.encode()),
            _element(0x0010, b"UI", transfer_syntax.encode()),
            _element(0x0012, b"UI", implementation[0].encode()),
            _element(0x0013, b"SH", implementation[1].encode()),
            _ae_titles(*titles),
        )
    )
    return _element(0x0000, b"UL", struct.pack("<I", len(group))) + group


def plain_uids(*uids: str) -> bool:
    """UIDs file_meta can write: 64 ASCII characters at most (c_store refuses the others)."""
    return all(isinstance(uid, str) and len(uid) <= 64 and uid.isascii() for uid in uids)


def even_length(value: bytes, vr: bytes) -> bytes:
    """A value padded to even length as pydicom pads it: UI with NUL, text with a space."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    return value


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 2 element, explicit VR little endian."""
    value = even_length(value, vr)
    if vr == b"OB":
        return struct.pack("<HH", 2, element) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", 2, element) + vr + struct.pack("<H", len(value)) + value


def _ae_titles(source: str | None, sending: str | None, receiving: str | None) -> bytes:
    """Source (the node), Sending (calling) and Receiving (called) Application Entity Title."""
    return b"".join(
        _element(element, b"AE", title.encode("ascii", "replace")[:16])
        for element, title in ((0x0016, source), (0x0017, sending), (0x0018, receiving))
        if title is not None
    )
