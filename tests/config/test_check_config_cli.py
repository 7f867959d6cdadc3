"""load_config of files on disk, and `dicom-node check-config` output and exit codes."""

from __future__ import annotations

from textwrap import dedent

import pytest

from node.config import DEFAULT_LAYOUT, ConfigError, load_config
from node.ops.cli import main
from tests.config.helpers import (
    CONTRACT_EXAMPLE,
    SEVERAL_PROBLEMS,
    SEVERAL_PROBLEMS_EXPECTED,
    check_config,
)

# --- load_config and check-config --------------------------------------------------------------


def test_load_config_reports_problems_with_the_files_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("node:\n  prot: 1\nrules: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:2: node: unknown key 'prot' (did you mean 'port'?); "
        "allowed: ae_title, draining, host, log_patient_names, name, port, spool, spool_max_size, "
        "spool_min_free, tls, workers",
        f"{path}:3: rules: expected a non-empty list of rules",
    ]


def test_load_config_of_a_missing_file_names_the_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:0: cannot read: No such file or directory"
    ]


def test_load_config_of_a_file_that_is_not_utf8_is_reported(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("node: {ae_title: NÖDE}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:1: not UTF-8 text: invalid continuation byte"
    ]


def test_check_config_prints_every_problem_and_exits_non_zero(tmp_path, capsys):
    path = tmp_path / "node.yaml"
    path.write_text(SEVERAL_PROBLEMS)

    assert main(["check-config", str(path)]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        *(f"{path}:{p}" for p in SEVERAL_PROBLEMS_EXPECTED),
        "7 problem(s); nothing was started",
    ]


def test_check_config_of_a_missing_file_exits_non_zero_naming_the_file(tmp_path):
    path = tmp_path / "no-such-config.yaml"

    done = check_config(str(path))

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{path}:0: cannot read: No such file or directory",
        "1 problem(s); nothing was started",
    ]


def test_check_config_reports_a_yaml_syntax_error_with_its_line(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("rules:\n  - name: r\n    send_to: archive: pacs\n")  # line 3

    done = check_config(str(path))

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{path}:3: YAML syntax error: mapping values are not allowed here",
        "1 problem(s); nothing was started",
    ]


def test_check_config_names_the_line_where_an_unclosed_brace_opened(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(
        "destinations:\n"
        "  archive: {type: folder, path: ./archive}\n"
        "rules:\n"
        "  - name: mr\n"
        "    match: {Modality: MR\n"  # line 5: the '}' is missing
        "    send_to: [archive]\n"
    )

    done = check_config(str(path))

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{path}:5: '{{' opened here is not closed (found ':' at line 6 col 12)",
        "1 problem(s); nothing was started",
    ]


def test_check_config_prints_warnings_on_stderr_and_still_succeeds(tmp_path, capsys):
    path = tmp_path / "node.yaml"
    path.write_text(
        dedent(
            """\
            destinations:
              archive: {type: folder, path: ./archive}
            rules:
              - name: all
                send_to: [archive]
              - name: ct
                match: {Modality: CT}
                send_to: [archive]
            """
        )
    )

    assert main(["check-config", str(path)]) == 0

    out, err = capsys.readouterr()
    warning = f"{path}:4: rule 'all' matches everything; later rules never apply: ct"
    assert err.splitlines() == [f"warning: {warning}"]
    assert out.splitlines()[0] == f"{path}: OK"
    assert out.splitlines()[-1] == f"warning: {warning}"


def test_check_config_summary_describes_the_contract_example(tmp_path, capsys):
    path = tmp_path / "node.yaml"
    path.write_text(CONTRACT_EXAMPLE)

    assert main(["check-config", str(path)]) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        f"{path}: OK",
        f"node: DICOM-NODE on 0.0.0.0:11112, spool {tmp_path / 'spool'}, workers one per core",
        "accept: calling AE titles *; called AE titles DICOM-NODE; networks 0.0.0.0/0, ::/0",
        "destinations:",
        f"  archive: folder {tmp_path / 'archive'} layout {DEFAULT_LAYOUT}",
        "  pacs: DICOM PACS@127.0.0.1:4242 (as DICOM-NODE)",
        "rules (the first match wins):",
        "  1. mammo-lossless: Modality=MG -> JPEGLSLossless -> archive, pacs",
        "  2. color-ultrasound: Modality=US, PhotometricInterpretation=RGB -> JPEG2000Lossless mct"
        " -> pacs",
        "  3. ct-from-scanner-1: Modality=CT|PT, CallingAET=CT1* -> JPEG2000 j2k_cr=[20.0, 5.0]"
        " -> pacs",
        "  4. everything-else: everything -> keep -> archive",
    ]
