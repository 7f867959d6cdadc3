"""High-Throughput JPEG 2000 (ISO 15444-15): encoded by OpenJPH through imagecodecs, as pydicom
has no HTJ2K encoder; decoded again by pydicom (OpenJPEG via pylibjpeg-openjpeg).

OpenJPH's precision is the container's (8 or 16 bits), which pydicom's decoder accepts; its
default progression is RPCL; the RPCL syntax also needs TLM markers (PS3.5 8.2.15), with one
tile-part per resolution.
"""

from __future__ import annotations

import numpy as np
from pydicom import uid

from node.transcode.codecs.base import (
    Codec,
    FrameDecoder,
    FrameEncoder,
    FrameJob,
    ProfileRow,
    Refused,
    pydicom_decoder,
)
from node.transcode.codecs.jpeg2000 import irreversible_wavelet

# What the node feeds OpenJPH, in ENCODING_PROFILES' form (pydicom has none for HTJ2K).
# Precision follows the container (8 or 16 bits).
_PROFILE: tuple[ProfileRow, ...] = (
    ("MONOCHROME1", 1, (0, 1), (8, 16), range(1, 17)),
    ("MONOCHROME2", 1, (0, 1), (8, 16), range(1, 17)),
    ("PALETTE COLOR", 1, (0,), (8, 16), range(1, 17)),
    ("RGB", 3, (0,), (8, 16), range(1, 17)),
    ("YBR_FULL", 3, (0,), (8, 16), range(1, 17)),
    ("YBR_RCT", 3, (0,), (8, 16), range(1, 17)),
    ("YBR_ICT", 3, (0,), (8, 16), range(1, 17)),
)
_SYNTAXES = (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K)


def build(job: FrameJob) -> tuple[FrameEncoder, FrameDecoder]:
    def encode(frame: np.ndarray) -> bytes:
        return _encode(frame, job)

    return encode, pydicom_decoder(job)


def _encode(frame: np.ndarray, job: FrameJob) -> bytes:
    import imagecodecs  # only the workers that encode HTJ2K pay for the import

    rpcl = job.syntax == uid.HTJ2KLosslessRPCL
    encoded = imagecodecs.htj2k_encode(
        np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("=")),  # big endian input
        level=job.target.htj2k_qstep,
        reversible=not job.target.is_lossy,
        rgb=job.colour_transform if job.facts.samples == 3 else None,
        tlm=rpcl,
        tilepart=imagecodecs.HTJ2K.TILEPART.RESOLUTIONS if rpcl else None,
    )
    if rpcl and not _is_rpcl_with_tlm(encoded):
        raise Refused("the HTJ2K encoder did not produce RPCL order with TLM markers")
    return bytes(encoded)


def _is_rpcl_with_tlm(codestream: bytes) -> bool:
    header_end = codestream.find(b"\xff\x90")  # first SOT: the main header ends there
    header = codestream[:header_end]
    cod = header.find(b"\xff\x52")
    return cod > 0 and header[cod + 5] == 2 and b"\xff\x55" in header  # 2 = RPCL


CODEC = Codec(
    name="HTJ2K (OpenJPH via imagecodecs)",
    encodes=_SYNTAXES,
    decodes=_SYNTAXES,
    build=build,
    profiles=dict.fromkeys(_SYNTAXES, _PROFILE),
    colour_transform=True,
    lossy_evidence=irreversible_wavelet("HTJ2K"),
    matrix_columns=(
        ("HTJ2K", {"syntax": "HTJ2KLossless"}),
        ("HTJ2K-RPCL", {"syntax": "HTJ2KLosslessRPCL"}),
        ("HTJ2K-q", {"syntax": "HTJ2K", "htj2k_qstep": 0.002}),
    ),
)
