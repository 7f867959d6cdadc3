"""Uncompressed (native) Pixel Data: Explicit VR Little Endian out; the uncompressed syntaxes in.

It has no frame codec: native Pixel Data is one value for all frames (no fragments, no Basic
Offset Table), its VR follows Bits Allocated, and it is verified by pydicom reading the finished
dataset, so the codec step writes it itself (step._native_pixels); big endian input made little
endian by a byte swap (step._little_endian_copy) involves no codec at all. What is here is its
row of the registry: it takes every image the node can decode.
"""

from __future__ import annotations

from pydicom import uid

from node.transcode.codecs.base import Codec

CODEC = Codec(
    name="native (uncompressed)",
    encodes=(uid.ExplicitVRLittleEndian,),
    decodes=(
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
    ),
    matrix_columns=(("EVRLE", {"syntax": "ExplicitVRLittleEndian"}),),
)
