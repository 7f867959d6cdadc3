"""The Image Pixel module of a received instance as the codecs see it: `PixelFacts`, read once by
`pixel_facts` and handed to the capability table, the codec step and each codec."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.vocabulary.syntaxes import ALWAYS_LOSSY


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
