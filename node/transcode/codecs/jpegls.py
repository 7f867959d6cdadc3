"""JPEG-LS lossless and near-lossless (ISO 14495-1), encoded and decoded by CharLS through
pyjpegls: CharLS also decodes JPEG-LS ~4x faster than libjpeg, pydicom's first choice."""

from __future__ import annotations

import struct

from pydicom import uid
from pydicom.uid import UID

from node.config.targets import Target
from node.transcode.codecs.base import (
    Codec,
    FrameDecoder,
    FrameEncoder,
    FrameJob,
    pydicom_decoder,
    pydicom_encoder,
    pydicom_profiles,
)
from node.transcode.pixels import PixelFacts

_PLUGIN = "pyjpegls"  # CharLS, in pydicom


def build(job: FrameJob) -> tuple[FrameEncoder, FrameDecoder]:
    parameters = {}
    if job.target.jls_error is not None:
        parameters["jls_error"] = job.target.jls_error  # NEAR, the largest pixel error
    return pydicom_encoder(job, _PLUGIN, **parameters), pydicom_decoder(job, _PLUGIN)


def refuse(facts: PixelFacts, target: Target) -> str | None:
    """Signed data leaves near-lossless coding no valid range once 2 x NEAR reaches half of
    it. Whether the actual values lie within NEAR of the limits, pydicom checks on the pixels
    (its ValueError becomes the refusal)."""
    if target.syntax == uid.JPEGLSNearLossless and facts.pixel_representation == 1:
        limit = 2 ** (facts.bits_stored - 1)
        if target.jls_error and target.jls_error * 2 >= limit:
            return (
                f"jls_error {target.jls_error} leaves no valid range for signed "
                f"{facts.bits_stored}-bit data"
            )
    return None


def error_bound(target: Target) -> int:
    if target.syntax == uid.JPEGLSNearLossless:
        return target.jls_error or 0
    return 0


def lossy_evidence(syntax: UID, codestream: bytes) -> str | None:
    near = _jpeg_ls_near(codestream)
    return f"JPEG-LS NEAR={near} in the codestream" if near else None


def _jpeg_ls_near(cs: bytes) -> int | None:
    """NEAR of the first scan (ISO 14495-1 C.2.3), walking the marker segments from SOI."""
    if cs[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(cs):
        if cs[pos] != 0xFF:
            return None
        marker = cs[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", cs, pos + 2)
        if marker == 0xDA:  # SOS: Ls, Ns, Ns x (Ci, Tmi), NEAR, ILV, Al/Ah
            ns = cs[pos + 4] if pos + 4 < len(cs) else 0
            near_at = pos + 5 + 2 * ns
            ok = ns and length == 6 + 2 * ns and near_at < len(cs)
            return cs[near_at] if ok else None
        if length < 2:
            return None
        pos += 2 + length
    return None


CODEC = Codec(
    name="JPEG-LS (CharLS via pyjpegls)",
    encodes=(uid.JPEGLSLossless, uid.JPEGLSNearLossless),
    decodes=(uid.JPEGLSLossless, uid.JPEGLSNearLossless),
    build=build,
    profiles=pydicom_profiles(uid.JPEGLSLossless, uid.JPEGLSNearLossless),
    refuse=refuse,
    error_bound=error_bound,
    lossy_evidence=lossy_evidence,
    matrix_columns=(
        ("JLS", {"syntax": "JPEGLSLossless"}),
        ("JLS-near2", {"syntax": "JPEGLSNearLossless", "jls_error": 2}),
    ),
)
