"""Writing a processed instance to its work file.

A lossless recompression of an explicit VR little endian instance changes nothing but the
Pixel Data element and the File Meta. Its output is then spliced: the received file's own bytes
before and after Pixel Data, around the newly encapsulated pixels. That keeps every other
element byte for byte as the modality sent it, and costs a fraction of pydicom re-encoding the
header (dcmwrite was a fifth of a CT slice's HTJ2K processing). Anything else is written by
pydicom.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from node.transcode import PIXEL_TAGS

PIXEL_DATA = 0x7FE00010
_META_START = b"DICM\x02\x00\x00\x00UL\x04\x00"  # preamble end, (0002,0000) UL 4
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def write_output(path: Path, out: Dataset, received: Dataset, received_path: Path) -> bool:
    """Write `out`, the processed form of `received` (read from `received_path`), to `path`.
    True when it was spliced from the received file's bytes, False when pydicom wrote it."""
    if _splice(path, out, received, received_path):
        return True
    dcmwrite(path, out, enforce_file_format=True)
    return False


def _splice(path: Path, out: Dataset, received: Dataset, received_path: Path) -> bool:
    if received.file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return False
    pixels_in = received.get_item(PIXEL_DATA, keep_deferred=True)
    start = _value_offset(pixels_in)
    pixels_out = out.get_item(PIXEL_DATA)
    if start is None or pixels_out is None or not pixels_out.is_undefined_length:
        return False
    if not _same_header(received, out):
        return False
    with open(received_path, "rb") as src:
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
    meta = DicomBytesIO()
    write_file_meta_info(meta, out.file_meta, enforce_standard=True)
    with open(path, "wb") as dst:
        dst.write(b"\0" * 128 + b"DICM")
        dst.write(meta.getvalue())
        dst.write(before)
        dst.write(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
        dst.write(pixels_out.value)
        dst.write(_SEQUENCE_DELIMITER)
        dst.write(after)
    return True


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
