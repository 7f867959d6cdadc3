"""Codecs as plugins: one module per transfer syntax family, each a `Codec` (base.py) that says
what it encodes and decodes, builds (encode one frame, decode one frame) for a target, and
carries its row of the capability table. Registering one is one entry in REGISTERED; the codec
step, capability.refusal, `dicom-node explain`, the Storage SCP's syntaxes and
tools/codec_matrix.py all read this registry, at the time they ask.

A codec's syntaxes must also be in node.vocabulary.syntaxes.ENCODABLE (configuration checks rule
targets against it and imports nothing of the transcoder); tests/transcode/test_codecs.py
asserts the two agree.
"""

from __future__ import annotations

import functools

from pydicom import uid
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from node.transcode.codecs import htj2k, jpeg, jpeg2000, jpegls, jpegxl, native, rle
from node.transcode.codecs.base import Codec
from node.vocabulary.syntaxes import JPEGXL, JPEGXLJPEGRecompression, JPEGXLLossless

# In the order the README lists the targets (and the codec matrix its columns).
REGISTERED: tuple[Codec, ...] = (
    native.CODEC,
    rle.CODEC,
    jpegls.CODEC,
    jpeg2000.CODEC,
    htj2k.CODEC,
    jpeg.CODEC,
    jpegxl.CODEC,
)

# The order the Storage SCP prefers received syntaxes in (the acceptor picks from its own
# list): compressed lossless first, so a sender is never asked to decompress, then those that
# may be lossy, then uncompressed. A registered syntax not named here follows the compressed
# (or uncompressed) ones named, in registry order.
_RECEIVE_PREFERENCE: tuple[UID, ...] = (
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.RLELossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    JPEGXLLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000,
    uid.HTJ2K,
    JPEGXL,
    JPEGXLJPEGRecompression,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
)


def codec_for(syntax: str | None) -> Codec | None:
    """The codec that encodes `syntax`, or None when none does."""
    return next((c for c in REGISTERED if syntax in c.encodes), None)


def decoder_for(syntax: str) -> Codec | None:
    """The first registered codec that decodes `syntax` (received data), or None."""
    return next((c for c in REGISTERED if syntax in c.decodes), None)


def encodable_syntaxes() -> tuple[UID, ...]:
    """Every syntax a rule may target, in registry order."""
    return tuple(ts for c in REGISTERED for ts in c.encodes)


@functools.cache
def receivable_syntaxes() -> tuple[UID, ...]:
    """Transfer syntaxes this installation can decode, compressed ones first: uncompressed ones
    always, compressed ones when pydicom has a decoder for them here. Asked once a process."""
    declared = dict.fromkeys(ts for c in REGISTERED for ts in c.decodes)
    rank = {ts: i for i, ts in enumerate(_RECEIVE_PREFERENCE)}
    ordered = sorted(
        declared, key=lambda ts: (not ts.is_compressed, rank.get(ts, len(rank)))
    )  # stable: syntaxes not in the preference keep registry order
    result = []
    for ts in ordered:
        if not ts.is_compressed:
            result.append(ts)
            continue
        try:
            if get_decoder(ts).is_available:
                result.append(ts)
        except NotImplementedError:
            pass
    return tuple(result)
