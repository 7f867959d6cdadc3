"""Transcode targets: transfer syntaxes, their parameters, fallbacks and allow_lossy."""

from __future__ import annotations

import pytest
from pydicom import uid

from node.config.targets import Target
from tests.config.helpers import SUPPORTED, parse, problems, rule_with_transcode

# --- transfer syntaxes and their parameters ----------------------------------------------------


def test_unknown_transfer_syntax_suggests_the_closest_supported_name():
    assert problems(rule_with_transcode("{syntax: JPEGLSLosless}")) == [
        "node.yaml:6: rule 'r'.transcode: unknown transfer syntax 'JPEGLSLosless' "
        f"(did you mean 'JPEGLSLossless'?); {SUPPORTED}"
    ]


def test_unknown_transfer_syntax_on_a_block_mapping_names_the_syntax_line():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            transcode:
              mct: false
              syntax: Jpeg2000    # <- 7
            send_to: [archive]
        """
    ) == [
        "node.yaml:7: rule 'r'.transcode: unknown transfer syntax 'Jpeg2000' "
        f"(did you mean 'JPEG2000'?); {SUPPORTED}"
    ]


@pytest.mark.parametrize(
    "syntax, shown",
    [
        ("MPEG2MPML", "MPEG2MPML (1.2.840.10008.1.2.4.100)"),
        ("1.2.840.10008.1.2.4.100", "MPEG2MPML (1.2.840.10008.1.2.4.100)"),
        ("JPEG2000MCLossless", "JPEG2000MCLossless (1.2.840.10008.1.2.4.92)"),
        ("ImplicitVRLittleEndian", "ImplicitVRLittleEndian (1.2.840.10008.1.2)"),
        ("1.2.3.4", "1.2.3.4 (1.2.3.4)"),
    ],
)
def test_syntax_the_node_cannot_encode_is_rejected(syntax, shown):
    assert problems(rule_with_transcode(f"{{syntax: {syntax}}}")) == [
        f"node.yaml:6: rule 'r'.transcode: the node cannot encode {shown}; {SUPPORTED}"
    ]


@pytest.mark.parametrize(
    "syntax, expected",
    [
        ("1.2.840.10008.1.2.4.80", uid.JPEGLSLossless),
        ("ExplicitVRLittleEndian", uid.ExplicitVRLittleEndian),
        ("RLELossless", uid.RLELossless),
        ("keep", None),
    ],
)
def test_syntax_may_be_named_by_keyword_or_uid(syntax, expected):
    config = parse(rule_with_transcode(f"{{syntax: '{syntax}'}}"))
    assert config.rules[0].transcode.target.syntax == expected


def test_transcode_without_syntax_is_reported():
    assert problems(rule_with_transcode("{jls_error: 2}")) == [
        "node.yaml:6: rule 'r'.transcode: missing 'syntax' (a transfer syntax name, or keep)"
    ]


def test_jpegls_near_lossless_without_jls_error_is_reported():
    assert problems(rule_with_transcode("{syntax: JPEGLSNearLossless}")) == [
        "node.yaml:6: rule 'r'.transcode: JPEGLSNearLossless needs jls_error "
        "(the maximum pixel error, 1-255)"
    ]


@pytest.mark.parametrize("value", ["0", "256", "-1", "2.5", "true", "'3'"])
def test_jls_error_out_of_range_or_not_whole_is_reported(value):
    shown = {"true": "True", "'3'": "'3'"}.get(value, value)
    assert problems(rule_with_transcode(f"{{syntax: JPEGLSNearLossless, jls_error: {value}}}")) == [
        "node.yaml:6: rule 'r'.transcode: jls_error: expected a whole number 1-255 "
        f"(0 is lossless: use JPEGLSLossless), got {shown}"
    ]


def test_jls_error_bounds_are_accepted():
    for value in (1, 255):
        config = parse(rule_with_transcode(f"{{syntax: JPEGLSNearLossless, jls_error: {value}}}"))
        assert config.rules[0].transcode.target.jls_error == value


@pytest.mark.parametrize("syntax", ["JPEGLSLossless", "JPEG2000Lossless", "keep"])
def test_jls_error_on_another_syntax_is_reported(syntax):
    assert problems(rule_with_transcode(f"{{syntax: {syntax}, jls_error: 2}}")) == [
        f"node.yaml:6: rule 'r'.transcode: jls_error applies to JPEGLSNearLossless only, "
        f"not {syntax}"
    ]


def test_jls_error_on_another_syntax_names_the_jls_error_line():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            transcode:
              syntax: JPEGLSLossless
              jls_error: 2          # <- 7
            send_to: [archive]
        """
    ) == [
        "node.yaml:7: rule 'r'.transcode: jls_error applies to JPEGLSNearLossless only, "
        "not JPEGLSLossless"
    ]


