"""Per-destination outputs: a send_to entry may carry its own transcode, a destination its own
default; precedence is the rule's entry, the destination's default, the rule's transcode."""

from __future__ import annotations

from pydicom import uid

from node.config.targets import Target, TranscodeSpec
from node.ops.explain import config_summary
from tests.config.helpers import parse, problems

ISSUE_EXAMPLE = """\
    destinations:
      archive: {type: folder, path: ./archive}
      telerad: {type: folder, path: ./telerad}
      old-pacs: {type: dicom, host: pacs, port: 104, ae_title: OLD}
    rules:
      - name: ct
        match: {Modality: CT}
        transcode: {syntax: JPEG2000Lossless}
        send_to:
          - archive
          - {destination: telerad, transcode: {syntax: HTJ2K, htj2k_qstep: 0.004, allow_lossy: [for-processing]}}
          - {destination: old-pacs, transcode: {syntax: JPEGLSLossless, fallback: [ExplicitVRLittleEndian]}}
"""  # noqa: E501 - the issue's example, verbatim


def test_the_issue_example_gives_each_destination_its_own_output():
    rule = parse(ISSUE_EXAMPLE).rules[0]
    assert rule.send_to == ("archive", "telerad", "old-pacs")
    assert rule.spec_for("archive") == rule.transcode == TranscodeSpec(Target(uid.JPEG2000Lossless))
    assert rule.spec_for("telerad") == TranscodeSpec(
        Target(uid.HTJ2K, htj2k_qstep=0.004), allow_lossy=frozenset({"for-processing"})
    )
    assert rule.spec_for("old-pacs") == TranscodeSpec(
        Target(uid.JPEGLSLossless), (Target(uid.ExplicitVRLittleEndian),)
    )
    assert len(rule.distinct_specs()) == 3


def test_precedence_entry_then_destination_default_then_rule():
    rule = parse("""\
        destinations:
          a: {type: folder, path: ./a}
          b: {type: folder, path: ./b, transcode: {syntax: RLELossless}}
          c: {type: folder, path: ./c, transcode: {syntax: RLELossless}}
        rules:
          - name: r
            transcode: {syntax: JPEGLSLossless}
            send_to: [a, b, {destination: c, transcode: {syntax: HTJ2KLossless}}]
        """).rules[0]  # fmt: skip
    assert [rule.spec_for(d).target.syntax for d in rule.send_to] == [
        uid.JPEGLSLossless, uid.RLELossless, uid.HTJ2KLossless,
    ]  # fmt: skip


def test_destinations_sharing_a_target_share_one_output():
    rule = parse("""\
        destinations:
          a: {type: folder, path: ./a}
          b: {type: folder, path: ./b}
          c: {type: folder, path: ./c, transcode: {syntax: JPEGLSLossless}}
        rules:
          - {name: r, transcode: {syntax: JPEGLSLossless}, send_to: [a, b, c]}
        """).rules[0]  # fmt: skip
    assert rule.distinct_specs() == (TranscodeSpec(Target(uid.JPEGLSLossless)),)


def test_the_current_form_is_unchanged():
    rule = parse("""\
        destinations: {a: {type: folder, path: ./a}, b: {type: folder, path: ./b}}
        rules: [{name: r, transcode: {syntax: RLELossless}, send_to: [a, b]}]
        """).rules[0]  # fmt: skip
    assert rule.send_to == ("a", "b")
    assert rule.distinct_specs() == (rule.transcode,) == (TranscodeSpec(Target(uid.RLELossless)),)


def test_send_to_entry_problems_name_their_lines():
    assert problems("""\
        destinations:
          a: {type: folder, path: ./a}
        rules:
          - name: r
            send_to:
              - {destination: a, transcode: {syntax: JPEGLSLosless}}   # <- 6
              - {destinaton: a}                                        # <- 7
              - {destination: nowhere}                                 # <- 8
              - 42                                                     # <- 9
              - a                                                      # <- 10
        """) == [
        "node.yaml:6: rule 'r'.send_to[a].transcode: unknown transfer syntax 'JPEGLSLosless' "
        "(did you mean 'JPEGLSLossless'?); supported: keep, ExplicitVRLittleEndian, RLELossless, "
        "JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, HTJ2KLossless, "
        "HTJ2KLosslessRPCL, HTJ2K, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, "
        "JPEGLossless, JPEGXLLossless, JPEGXL, JPEGXLJPEGRecompression",
        "node.yaml:7: rule 'r'.send_to: unknown key 'destinaton' (did you mean 'destination'?); "
        "allowed: destination, transcode",
        "node.yaml:7: rule 'r'.send_to: missing required key 'destination'",
        "node.yaml:8: rule 'r'.send_to: undefined destination 'nowhere' (known: a)",
        "node.yaml:9: rule 'r'.send_to: expected a destination name or a mapping with "
        "'destination' (and 'transcode'), got int 42",
        "node.yaml:10: rule 'r'.send_to: 'a' is named twice",
    ]  # fmt: skip


def test_a_destination_default_is_checked_like_a_rule_transcode():
    assert problems("""\
        destinations:
          a:
            type: folder
            path: ./a
            transcode: {syntax: JPEG2000}     # <- 5
        rules: [{name: r, send_to: [a]}]
        """) == [
        "node.yaml:5: destinations.a.transcode: JPEG2000 needs exactly one of j2k_cr or j2k_psnr"
    ]  # fmt: skip


def test_check_config_shows_which_destination_gets_which_output():
    summary = config_summary(parse(ISSUE_EXAMPLE))
    assert (
        "1. ct: Modality=CT -> JPEG2000Lossless -> archive; HTJ2K htj2k_qstep=0.004 -> telerad; "
        "JPEGLSLossless then ExplicitVRLittleEndian -> old-pacs"
    ) in summary
