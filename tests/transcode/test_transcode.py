"""The codec step as a pure function: real images in, verified datasets (or refusals) out."""

from __future__ import annotations

import copy
import struct

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.pixels import iter_pixels, pixel_array

from node.config.targets import Target, TranscodeSpec
from node.transcode import capability
from node.transcode import step as transcode_module
from node.transcode.output_file import write_output
from node.transcode.step import transcode
from tests.conftest import data_file, one_rule_config


def spec(syntax, *fallback: Target, **params) -> TranscodeSpec:
    return TranscodeSpec(Target(syntax, **params), tuple(fallback))


def raw(ds: Dataset) -> np.ndarray:
    return pixel_array(ds, raw=True)


# The encapsulated Pixel Data sizes pydicom's encoding guides print for these images.
REFERENCE_SIZES = [
    ("CT_small.dcm", spec(uid.JPEGLSLossless), 14180),
    ("CT_small.dcm", spec(uid.JPEGLSNearLossless, jls_error=3), 8508),
    ("CT_small.dcm", spec(uid.JPEG2000Lossless), 13656),
    ("CT_small.dcm", spec(uid.JPEG2000, j2k_cr=(20.0,)), 1582),
    ("US1_UNCR.dcm", spec(uid.JPEGLSLossless), 261792),
    ("US1_UNCR.dcm", spec(uid.JPEGLSNearLossless, jls_error=2), 149188),
    ("US1_UNCR.dcm", spec(uid.JPEG2000Lossless, mct=False), 334412),
    ("US1_UNCR.dcm", spec(uid.JPEG2000Lossless, mct=True), 152342),
    ("US1_UNCR.dcm", spec(uid.JPEG2000, j2k_cr=(20.0,), mct=False), 46100),
    ("US1_UNCR.dcm", spec(uid.JPEG2000, j2k_cr=(20.0,), mct=True), 46076),
]


@pytest.mark.parametrize(
    ("name", "rule", "size"),
    REFERENCE_SIZES,
    ids=[f"{n}-{s.target.describe()}" for n, s, _ in REFERENCE_SIZES],
)
def test_reference_sizes_of_the_encoding_guides_are_reproduced(name, rule, size):
    result = transcode(dcmread(data_file(name)), rule)
    assert result.outcome == "recompressed", result.notes
    assert len(result.dataset.PixelData) == size


@pytest.mark.parametrize("syntax", [uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.RLELossless,
                                    uid.ExplicitVRLittleEndian, uid.HTJ2KLossless,
                                    uid.HTJ2KLosslessRPCL, uid.HTJ2K])  # fmt: skip
@pytest.mark.parametrize("name", ["CT_small.dcm", "US1_UNCR.dcm", "MR_small_bigendian.dcm",
                                  "SC_rgb_16bit_2frame.dcm", "emri_small_RLE.dcm",
                                  "OBXXXX1A_2frame.dcm", "image_dfl.dcm", "MR_small_implicit.dcm",
                                  "RG3_UNCR.dcm"])  # fmt: skip
def test_lossless_output_is_bit_exact_and_keeps_the_sop_instance_uid(name, syntax):
    source = dcmread(data_file(name))
    result = transcode(source, spec(syntax))
    if source.file_meta.TransferSyntaxUID == syntax:
        assert (result.outcome, result.dataset) == ("kept", None)
        return
    assert result.outcome == "recompressed", result.notes
    out = result.dataset
    assert out.file_meta.TransferSyntaxUID == syntax
    assert out.SOPInstanceUID == source.SOPInstanceUID
    assert "LossyImageCompression" not in out or out.LossyImageCompression == source.get(
        "LossyImageCompression"
    )
    np.testing.assert_array_equal(raw(out), raw(source))
    assert result.max_error == 0


def test_rgb_with_mct_is_labelled_ybr_rct_and_decodes_to_the_original_rgb():
    source = dcmread(data_file("US1_UNCR.dcm"))
    out = transcode(source, spec(uid.JPEG2000Lossless, mct=True)).dataset
    assert out.PhotometricInterpretation == "YBR_RCT"
    np.testing.assert_array_equal(raw(out), raw(source))