@pytest.mark.parametrize(
    "transcode", ["{syntax: JPEG2000}", "{syntax: JPEG2000, j2k_cr: [10], j2k_psnr: [40]}"]
)
def test_jpeg2000_needs_exactly_one_of_j2k_cr_or_j2k_psnr(transcode):
    assert problems(rule_with_transcode(transcode)) == [
        "node.yaml:6: rule 'r'.transcode: JPEG2000 needs exactly one of j2k_cr or j2k_psnr"
    ]


@pytest.mark.parametrize("ratios", ["[5, 20]", "[20, 20]", "[20, 5, 10]"])
def test_j2k_cr_not_decreasing_is_reported(ratios):
    assert problems(rule_with_transcode(f"{{syntax: JPEG2000, j2k_cr: {ratios}}}")) == [
        "node.yaml:6: rule 'r'.transcode: j2k_cr: quality layers must be in decreasing order"
    ]


@pytest.mark.parametrize("ratios", ["1", "[1]", "[20, 1]", "[10, 0.5]"])
def test_j2k_cr_of_one_or_less_is_reported(ratios):
    assert problems(rule_with_transcode(f"{{syntax: JPEG2000, j2k_cr: {ratios}}}")) == [
        "node.yaml:6: rule 'r'.transcode: j2k_cr: every ratio must be above 1 (a ratio of 1 "
        "silently becomes reversible; use JPEG2000Lossless for lossless)"
    ]


@pytest.mark.parametrize("ratios", ["[]", "[ten]", "[20, true]", "high"])
def test_j2k_cr_must_be_numbers(ratios):
    shown = {"[]": "[]", "[ten]": "['ten']", "[20, true]": "[20, True]", "high": "'high'"}[ratios]
    assert problems(rule_with_transcode(f"{{syntax: JPEG2000, j2k_cr: {ratios}}}")) == [
        f"node.yaml:6: rule 'r'.transcode: j2k_cr: expected a number or a list of numbers, "
        f"got {shown}"
    ]


def test_a_single_j2k_cr_number_is_one_quality_layer():
    config = parse(rule_with_transcode("{syntax: JPEG2000, j2k_cr: 15}"))
    assert config.rules[0].transcode.target.j2k_cr == (15.0,)


@pytest.mark.parametrize("values", ["[50, 40]", "[40, 40]"])
def test_j2k_psnr_not_increasing_is_reported(values):
    assert problems(rule_with_transcode(f"{{syntax: JPEG2000, j2k_psnr: {values}}}")) == [
        "node.yaml:6: rule 'r'.transcode: j2k_psnr: quality layers must be in increasing order"
    ]


def test_j2k_psnr_of_zero_is_reported():
    assert problems(rule_with_transcode("{syntax: JPEG2000, j2k_psnr: [0, 40]}")) == [
        "node.yaml:6: rule 'r'.transcode: j2k_psnr: every value must be above 0 dB"
    ]


@pytest.mark.parametrize("key", ["j2k_cr", "j2k_psnr"])
def test_j2k_quality_on_jpeg2000_lossless_is_reported(key):
    assert problems(rule_with_transcode(f"{{syntax: JPEG2000Lossless, {key}: [10]}}")) == [
        f"node.yaml:6: rule 'r'.transcode: {key} applies to JPEG2000 (lossy) only, "
        "not JPEG2000Lossless"
    ]


@pytest.mark.parametrize("value, shown", [("yes please", "'yes please'"), ("1", "1")])
def test_mct_not_a_bool_is_reported(value, shown):
    assert problems(rule_with_transcode(f"{{syntax: JPEG2000Lossless, mct: {value}}}")) == [
        f"node.yaml:6: rule 'r'.transcode: mct: expected true or false, got {shown}"
    ]


