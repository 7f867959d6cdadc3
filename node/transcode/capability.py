"""Can a target syntax encode this image, and if not, why? One table-driven answer used by the
transcoder, by `dicom-node explain` and by the tests, so they never disagree.

The per-syntax pixel parameters come from pydicom's ENCODING_PROFILES (PS3.5 section 8.2);
the node adds what no installed encoder can do.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSNearLossless,
)

from node.config.targets import Target
from node.vocabulary.syntaxes import (
    ALWAYS_LOSSY,
    HTJ2K_FAMILY,
    J2K_FAMILY,
    JPEG_LS_FAMILY,
    LOSSY_METHOD,
    receivable_syntaxes,
    syntax_name,
)

ULTRASOUND_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",  # US, US multi-frame
    "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3",  # their retired forms
}  # fmt: skip

# Beyond these, Rows x Columns x Frames describe no real image: a hostile or broken header
# must not make a worker allocate gigabytes (it passes through as received instead).
MAX_FRAME_BYTES = 1 << 31
MAX_DECODED_BYTES = 1 << 34

# Encoder limits below what the standard allows (FIELD-NOTES 6).
_MAX_BITS_STORED = {uid: 24 for uid in J2K_FAMILY - HTJ2K_FAMILY}

# pydicom has no HTJ2K encoder, so no profile: what the node feeds OpenJPH (imagecodecs), in
# ENCODING_PROFILES' form. Precision follows the container (8 or 16 bits).
_HTJ2K_PROFILE = [
    ("MONOCHROME1", 1, (0, 1), (8, 16), range(1, 17)),
    ("MONOCHROME2", 1, (0, 1), (8, 16), range(1, 17)),
    ("PALETTE COLOR", 1, (0,), (8, 16), range(1, 17)),
    ("RGB", 3, (0,), (8, 16), range(1, 17)),
    ("YBR_FULL", 3, (0,), (8, 16), range(1, 17)),
    ("YBR_RCT", 3, (0,), (8, 16), range(1, 17)),
    ("YBR_ICT", 3, (0,), (8, 16), range(1, 17)),
]
_DECODABLE_PHOTOMETRIC = {
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB",
    "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT",
}  # fmt: skip


@dataclass(frozen=True)
class PixelFacts:
    """The Image Pixel module of a received instance, as the codecs see it."""

    syntax: UID
    pixel_keyword: str | None  # PixelData, FloatPixelData, DoubleFloatPixelData or None
    photometric: str
    samples: int
    pixel_representation: int
    bits_allocated: int
    bits_stored: int
    rows: int
    columns: int
    frames: int
    sop_class: str = ""
    native_bytes: int | None = None  # length of native (not encapsulated) Pixel Data

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples * max(self.bits_allocated, 8) // 8

    @property
    def converts_to_rgb(self) -> bool:
        return self.syntax in ALWAYS_LOSSY and self.photometric in ("YBR_FULL", "YBR_FULL_422")

    @property
    def decoded_photometric(self) -> str:
        """The photometric interpretation of the raw decoded frames.

        pydicom upsamples YBR_FULL_422 to full resolution without colour conversion, which is
        YBR_FULL; J2K MCT is undone by the codec, giving RGB. YBR from a lossy JPEG is
        converted to RGB (as every viewer shows it): most IODs, ultrasound among them, do
        not allow YBR_FULL, and the image is lossy already.
        """
        if self.converts_to_rgb:
            return "RGB"
        if self.photometric == "YBR_FULL_422":
            return "YBR_FULL"
        if self.photometric in ("YBR_RCT", "YBR_ICT"):
            return "RGB"
        return self.photometric


def pixel_facts(ds: Dataset) -> PixelFacts:
    """Read the Image Pixel module; raises ValueError naming the attribute that is unusable."""
    keyword = next(
        (k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None
    )

    def number(name: str, default: int | None = None) -> int:
        value = ds.get(name, default)
        if value is None or value == "":
            if keyword is None:
                return 0
            raise ValueError(f"({name}) is missing")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} has an unusable value {value!r}") from None

    return PixelFacts(
        syntax=UID(ds.file_meta.TransferSyntaxUID),
        pixel_keyword=keyword,
        photometric=str(ds.get("PhotometricInterpretation", "")).strip(),
        samples=number("SamplesPerPixel", 1),
        pixel_representation=number("PixelRepresentation", 0),
        bits_allocated=number("BitsAllocated"),
        bits_stored=number("BitsStored", ds.get("BitsAllocated")),
        rows=number("Rows"),
        columns=number("Columns"),
        frames=number("NumberOfFrames", 1) or 1,
        sop_class=str(ds.get("SOPClassUID", "")),
        native_bytes=_native_length(ds, keyword),
    )


def _native_length(ds: Dataset, keyword: str | None) -> int | None:
    if keyword is None or ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return None
    elem = ds.get_item(keyword, keep_deferred=True)  # a deferred value stays on disk
    return elem.length if elem.value is None else len(elem.value)


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


# The headers up to SOS (JPEG-LS) or COD (JPEG 2000) sit in a frame's first bytes.
_CODESTREAM_HEAD = 1 << 16


def lossy_history(
    ds: Dataset, facts: PixelFacts, pixel_source: Path | None = None
) -> LossyHistory | None:
    """Whether the input is lossy already: from its codestream (JPEG baseline/extended, JPEG-LS
    NEAR > 0, an irreversible JPEG 2000/HTJ2K wavelet) or its header (Lossy Image Compression
    "01"). The one answer for the transcoder, the safety default, explain and the codec matrix.

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
    if syntax in ALWAYS_LOSSY:
        why = f"JPEG {'baseline' if syntax == JPEGBaseline8Bit else 'extended'} input"
    elif syntax in JPEG_LS_FAMILY:
        near = _jpeg_ls_near(head)
        if not near:
            return None
        why = f"JPEG-LS NEAR={near} in the codestream"
    else:
        if _j2k_transform(head) != 0:
            return None
        family = "HTJ2K" if syntax in HTJ2K_FAMILY else "JPEG 2000"
        why = f"irreversible 9-7 wavelet in the {family} codestream"
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


