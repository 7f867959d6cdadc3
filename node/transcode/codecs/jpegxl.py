"""JPEG XL (ISO 18181-1, PS3.5 A.4.11): lossless (.110) and lossy (.112) from pixels, and JPEG
Recompression (.111), a JPEG baseline codestream repacked without decoding it; all by libjxl
through imagecodecs, in and out.

pydicom 3.0.2 decodes none of them: this module gives it a decoder for each (a plugin of its own
Decoder class, entered in its table of decoders on import), so the node decodes JPEG XL input
as it decodes any other, and the codec step verifies its outputs the way a reader would decode
them. A .111 frame is decoded as the JPEG it holds, with the same libjpeg decoder pydicom uses
for JPEG baseline, so both give the same pixels.

JPEG XL integer samples are unsigned: signed data is refused rather than shifted.
"""

from __future__ import annotations

import numpy as np
from pydicom import uid
from pydicom.pixels.decoders import base as _pydicom_decoders
from pydicom.uid import UID

from node.config.targets import Target
from node.transcode.codecs.base import (
    Codec,
    CodestreamRepacker,
    FrameDecoder,
    FrameEncoder,
    FrameJob,
    ProfileRow,
    Refused,
    pydicom_decoder,
)
from node.transcode.pixels import PixelFacts
from node.vocabulary.syntaxes import JPEGXL, JPEGXLJPEGRecompression, JPEGXLLossless

_FROM_PIXELS = (JPEGXLLossless, JPEGXL)
_SYNTAXES = (JPEGXLLossless, JPEGXL, JPEGXLJPEGRecompression)
_EOI = b"\xff\xd9"

_PROFILE: tuple[ProfileRow, ...] = (
    ("MONOCHROME1", 1, (0,), (8, 16), range(1, 17)),
    ("MONOCHROME2", 1, (0,), (8, 16), range(1, 17)),
    ("PALETTE COLOR", 1, (0,), (8, 16), range(1, 17)),  # lossless only (capability.refusal)
    ("RGB", 3, (0,), (8, 16), range(1, 17)),
)


def build(job: FrameJob) -> tuple[FrameEncoder, FrameDecoder]:
    import imagecodecs  # only the workers that encode JPEG XL pay for the import

    target, bits = job.target, job.facts.bits_stored
    lossless = job.syntax == JPEGXLLossless

    def encode(frame: np.ndarray) -> bytes:
        try:
            return bytes(imagecodecs.jpegxl_encode(
                np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("=")),
                lossless=lossless, distance=None if lossless else target.jxl_distance,
                effort=target.jxl_effort, bitspersample=bits,
            ))  # fmt: skip
        except Exception as exc:  # JpegxlError, ValueError: the reason is the refusal
            raise Refused(f"libjxl: {exc}") from None

    return encode, pydicom_decoder(job)


def repack(job: FrameJob) -> CodestreamRepacker:
    """A JPEG baseline frame's codestream (up to its EOI marker: what follows is padding to an
    even length) repacked as JPEG XL, kept only if libjxl gives the codestream back byte for
    byte."""
    import imagecodecs

    def repacked(frame: bytes) -> bytes:
        end = frame.rfind(_EOI)
        jpeg = frame[: end + 2] if end >= 0 else frame
        try:
            jxl = bytes(imagecodecs.jpegxl_encode_jpeg(jpeg))
            back = bytes(imagecodecs.jpegxl_decode_jpeg(jxl))
        except Exception as exc:  # e.g. arithmetic coding, which libjxl cannot repack
            raise Refused(f"libjxl cannot repack this JPEG: {exc}") from None
        if back != jpeg:
            raise Refused("libjxl did not give the received JPEG back byte for byte")
        return jxl

    return repacked


def output_photometric(facts: PixelFacts, target: Target) -> str:
    """A repacked JPEG is the JPEG it was: its Photometric Interpretation stays."""
    if target.syntax == JPEGXLJPEGRecompression:
        return facts.photometric
    return facts.decoded_photometric


def refuse(facts: PixelFacts, target: Target) -> str | None:
    if target.syntax == JPEGXLJPEGRecompression:
        if facts.syntax != uid.JPEGBaseline8Bit:
            return (
                "JPEG XL JPEG Recompression repacks JPEG baseline (1.2.840.10008.1.2.4.50) "
                "input only; this is not JPEG baseline"
            )
        return None
    if facts.pixel_representation == 1:
        return (
            "JPEG XL codes unsigned samples only: signed (Pixel Representation 1) data is "
            "refused, not shifted"
        )
    return None


def lossy_evidence(syntax: UID, codestream: bytes) -> str | None:
    """A repacked JPEG is as lossy as the JPEG; .112 codestreams carry no lossy flag that a
    first look can read (the header's Lossy Image Compression decides)."""
    if syntax == JPEGXLJPEGRecompression:
        return "JPEG XL JPEG Recompression input (a JPEG baseline image)"
    return None


# --- the decoder pydicom is given ------------------------------------------------------------

DECODER_DEPENDENCIES = dict.fromkeys(_SYNTAXES, ("imagecodecs>=2026.3.6",))


def is_available(syntax: str) -> bool:
    """pydicom's plugin protocol: whether this installation decodes `syntax`."""
    try:
        import imagecodecs
    except ImportError:
        return False
    return syntax in _SYNTAXES and bool(imagecodecs.JPEGXL.available)


def _decode_frame(src: bytes, runner) -> bytes | bytearray:
    """pydicom's plugin protocol: one frame's pixels, in the layout its runner describes."""
    import imagecodecs

    if runner.transfer_syntax == JPEGXLJPEGRecompression:
        from libjpeg import decode_pixel_data  # what pydicom decodes JPEG baseline with

        jpeg = bytes(imagecodecs.jpegxl_decode_jpeg(src))
        return decode_pixel_data(jpeg, version=2, **runner.options)
    frame = imagecodecs.jpegxl_decode(src)
    container = np.uint8 if runner.bits_allocated <= 8 else np.uint16
    return np.ascontiguousarray(frame, dtype=container).tobytes()


def _teach_pydicom() -> None:
    """A pydicom Decoder with this module as its plugin, for each JPEG XL syntax, entered in
    pydicom's table of decoders (pydicom.pixels.decoders.base._PIXEL_DATA_DECODERS, which
    get_decoder reads: the one private name this needs). Idempotent."""
    table = _pydicom_decoders._PIXEL_DATA_DECODERS
    for ts in _SYNTAXES:
        if ts not in table:
            decoder = _pydicom_decoders.Decoder(UID(ts))
            decoder.add_plugin("imagecodecs", (__name__, "_decode_frame"))
            table[UID(ts)] = (decoder, "dicom-node")


_teach_pydicom()

CODEC = Codec(
    name="JPEG XL (libjxl via imagecodecs)",
    encodes=_SYNTAXES,
    decodes=_SYNTAXES,
    build=build,
    profiles={**dict.fromkeys(_FROM_PIXELS, _PROFILE)},
    refuse=refuse,
    output_photometric=output_photometric,
    repacks=(JPEGXLJPEGRecompression,),
    repack=repack,
    lossy_evidence=lossy_evidence,
    matrix_columns=(
        ("JXL", {"syntax": "JPEGXLLossless"}),
        ("JXL-d1", {"syntax": "JPEGXL", "jxl_distance": 1.0}),
        ("JXL-JPEG", {"syntax": "JPEGXLJPEGRecompression"}),
    ),
)
