"""The JPEG family (libjpeg-turbo) and JPEG XL (libjxl) targets through the codec step: lossless is
bit-exact as pydicom reads the written file, lossy carries the PS3.3 bookkeeping and stays close
to the input, JPEG XL JPEG Recompression gives the received codestream back byte for byte, and
JPEG XL input decodes to the pixels that were encoded."""

from __future__ import annotations

from io import BytesIO

import imagecodecs
import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array

from node.config.targets import TranscodeSpec, parse_target
from node.transcode.step import transcode
from node.vocabulary.syntaxes import JPEGXL, JPEGXLJPEGRecompression, JPEGXLLossless
from tests.conftest import data_file

# Unsigned, signed, 8-bit, RGB, palette, multi-frame 12-bit
LOSSLESS_INPUTS = ["MR2_UNCR.dcm", "CT_small.dcm", "OBXXXX1A.dcm", "US1_UNCR.dcm", "emri_small.dcm"]
UNSIGNED_INPUTS = ["MR2_UNCR.dcm", "OBXXXX1A.dcm", "US1_UNCR.dcm", "emri_small.dcm"]


def run(name: str, settings: dict | str, allow: frozenset[str] = frozenset()):
    source = dcmread(data_file(name))
    result = transcode(source, TranscodeSpec(parse_target(settings), allow_lossy=allow))
    if result.dataset is None:
        return source, result, None
    buffer = BytesIO()
    result.dataset.save_as(buffer, enforce_file_format=True)
    return source, result, dcmread(BytesIO(buffer.getvalue()))


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


@pytest.mark.parametrize("name", LOSSLESS_INPUTS)
@pytest.mark.parametrize(
    "settings, syntax",
    [
        ("JPEGLosslessSV1", uid.JPEGLosslessSV1),
        ({"syntax": "JPEGLossless", "predictor": 7}, uid.JPEGLossless),
    ],
)
def test_lossless_jpeg_is_bit_exact_as_pydicom_reads_the_file(name, settings, syntax):
    source, result, written = run(name, settings)
    assert result.outcome == "recompressed", result.notes
    assert written.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(pixel_array(written, raw=True), pixel_array(source, raw=True))
    assert written.SOPInstanceUID == source.SOPInstanceUID
    assert written.get("LossyImageCompression") == source.get("LossyImageCompression")


@pytest.mark.parametrize("name", UNSIGNED_INPUTS)
def test_jpeg_xl_lossless_is_bit_exact_and_decodes_again_as_input(name):
    source, result, written = run(name, {"syntax": "JPEGXLLossless", "jxl_effort": 3})
    assert result.outcome == "recompressed", result.notes
    assert written.file_meta.TransferSyntaxUID == JPEGXLLossless
    assert np.array_equal(pixel_array(written, raw=True), pixel_array(source, raw=True))
    assert written.SOPInstanceUID == source.SOPInstanceUID
    # JPEG XL input is decoded like any other: routed on to JPEG-LS, still the same pixels
    again = transcode(written, TranscodeSpec(parse_target("JPEGLSLossless")))
    assert again.outcome == "recompressed", again.notes
    assert np.array_equal(pixel_array(again.dataset, raw=True), pixel_array(source, raw=True))


def test_baseline_colour_is_ybr_full_422_with_the_lossy_bookkeeping():
    source, result, written = run("US1_UNCR.dcm", {"syntax": "JPEGBaseline8Bit",
                                                   "jpeg_quality": 90})  # fmt: skip
    assert result.outcome == "recompressed", result.notes
    assert written.file_meta.TransferSyntaxUID == uid.JPEGBaseline8Bit
    assert written.PhotometricInterpretation == "YBR_FULL_422"
    assert written.LossyImageCompression == "01"
    assert written.LossyImageCompressionMethod == "ISO_10918_1"
    assert written.ImageType[0] == "DERIVED"
    assert written.SOPInstanceUID != source.SOPInstanceUID
    shown = pixel_array(written)  # as a viewer shows it: RGB
    assert psnr(shown, pixel_array(source), 255) > 35


def test_extended_12_bit_keeps_12_bit_greyscale_close():
    source, result, written = run("emri_small.dcm", {"syntax": "JPEGExtended12Bit",
                                                     "jpeg_quality": 90})  # fmt: skip
    assert result.outcome == "recompressed", result.notes
    assert written.file_meta.TransferSyntaxUID == uid.JPEGExtended12Bit
    assert written.LossyImageCompressionMethod == "ISO_10918_1"
    peak = float(pixel_array(source).max())
    assert psnr(pixel_array(written), pixel_array(source), peak) > 40


def test_lossy_jpeg_xl_records_iso_18181_and_a_new_uid():
    source, result, written = run("MR2_UNCR.dcm", {"syntax": "JPEGXL", "jxl_distance": 1.0})
    assert result.outcome == "recompressed", result.notes
    assert written.file_meta.TransferSyntaxUID == JPEGXL
    assert written.LossyImageCompressionMethod == "ISO_18181_1"
    assert written.SOPInstanceUID != source.SOPInstanceUID
    assert result.ratio and result.ratio > 4
    peak = float(pixel_array(source).max())
    assert psnr(pixel_array(written), pixel_array(source), peak) > 40


