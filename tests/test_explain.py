"""`dicom-node explain`: a dry run that says what the node would do, and writes nothing."""

from __future__ import annotations

from node.cli import main
from tests.conftest import data_file

CONFIG = """
node: {spool: ./spool}
destinations:
  archive: {type: folder, path: ./archive, layout: "{Modality}/{SOPInstanceUID}.dcm"}
rules:
  - name: ct-lossy
    match: {Modality: CT}
    transcode: {syntax: JPEG2000, j2k_cr: [20]}
    send_to: [archive]
  - name: us-near-lossless
    match: {Modality: US}
    transcode: {syntax: JPEGLSNearLossless, jls_error: 2, fallback: [JPEGLSLossless]}
    send_to: [archive]
  - name: seg
    match: {Modality: SEG}
    transcode: {syntax: JPEGLSLossless, fallback: [RLELossless]}
    send_to: [archive]
"""


def explain(tmp_path, capsys, *names: str, extra: tuple[str, ...] = ()) -> str:
    config = tmp_path / "node.yaml"
    config.write_text(CONFIG)
    files = [str(data_file(n)) for n in names]
    assert main(["explain", "-c", str(config), *extra, *files]) == 0
    assert not (tmp_path / "archive").exists() and not (tmp_path / "spool").exists()
    return capsys.readouterr().out


def test_explain_names_rule_target_ratio_and_destination_path(tmp_path, capsys):
    out = explain(tmp_path, capsys, "CT_small.dcm")
    assert f"rule: ct-lossy ({tmp_path / 'node.yaml'}:" in out
    assert "recompressed to JPEG2000 j2k_cr=[20.0]" in out
    assert "Lossy Image Compression 01" in out and "new SOP Instance UID" in out
    assert f"deliver: archive -> {tmp_path / 'archive' / 'CT'}" in out


def test_explain_says_why_a_target_cannot_encode_and_what_happens_instead(tmp_path, capsys):
    out = explain(tmp_path, capsys, "OBXXXX1A.dcm", "liver.dcm")
    assert "note: JPEGLSNearLossless jls_error=2: PALETTE COLOR holds palette indexes" in out
    assert "recompressed to JPEGLSLossless" in out and "verified bit-exact" in out
    assert "Bits Allocated 1 (bit-packed pixels) cannot be re-encoded" in out
    assert "result: passed-through: forwarded as received" in out


def test_explain_reports_quarantine_when_no_rule_matches(tmp_path, capsys):
    out = explain(tmp_path, capsys, "MR_small.dcm", extra=("--calling-aet", "MR1"))
    assert "CallingAET=MR1" in out
    assert "rule: none matches => quarantined" in out