def needs_mct(facts: PixelFacts, target: Target) -> bool:
    """RGB into JPEG 2000 with the colour transform: `mct: true` always, `mct: false` never,
    unset where the IOD requires it: ultrasound allows only YBR_RCT / YBR_ICT with JPEG 2000
    (PS3.3 C.8.5.6.1.2)."""
    wanted = target.mct if target.mct is not None else facts.sop_class in ULTRASOUND_SOP_CLASSES
    return (
        wanted
        and target.syntax in J2K_FAMILY
        and facts.decoded_photometric == "RGB"
        and facts.samples == 3
    )


def output_photometric(facts: PixelFacts, target: Target) -> str:
    """The Photometric Interpretation the output will carry."""
    if needs_mct(facts, target):
        return "YBR_ICT" if target.is_lossy else "YBR_RCT"
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
    if facts.syntax not in receivable_syntaxes():
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
    if target.syntax == JPEGLSNearLossless and facts.pixel_representation == 1:
        limit = 2 ** (facts.bits_stored - 1)
        if target.jls_error and target.jls_error * 2 >= limit:
            return (
                f"jls_error {target.jls_error} leaves no valid range for signed "
                f"{facts.bits_stored}-bit data"
            )
    if target.syntax == ExplicitVRLittleEndian:
        return None
    limit = _MAX_BITS_STORED.get(target.syntax)
    if limit and facts.bits_stored > limit:
        return (
            f"Bits Stored {facts.bits_stored} is above the {limit} bits the {name} encoder supports"
        )
    pi = output_photometric(facts, target)
    if target.syntax in HTJ2K_FAMILY:
        profile = _HTJ2K_PROFILE
    else:
        profile = ENCODING_PROFILES.get(target.syntax, [])
    for p_pi, p_spp, p_repr, p_alloc, p_stored in profile:
        if (
            pi == p_pi
            and facts.samples == p_spp
            and facts.pixel_representation in p_repr
            and facts.bits_allocated in p_alloc
            and facts.bits_stored in p_stored
        ):
            return None
    return (
        f"{name} cannot encode {pi}, {facts.samples} sample(s), Bits Allocated "
        f"{facts.bits_allocated}, Bits Stored {facts.bits_stored}, "
        f"{'signed' if facts.pixel_representation else 'unsigned'} (PS3.5 section 8.2)"
    )
