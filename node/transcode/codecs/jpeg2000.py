"""JPEG 2000 lossless and lossy (ISO 15444-1), encoded and decoded by OpenJPEG through
pylibjpeg-openjpeg. Lossy targets give the quality layers as ratios (j2k_cr) or PSNR (j2k_psnr);
RGB gets the colour transform when the output's Photometric Interpretation is YBR_RCT / YBR_ICT.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pydicom import uid
from pydicom.uid import UID

from node.transcode.codecs.base import (
    Codec,
    FrameDecoder,
    FrameEncoder,
    FrameJob,
    pydicom_decoder,
    pydicom_encoder,
    pydicom_profiles,
)

_PLUGIN = "pylibjpeg"  # pylibjpeg-openjpeg's plugin in pydicom


def build(job: FrameJob) -> tuple[FrameEncoder, FrameDecoder]:
    parameters = {}
    if job.target.j2k_cr is not None:
        parameters["j2k_cr"] = list(job.target.j2k_cr)
    if job.target.j2k_psnr is not None:
        parameters["j2k_psnr"] = list(job.target.j2k_psnr)
    return pydicom_encoder(job, _PLUGIN, **parameters), pydicom_decoder(job, _PLUGIN)


def irreversible_wavelet(family: str) -> Callable[[UID, bytes], str | None]:
    """Lossy evidence of a JPEG 2000 `family` codestream: the 9-7 irreversible wavelet."""

    def evidence(syntax: UID, codestream: bytes) -> str | None:
        if _j2k_transform(codestream) != 0:
            return None
        return f"irreversible 9-7 wavelet in the {family} codestream"

    return evidence


def _j2k_transform(cs: bytes) -> int | None:
    """The COD wavelet of the main header (ISO 15444-1 A.6.1): 0 = 9-7 irreversible,
    1 = 5-3 reversible. A JP2 wrapper is skipped by looking for SOC followed by SIZ."""
    pos = cs.find(b"\xff\x4f\xff\x51")
    if pos < 0:
        return None
    pos += 2
    while pos + 4 <= len(cs):
        marker, length = struct.unpack_from(">HH", cs, pos)
        if marker >> 8 != 0xFF or marker == 0xFF90 or length < 2:  # SOT: main header ended
            return None
        if marker == 0xFF52:  # COD: Lcod Scod, progression, layers(2), MCT, then SPcod:
            # levels, xcb, ycb, code-block style, transform
            at = pos + 13
            return cs[at] if length >= 12 and at < len(cs) and cs[at] in (0, 1) else None
        pos += 2 + length
    return None


CODEC = Codec(
    name="JPEG 2000 (OpenJPEG via pylibjpeg-openjpeg)",
    encodes=(uid.JPEG2000Lossless, uid.JPEG2000),
    decodes=(uid.JPEG2000Lossless, uid.JPEG2000),
    build=build,
    profiles=pydicom_profiles(uid.JPEG2000Lossless, uid.JPEG2000),
    # pylibjpeg-openjpeg encodes 1-24 bits per sample; PS3.5 allows JPEG 2000 up to 38
    max_bits_stored=24,
    colour_transform=True,
    lossy_evidence=irreversible_wavelet("JPEG 2000"),
    matrix_columns=(
        ("J2K", {"syntax": "JPEG2000Lossless"}),
        ("J2K-MCT", {"syntax": "JPEG2000Lossless", "mct": True}),
        ("J2K-cr", {"syntax": "JPEG2000", "j2k_cr": [20, 10, 5]}),
        ("J2K-psnr", {"syntax": "JPEG2000", "j2k_psnr": [60, 80]}),
    ),
)