def test_lossy_output_gets_new_uid_and_lossy_bookkeeping():
    source = dcmread(data_file("CT_small.dcm"))
    result = transcode(source, spec(uid.JPEG2000, j2k_cr=(20.0, 5.0)))
    out = result.dataset
    assert out.SOPInstanceUID != source.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == "ISO_15444_1"
    assert float(out.LossyImageCompressionRatio) == pytest.approx(result.ratio, rel=0.01)
    assert 4 < result.ratio < 25
    assert out.ImageType[0] == "DERIVED"
    assert list(out.ImageType[1:]) == list(source.ImageType[1:])
    assert "dicom-node" in out.DerivationDescription


@pytest.mark.parametrize("syntax", [uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K])
@pytest.mark.parametrize("name", ["CT_small.dcm", "US1_UNCR.dcm", "SC_rgb_16bit_2frame.dcm",
                                  "MR_small_bigendian.dcm", "OBXXXX1A_2frame.dcm"])  # fmt: skip
def test_htj2k_frames_decode_identically_with_openjph_too(name, syntax):
    """pydicom verified the output with OpenJPEG; OpenJPH (imagecodecs) is a second,
    independent decoder of the same codestreams."""
    import imagecodecs

    source = dcmread(data_file(name))
    out = transcode(source, spec(syntax)).dataset
    expected = list(iter_pixels(source, raw=True))
    frames = list(generate_frames(out.PixelData, number_of_frames=len(expected)))
    assert len(frames) == len(expected)
    for frame, original in zip(frames, expected, strict=True):
        np.testing.assert_array_equal(imagecodecs.htj2k_decode(frame, planar=False), original)


def test_htj2k_rpcl_codestreams_have_rpcl_order_and_tlm_markers():
    out = transcode(dcmread(data_file("CT_small.dcm")), spec(uid.HTJ2KLosslessRPCL)).dataset
    codestream = next(generate_frames(out.PixelData, number_of_frames=1))
    main_header = codestream[: codestream.find(b"\xff\x90")]
    assert main_header[main_header.find(b"\xff\x52") + 5] == 2  # COD progression: RPCL
    assert b"\xff\x55" in main_header  # TLM
    assert codestream.count(b"\xff\x90") > 1  # one tile-part per resolution


def test_rgb_into_htj2k_with_mct_is_ybr_rct_and_lossy_htj2k_records_its_step():
    source = dcmread(data_file("US1_UNCR.dcm"))
    lossless = transcode(source, spec(uid.HTJ2KLossless)).dataset  # ultrasound: MCT by default
    assert lossless.PhotometricInterpretation == "YBR_RCT"
    np.testing.assert_array_equal(raw(lossless), raw(source))
    assert transcode(source, spec(uid.HTJ2K, mct=False)).dataset.PhotometricInterpretation == (
        "RGB"
    )
    result = transcode(source, spec(uid.HTJ2K, htj2k_qstep=0.01))
    out = result.dataset
    assert out.PhotometricInterpretation == "YBR_ICT"
    assert out.file_meta.TransferSyntaxUID == uid.HTJ2K
    assert out.SOPInstanceUID != source.SOPInstanceUID
    assert (out.LossyImageCompression, out.LossyImageCompressionMethod) == ("01", "ISO_15444_15")
    assert result.ratio > 5 and result.max_error is None


def test_lossy_uid_is_deterministic_so_a_rerun_after_a_crash_makes_no_duplicate():
    source = dcmread(data_file("CT_small.dcm"))
    rule = spec(uid.JPEGLSNearLossless, jls_error=2)
    assert (
        transcode(source, rule).dataset.SOPInstanceUID
        == transcode(dcmread(data_file("CT_small.dcm")), rule).dataset.SOPInstanceUID
    )


