"""What a codec plugin is: `Codec`, one transfer syntax family and its library, and `FrameJob`,
what the codec step asks it to build (encode one frame, decode one frame) for. Also the two
helpers the codecs that encode through pydicom's pixel framework share."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import UID

from node.config.targets import Target
from node.transcode.pixels import PixelFacts

FrameEncoder = Callable[[np.ndarray], bytes]
FrameDecoder = Callable[[bytes], np.ndarray]
# A received frame's codestream in, the output's out, verified by the codec itself
CodestreamRepacker = Callable[[bytes], bytes]
# (Photometric Interpretation, Samples per Pixel, Pixel Representations, Bits Allocated,
# Bits Stored): one row of an encoder's profile, in pydicom's ENCODING_PROFILES form.
ProfileRow = tuple[str, int, Sequence[int], Sequence[int], Sequence[int]]


class Refused(Exception):
    """This target cannot (or did not correctly) encode this image; the message says why."""


@dataclass(frozen=True)
class FrameJob:
    """What a codec builds its frame functions for: one target, one image."""

    syntax: UID  # the target's syntax, one of the codec's `encodes`
    target: Target
    facts: PixelFacts
    # pydicom's Image Pixel options of the output dataset (`as_pixel_options`), one frame
    options: Mapping[str, Any]
    colour_transform: bool  # RGB gets the JPEG 2000 colour transform (capability.needs_mct)
    # pydicom's encoder lookup (pydicom.pixels.get_encoder) as the codec step holds it: codecs
    # that encode through pydicom take their encoder from it, so whatever stands in for
    # pydicom's encoders there (a test's corrupting one) is what they call
    get_encoder: Callable[[UID], Any]


def _bounded_unless_lossy(target: Target) -> int | None:
    return None if target.is_lossy else 0


@dataclass(frozen=True, eq=False)
class Codec:
    """A transfer syntax family: what it encodes and decodes, how, and what it can take.

    Its capability row (`profiles`, `max_bits_stored`, `refuse`) is read by
    capability.refusal, after the checks every target shares (pixel data present, decodable,
    sane Image Pixel attributes, no lossy PALETTE COLOR).
    """

    name: str  # the family and its library, e.g. "JPEG-LS (CharLS via pyjpegls)"
    encodes: tuple[UID, ...]  # what a rule may target, in the order the README lists them
    decodes: tuple[UID, ...]  # received syntaxes it reads (compressed: if pydicom can here)
    # (encode one frame, decode it again) for a target; None: uncompressed (native) Pixel
    # Data, which the codec step writes and verifies itself as one value for all frames
    build: Callable[[FrameJob], tuple[FrameEncoder, FrameDecoder]] | None = None
    # What the encoder takes, per syntax it encodes; None, or a syntax it does not name: every
    # image the node can decode (that `refuse` lets through).
    profiles: Mapping[UID, Sequence[ProfileRow]] | None = None
    max_bits_stored: int | None = None  # an encoder limit below what its profile allows
    # Why this codec cannot take this image for this target (checked before the profile),
    # beyond its profile; None when it can
    refuse: Callable[[PixelFacts, Target], str | None] | None = None
    # The largest pixel error verification allows for a target; None: lossy without an error
    # bound (the ratio is recorded instead)
    error_bound: Callable[[Target], int | None] = _bounded_unless_lossy
    colour_transform: bool = False  # `mct` applies (RGB may become YBR_RCT / YBR_ICT)
    # The Photometric Interpretation of an output for a target (e.g. lossy JPEG colour is
    # YBR_FULL_422); None: the decoded frames' own (or YBR_RCT / YBR_ICT with `mct`)
    output_photometric: Callable[[PixelFacts, Target], str] | None = None
    # Syntaxes made from the received codestream rather than from decoded pixels (JPEG XL
    # JPEG Recompression), and what builds the repacker of one frame's codestream for them
    repacks: tuple[UID, ...] = ()
    repack: Callable[[FrameJob], CodestreamRepacker] | None = None
    # Why a received codestream of one of `decodes` is lossy already, from its first bytes
    # (up to 64 KiB of the first fragment, b"" when unreadable); None: no evidence
    lossy_evidence: Callable[[UID, bytes], str | None] | None = None
    # Columns of docs/codec-matrix.md: (label, the target as node.yaml would write it)
    matrix_columns: tuple[tuple[str, Mapping[str, Any]], ...] = ()


def pydicom_profiles(*syntaxes: UID) -> dict[UID, Sequence[ProfileRow]]:
    """The encoding profiles pydicom defines for these syntaxes (PS3.5 section 8.2)."""
    return {uid: ENCODING_PROFILES.get(uid, []) for uid in syntaxes}


def pydicom_decoder(job: FrameJob, plugin: str = "") -> FrameDecoder:
    """Decode one encoded frame again with pydicom, raw (no colour conversion); `plugin`
    names pydicom's decoding plugin ("" lets pydicom choose)."""
    decoder = get_decoder(job.syntax)
    options = dict(job.options)

    def decode(encoded: bytes) -> np.ndarray:
        # HTJ2K codestreams declare their container's precision (8 or 16 bits), above Bits
        # Stored: pydicom warns about it and decodes with Bits Stored as usual
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return decoder.as_array(
                encapsulate([encoded]), raw=True, decoding_plugin=plugin, **options
            )[0]

    return decode


def pydicom_encoder(job: FrameJob, plugin: str, **parameters: Any) -> FrameEncoder:
    """Encode one frame with pydicom's encoder for the job's syntax through `plugin`, with the
    codec's own encoding `parameters` beside the Image Pixel options."""
    encoder = job.get_encoder(job.syntax)
    options = {**job.options, **parameters}

    def encode(frame: np.ndarray) -> bytes:
        try:
            return encoder.encode(frame, encoding_plugin=plugin, **options)
        except ValueError as exc:  # pydicom's validation: pixel range, profile, shape
            raise Refused(str(exc).replace("\n", " ")) from None

    return encode