@pytest.mark.parametrize("syntax", ["JPEGLSLossless", "RLELossless"])
def test_mct_on_a_non_jpeg2000_syntax_is_reported(syntax):
    assert problems(rule_with_transcode(f"{{syntax: {syntax}, mct: true}}")) == [
        "node.yaml:6: rule 'r'.transcode: "
        f"mct applies to JPEG 2000 and HTJ2K syntaxes only, not {syntax}"
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ("{syntax: HTJ2KLossless, htj2k_qstep: 0.01}",
         "htj2k_qstep applies to HTJ2K (lossy) only, not HTJ2KLossless"),
        ("{syntax: HTJ2K, htj2k_qstep: 2}",
         "htj2k_qstep: expected a quantisation step between 0 and 1 (e.g. 0.005; smaller is "
         "closer to the original), got 2"),
        ("{syntax: HTJ2K, htj2k_qstep: fine}",
         "htj2k_qstep: expected a quantisation step between 0 and 1 (e.g. 0.005; smaller is "
         "closer to the original), got 'fine'"),
    ],
)  # fmt: skip
def test_htj2k_qstep_problems_are_reported(body, message):
    assert problems(rule_with_transcode(body)) == [f"node.yaml:6: rule 'r'.transcode: {message}"]


def test_htj2k_targets_parse():
    rules = parse(rule_with_transcode("{syntax: HTJ2K, htj2k_qstep: 0.005, mct: true}")).rules
    target = rules[0].transcode.target
    assert (target.syntax, target.htj2k_qstep, target.mct, target.is_lossy) == (
        "1.2.840.10008.1.2.4.203",
        0.005,
        True,
        True,
    )
    assert not parse(rule_with_transcode("{syntax: HTJ2K}")).rules[0].transcode.target.is_lossy


@pytest.mark.parametrize(
    "body, message",
    [
        ("{syntax: JPEGBaseline8Bit}",
         "JPEGBaseline8Bit needs jpeg_quality (libjpeg's quality, 1-100)"),
        ("{syntax: JPEGExtended12Bit}",
         "JPEGExtended12Bit needs jpeg_quality (libjpeg's quality, 1-100)"),
        ("{syntax: JPEGBaseline8Bit, jpeg_quality: 0}",
         "jpeg_quality: expected a whole number 1-100 (higher keeps more), got 0"),
        ("{syntax: JPEGBaseline8Bit, jpeg_quality: 90.5}",
         "jpeg_quality: expected a whole number 1-100 (higher keeps more), got 90.5"),
        ("{syntax: JPEGLossless, jpeg_quality: 90}",
         "jpeg_quality applies to JPEGBaseline8Bit and JPEGExtended12Bit only, not JPEGLossless"),
        ("{syntax: JPEGLossless, predictor: 8}",
         "predictor: expected a whole number 1-7 (the selection value; JPEGLosslessSV1 is "
         "predictor 1), got 8"),
        ("{syntax: JPEGLosslessSV1, predictor: 2}",
         "predictor applies to JPEGLossless only, not JPEGLosslessSV1"),
        ("{syntax: JPEGXLLossless, jxl_effort: 0}",
         "jxl_effort: expected a whole number 1-9 (higher is smaller and slower), got 0"),
        ("{syntax: JPEGXLJPEGRecompression, jxl_effort: 5}",
         "jxl_effort applies to JPEGXLLossless and JPEGXL only, not JPEGXLJPEGRecompression"),
        ("{syntax: JPEGXL}",
         "JPEGXL needs jxl_distance (butteraugli distance; 1 is visually lossless, for "
         "lossless use JPEGXLLossless)"),
        ("{syntax: JPEGXL, jxl_distance: 0}",
         "jxl_distance: expected a butteraugli distance above 0 and at most 25 (1 is visually "
         "lossless; for lossless use JPEGXLLossless), got 0"),
        ("{syntax: JPEGXLLossless, jxl_distance: 1}",
         "jxl_distance applies to JPEGXL (lossy) only, not JPEGXLLossless"),
        ("{syntax: JPEGLosslessSV1, mct: true}",
         "mct applies to JPEG 2000 and HTJ2K syntaxes only, not JPEGLosslessSV1"),
    ],
)  # fmt: skip
def test_jpeg_and_jpeg_xl_parameter_problems_are_reported(body, message):
    assert problems(rule_with_transcode(body)) == [f"node.yaml:6: rule 'r'.transcode: {message}"]


