"""JPEG (ISO 10918-1): baseline, extended and lossless process 14, decoded by pydicom's JPEG
plugins (pylibjpeg-libjpeg here). Received only: the node encodes none of them."""

from __future__ import annotations

from pydicom import uid
from pydicom.uid import UID

from node.transcode.codecs.base import Codec
from node.vocabulary.syntaxes import ALWAYS_LOSSY


def lossy_evidence(syntax: UID, codestream: bytes) -> str | None:
    """Baseline and extended JPEG are lossy whatever their codestream says."""
    if syntax in ALWAYS_LOSSY:
        return f"JPEG {'baseline' if syntax == uid.JPEGBaseline8Bit else 'extended'} input"
    return None


CODEC = Codec(
    name="JPEG (decoded by pydicom's JPEG plugins)",
    encodes=(),
    decodes=(uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit),
    lossy_evidence=lossy_evidence,
)
