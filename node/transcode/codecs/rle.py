"""RLE Lossless, encoded and decoded by pylibjpeg-rle (Rust) through pydicom: pydicom's own
pure-Python RLE encoder is ~8x slower."""

from __future__ import annotations

from pydicom import uid

from node.transcode.codecs.base import (
    Codec,
    FrameDecoder,
    FrameEncoder,
    FrameJob,
    pydicom_decoder,
    pydicom_encoder,
    pydicom_profiles,
)

_PLUGIN = "pylibjpeg"  # pylibjpeg-rle's plugin in pydicom


def build(job: FrameJob) -> tuple[FrameEncoder, FrameDecoder]:
    return pydicom_encoder(job, _PLUGIN), pydicom_decoder(job, _PLUGIN)


CODEC = Codec(
    name="RLE Lossless (pylibjpeg-rle)",
    encodes=(uid.RLELossless,),
    decodes=(uid.RLELossless,),
    build=build,
    profiles=pydicom_profiles(uid.RLELossless),
    matrix_columns=(("RLE", {"syntax": "RLELossless"}),),
)