@pytest.mark.parametrize(
    "body, lossy, described",
    [
        ("{syntax: JPEGBaseline8Bit, jpeg_quality: 90}", True, "JPEGBaseline8Bit jpeg_quality=90"),
        ("{syntax: JPEGExtended12Bit, jpeg_quality: 75}", True,
         "JPEGExtended12Bit jpeg_quality=75"),
        ("{syntax: JPEGLosslessSV1}", False, "JPEGLosslessSV1"),
        ("{syntax: JPEGLossless, predictor: 7}", False, "JPEGLossless predictor=7"),
        ("{syntax: JPEGXLLossless, jxl_effort: 3}", False, "JPEGXLLossless jxl_effort=3"),
        ("{syntax: '1.2.840.10008.1.2.4.110'}", False, "JPEGXLLossless"),
        ("{syntax: JPEGXL, jxl_distance: 1.5}", True, "JPEGXL jxl_distance=1.5"),
        ("{syntax: JPEGXLJPEGRecompression}", False, "JPEGXLJPEGRecompression"),
    ],
)  # fmt: skip
def test_jpeg_and_jpeg_xl_targets_parse(body, lossy, described):
    target = parse(rule_with_transcode(body)).rules[0].transcode.target
    assert (target.is_lossy, target.describe()) == (lossy, described)


def test_mct_false_is_accepted_on_any_syntax():
    config = parse(rule_with_transcode("{syntax: JPEGLSLossless, mct: false}"))
    assert config.rules[0].transcode.target == Target(uid.JPEGLSLossless)


def test_bad_fallback_entry_names_the_line_of_that_item():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            transcode:
              syntax: JPEGLSLossless
              fallback:
                - JPEG2000Lossless
                - JPEGBaseline8Bit          # <- 9
                - {syntax: JPEG2000}        # <- 10
                - RLELossles                # <- 11
            send_to: [archive]
        """
    ) == [
        "node.yaml:9: rule 'r'.transcode.fallback[1]: JPEGBaseline8Bit needs jpeg_quality "
        "(libjpeg's quality, 1-100)",
        "node.yaml:10: rule 'r'.transcode.fallback[2]: JPEG2000 needs exactly one of j2k_cr "
        "or j2k_psnr",
        "node.yaml:11: rule 'r'.transcode.fallback[3]: unknown transfer syntax 'RLELossles' "
        f"(did you mean 'RLELossless'?); {SUPPORTED}",
    ]


def test_bad_fallback_parameter_names_its_own_line():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            transcode:
              syntax: JPEGLSLossless
              fallback:
                - syntax: JPEG2000
                  j2k_cr: [5, 10]           # <- 9
            send_to: [archive]
        """
    ) == [
        "node.yaml:9: rule 'r'.transcode.fallback[0]: j2k_cr: quality layers must be in "
        "decreasing order"
    ]


def test_transcode_that_is_not_a_mapping_is_reported():
    assert problems(rule_with_transcode("[JPEGLSLossless]")) == [
        "node.yaml:6: rule 'r'.transcode: expected a mapping (key: value), got a list"
    ]


def test_allow_lossy_is_parsed_and_unknown_kinds_are_reported():
    config = parse(rule_with_transcode(
        "{syntax: JPEG2000, j2k_cr: [10], allow_lossy: [mammography, already-lossy]}"
    ))  # fmt: skip
    assert config.rules[0].transcode.allow_lossy == {"mammography", "already-lossy"}
    assert problems(rule_with_transcode("{syntax: JPEG2000, j2k_cr: [10], allow_lossy: [MG]}")) == [
        "node.yaml:6: rule 'r'.transcode.allow_lossy: unknown kind 'MG'; "
        "allowed: already-lossy, mammography, for-processing"
    ]
