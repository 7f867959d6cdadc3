"""The codec step as a pure function: real images in, verified datasets (or refusals) out."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import iter_pixels, pixel_array

from node import transcode as transcode_module
from node.syntaxes import Target, TranscodeSpec
from node.transcode import transcode
from tests.conftest import data_file, one_rule_config


def spec(syntax, *fallback: Target, **params) -> TranscodeSpec:
    return TranscodeSpec(Target(syntax, **params), tuple(fallback))


def raw(ds: Dataset) -> np.ndarray:
    return pixel_array(ds, raw=True)


# FIELD-NOTES section 1 (pydicom's encoding guides): encapsulated Pixel Data sizes.
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
    from node import process
    from node.spool import SpoolEntry

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
