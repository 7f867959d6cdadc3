"""Can a target syntax encode this image, and if not, why? One table-driven answer used by the
transcoder, by `dicom-node explain` and by the tests, so they never disagree.

The checks every target shares are here; each codec's own row of the table (its profile, from
pydicom's ENCODING_PROFILES per PS3.5 section 8.2 where pydicom encodes it, its bit depth limit
and its own refusals) is in its module under node/transcode/codecs/. Also here: whether an
input is lossy already, which each codec tells from its codestream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets

from node.config.targets import Target
from node.transcode import codecs
from node.transcode.pixels import PixelFacts as PixelFacts  # re-exported: callers read the
from node.transcode.pixels import pixel_facts as pixel_facts  # facts here, then ask about them
from node.vocabulary.syntaxes import LOSSY_METHOD, syntax_name

ULTRASOUND_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",  # US, US multi-frame
    "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3",  # their retired forms
}  # fmt: skip

# Beyond these, Rows x Columns x Frames describe no real image: a hostile or broken header
# must not make a worker allocate gigabytes (it passes through as received instead).
MAX_FRAME_BYTES = 1 << 31
MAX_DECODED_BYTES = 1 << 34

_DECODABLE_PHOTOMETRIC = {
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB",
    "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT",
}  # fmt: skip


def guarded_kinds(ds: Dataset, facts: PixelFacts, pixel_source: Path | None = None) -> list[str]:
    """Why this image must not be lossy-compressed unless a rule allows it (LOSSY_GUARDED)."""
    kinds = []
    if lossy_history(ds, facts, pixel_source) is not None:
        kinds.append("already-lossy")
    if str(ds.get("Modality", "")).strip() == "MG":
        kinds.append("mammography")
    sop_class = str(getattr(ds.get("SOPClassUID"), "name", ""))
    intent = str(ds.get("PresentationIntentType", "")).strip().upper()
    if intent == "FOR PROCESSING" or "For Processing" in sop_class:
        kinds.append("for-processing")
    return kinds


@dataclass(frozen=True)
class LossyHistory:
    """Why an input is lossy already, and what is known of its own lossy step."""

    why: str  # e.g. "JPEG-LS NEAR=3 in the codestream"
    method: str | None = None  # (0028,2114) term of the input's own step, if its data says so
    ratio: float | None = None  # that step's ratio, measured: decoded / encapsulated bytes


# The headers up to SOS (JPEG-LS) or COD (JPEG 2000) sit in a frame's first bytes: what a
# codec's lossy_evidence is given.
_CODESTREAM_HEAD = 1 << 16


def lossy_history(
    ds: Dataset, facts: PixelFacts, pixel_source: Path | None = None
) -> LossyHistory | None:
    """Whether the input is lossy already: from its codestream, as the codec that decodes it
    tells (JPEG baseline/extended, JPEG-LS NEAR > 0, an irreversible JPEG 2000/HTJ2K wavelet),
    or its header (Lossy Image Compression "01"). The one answer for the transcoder, the safety
    default, explain and the codec matrix.

    `pixel_source`: the file a deferred Pixel Data is on (else the dataset's own filename).
    Damaged or unreadable pixel data is no evidence: the header decides then.
    """
    if (own := _own_lossy_step(ds, facts, pixel_source)) is not None:
        return own
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        return LossyHistory("Lossy Image Compression 01 in the header")
    return None


def _own_lossy_step(
    ds: Dataset, facts: PixelFacts, pixel_source: Path | None
) -> LossyHistory | None:
    syntax = facts.syntax
    if facts.pixel_keyword != "PixelData" or syntax not in LOSSY_METHOD:
        return None
    try:
        head, total = _first_fragment(ds, pixel_source)
    except Exception:  # damaged: no evidence, except the syntax of JPEG baseline/extended
        head, total = b"", 0
    codec = codecs.decoder_for(syntax)
    why = codec.lossy_evidence(syntax, head) if codec and codec.lossy_evidence else None
    if why is None:
        return None
    ratio = facts.frame_bytes * facts.frames / total if total else None
    return LossyHistory(why, LOSSY_METHOD[syntax], ratio)


def _first_fragment(ds: Dataset, pixel_source: Path | None) -> tuple[bytes, int]:
    """(the first bytes of the first fragment, all fragments' bytes) of encapsulated Pixel
    Data, read from disk when the value is deferred there: item headers only, no frames."""
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    if elem.value is not None:
        return _walk_fragments(BytesIO(elem.value))
    source = pixel_source or getattr(ds, "filename", None)
    if not isinstance(source, (str, Path)) or not getattr(elem, "value_tell", None):
        return b"", 0
    with open(source, "rb") as f:
        f.seek(elem.value_tell)
        return _walk_fragments(f)


def _walk_fragments(buffer: BinaryIO) -> tuple[bytes, int]:
    parse_basic_offsets(buffer)  # skips the Basic Offset Table; ValueError on damage
    head: bytes | None = None
    total = 0
    while len(item := buffer.read(8)) == 8:
        group, element, length = struct.unpack("<HHL", item)
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            break  # sequence delimiter, or damage: what was read stands
        total += length
        if head is None:
            head = buffer.read(min(length, _CODESTREAM_HEAD))
            length -= len(head)
        buffer.seek(length, 1)
    return head or b"", total


def needs_mct(facts: PixelFacts, target: Target) -> bool:
    """RGB into JPEG 2000 with the colour transform: `mct: true` always, `mct: false` never,
    unset where the IOD requires it: ultrasound allows only YBR_RCT / YBR_ICT with JPEG 2000
    (PS3.3 C.8.5.6.1.2)."""
    wanted = target.mct if target.mct is not None else facts.sop_class in ULTRASOUND_SOP_CLASSES
    codec = codecs.codec_for(target.syntax)
    return (
        wanted
        and codec is not None
        and codec.colour_transform
        and facts.decoded_photometric == "RGB"
        and facts.samples == 3
    )


def output_photometric(facts: PixelFacts, target: Target) -> str:
    """The Photometric Interpretation the output will carry."""
    if needs_mct(facts, target):
        return "YBR_ICT" if target.is_lossy else "YBR_RCT"
    codec = codecs.codec_for(target.syntax)
    if codec is not None and codec.output_photometric is not None:
        return codec.output_photometric(facts, target)
    return facts.decoded_photometric


def refusal(facts: PixelFacts, target: Target) -> str | None:
    """Why `target` cannot encode this image, or None when it can.

    Data-dependent limits (e.g. signed values against the JPEG-LS near-lossless range) are
    checked by the encoder on the actual pixels; their message becomes the refusal then.
    """
    assert target.syntax is not None, "keep needs no capability check"
    name = syntax_name(target.syntax)
    if facts.pixel_keyword is None:
        return "the instance has no pixel data"
    if facts.pixel_keyword != "PixelData":
        return f"{facts.pixel_keyword} (floating point pixels) cannot be re-encoded"
    if facts.syntax not in codecs.receivable_syntaxes():
        return f"the node cannot decode the received syntax {syntax_name(facts.syntax)}"
    if facts.bits_allocated == 1:
        return "Bits Allocated 1 (bit-packed pixels) cannot be re-encoded"
    if facts.frame_bytes > MAX_FRAME_BYTES or facts.frame_bytes * facts.frames > MAX_DECODED_BYTES:
        return (
            f"{facts.rows} x {facts.columns} x {facts.frames} frames of {facts.samples} "
            f"sample(s) at {facts.bits_allocated} bits is beyond what the node decodes"
        )
    if min(facts.rows, facts.columns, facts.samples, facts.bits_allocated) < 1:
        return "Rows, Columns, Samples per Pixel and Bits Allocated must be positive"
    if facts.native_bytes is not None:
        expected = facts.rows * facts.columns * facts.samples * facts.frames
        expected = expected * facts.bits_allocated // 8 if facts.bits_allocated >= 8 else 0
        if facts.photometric == "YBR_FULL_422":  # two chroma samples per two pixels
            expected = expected * 2 // 3
        if facts.native_bytes < expected:  # more is trailing padding, seen in real files
            return (
                f"Pixel Data holds {facts.native_bytes} bytes; its Image Pixel attributes "
                f"describe {expected}"
            )
    if facts.photometric not in _DECODABLE_PHOTOMETRIC:
        return f"Photometric Interpretation {facts.photometric or '(missing)'} cannot be decoded"
    if facts.bits_stored > facts.bits_allocated or facts.bits_stored < 1:
        return f"Bits Stored {facts.bits_stored} does not fit Bits Allocated {facts.bits_allocated}"
    if facts.photometric == "PALETTE COLOR" and target.is_lossy:
        return f"PALETTE COLOR holds palette indexes; lossy {name} would change the colours"
    codec = codecs.codec_for(target.syntax)
    if codec is None:
        return f"the node has no encoder for {name}"
    if codec.refuse is not None and (reason := codec.refuse(facts, target)):
        return reason
    profile = None if codec.profiles is None else codec.profiles.get(target.syntax)
    if profile is None:  # takes whatever the node decodes
        return None
    limit = codec.max_bits_stored
    if limit and facts.bits_stored > limit:
        return (
            f"Bits Stored {facts.bits_stored} is above the {limit} bits the {name} encoder supports"
        )
    pi = output_photometric(facts, target)
    for p_pi, p_spp, p_repr, p_alloc, p_stored in profile:
        if (
            pi == p_pi
            and facts.samples == p_spp
            and facts.pixel_representation in p_repr
            and facts.bits_allocated in p_alloc
            and facts.bits_stored in p_stored
        ):
            return None
    shown = pi if pi == facts.decoded_photometric else f"{facts.decoded_photometric} (as {pi})"
    return (
        f"{name} cannot encode {shown}, {facts.samples} sample(s), Bits Allocated "
        f"{facts.bits_allocated}, Bits Stored {facts.bits_stored}, "
        f"{'signed' if facts.pixel_representation else 'unsigned'} (PS3.5 section 8.2)"
    )