@pytest.mark.parametrize(
    "settings, why",
    [
        ({"syntax": "JPEGBaseline8Bit", "jpeg_quality": 90}, "lossy JPEG codes unsigned samples"),
        ({"syntax": "JPEGExtended12Bit", "jpeg_quality": 90}, "lossy JPEG codes unsigned samples"),
        ("JPEGXLLossless", "JPEG XL codes unsigned samples only"),
        ({"syntax": "JPEGXL", "jxl_distance": 1.0}, "JPEG XL codes unsigned samples only"),
        ("JPEGXLJPEGRecompression", "repacks JPEG baseline (1.2.840.10008.1.2.4.50) input only"),
    ],
)
def test_what_a_target_cannot_take_passes_through_with_the_reason(settings, why):
    _, result, written = run("CT_small.dcm", settings)  # signed 16-bit, native
    assert (result.outcome, written) == ("passed-through", None)
    assert why in result.notes[0]


def test_12_bit_is_beyond_baseline_and_colour_beyond_extended():
    _, result, _ = run("emri_small.dcm", {"syntax": "JPEGBaseline8Bit", "jpeg_quality": 90})
    assert "JPEGBaseline8Bit cannot encode MONOCHROME2" in result.notes[0]
    _, result, _ = run("US1_UNCR.dcm", {"syntax": "JPEGExtended12Bit", "jpeg_quality": 90})
    assert "JPEGExtended12Bit cannot encode RGB, 3 sample(s)" in result.notes[0]


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "color3d_jpeg_baseline.dcm"])
def test_jpeg_recompression_gives_the_received_codestream_back_byte_for_byte(name):
    source, result, written = run(name, "JPEGXLJPEGRecompression")
    assert result.outcome == "recompressed", result.notes
    assert written.file_meta.TransferSyntaxUID == JPEGXLJPEGRecompression
    frames = int(source.get("NumberOfFrames", 1))
    received = list(generate_frames(source.PixelData, number_of_frames=frames))
    repacked = list(generate_frames(written.PixelData, number_of_frames=frames))
    assert len(repacked) == len(received) == frames
    for jpeg, jxl in zip(received, repacked, strict=True):
        assert bytes(imagecodecs.jpegxl_decode_jpeg(jxl)) == jpeg[: jpeg.rfind(b"\xff\xd9") + 2]
    # the same image: its photometric, its UID, lossy as its JPEG was (PS3.3 C.7.6.1.1.5)
    assert written.PhotometricInterpretation == source.PhotometricInterpretation
    assert written.SOPInstanceUID == source.SOPInstanceUID
    assert (written.LossyImageCompression, written.LossyImageCompressionMethod) == (
        "01", "ISO_10918_1",
    )  # fmt: skip
    assert np.array_equal(pixel_array(written, raw=True), pixel_array(source, raw=True))
    # and it is lossy input for the safety default: no lossy target without allow_lossy
    lossy = transcode(written, TranscodeSpec(parse_target({"syntax": "JPEGXL",
                                                           "jxl_distance": 2.0})))  # fmt: skip
    assert lossy.outcome == "passed-through" and "already-lossy" in lossy.notes[0]


def test_a_repack_that_does_not_give_the_jpeg_back_is_refused(monkeypatch):
    real = imagecodecs.jpegxl_decode_jpeg
    monkeypatch.setattr(imagecodecs, "jpegxl_decode_jpeg", lambda data: real(data)[:-3] + b"\0")
    _, result, written = run("SC_rgb_jpeg_dcmtk.dcm", "JPEGXLJPEGRecompression")
    assert (result.outcome, written) == ("passed-through", None)
    assert "did not give the received JPEG back byte for byte" in result.notes[0]


def test_a_lossless_jpeg_encoder_that_corrupts_is_caught_by_verification(monkeypatch):
    real = imagecodecs.jpeg8_encode

    def corrupting(data, *args, **kwargs):
        data = np.array(data)
        data.flat[1234] ^= 1
        return real(data, *args, **kwargs)

    monkeypatch.setattr(imagecodecs, "jpeg8_encode", corrupting)
    _, result, written = run("MR2_UNCR.dcm", "JPEGLosslessSV1")
    assert (result.outcome, written) == ("passed-through", None)
    assert "verification failed on frame 0: pixel error 1" in result.notes[0]


def test_a_lossy_sample_that_overshoots_bits_stored_is_refused_not_wrapped():
    """10-bit data into 12-bit JPEG: libjpeg-turbo decodes a 1023 as 1024, which every DICOM
    decoder (pydicom's too) reads as 0 in 10 stored bits."""
    _, result, written = run("RG3_UNCR.dcm", {"syntax": "JPEGExtended12Bit", "jpeg_quality": 90})
    assert (result.outcome, written) == ("passed-through", None)
    assert "overshoots Bits Stored wraps around" in result.notes[0]
