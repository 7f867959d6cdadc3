"""The codec step, a pure function: received dataset + TranscodeSpec -> TranscodeResult.

Frames are decoded raw (no colour conversion), encoded one at a time, and every encoded frame
is decoded again and compared before it is kept: lossless must be bit-exact, near-lossless
within jls_error. Any refusal or mismatch moves on to the next fallback; when none is left the
instance goes on exactly as received. Each family's encoder and decoder is a codec plugin
(node/transcode/codecs); what is here is the same for all of them.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import (
    as_pixel_options,
    convert_color_space,
    get_encoder,
    iter_pixels,
)
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

from node.config.targets import Target, TranscodeSpec
from node.transcode import capability, codecs
from node.transcode.codecs.base import Codec, FrameJob, Refused
from node.vocabulary.syntaxes import LOSSY_METHOD, syntax_name

# Extended Offset Table (+ lengths), Pixel Data; a set: a tuple compared pydicom tags one by one
PIXEL_TAGS = frozenset((0x7FE00001, 0x7FE00002, 0x7FE00010))
_RAW_VRS = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
IMPLEMENTATION_VERSION = "DICOM_NODE_01"
_LITTLE_ENDIAN = Target(UID(ExplicitVRLittleEndian))


@dataclass(frozen=True)
class TranscodeResult:
    """What the codec step decided. `dataset` None means: forward exactly as received."""

    dataset: Dataset | None
    outcome: str  # "recompressed", "kept" (as the rule asked) or "passed-through" (could not)
    target: Target | None
    notes: tuple[str, ...] = ()
    ratio: float | None = None  # uncompressed / encoded pixel bytes, measured
    max_error: int | None = None  # largest absolute pixel difference found when verifying


# Decoded frames up to this (bytes, all frames) are kept for an instance's other targets.
KEEP_DECODED = 1 << 30


class DecodedInput:
    """An instance's frames, decoded once for all of its targets (transcode_all). Above
    KEEP_DECODED bytes they are not kept: each target decodes them again, frame by frame, as
    a single target does, so that a large multi-frame instance never sits in memory whole."""

    def __init__(self) -> None:
        self._frames: list[np.ndarray] | None = None
        self.decodes = 0  # times the input was decoded

    def frames(
        self, ds: Dataset, facts: capability.PixelFacts, pixel_source: Path | None
    ) -> Iterator[np.ndarray]:
        if self._frames is not None:
            return iter(self._frames)
        self.decodes += 1
        if facts.frame_bytes * facts.frames > KEEP_DECODED:
            return decoded_frames(ds, facts, pixel_source)
        self._frames = list(decoded_frames(ds, facts, pixel_source))
        return iter(self._frames)


def transcode_all(
    ds: Dataset, specs: tuple[TranscodeSpec, ...], pixel_source: Path | None = None
) -> tuple[TranscodeResult, ...]:
    """`transcode` for each of `specs` (a rule's distinct outputs), the input decoded once."""
    if len(specs) == 1:  # nothing to share: frames stream through, one at a time
        return (transcode(ds, specs[0], pixel_source),)
    decoded = DecodedInput()
    return tuple(transcode(ds, spec, pixel_source, decoded) for spec in specs)


def transcode(
    ds: Dataset,
    spec: TranscodeSpec,
    pixel_source: Path | None = None,
    decoded: DecodedInput | None = None,
) -> TranscodeResult:
    """Encode `ds` to the first candidate of `spec` that can take it, verified.

    `pixel_source`: the file `ds` was read from with its Pixel Data deferred (a large
    multi-frame instance); frames are then read from it one at a time, never all at once.
    `decoded`: the frames as another target of the same instance decoded them (transcode_all).
    """
    notes: list[str] = []
    try:
        facts = capability.pixel_facts(ds)
    except Exception as exc:  # any attribute a hostile header makes unreadable
        return TranscodeResult(
            None, "passed-through", None, (f"unusable Image Pixel module: {exc}",)
        )
    for target in spec.candidates:
        if target.syntax is None:
            return TranscodeResult(None, "kept", target, (*notes, "the rule says keep"))
        if target.syntax == facts.syntax:
            note = f"already {syntax_name(target.syntax)}: forwarded as received, not re-encoded"
            return TranscodeResult(None, "kept", target, (*notes, note))
        if target.is_lossy:
            kinds = capability.guarded_kinds(ds, facts, pixel_source)
            guarded = [k for k in kinds if k not in spec.allow_lossy]
            if guarded:
                notes.append(
                    f"{target.describe()}: safety: no lossy compression of {', '.join(guarded)} "
                    f"images unless the rule says allow_lossy: [{', '.join(guarded)}]"
                )
                continue
        try:
            out, ratio, max_error = _encode(ds, facts, target, pixel_source, decoded)
        except Refused as exc:
            notes.append(f"{target.describe()}: {exc}")
            continue
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a codec failing on hostile or damaged
            # data is a refusal too; Rust codecs (pylibjpeg-rle) panic with a BaseException
            notes.append(f"{target.describe()}: {type(exc).__name__}: {exc}")
            continue
        if capability.needs_mct(facts, target) and target.mct is None:
            notes.append("ultrasound: JPEG 2000 colour transform applied, the US IOD allows "
                         "only YBR_RCT/YBR_ICT with JPEG 2000 (PS3.3 C.8.5.6.1.2)")  # fmt: skip
        return TranscodeResult(out, "recompressed", target, tuple(notes), ratio, max_error)
    tried = any(t.syntax == ExplicitVRLittleEndian for t in spec.candidates)
    if facts.syntax == ExplicitVRBigEndian and not tried:  # the rule wants little endian
        try:
            out = _little_endian_copy(ds, facts)
        except Refused as exc:
            notes.append(f"{syntax_name(ExplicitVRLittleEndian)}: {exc}")
        else:
            notes.append("no target could take it: byte order changed to Explicit VR Little "
                         "Endian (big endian is retired; many archives refuse it)")  # fmt: skip
            return TranscodeResult(out, "recompressed", _LITTLE_ENDIAN, tuple(notes), 1.0, 0)
    return TranscodeResult(None, "passed-through", None, tuple(notes))


def _encode(
    ds: Dataset,
    facts: capability.PixelFacts,
    target: Target,
    pixel_source: Path | None = None,
    decoded: DecodedInput | None = None,
):
    if target.syntax == ExplicitVRLittleEndian and facts.syntax == ExplicitVRBigEndian:
        return _little_endian_copy(ds, facts), 1.0, 0  # no codec: bit-packed, float, any
    reason = capability.refusal(facts, target)
    if reason:
        raise Refused(reason)
    codec = codecs.codec_for(target.syntax)
    assert target.syntax is not None and codec is not None  # refusal() said there is one
    out = _header_copy(ds)
    out.PhotometricInterpretation = capability.output_photometric(facts, target)
    if facts.samples > 1:
        out.PlanarConfiguration = 0  # decoded frames are always colour-by-pixel

    repacked = target.syntax in codec.repacks  # from the received codestream, not decoded
    if repacked:
        frames: Iterator = received_codestreams(ds, facts, pixel_source)
    elif decoded is not None:
        frames = decoded.frames(ds, facts, pixel_source)
    else:
        frames = decoded_frames(ds, facts, pixel_source)
    if codec.build is None and not repacked:  # native Pixel Data: no frame codec
        encoded_bytes, max_error = _native_pixels(frames, out, facts)
    else:
        encoded_bytes, max_error = _encapsulated_pixels(frames, out, facts, target, codec)

    uncompressed = facts.frame_bytes * facts.frames
    ratio = uncompressed / encoded_bytes if encoded_bytes else None
    _stamp_file_meta(out, target.syntax)
    history = capability.lossy_history(ds, facts, pixel_source)
    if history is not None:
        _record_input_step(out, history)
    if target.is_lossy:
        _record_lossy_step(out, target, ratio or 0.0)
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out, ratio, max_error


def _encapsulated_pixels(
    frames: Iterator[np.ndarray],
    out: Dataset,
    facts: capability.PixelFacts,
    target: Target,
    codec: Codec,
) -> tuple[int, int | None]:
    syntax = UID(target.syntax)
    options = as_pixel_options(out)
    options["number_of_frames"] = 1
    colour_transform = capability.needs_mct(facts, target)
    # get_encoder as this module holds it: see FrameJob.get_encoder
    job = FrameJob(syntax, target, facts, options, colour_transform, get_encoder)
    pixel_data = _Encapsulated(facts.frames)
    if syntax in codec.repacks:  # the repacker verifies its own output (byte for byte)
        assert codec.repack is not None
        repacked = codec.repack(job)
        for codestream in frames:
            pixel_data.add(repacked(codestream))
        out.PixelData = pixel_data.finish()
        out["PixelData"].VR = "OB"
        out["PixelData"].is_undefined_length = True
        return pixel_data.frame_bytes, 0
    assert codec.build is not None
    encode, decode = codec.build(job)
    allowed_error = codec.error_bound(target)  # None: lossy, the ratio is recorded instead
    wrapped = 1 << max(facts.bits_stored - 1, 0)  # a lossy error this large is a wrap-around
    max_error = 0
    for index, frame in enumerate(frames):
        encoded = encode(frame)
        decoded = decode(encoded)
        if decoded.shape != frame.shape:
            raise Refused(f"frame {index}: decoded shape {decoded.shape} != {frame.shape}")
        error = _max_abs_difference(decoded, frame)
        if allowed_error is not None and error > allowed_error:
            raise Refused(
                f"verification failed on frame {index}: pixel error {error}, "
                f"allowed {allowed_error}"
            )
        if allowed_error is None and error >= wrapped:
            # A lossy codestream may decode a sample beyond Bits Stored (1024 from 10-bit
            # data); every DICOM decoder keeps the stored bits only, so it comes back as 0
            # (pydicom's too: seen here as an error of about the whole range)
            raise Refused(
                f"verification failed on frame {index}: a sample decodes {error} away from "
                f"the original, half of the {facts.bits_stored}-bit range or more (a value "
                "that overshoots Bits Stored wraps around)"
            )
        max_error = max(max_error, error)
        pixel_data.add(encoded)
    out.PixelData = pixel_data.finish()
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    return pixel_data.frame_bytes, (max_error if allowed_error is not None else None)


class _Encapsulated:
    """Encapsulated Pixel Data built frame by frame in one buffer: the same bytes as pydicom's
    `encapsulate(frames, has_bot=True)` (one fragment per frame, a Basic Offset Table), without
    a list of frames beside it."""

    _ITEM = b"\xfe\xff\x00\xe0"

    def __init__(self, frames: int):
        self._count = frames
        self._offsets: list[int] = []
        self.frame_bytes = 0
        self._buf = bytearray(self._ITEM + struct.pack("<I", 4 * frames) + bytes(4 * frames))
        self._first_item = len(self._buf)

    def add(self, encoded: bytes) -> None:
        self._offsets.append(len(self._buf) - self._first_item)
        self.frame_bytes += len(encoded)
        padding = b"\0" if len(encoded) % 2 else b""
        self._buf += self._ITEM + struct.pack("<I", len(encoded) + len(padding))
        self._buf += encoded
        self._buf += padding

    def finish(self) -> bytes:
        if len(self._offsets) != self._count:
            raise Refused(f"{len(self._offsets)} frames decoded, Number of Frames {self._count}")
        if len(self._buf) > 0xFFFFFFFF:
            raise Refused("more than 4 GiB encoded: beyond what a Basic Offset Table can index")
        self._buf[8 : self._first_item] = struct.pack(f"<{self._count}I", *self._offsets)
        data = bytes(self._buf)  # pydicom takes bytes only; the buffer is released at once
        self._buf = bytearray()
        return data


def _native_pixels(frames: Iterator[np.ndarray], out: Dataset, facts: capability.PixelFacts):
    """Explicit VR Little Endian Pixel Data: one value for all frames, OW or OB as Bits
    Allocated says, verified as pydicom reads the finished dataset (see codecs/native.py)."""
    frames = [f.astype(f.dtype.newbyteorder("<"), copy=False) for f in frames]
    data = b"".join(f.tobytes() for f in frames)
    if len(data) % 2:
        data += b"\0"
    out.PixelData = data
    out["PixelData"].VR = "OW" if facts.bits_allocated > 8 else "OB"
    out["PixelData"].is_undefined_length = False
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for index, (decoded, frame) in enumerate(zip(iter_pixels(out, raw=True), frames, strict=True)):
        if _max_abs_difference(decoded, frame):
            raise Refused(f"verification failed on frame {index} of the native output")
    return len(data), 0


def _stamp_file_meta(out: Dataset, syntax: str) -> None:
    """The File Meta of an output this node wrote: its syntax and the node as implementation."""
    out.file_meta.TransferSyntaxUID = syntax
    out.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION


def _little_endian_copy(ds: Dataset, facts: capability.PixelFacts) -> Dataset:
    """Big endian made little endian without decoding: each pixel element's value swapped
    by the width its VR gives (OB bytes, bit-packed data among them, stay as they are),
    then verified frame by frame against the input as pydicom decodes both."""
    out = _header_copy(ds)
    _stamp_file_meta(out, ExplicitVRLittleEndian)
    if facts.pixel_keyword is None:
        return out
    elem = ds[facts.pixel_keyword]
    value = elem.value
    if not isinstance(value, (bytes, bytearray)) or elem.is_undefined_length:
        raise Refused(f"{facts.pixel_keyword} is not native big endian data")
    width = _RAW_VRS.get(elem.VR, 1)
    if len(value) % width:
        raise Refused(f"{facts.pixel_keyword} holds {len(value)} bytes, not whole {elem.VR} values")
    if width > 1:
        value = np.frombuffer(value, f">u{width}").astype(f"<u{width}").tobytes()
    out[facts.pixel_keyword] = DataElement(elem.tag, elem.VR, value)
    try:
        pairs = zip(iter_pixels(out, raw=True), iter_pixels(ds, raw=True), strict=True)
        for index, (converted, received) in enumerate(pairs):
            if not np.array_equal(converted, received):
                raise Refused(f"verification failed on frame {index} of the little endian copy")
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - an Image Pixel module pydicom cannot read
        raise Refused(f"the pixels cannot be decoded to verify a byte order change: {exc}") from exc
    return out


def received_codestreams(
    ds: Dataset, facts: capability.PixelFacts, pixel_source: Path | None = None
) -> Iterator[bytes]:
    """Each frame of encapsulated Pixel Data as received, read from `pixel_source` (or the
    dataset's file) one at a time when the value is deferred there."""
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    if elem.value is not None:
        yield from generate_frames(elem.value, number_of_frames=facts.frames)
        return
    source = pixel_source or getattr(ds, "filename", None)
    if not isinstance(source, (str, Path)) or not getattr(elem, "value_tell", None):
        raise Refused("the received Pixel Data cannot be read")
    with open(source, "rb") as f:
        f.seek(elem.value_tell)
        yield from generate_frames(f, number_of_frames=facts.frames)


def decoded_frames(
    ds: Dataset, facts: capability.PixelFacts, pixel_source: Path | None = None
) -> Iterator[np.ndarray]:
    """Each frame as the output will hold it: raw, except YBR from lossy JPEG, made RGB."""
    for frame in iter_pixels(pixel_source or ds, raw=True):
        yield convert_color_space(frame, "YBR_FULL", "RGB") if facts.converts_to_rgb else frame


def _max_abs_difference(a: np.ndarray, b: np.ndarray) -> int:
    if np.array_equal(a, b):
        return 0
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def _header_copy(ds: Dataset) -> Dataset:
    """Everything but the pixel data and its old encapsulation tables, little endian.

    Top-level elements are copied one by one (deepcopy of a whole header cost a third of an
    HTJ2K transcode); nested sequences are shared, as nothing here changes them, except
    big endian input, whose raw word values are swapped in a deep copy.
    """
    big_endian = ds.original_encoding[1] is False
    out = FileDataset(
        getattr(ds, "filename", None) or "", Dataset(), file_meta=copy.deepcopy(ds.file_meta)
    )
    for tag in ds.keys():  # noqa: SIM118 - iterating ds itself loads deferred values
        if tag in PIXEL_TAGS:
            continue
        elem = ds.get_item(tag, keep_deferred=True)  # raw stays raw, deferred stays on disk
        if big_endian:
            elem = copy.deepcopy(elem)
        elif not isinstance(elem, RawDataElement):  # raw ones are immutable tuples: shared
            elem = copy.copy(elem)
        out[tag] = elem
    out.set_original_encoding(*ds.original_encoding[:2], ds.original_character_set)
    if big_endian:
        _swap_raw_values(out)
    return out


def _swap_raw_values(ds: Dataset) -> None:
    for elem in ds.iterall():
        width = _RAW_VRS.get(elem.VR)
        if width and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, f">u{width}").astype(f"<u{width}").tobytes()


