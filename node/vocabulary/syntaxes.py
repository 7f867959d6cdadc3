"""Transfer syntaxes as DICOM defines them and as the node uses them: names, families, which
are lossless, the Lossy Image Compression Method of each, what the node can receive and encode.
Pure facts, imported by configuration and every stage alike."""

from __future__ import annotations

import functools
from typing import Any

from pydicom import uid as _uid
from pydicom.uid import (
    UID,
    UID_dictionary,
)

# What a rule may name as its target, in the order the README documents them.
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
)

# JPEG 2000 family: `mct` applies; HTJ2K is encoded by OpenJPH (imagecodecs), not pydicom.
J2K_FAMILY: frozenset[UID] = frozenset(
    {_uid.JPEG2000Lossless, _uid.JPEG2000, _uid.HTJ2KLossless, _uid.HTJ2KLosslessRPCL, _uid.HTJ2K}
)
HTJ2K_FAMILY: frozenset[UID] = frozenset({_uid.HTJ2KLossless, _uid.HTJ2KLosslessRPCL, _uid.HTJ2K})
JPEG_LS_FAMILY: frozenset[UID] = frozenset({_uid.JPEGLSLossless, _uid.JPEGLSNearLossless})

# Lossless by construction. JPEG-LS near-lossless with jls_error 0 is also lossless, but the
# syntax itself says "may be lossy", so it is treated as lossy bookkeeping-wise only when error > 0.
LOSSLESS: frozenset[UID] = frozenset(
    {
        _uid.ExplicitVRLittleEndian,
        _uid.RLELossless,
        _uid.JPEGLSLossless,
        _uid.JPEG2000Lossless,
        _uid.HTJ2KLossless,
        _uid.HTJ2KLosslessRPCL,
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
}

# Syntaxes whose pixel data is lossy whatever the parameters were.
ALWAYS_LOSSY: frozenset[UID] = frozenset({_uid.JPEGBaseline8Bit, _uid.JPEGExtended12Bit})

# What the Storage SCP accepts, in the order it prefers them: the acceptor picks from its own
# list, so compressed syntaxes come first and a sender is never asked to decompress.
_RECEIVABLE_CANDIDATES: tuple[UID, ...] = (
    _uid.JPEGLSLossless,
    _uid.JPEG2000Lossless,
    _uid.HTJ2KLossless,
    _uid.HTJ2KLosslessRPCL,
    _uid.RLELossless,
    _uid.JPEGLosslessSV1,
    _uid.JPEGLossless,
    _uid.JPEGLSNearLossless,
    _uid.JPEG2000,
    _uid.HTJ2K,
    _uid.JPEGBaseline8Bit,
    _uid.JPEGExtended12Bit,
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.ExplicitVRBigEndian,
    _uid.DeflatedExplicitVRLittleEndian,
)


@functools.cache
def receivable_syntaxes() -> tuple[UID, ...]:
    """Transfer syntaxes this installation can decode, compressed ones first."""
    from pydicom.pixels import get_decoder

    result = []
    for ts in _RECEIVABLE_CANDIDATES:
        if not ts.is_compressed:
            result.append(ts)
            continue
        try:
            if get_decoder(ts).is_available:
                result.append(ts)
        except NotImplementedError:
            pass
    return tuple(result)


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
