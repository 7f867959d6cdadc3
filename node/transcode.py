"""The codec step, a pure function: received dataset + TranscodeSpec -> TranscodeResult.

Frames are decoded raw (no colour conversion), encoded one at a time, and every encoded frame
is decoded again and compared before it is kept: lossless must be bit-exact, near-lossless
within jls_error. Any refusal or mismatch moves on to the next fallback; when none is left the
instance goes on exactly as received.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.pixels import (
    as_pixel_options,
    convert_color_space,
    get_decoder,
    get_encoder,
    iter_pixels,
)
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEGLSNearLossless,
    generate_uid,
)

from node import capability
from node.syntaxes import ALWAYS_LOSSY, LOSSY_METHOD, Target, TranscodeSpec, syntax_name

# Name the plugin: pydicom's pure-Python RLE encoder is ~8x slower (FIELD-NOTES 2).
_PLUGIN = {"1.2.840.10008.1.2.5": "pylibjpeg", "1.2.840.10008.1.2.4.80": "pyjpegls",
           "1.2.840.10008.1.2.4.81": "pyjpegls", "1.2.840.10008.1.2.4.90": "pylibjpeg",
           "1.2.840.10008.1.2.4.91": "pylibjpeg"}  # fmt: skip
_RAW_VRS = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
IMPLEMENTATION_VERSION = "DICOM_NODE_01"


@dataclass(frozen=True)
class TranscodeResult:
    """What the codec step decided. `dataset` None means: forward exactly as received."""

    dataset: Dataset | None
    outcome: str  # "recompressed", "kept" (as the rule asked) or "passed-through" (could not)
    target: Target | None
    notes: tuple[str, ...] = ()
    ratio: float | None = None  # uncompressed / encoded pixel bytes, measured
    max_error: int | None = None  # largest absolute pixel difference found when verifying


class Refused(Exception):
    """This target cannot (or did not correctly) encode this image; the message says why."""


def transcode(ds: Dataset, spec: TranscodeSpec) -> TranscodeResult:
    """Encode `ds` to the first candidate of `spec` that can take it, verified."""
    notes: list[str] = []
    try:
        facts = capability.pixel_facts(ds)
    except (ValueError, AttributeError, KeyError) as exc:
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
            guarded = [k for k in capability.guarded_kinds(ds, facts) if k not in spec.allow_lossy]
            if guarded:
                notes.append(
                    f"{target.describe()}: safety: no lossy compression of {', '.join(guarded)} "
                    f"images unless the rule says allow_lossy: [{', '.join(guarded)}]"
                )
                continue
        try:
            out, ratio, max_error = _encode(ds, facts, target)
        except Refused as exc:
            notes.append(f"{target.describe()}: {exc}")
            continue
        except Exception as exc:  # a codec failing on hostile or damaged data is a refusal too
            notes.append(f"{target.describe()}: {type(exc).__name__}: {exc}")
            continue
        if capability.needs_mct(facts, target) and target.mct is None:
            notes.append("ultrasound: JPEG 2000 colour transform applied, the US IOD allows "
                         "only YBR_RCT/YBR_ICT with JPEG 2000 (PS3.3 C.8.5.6.1.2)")  # fmt: skip
        return TranscodeResult(out, "recompressed", target, tuple(notes), ratio, max_error)
    return TranscodeResult(None, "passed-through", None, tuple(notes))


def _encode(ds: Dataset, facts: capability.PixelFacts, target: Target):
    reason = capability.refusal(facts, target)
    if reason:
        raise Refused(reason)
    assert target.syntax is not None
    out = _header_copy(ds)
    out.PhotometricInterpretation = capability.output_photometric(facts, target)
    if facts.samples > 1:
        out.PlanarConfiguration = 0  # decoded frames are always colour-by-pixel
    params = {}
    if target.jls_error is not None:
        params["jls_error"] = target.jls_error
    if target.j2k_cr is not None:
        params["j2k_cr"] = list(target.j2k_cr)
    if target.j2k_psnr is not None:
        params["j2k_psnr"] = list(target.j2k_psnr)

    if target.syntax == ExplicitVRLittleEndian:
        encoded_bytes, max_error = _native_pixels(ds, out, facts)
    else:
        encoded_bytes, max_error = _encapsulated_pixels(ds, out, facts, target, params)

    uncompressed = facts.frame_bytes * facts.frames
    ratio = uncompressed / encoded_bytes if encoded_bytes else None
    out.file_meta.TransferSyntaxUID = target.syntax
    out.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if facts.syntax in ALWAYS_LOSSY:
        out.LossyImageCompression = "01"  # once lossy, always lossy (PS3.3 C.7.6.1.1.5)
    if target.is_lossy:
        _record_lossy_step(out, target, ratio or 0.0)
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out, ratio, max_error


def _encapsulated_pixels(
    ds: Dataset, out: Dataset, facts: capability.PixelFacts, target: Target, params: dict
):
    uid = UID(target.syntax)
    encoder, decoder = get_encoder(uid), get_decoder(uid)
    opts = as_pixel_options(out, **params)
    opts["number_of_frames"] = 1
    decode_opts = {k: v for k, v in opts.items() if k not in ("jls_error", "j2k_cr", "j2k_psnr")}
    allowed_error = target.jls_error if uid == JPEGLSNearLossless else 0
    frames: list[bytes] = []
    max_error = 0
    for index, frame in enumerate(decoded_frames(ds, facts)):
        try:
            encoded = encoder.encode(frame, encoding_plugin=_PLUGIN[uid], **opts)
        except ValueError as exc:  # pydicom's validation: pixel range, profile, shape
            raise Refused(str(exc).replace("\n", " ")) from None
        decoded, _ = decoder.as_array(encapsulate([encoded]), raw=True, **decode_opts)
        if decoded.shape != frame.shape:
            raise Refused(f"frame {index}: decoded shape {decoded.shape} != {frame.shape}")
        if uid != JPEG2000:  # lossy J2K has no error bound; its ratio is recorded instead
            error = _max_abs_difference(decoded, frame)
            if error > (allowed_error or 0):
                raise Refused(
                    f"verification failed on frame {index}: pixel error {error}, "
                    f"allowed {allowed_error or 0}"
                )
            max_error = max(max_error, error)
        frames.append(bytes(encoded))
    out.PixelData = encapsulate(
        frames, has_bot=True
    )  # as pydicom compress(): a BOT entry per frame
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    return sum(len(f) for f in frames), (max_error if uid != JPEG2000 else None)


def _native_pixels(ds: Dataset, out: Dataset, facts: capability.PixelFacts):
    frames = [f.astype(f.dtype.newbyteorder("<"), copy=False) for f in decoded_frames(ds, facts)]
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


def decoded_frames(ds: Dataset, facts: capability.PixelFacts) -> Iterator[np.ndarray]:
    """Each frame as the output will hold it: raw, except YBR from lossy JPEG, made RGB."""
    for frame in iter_pixels(ds, raw=True):
        yield convert_color_space(frame, "YBR_FULL", "RGB") if facts.converts_to_rgb else frame


def _max_abs_difference(a: np.ndarray, b: np.ndarray) -> int:
    if np.array_equal(a, b):
        return 0
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def _header_copy(ds: Dataset) -> Dataset:
    """Everything but the pixel data and its old encapsulation tables, little endian."""
    held = {tag: ds[tag] for tag in (0x7FE00001, 0x7FE00002, 0x7FE00010) if tag in ds}
    for tag in held:
        del ds[tag]
    try:
        out = copy.deepcopy(ds)
    finally:
        for tag, elem in held.items():
            ds[tag] = elem
    if ds.original_encoding[1] is False:  # big endian: raw word values must be swapped
        _swap_raw_values(out)
    return out


def _swap_raw_values(ds: Dataset) -> None:
    for elem in ds.iterall():
        width = _RAW_VRS.get(elem.VR)
        if width and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, f">u{width}").astype(f"<u{width}").tobytes()


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