def _record_input_step(out: Dataset, history: capability.LossyHistory) -> None:
    """Once lossy, always lossy (PS3.3 C.7.6.1.1.5). The input's own step, when its header
    does not record it, goes first, so a later step's ratio and method stay paired with it."""
    out.LossyImageCompression = "01"
    if history.method is None:  # lossy before, in some step the data does not name
        return
    if not _as_list(out.get("LossyImageCompressionMethod")):
        out.LossyImageCompressionMethod = history.method
    if not _as_list(out.get("LossyImageCompressionRatio")) and history.ratio:
        out.LossyImageCompressionRatio = f"{history.ratio:.2f}"


def _record_lossy_step(out: Dataset, target: Target, ratio: float) -> None:
    """PS3.3 C.7.6.1.1.5: append this step's ratio and method, never overwrite earlier ones."""
    assert target.syntax is not None
    original_uid = str(out.SOPInstanceUID)
    out.LossyImageCompression = "01"
    ratios = [str(v) for v in _as_list(out.get("LossyImageCompressionRatio"))]
    methods = [str(v) for v in _as_list(out.get("LossyImageCompressionMethod"))]
    out.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"]
    out.LossyImageCompressionMethod = [*methods, LOSSY_METHOD[target.syntax]]
    image_type = [str(v) for v in _as_list(out.get("ImageType"))]
    out.ImageType = ["DERIVED", *image_type[1:]] if image_type else ["DERIVED", "SECONDARY"]
    note = f"Lossy compression by dicom-node: {target.describe()}, ratio {ratio:.1f}:1"
    previous = str(out.get("DerivationDescription", "") or "")
    out.DerivationDescription = f"{previous}; {note}"[:1024] if previous else note
    # Deterministic, so a re-run after a crash produces the same instance, not a duplicate.
    out.SOPInstanceUID = generate_uid(entropy_srcs=[original_uid, target.describe()])


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]
