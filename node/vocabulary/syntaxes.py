"""Transfer syntaxes as DICOM defines them and as the node uses them: names, the JPEG 2000
family, which are lossless, the Lossy Image Compression Method of each, which a rule may target.
Pure facts, imported by configuration and every stage alike (what this installation can decode
and encode, the codecs tell: node/transcode/codecs)."""

from __future__ import annotations

from typing import Any

from pydicom import uid as _uid
from pydicom.uid import (
    UID,
    UID_dictionary,
)

# JPEG XL (PS3.5 A.4.11, DICOM 2024), which pydicom 3.0.2 predates: it takes UIDs it does not
# know for no transfer syntax at all. Entered in its UID dictionary (name, type, info, retired,
# keyword) on import, so that pydicom reads and writes such files as the compressed, explicit
# VR little endian syntaxes they are, and names them; every module that meets them imports this.
JPEGXLLossless = UID("1.2.840.10008.1.2.4.110")
JPEGXLJPEGRecompression = UID("1.2.840.10008.1.2.4.111")
JPEGXL = UID("1.2.840.10008.1.2.4.112")
for _ts, _name, _keyword in (
    (JPEGXLLossless, "JPEG XL Lossless", "JPEGXLLossless"),
    (JPEGXLJPEGRecompression, "JPEG XL JPEG Recompression", "JPEGXLJPEGRecompression"),
    (JPEGXL, "JPEG XL", "JPEGXL"),
):
    UID_dictionary.setdefault(_ts, (_name, "Transfer Syntax", "", "", _keyword))

# What a rule may name as its target, in the order the README documents them: configuration
# checks targets against it. The codecs that encode them are node/transcode/codecs;
# tests/transcode/test_codecs.py asserts that registry encodes exactly these.
ENCODABLE: tuple[UID, ...] = (
    _uid.ExplicitVRLittleEndian,
    _uid.RLELossless,
    _uid.JPEGLSLossless,
    _uid.JPEGLSNearLossless,
    _uid.JPEG2000Lossless,
    _uid.JPEG2000,
    _uid.HTJ2KLossless,
    _uid.HTJ2KLosslessRPCL,
    _uid.HTJ2K,
    _uid.JPEGBaseline8Bit,
    _uid.JPEGExtended12Bit,
    _uid.JPEGLosslessSV1,
    _uid.JPEGLossless,
    JPEGXLLossless,
    JPEGXL,
    JPEGXLJPEGRecompression,
)

# The JPEG 2000 family, HTJ2K among it: where a rule's `mct` applies (the codecs with
# colour_transform, as tests/transcode/test_codecs.py asserts).
J2K_FAMILY: frozenset[UID] = frozenset(
    {_uid.JPEG2000Lossless, _uid.JPEG2000, _uid.HTJ2KLossless, _uid.HTJ2KLosslessRPCL, _uid.HTJ2K}
)

# Lossless by construction. JPEG-LS near-lossless with jls_error 0 is also lossless, but the
# syntax itself says "may be lossy", so it is treated as lossy bookkeeping-wise only when error > 0.
# JPEG XL JPEG Recompression repacks a (lossy) JPEG without changing a bit of it: the step is
# lossless, the image stays as lossy as its JPEG was (ALWAYS_LOSSY).
LOSSLESS: frozenset[UID] = frozenset(
    {
        _uid.ExplicitVRLittleEndian,
        _uid.RLELossless,
        _uid.JPEGLSLossless,
        _uid.JPEG2000Lossless,
        _uid.HTJ2KLossless,
        _uid.HTJ2KLosslessRPCL,
        _uid.JPEGLosslessSV1,
        _uid.JPEGLossless,
        JPEGXLLossless,
        JPEGXLJPEGRecompression,
    }
)

# Lossy Image Compression Method (0028,2114) defined terms, PS3.3 C.7.6.1.1.5.1, for every
# syntax whose codestream can be lossy: a lossless label proves nothing (see lossy_history).
LOSSY_METHOD: dict[UID, str] = {
    _uid.JPEGBaseline8Bit: "ISO_10918_1",
    _uid.JPEGExtended12Bit: "ISO_10918_1",
    _uid.JPEGLSLossless: "ISO_14495_1",
    _uid.JPEGLSNearLossless: "ISO_14495_1",
    _uid.JPEG2000Lossless: "ISO_15444_1",
    _uid.JPEG2000: "ISO_15444_1",
    _uid.HTJ2KLossless: "ISO_15444_15",
    _uid.HTJ2KLosslessRPCL: "ISO_15444_15",
    _uid.HTJ2K: "ISO_15444_15",
    JPEGXLLossless: "ISO_18181_1",
    JPEGXL: "ISO_18181_1",
    JPEGXLJPEGRecompression: "ISO_10918_1",  # the JPEG's own step: the repack loses nothing
}

# Syntaxes whose pixel data is lossy whatever the parameters were (JPEG XL JPEG Recompression
# holds a JPEG baseline image, as received).
ALWAYS_LOSSY: frozenset[UID] = frozenset(
    {_uid.JPEGBaseline8Bit, _uid.JPEGExtended12Bit, JPEGXLJPEGRecompression}
)


def syntax_name(ts: str | None) -> str:
    """A short name for logs: the pydicom keyword, or the UID when it has none."""
    if ts is None:
        return "keep"
    entry = UID_dictionary.get(str(ts))
    return entry[4] if entry and entry[4] else str(ts)


def lookup_syntax(name: Any) -> UID | None:
    """Any transfer syntax by pydicom keyword or dotted UID, or None if there is no such one."""
    if not isinstance(name, str) or not name.strip():
        return None
    name = name.strip()
    for uid_value, entry in UID_dictionary.items():
        if entry[1] == "Transfer Syntax" and name in (uid_value, entry[4]):
            return UID(uid_value)
    return None