def test_a_second_lossy_step_appends_ratio_and_method():
    source = dcmread(data_file("CT_small.dcm"))
    first = transcode(source, spec(uid.JPEG2000, j2k_cr=(10.0,))).dataset
    first.file_meta.TransferSyntaxUID = uid.JPEG2000  # as received by the next node
    rule = TranscodeSpec(
        Target(uid.JPEGLSNearLossless, jls_error=2), allow_lossy=frozenset({"already-lossy"})
    )
    second = transcode(first, rule).dataset
    assert second.LossyImageCompression == "01"
    assert list(second.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_14495_1"]
    assert len(second.LossyImageCompressionRatio) == 2


def test_near_lossless_stays_within_jls_error_and_never_flips_sign():
    source = dcmread(data_file("CT_small.dcm"))
    result = transcode(source, spec(uid.JPEGLSNearLossless, jls_error=3))
    diff = raw(result.dataset).astype(int) - raw(source).astype(int)
    assert 0 < np.abs(diff).max() <= 3
    assert result.max_error == np.abs(diff).max()
    assert np.all(np.sign(raw(result.dataset)) * np.sign(raw(source)) >= 0)


def test_signed_values_outside_the_near_lossless_range_take_the_fallback():
    source = dcmread(data_file("CT_small.dcm"))
    arr = raw(source).copy()
    arr[0, 0] = -32768  # at the signed minimum: near-lossless could wrap it to positive
    source.BitsStored = 16
    source.PixelData = arr.tobytes()
    result = transcode(
        source, spec(uid.JPEGLSNearLossless, Target(uid.JPEGLSLossless), jls_error=3)
    )
    assert result.outcome == "recompressed"
    assert result.target == Target(uid.JPEGLSLossless)
    assert "range" in result.notes[0]
    np.testing.assert_array_equal(raw(result.dataset), arr)


@pytest.mark.parametrize(("name", "expected"), [
    ("liver.dcm", "Bits Allocated 1"),
    ("SC_rgb_32bit.dcm", "cannot encode"),
    ("OBXXXX1A.dcm", "PALETTE COLOR"),
])  # fmt: skip
def test_what_no_target_can_encode_passes_through_with_reasons(name, expected):
    source = dcmread(data_file(name))
    rule = spec(uid.JPEGLSNearLossless, Target(uid.JPEG2000, j2k_cr=(10.0,)), jls_error=2)
    if name == "SC_rgb_32bit.dcm":
        rule = spec(uid.JPEGLSLossless, Target(uid.RLELossless))
    result = transcode(source, rule)
    assert result.outcome == "passed-through"
    assert result.dataset is None
    assert len(result.notes) == 2
    assert expected in result.notes[0]


def test_palette_colour_goes_to_a_lossless_fallback_not_a_lossy_target():
    source = dcmread(data_file("OBXXXX1A.dcm"))
    result = transcode(source, spec(uid.JPEG2000, Target(uid.JPEGLSLossless), j2k_cr=(10.0,)))
    assert result.target == Target(uid.JPEGLSLossless)
    assert result.dataset.PhotometricInterpretation == "PALETTE COLOR"
    np.testing.assert_array_equal(raw(result.dataset), raw(source))


def test_float_pixel_data_is_refused():
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPInstanceUID = uid.generate_uid()
    ds.update({"Rows": 2, "Columns": 2, "SamplesPerPixel": 1, "BitsAllocated": 32,
               "PhotometricInterpretation": "MONOCHROME2"})  # fmt: skip
    ds.FloatPixelData = np.zeros(4, "<f4").tobytes()
    result = transcode(ds, spec(uid.JPEGLSLossless))
    assert result.outcome == "passed-through"
    assert "FloatPixelData" in result.notes[0]


def test_big_endian_palette_lookup_tables_are_converted_correctly():
    big = dcmread(data_file("OBXXXX1A_expb.dcm"))
    little = dcmread(data_file("OBXXXX1A.dcm"))
    out = transcode(big, spec(uid.JPEGLSLossless)).dataset
    assert out.RedPaletteColorLookupTableData == little.RedPaletteColorLookupTableData
    np.testing.assert_array_equal(raw(out), raw(little))


def test_big_endian_bit_packed_input_leaves_little_endian_bit_exact(tmp_path):
    """A segmentation sent big endian (Bits Allocated 1, OB) needs no codec to become little
    endian: the bits are kept as they are, and the file is the little endian one."""
    received = data_file("liver_expb.dcm")
    big, little = dcmread(received), dcmread(data_file("liver.dcm"))
    result = transcode(big, spec(uid.ExplicitVRLittleEndian))
    assert result.outcome == "recompressed", result.notes
    write_output(tmp_path / "out.dcm", result.dataset, big, received)
    out = dcmread(tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
    assert out.PixelData == little.PixelData
    assert (out.SOPInstanceUID, out.NumberOfFrames) == (big.SOPInstanceUID, big.NumberOfFrames)
    np.testing.assert_array_equal(out.pixel_array, big.pixel_array)


def test_big_endian_input_no_target_can_take_still_leaves_little_endian():
    result = transcode(dcmread(data_file("liver_expb.dcm")), spec(uid.JPEGLSLossless))
    assert result.target == Target(uid.ExplicitVRLittleEndian)
    assert result.dataset.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
    assert "Bits Allocated 1" in result.notes[0]
    assert "byte order changed to Explicit VR Little Endian" in result.notes[-1]


def test_big_endian_float_pixels_have_each_value_swapped(tmp_path):
    values = np.array([[1.5, -2.25], [3.0e-7, 65504.0]], ">f4")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRBigEndian
    ds.file_meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    ds.SOPClassUID = uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.update({"Rows": 2, "Columns": 2, "SamplesPerPixel": 1, "BitsAllocated": 32,
               "PhotometricInterpretation": "MONOCHROME2"})  # fmt: skip
    ds.FloatPixelData = values.tobytes()
    dcmwrite(tmp_path / "big.dcm", ds, enforce_file_format=True)
    big = dcmread(tmp_path / "big.dcm")
    assert big.original_encoding == (False, False)
    result = transcode(big, spec(uid.JPEGLSLossless))
    out = result.dataset
    assert out.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian, result.notes
    assert np.frombuffer(out.FloatPixelData, "<f4").tolist() == values.ravel().tolist()


def test_jpeg_baseline_ybr_input_stays_lossy_and_becomes_rgb():
    """YBR from a lossy JPEG is made RGB (most IODs, ultrasound among them, forbid YBR_FULL)."""
    source = dcmread(data_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert source.PhotometricInterpretation.startswith("YBR_FULL")
    result = transcode(source, spec(uid.JPEGLSLossless))
    out = result.dataset
    assert out.LossyImageCompression == "01"
    assert out.PhotometricInterpretation == "RGB"
    assert out.SOPInstanceUID == source.SOPInstanceUID  # this step itself was lossless
    np.testing.assert_array_equal(raw(out), pixel_array(source))  # pydicom's RGB conversion


def test_uncompressed_ybr_full_422_is_upsampled_to_ybr_full_exactly():
    source = dcmread(data_file("SC_ybr_full_422_uncompressed.dcm"))
    out = transcode(source, spec(uid.JPEGLSLossless)).dataset
    assert out.PhotometricInterpretation == "YBR_FULL"
    np.testing.assert_array_equal(raw(out), raw(source))


def test_target_equal_to_received_syntax_is_forwarded_untouched():
    source = dcmread(data_file("emri_small_jpeg_ls_lossless.dcm"))
    result = transcode(source, spec(uid.JPEGLSLossless))
    assert (result.outcome, result.dataset) == ("kept", None)


def test_a_verification_mismatch_never_leaves_the_codec_step(monkeypatch):
    """An encoder that silently corrupts one pixel must be caught by the decode-and-compare."""
    real = transcode_module.get_encoder

    class Corrupting:
        def __init__(self, inner):
            self.inner = inner

        def encode(self, frame, **kwargs):
            bad = frame.copy()
            bad.flat[0] ^= 1
            return self.inner.encode(bad, **kwargs)

    monkeypatch.setattr(transcode_module, "get_encoder", lambda ts: Corrupting(real(ts)))
    source = dcmread(data_file("CT_small.dcm"))
    result = transcode(source, spec(uid.JPEGLSLossless, Target(uid.JPEG2000Lossless)))
    assert result.outcome == "passed-through"
    assert all("verification failed" in note for note in result.notes)


def test_undecodable_compressed_input_passes_through():
    source = dcmread(data_file("emri_small_jpeg_2k_lossless_too_short.dcm"), force=True)
    result = transcode(source, spec(uid.JPEGLSLossless))
    assert result.outcome == "passed-through"
    assert result.dataset is None


def test_an_image_the_codecs_fail_on_passes_through_with_the_codec_error():
    """CharLS and OpenJPEG both fail on a 3x3 image: the node forwards it as received."""
    source = dcmread(data_file("SC_rgb_small_odd.dcm"))
    result = transcode(source, spec(uid.JPEGLSLossless, Target(uid.JPEG2000Lossless),
                                    Target(uid.RLELossless)))  # fmt: skip
    assert [n.split(":")[0] for n in result.notes] == ["JPEGLSLossless", "JPEG2000Lossless"]
    assert result.target == Target(uid.RLELossless)
    np.testing.assert_array_equal(raw(result.dataset), raw(source))


@pytest.mark.parametrize(
    ("kind", "prepare"),
    [
        ("already-lossy", lambda ds: setattr(ds, "LossyImageCompression", "01")),
        ("mammography", lambda ds: setattr(ds, "Modality", "MG")),
        ("for-processing", lambda ds: setattr(ds, "PresentationIntentType", "FOR PROCESSING")),
    ],
)
def test_no_lossy_step_on_guarded_images_unless_the_rule_allows_it(kind, prepare):
    source = dcmread(data_file("CT_small.dcm"))
    prepare(source)
    lossy = Target(uid.JPEG2000, j2k_cr=(10.0,))
    refused = transcode(source, TranscodeSpec(lossy, (Target(uid.JPEGLSLossless),)))
    assert refused.target == Target(uid.JPEGLSLossless)
    assert f"safety: no lossy compression of {kind} images" in refused.notes[0]
    assert refused.dataset.SOPInstanceUID == source.SOPInstanceUID
    allowed = transcode(source, TranscodeSpec(lossy, allow_lossy=frozenset({kind})))
    assert allowed.target == lossy and allowed.dataset.LossyImageCompression == "01"


@pytest.mark.parametrize("sizes", [[4, 5, 6], [1], [7, 7], [2, 3, 5, 8, 13]])
def test_frame_by_frame_encapsulation_matches_pydicom(sizes):
    frames = [bytes(range(n)) for n in sizes]
    built = transcode_module._Encapsulated(len(frames))
    for frame in frames:
        built.add(frame)
    assert bytes(built.finish()) == encapsulate(frames, has_bot=True)
    assert built.frame_bytes == sum(sizes)


def test_large_pixel_data_is_read_from_disk_frame_by_frame(tmp_path, monkeypatch):
    """A large multi-frame instance: Pixel Data stays deferred on disk (never loaded whole),
    frames come from the file one at a time, and the output is still bit-exact."""
    from node.spool import SpoolEntry
    from node.transcode import process

    monkeypatch.setattr(process, "LARGE_PIXEL_DATA", 1024)
    source = tmp_path / "multi.dcm"
    dcmread(data_file("emri_small.dcm")).save_as(source)  # 10 frames of 64x64, 8 KiB each
    seen = []
    real = transcode_module.decoded_frames

    def spy(ds, facts, pixel_source=None):
        seen.append((pixel_source, ds.get_item(0x7FE00010, keep_deferred=True).value is None))
        return real(ds, facts, pixel_source)

    monkeypatch.setattr(transcode_module, "decoded_frames", spy)
    config = one_rule_config(tmp_path, "HTJ2KLossless")
    outcome = process.process_entry(SpoolEntry(source), config, tmp_path / "out.dcm")
    assert outcome.outcome == "recompressed", outcome.notes
    assert seen == [(source, True)]
    np.testing.assert_array_equal(
        raw(dcmread(tmp_path / "out.dcm")), raw(dcmread(data_file("emri_small.dcm")))
    )


# Lossy history told by the codestream alone (issue 22): inputs whose header says nothing.
LOSSY_IN = {"jls": "ISO_14495_1", "j2k": "ISO_15444_1", "htj2k": "ISO_15444_15"}
LOSSY_WHY = {
    "jls": "JPEG-LS NEAR=2 in the codestream",
    "j2k": "irreversible 9-7 wavelet in the JPEG 2000 codestream",
    "htj2k": "irreversible 9-7 wavelet in the HTJ2K codestream",
}
LOSSY_HEADER = ("LossyImageCompression", "LossyImageCompressionRatio",
                "LossyImageCompressionMethod")  # fmt: skip


def coded(kind: str, name: str = "CT_small.dcm") -> Dataset:
    """A real image coded as `kind`, with no (0028,2110/2112/2114) in its header."""
    import imagecodecs

    ds = dcmread(data_file(name))
    pixels = raw(ds)
    if kind == "jls":  # signed data: arr= checks the range
        ds.compress(uid.JPEGLSNearLossless, arr=pixels, jls_error=2, generate_instance_uid=False)
    elif kind == "jls-near0":
        ds.compress(uid.JPEGLSNearLossless, arr=pixels, jls_error=0, generate_instance_uid=False)
    elif kind == "j2k":
        ds.compress(uid.JPEG2000, j2k_cr=[10], generate_instance_uid=False)
    elif kind == "j2k-reversible-as-91":  # .91 "may be lossless": the label proves nothing
        ds.compress(uid.JPEG2000Lossless, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = uid.JPEG2000
    else:
        lossy = kind == "htj2k"
        encoded = imagecodecs.htj2k_encode(pixels, level=0.002 if lossy else None,
                                           reversible=not lossy)  # fmt: skip
        ds.PixelData = encapsulate([bytes(encoded)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = uid.HTJ2K
    for keyword in LOSSY_HEADER:
        ds.pop(keyword, None)
    return ds


def input_ratio(ds: Dataset) -> float:
    encoded = sum(len(f) for f in generate_frames(ds.PixelData, number_of_frames=1))
    return ds.Rows * ds.Columns * 2 / encoded


@pytest.mark.parametrize("target", [uid.JPEGLSLossless, uid.HTJ2KLossless,
                                    uid.ExplicitVRLittleEndian])  # fmt: skip
@pytest.mark.parametrize("kind", LOSSY_IN)
def test_lossless_step_on_a_lossy_codestream_records_the_input_step(kind, target):
    source = coded(kind)
    result = transcode(source, spec(target))
    assert result.outcome == "recompressed", result.notes
    out = result.dataset
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == LOSSY_IN[kind]
    assert float(out.LossyImageCompressionRatio) == pytest.approx(input_ratio(source), abs=0.01)
    assert out.SOPInstanceUID == source.SOPInstanceUID  # this step itself was lossless


@pytest.mark.parametrize("kind", LOSSY_IN)
def test_a_lossy_codestream_is_already_lossy_for_the_safety_default(kind):
    source = coded(kind)
    lossy = (Target(uid.JPEG2000, j2k_cr=(10.0,)) if kind == "jls"
             else Target(uid.JPEGLSNearLossless, jls_error=2))  # fmt: skip
    refused = transcode(source, TranscodeSpec(lossy, (Target(uid.JPEGLSLossless),)))
    assert refused.target == Target(uid.JPEGLSLossless)
    assert "safety: no lossy compression of already-lossy images" in refused.notes[0]
    allowed = transcode(source, TranscodeSpec(lossy, allow_lossy=frozenset({"already-lossy"})))
    assert allowed.target == lossy, allowed.notes
    out = allowed.dataset
    new_method = "ISO_15444_1" if kind == "jls" else "ISO_14495_1"
    assert list(out.LossyImageCompressionMethod) == [LOSSY_IN[kind], new_method]
    ratios = [float(r) for r in out.LossyImageCompressionRatio]
    assert ratios == [pytest.approx(input_ratio(source), abs=0.01),
                      pytest.approx(allowed.ratio, abs=0.01)]  # fmt: skip


@pytest.mark.parametrize("kind", ["jls-near0", "j2k-reversible-as-91", "htj2k-reversible"])
def test_lossless_codestreams_are_no_lossy_history(kind):
    source = coded(kind)
    assert capability.lossy_history(source, capability.pixel_facts(source)) is None
    out = transcode(source, spec(uid.JPEGLSLossless)).dataset
    assert not any(keyword in out for keyword in LOSSY_HEADER)
    lossy = Target(uid.HTJ2K, htj2k_qstep=0.002)
    assert transcode(source, TranscodeSpec(lossy)).target == lossy  # not guarded


def test_jpeg_ls_lossless_input_is_no_lossy_history():
    source = dcmread(data_file("emri_small_jpeg_ls_lossless.dcm"))
    source.pop("LossyImageCompression")
    assert capability.lossy_history(source, capability.pixel_facts(source)) is None


def test_pydicoms_jpeg_ls_near_lossless_file_is_lossy_by_its_codestream():
    source = dcmread(data_file("JPEGLSNearLossless_16.dcm"))
    assert "LossyImageCompression" not in source
    out = transcode(source, spec(uid.ExplicitVRLittleEndian)).dataset
    assert (out.LossyImageCompression, out.LossyImageCompressionMethod) == ("01", "ISO_14495_1")
    history = capability.lossy_history(source, capability.pixel_facts(source))
    assert history == capability.LossyHistory(
        "JPEG-LS NEAR=2 in the codestream", "ISO_14495_1", pytest.approx(input_ratio(source))
    )


def test_jpeg_baseline_input_gets_its_method_before_a_new_step():
    source = dcmread(data_file("examples_ybr_color.dcm"))  # 2110 01, ratio 19, no method
    assert "LossyImageCompressionMethod" not in source
    out = transcode(source, spec(uid.JPEGLSLossless)).dataset
    assert (out.LossyImageCompressionRatio, out.LossyImageCompressionMethod) == (
        source.LossyImageCompressionRatio, "ISO_10918_1")  # fmt: skip


def test_lossy_history_of_deferred_pixel_data_is_read_from_the_file(tmp_path):
    path = tmp_path / "jls.dcm"
    coded("jls").save_as(path, enforce_file_format=True)
    source = dcmread(path, defer_size=256)
    out = transcode(source, spec(uid.JPEGLSLossless), path).dataset
    assert (out.LossyImageCompression, out.LossyImageCompressionMethod) == ("01", "ISO_14495_1")
    assert source.get_item(0x7FE00010, keep_deferred=True).value is None  # still on disk
    facts = capability.pixel_facts(source)
    assert capability.lossy_history(source, facts, path).method == "ISO_14495_1"


def with_first_fragment(source: Dataset, fragment: bytes) -> Dataset:
    """`source` with `fragment` as its one fragment (any length: encapsulate() refuses 0)."""
    ds = copy.deepcopy(source)
    item = b"\xfe\xff\x00\xe0"
    fragment += b"\0" * (len(fragment) % 2)
    ds.PixelData = item + bytes(4) + item + struct.pack("<I", len(fragment)) + fragment
    return ds


@pytest.mark.parametrize("kind", LOSSY_IN)
def test_damaged_codestreams_never_raise_and_are_no_evidence(kind):
    source = coded(kind)
    facts = capability.pixel_facts(source)
    codestream = next(generate_frames(source.PixelData, number_of_frames=1))
    history = capability.lossy_history(source, facts)
    assert history is not None and history.why == LOSSY_WHY[kind]
    header_end = codestream.find(b"\xff\xda" if kind == "jls" else b"\xff\x90")
    for cut in range(header_end + 16):  # every prefix: a cut codestream
        found = capability.lossy_history(with_first_fragment(source, codestream[:cut]), facts)
        assert found is None or found.why == LOSSY_WHY[kind], cut
    assert capability.lossy_history(with_first_fragment(source, codestream[:8]), facts) is None
    rng = np.random.default_rng(22)
    for _ in range(200):  # bytes overwritten in the headers
        damaged = bytearray(codestream)
        for at in rng.integers(0, header_end + 16, 3):
            damaged[at] = int(rng.integers(0, 256))
        capability.lossy_history(with_first_fragment(source, bytes(damaged)), facts)
    broken = copy.deepcopy(source)
    broken.PixelData = b"\x00" * 64  # no item at all
    assert capability.lossy_history(broken, facts) is None
    broken.LossyImageCompression = "01"
    assert capability.lossy_history(broken, facts).why == "Lossy Image Compression 01 in the header"


def test_jpeg_baseline_is_lossy_whatever_its_data_and_header_say():
    source = dcmread(data_file("examples_ybr_color.dcm"))
    for keyword in LOSSY_HEADER:
        source.pop(keyword, None)
    facts = capability.pixel_facts(source)
    assert capability.lossy_history(source, facts).ratio > 10  # measured from the fragments
    source.PixelData = b"\x00" * 64  # damaged: the syntax alone says lossy
    history = capability.lossy_history(source, facts)
    assert (history.why, history.method, history.ratio) == (
        "JPEG baseline input", "ISO_10918_1", None)  # fmt: skip


def test_a_jp2_wrapped_codestream_is_read_too():
    source = coded("j2k")
    codestream = next(generate_frames(source.PixelData, number_of_frames=1))
    jp2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x14ftypjp2 \x00\x00\x00\x00jp2 "
    jp2 += struct.pack(">I", 8 + len(codestream)) + b"jp2c" + codestream
    facts = capability.pixel_facts(source)
    found = capability.lossy_history(with_first_fragment(source, jp2), facts)
    assert found is not None and found.method == "ISO_15444_1"
