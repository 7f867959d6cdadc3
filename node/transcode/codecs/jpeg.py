"""JPEG (ISO 10918-1): baseline (.50), extended 12-bit (.51) and lossless process 14 (.57, and
.70 with selection value 1), encoded by libjpeg-turbo 3 through imagecodecs, decoded again by
pydicom's JPEG plugin (Thomas Richter's libjpeg, through pylibjpeg-libjpeg): the verification
decoder is not the encoder's library.

Baseline colour is written as YBR_FULL_422 (libjpeg's YCbCr with 4:2:2 chroma), what the IODs
that take colour JPEG (ultrasound, VL, secondary capture) list for it. Lossy JPEG codes unsigned
samples only: two's complement values would wrap around zero under quantisation, so signed
data is refused; lossless coding takes their bit pattern and gives it back bit for bit.
"""

from __future__ import annotations

import numpy as np
from pydicom import uid
from pydicom.pixels import convert_color_space
from pydicom.uid import UID

from node.config.targets import Target
from node.transcode.codecs.base import (
    Codec,
    FrameDecoder,
    FrameEncoder,
    FrameJob,
    ProfileRow,
    Refused,
    pydicom_decoder,
)
from node.transcode.pixels import PixelFacts
from node.vocabulary.syntaxes import ALWAYS_LOSSY

_LOSSLESS = (uid.JPEGLosslessSV1, uid.JPEGLossless)
_VERIFY_PLUGIN = "pylibjpeg"  # libjpeg, not libjpeg-turbo which encoded it

_MONO = ("MONOCHROME1", "MONOCHROME2")
# What libjpeg-turbo is fed, in ENCODING_PROFILES' form (pydicom encodes no JPEG); PS3.5 8.2.1.
_PROFILES: dict[UID, tuple[ProfileRow, ...]] = {
    uid.JPEGBaseline8Bit: (
        *((pi, 1, (0,), (8,), range(1, 9)) for pi in _MONO),
        ("YBR_FULL_422", 3, (0,), (8,), range(1, 9)),
    ),
    uid.JPEGExtended12Bit: tuple((pi, 1, (0,), (16,), range(1, 13)) for pi in _MONO),
    **dict.fromkeys(
        _LOSSLESS,
        (
            *((pi, 1, (0, 1), (8, 16), range(2, 17)) for pi in _MONO),
            ("PALETTE COLOR", 1, (0,), (8, 16), range(2, 17)),
            ("RGB", 3, (0,), (8, 16), range(2, 17)),
            ("YBR_FULL", 3, (0,), (8,), range(2, 9)),
        ),
    ),
}


def build(job: FrameJob) -> tuple[FrameEncoder, FrameDecoder]:
    import imagecodecs  # only the workers that encode JPEG pay for the import

    facts, target = job.facts, job.target
    if job.syntax in _LOSSLESS:
        predictor = target.predictor or 1  # .70 is predictor 1 by definition
        colour = "RGB" if facts.samples == 3 else None  # no colour transform: lossless

        def encode(frame: np.ndarray) -> bytes:
            return bytes(imagecodecs.jpeg8_encode(
                _bit_pattern(frame, facts.bits_stored), lossless=True, predictor=predictor,
                bitspersample=facts.bits_stored, colorspace=colour, outcolorspace=colour,
            ))  # fmt: skip

    else:
        quality = target.jpeg_quality
        precision = 12 if job.syntax == uid.JPEGExtended12Bit else 8
        # RGB becomes YCbCr 4:2:2; YBR_FULL input is YCbCr already, only subsampled
        source = None if facts.samples == 1 else facts.decoded_photometric
        colour = {"RGB": "RGB", "YBR_FULL": "YCbCr", None: None}[source]

        def encode(frame: np.ndarray) -> bytes:
            return bytes(imagecodecs.jpeg8_encode(
                np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("=")), level=quality,
                bitspersample=precision, colorspace=colour,
                outcolorspace="YCbCr" if colour else None, subsampling="422" if colour else None,
            ))  # fmt: skip

    decode = pydicom_decoder(job, _VERIFY_PLUGIN)
    if job.options["photometric_interpretation"] == "YBR_FULL_422" and colour == "RGB":
        rgb_decode = decode  # YCbCr comes back: compared with the RGB it was made from

        def decode(encoded: bytes) -> np.ndarray:
            return convert_color_space(rgb_decode(encoded), "YBR_FULL", "RGB")

    return _refusing(encode), decode


def _refusing(encode: FrameEncoder) -> FrameEncoder:
    def refusing(frame: np.ndarray) -> bytes:
        try:
            return encode(frame)
        except Exception as exc:  # imagecodecs' JpegError, ValueError: the reason is the refusal
            raise Refused(f"libjpeg-turbo: {exc}") from None

    return refusing


def _bit_pattern(frame: np.ndarray, bits_stored: int) -> np.ndarray:
    """The samples as lossless JPEG codes them: unsigned, `bits_stored` wide (a signed value is
    its two's complement bit pattern; pydicom sign-extends it again when decoding)."""
    frame = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("="))
    if frame.dtype.kind != "i":
        return frame
    unsigned = frame.view(frame.dtype.str.replace("i", "u"))
    return unsigned & np.array((1 << bits_stored) - 1, unsigned.dtype)


def output_photometric(facts: PixelFacts, target: Target) -> str:
    """Baseline colour is YBR_FULL_422; everything else keeps its decoded photometric."""
    if target.syntax == uid.JPEGBaseline8Bit and facts.samples == 3:
        return "YBR_FULL_422"
    return facts.decoded_photometric


def refuse(facts: PixelFacts, target: Target) -> str | None:
    if target.syntax in ALWAYS_LOSSY and facts.pixel_representation == 1:
        return (
            "lossy JPEG codes unsigned samples only: signed (Pixel Representation 1) values "
            "would wrap around zero; use a lossless JPEG, JPEG-LS or JPEG 2000 target"
        )
    return None


def lossy_evidence(syntax: UID, codestream: bytes) -> str | None:
    """Baseline and extended JPEG are lossy whatever their codestream says."""
    if syntax in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit):
        return f"JPEG {'baseline' if syntax == uid.JPEGBaseline8Bit else 'extended'} input"
    return None


CODEC = Codec(
    name="JPEG (libjpeg-turbo via imagecodecs; verified by libjpeg)",
    encodes=(uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLosslessSV1, uid.JPEGLossless),
    decodes=(uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit),
    build=build,
    profiles=_PROFILES,
    refuse=refuse,
    output_photometric=output_photometric,
    lossy_evidence=lossy_evidence,
    matrix_columns=(
        ("JPEG-q90", {"syntax": "JPEGBaseline8Bit", "jpeg_quality": 90}),
        ("JPEG12-q90", {"syntax": "JPEGExtended12Bit", "jpeg_quality": 90}),
        ("JPEG-SV1", {"syntax": "JPEGLosslessSV1"}),
        ("JPEG-P7", {"syntax": "JPEGLossless", "predictor": 7}),
    ),
)
