"""`dicom-node explain`: a dry run that says what the node would do, and writes nothing."""

from __future__ import annotations

from node.ops.cli import main
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


def test_explain_says_when_the_input_is_lossy_already_and_why(tmp_path, capsys):
    jls, j2k, ct = (
        explain(tmp_path, capsys, name)
        for name in ("JPEGLSNearLossless_16.dcm", "MR2_J2KI.dcm", "CT_small.dcm")
    )
    assert "  input: already lossy (JPEG-LS NEAR=2 in the codestream)" in jls
    assert "  input: already lossy (irreversible 9-7 wavelet in the JPEG 2000 codestream)" in j2k
    assert "already lossy" not in ct


BROKEN = {  # one per area of the config; the line each problem must name
    "yaml": ("node:\n  port: 1: 2\nrules: []\n", [2]),
    "node key": ("node: {prot: 1}\nrules: [{name: r, send_to: []}]\n", [1]),
    "syntax typo": (
        "destinations: {a: {type: folder, path: ./a}}\nrules:\n"
        "  - {name: r, transcode: {syntax: JPEGLSLosless}, send_to: [a]}\n", [3]),
    "unknown destination": ("rules:\n  - name: r\n    send_to: [pacs]\n", [3]),
    "accept and limits": (
        "accept: {networks: [10.0.0.300/8]}\nlimits: {max_associations: 0}\n"
        "rules: [{name: r, send_to: []}]\n", [1, 2]),
    "tls": ("node: {tls: {cert: /nonexistent.pem, key: /nonexistent.key}}\n"
            "rules: [{name: r, send_to: []}]\n", [1, 1]),
}  # fmt: skip


def test_explain_reports_every_config_problem_with_its_line_like_check_config(tmp_path, capsys):
    for name, (text, lines) in BROKEN.items():
        config = tmp_path / f"{name.replace(' ', '-')}.yaml"
        config.write_text(text)
        assert main(["check-config", str(config)]) == 2, name
        checked = capsys.readouterr().err.splitlines()
        assert main(["explain", "-c", str(config), str(data_file("CT_small.dcm"))]) == 2, name
        explained = capsys.readouterr().err.splitlines()
        assert explained == checked, name
        problems = [p for p in explained if p.startswith(f"{config}:")]
        assert [int(p.split(":")[1]) for p in problems][: len(lines)] == lines, (name, problems)


def test_explain_runs_every_distinct_output_and_says_who_gets_it(tmp_path, capsys):
    config = tmp_path / "three.yaml"
    config.write_text("""
destinations:
  archive: {type: folder, path: ./archive, layout: "{SOPInstanceUID}.dcm"}
  telerad: {type: folder, path: ./telerad, layout: "{SOPInstanceUID}.dcm"}
  mirror: {type: folder, path: ./mirror, layout: "{SOPInstanceUID}.dcm"}
rules:
  - name: r
    transcode: {syntax: JPEGLSLossless}
    send_to: [archive, {destination: telerad, transcode: {syntax: HTJ2K, htj2k_qstep: 0.004}},
              mirror]
""")
    assert main(["explain", "-c", str(config), str(data_file("MR_small.dcm"))]) == 0
    out = capsys.readouterr().out
    assert "  output for archive, mirror: JPEGLSLossless\n" in out
    assert "    result: recompressed to JPEGLSLossless" in out
    assert "  output for telerad: HTJ2K htj2k_qstep=0.004\n" in out
    assert "    result: recompressed to HTJ2K htj2k_qstep=0.004" in out
    assert "    lossy: new SOP Instance UID" in out
    assert out.count("deliver: ") == 3
    assert not (tmp_path / "archive").exists()
