"""Writing a processed instance to its work file.

A lossless recompression of an explicit VR little endian instance changes nothing but the
Pixel Data element and the File Meta. Its output is then spliced: the received file's own bytes
before and after Pixel Data, around the newly encapsulated pixels. That keeps every other
element byte for byte as the modality sent it, and costs a fraction of pydicom re-encoding the
header (dcmwrite was a fifth of a CT slice's HTJ2K processing). Anything else is written by
pydicom.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from node.receive.received_file import meta_group, plain_uids
from node.transcode.step import PIXEL_TAGS

PIXEL_DATA = 0x7FE00010
_META_START = b"DICM\x02\x00\x00\x00UL\x04\x00"  # preamble end, (0002,0000) UL 4
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# File Meta elements (tag, VR) that received_file.meta_group writes; group length and version
# are written by it whatever they were.
_META_ELEMENTS = {
    0x00020002: "UI", 0x00020003: "UI", 0x00020010: "UI", 0x00020012: "UI",
    0x00020013: "SH", 0x00020016: "AE", 0x00020017: "AE", 0x00020018: "AE",
}  # fmt: skip


def write_output(
    path: Path,
    out: Dataset,
    received: Dataset,
    received_path: Path,
    received_bytes: bytes | None = None,
) -> bool:
    """Write `out`, the processed form of `received` (read from `received_path`, whose bytes
    are `received_bytes` when the caller holds them), to `path`. True when it was spliced
    from the received file's bytes, False when pydicom wrote it."""
    if _splice(path, out, received, received_path, received_bytes):
        return True
    dcmwrite(path, out, enforce_file_format=True)
    return False


def file_meta_bytes(meta: FileMetaDataset) -> bytes:
    """The File Meta group, byte for byte as pydicom writes it. The elements the spool's files
    have are encoded by received_file.meta_group (pydicom's writer cost 0.65 ms of a CT slice's
    processing); anything else, or a value pydicom would write differently, goes to pydicom."""
    values = _meta_values(meta)
    if values is not None:
        return meta_group(values[0x00020002], values[0x00020003], values[0x00020010],
                          (values[0x00020012], values[0x00020013]),
                          (values.get(0x00020016), values.get(0x00020017),
                           values.get(0x00020018)))  # fmt: skip
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


def _meta_values(meta: FileMetaDataset) -> dict[int, str] | None:
    values: dict[int, str] = {}
    for tag in meta.keys():  # noqa: SIM118 - tags only
        if tag in (0x00020000, 0x00020001):
            if tag == 0x00020001 and meta[tag].value != b"\x00\x01":
                return None
            continue
        elem = meta[tag]
        if _META_ELEMENTS.get(tag) != elem.VR:
            return None
        value = "" if elem.value is None else elem.value
        if not isinstance(value, str) or not value.isascii():
            return None
        values[tag] = value
    uids = [values.get(t, "") for t in (0x00020002, 0x00020003, 0x00020010, 0x00020012)]
    if not all(uids) or 0x00020013 not in values or not plain_uids(*uids):
        return None  # pydicom adds or refuses what is missing
    short = [values.get(t, "") for t in (0x00020013, 0x00020016, 0x00020017, 0x00020018)]
    if any(len(value) > 16 for value in short):  # meta_group would cut an AE title there
        return None
    return values


def _splice(
    path: Path, out: Dataset, received: Dataset, received_path: Path, received_bytes: bytes | None
) -> bool:
    if received.file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return False
    pixels_in = received.get_item(PIXEL_DATA, keep_deferred=True)
    start = _value_offset(pixels_in)
    pixels_out = out.get_item(PIXEL_DATA)
    if start is None or pixels_out is None or not pixels_out.is_undefined_length:
        return False
    if not _same_header(received, out):
        return False
    with _received(received_path, received_bytes) as src:
        head = src.read(144)
        if len(head) < 144 or head[128:140] != _META_START:
            return False
        dataset_start = 144 + struct.unpack_from("<I", head, 140)[0]
        element_start = start - 12  # tag, VR, 2 reserved bytes, 4-byte length
        if element_start < dataset_start:
            return False
        src.seek(dataset_start)
        before = src.read(element_start - dataset_start)
        element_header = src.read(12)
        length = struct.unpack_from("<I", element_header, 8)[0] if len(element_header) == 12 else 0
        if element_header[:4] != b"\xe0\x7f\x10\x00" or element_header[4:6] not in (b"OB", b"OW") \
                or length in (0, 0xFFFFFFFF) or length != _known_length(pixels_in, length):
            return False  # not where pydicom said it is: never guess
        src.seek(start + length)
        after = src.read()
    meta = file_meta_bytes(out.file_meta)
    with open(path, "wb") as dst:
        dst.write(b"\0" * 128 + b"DICM")
        dst.write(meta)
        dst.write(before)
        dst.write(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
        dst.write(pixels_out.value)
        dst.write(_SEQUENCE_DELIMITER)
        dst.write(after)
    return True


def _received(path: Path, data: bytes | None) -> BinaryIO:
    """The received file: the bytes the caller read (parsed and spliced from one read), or the
    file itself."""
    return io.BytesIO(data) if data is not None else open(path, "rb")  # noqa: SIM115


def _value_offset(elem: DataElement | RawDataElement | None) -> int | None:
    """Where a top-level element's value starts in the file it was read from."""
    if isinstance(elem, RawDataElement):
        return elem.value_tell
    if isinstance(elem, DataElement):
        return elem.file_tell
    return None


def _known_length(elem: DataElement | RawDataElement, default: int) -> int:
    if isinstance(elem, RawDataElement):
        return elem.length
    return len(elem.value) if isinstance(elem.value, (bytes, bytearray)) else default


def _same_header(received: Dataset, out: Dataset) -> bool:
    """Every element but the pixel ones is the same in both, and no group length would have to
    change with the Pixel Data's length."""
    tags = [t for t in received.keys() if t not in PIXEL_TAGS]  # noqa: SIM118 - no loading
    if len(tags) != len(out) - 1 or PIXEL_DATA not in out or 0x7FE00000 in received:
        return False
    for tag in tags:
        mine = out.get_item(tag, keep_deferred=True)
        theirs = received.get_item(tag, keep_deferred=True)
        if mine is None or not (mine is theirs or _equal(mine, theirs)):
            return False
    return True


def _equal(a: DataElement | RawDataElement, b: DataElement | RawDataElement) -> bool:
    """Raw and converted forms of one element compare by their converted value."""
    if type(a) is not type(b):
        a, b = _converted(a), _converted(b)
    return a == b


def _converted(elem: DataElement | RawDataElement) -> DataElement:
    return convert_raw_data_element(elem) if isinstance(elem, RawDataElement) else elem
