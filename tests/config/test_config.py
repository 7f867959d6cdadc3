"""Unit tests of the configuration: parse_config, load_config and `dicom-node check-config`.

Every problem is asserted as the exact `FILE:LINE: message` text the user sees. In the YAML
snippets, `# <- N` marks the line a problem is expected on.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest
from pydicom import uid

from node.config import (
    DEFAULT_LAYOUT,
    AcceptPolicy,
    ConfigError,
    DicomDestination,
    FolderDestination,
    NodeSettings,
    Problem,
    RetryPolicy,
    load_config,
    parse_config,
)
from node.config.targets import Target, TranscodeSpec
from node.ops.cli import main

REPO = Path(__file__).resolve().parents[2]
SRC = "node.yaml"
SUPPORTED = (
    "supported: keep, ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEGLSNearLossless, "
    "JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K"
)

# The README's configuration example, verbatim.
CONTRACT_EXAMPLE = """\
node:
  ae_title: DICOM-NODE
  host: 0.0.0.0
  port: 11112
  spool: ./spool
  workers: 0
accept:
  calling_aets: ["*"]
destinations:
  archive:
    type: folder
    path: ./archive
    layout: "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
  pacs:
    type: dicom
    host: 127.0.0.1
    port: 4242
    ae_title: PACS
rules:
  - name: mammo-lossless
    match: {Modality: MG}
    transcode: {syntax: JPEGLSLossless}
    send_to: [archive, pacs]
  - name: color-ultrasound
    match: {Modality: US, PhotometricInterpretation: RGB}
    transcode: {syntax: JPEG2000Lossless, mct: true}
    send_to: [pacs]
  - name: ct-from-scanner-1
    match: {Modality: [CT, PT], CallingAET: "CT1*"}
    transcode: {syntax: JPEG2000, j2k_cr: [20, 5]}
    send_to: [pacs]
  - name: everything-else
    transcode: {syntax: keep}
    send_to: [archive]
"""


def parse(text: str, base: Path = Path("/srv/node")):
    return parse_config(dedent(text), SRC, base)


def problems(text: str) -> list[str]:
    """The problems parse_config reports for `text`, as the `FILE:LINE: message` lines."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert all(isinstance(p, Problem) for p in info.value.problems)
    # the exception's own text is the same lines, so callers that print it lose nothing
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.ops.cli", "check-config", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def rule_with_transcode(transcode: str) -> str:
    """A one-rule config whose transcode (a flow mapping) is on line 6."""
    return f"""\
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules:
          - name: r
            send_to: [archive]
            transcode: {transcode}
        """


# --- valid configurations ----------------------------------------------------------------------


def test_problem_renders_as_file_colon_line_colon_message():
    problem = Problem("a/node.yaml", 12, "something is wrong")
    assert str(problem) == "a/node.yaml:12: something is wrong"


def test_contract_example_parses_into_typed_objects(tmp_path):
    config = parse_config(CONTRACT_EXAMPLE, SRC, tmp_path)

    assert config.source == SRC
    assert config.warnings == ()
    assert config.node == NodeSettings(
        ae_title="DICOM-NODE", host="0.0.0.0", port=11112, spool=tmp_path / "spool", workers=0
    )
    assert config.accept == AcceptPolicy(calling_aets=("*",), called_aets=("DICOM-NODE",))
    assert list(config.destinations) == ["archive", "pacs"]
    assert config.destinations["archive"] == FolderDestination(
        name="archive",
        path=tmp_path / "archive",
        layout="{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm",
    )
    assert config.destinations["pacs"] == DicomDestination(
        name="pacs", host="127.0.0.1", port=4242, ae_title="PACS",
        calling_ae_title="DICOM-NODE", timeout=30.0,
    )  # fmt: skip

    rules = config.rules
    assert [r.name for r in rules] == [
        "mammo-lossless", "color-ultrasound", "ct-from-scanner-1", "everything-else",
    ]  # fmt: skip
    assert [r.line for r in rules] == [20, 24, 28, 32]

    assert rules[0].match == (("Modality", ("MG",)),)
    assert rules[0].transcode == TranscodeSpec(Target(uid.JPEGLSLossless), ())
    assert rules[0].send_to == ("archive", "pacs")

    assert rules[1].match == (("Modality", ("US",)), ("PhotometricInterpretation", ("RGB",)))
    assert rules[1].transcode == TranscodeSpec(Target(uid.JPEG2000Lossless, mct=True), ())
    assert rules[1].send_to == ("pacs",)

    assert rules[2].match == (("Modality", ("CT", "PT")), ("CallingAET", ("CT1*",)))
    assert rules[2].transcode.target == Target(uid.JPEG2000, j2k_cr=(20.0, 5.0))
    assert rules[2].transcode.fallback == ()
    assert rules[2].transcode.target.is_lossy is True
    assert rules[2].send_to == ("pacs",)

    assert rules[3].match == ()
    assert rules[3].transcode == TranscodeSpec(Target(None), ())
    assert rules[3].send_to == ("archive",)


def test_relative_paths_are_resolved_against_the_config_files_directory(tmp_path, monkeypatch):
    folder = tmp_path / "etc" / "node"
    folder.mkdir(parents=True)
    path = folder / "node.yaml"
    path.write_text(CONTRACT_EXAMPLE)
    monkeypatch.chdir(tmp_path)  # somewhere else than the file's directory

    config = load_config(path)

    assert config.source == str(path)
    assert config.node.spool == folder / "spool"
    assert config.destinations["archive"].path == folder / "archive"


def test_absolute_paths_are_kept_as_written(tmp_path):
    config = parse(
        f"""\
        node: {{spool: {tmp_path / "spool"}}}
        destinations:
          archive: {{type: folder, path: {tmp_path / "out"}}}
        rules:
          - name: r
            send_to: [archive]
        """,
        base=Path("/somewhere/else"),
    )
    assert config.node.spool == tmp_path / "spool"
    assert config.destinations["archive"].path == tmp_path / "out"


def test_omitted_settings_take_their_documented_defaults():
    config = parse(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
          pacs: {type: dicom, host: pacs.example, port: 104, ae_title: PACS}
        rules:
          - name: r
            send_to: [archive]
        """
    )
    assert config.node == NodeSettings("DICOM-NODE", "0.0.0.0", 11112, Path("/srv/node/spool"), 0)
    assert config.accept.calling_aets == ("*",)
    assert config.destinations["archive"].layout == DEFAULT_LAYOUT
    assert config.destinations["pacs"].calling_ae_title == "DICOM-NODE"
    assert config.destinations["pacs"].timeout == 30.0
    assert config.rules[0].transcode == TranscodeSpec(Target(None), ())  # no transcode = keep


def test_dicom_destination_takes_the_nodes_ae_title_as_calling_ae_title():
    config = parse(
        """\
        node: {ae_title: ROUTER}
        destinations:
          pacs: {type: dicom, host: h, port: 104, ae_title: PACS}
          other:
            {type: dicom, host: h, port: 105, ae_title: OTHER, calling_ae_title: ME, timeout: 2.5}
        rules:
          - name: r
            send_to: [pacs, other]
        """
    )
    assert config.destinations["pacs"].calling_ae_title == "ROUTER"
    assert config.destinations["other"].calling_ae_title == "ME"
    assert config.destinations["other"].timeout == 2.5


def test_target_parameters_and_fallbacks_are_parsed():
    config = parse(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: near
            transcode: {syntax: JPEGLSNearLossless, jls_error: 2}
            send_to: [archive]
          - name: psnr
            match: {Modality: CR}
            transcode: {syntax: JPEG2000, j2k_psnr: [40, 50.5], mct: true}
            send_to: [archive]
          - name: by-uid
            match: {Modality: CT}
            transcode:
              syntax: 1.2.840.10008.1.2.4.80
              fallback:
                - JPEG2000Lossless
                - {syntax: JPEGLSNearLossless, jls_error: 1}
                - keep
            send_to: [archive]
          - name: single-fallback
            match: {Modality: MR}
            transcode: {syntax: JPEGLSLossless, fallback: RLELossless}
            send_to: [archive]
        """
    )
    near, psnr, by_uid, single = config.rules
    assert near.transcode == TranscodeSpec(Target(uid.JPEGLSNearLossless, jls_error=2), ())
    assert near.transcode.target.is_lossy is True
    assert psnr.transcode.target == Target(uid.JPEG2000, j2k_psnr=(40.0, 50.5), mct=True)
    assert by_uid.transcode.target == Target(uid.JPEGLSLossless)
    assert by_uid.transcode.fallback == (
        Target(uid.JPEG2000Lossless),
        Target(uid.JPEGLSNearLossless, jls_error=1),
        Target(None),
    )
    assert by_uid.transcode.fallback[1].is_lossy is True
    assert single.transcode.fallback == (Target(uid.RLELossless),)


def test_match_values_become_text_tuples():
    config = parse(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            match:
              Rows: 512
              SliceThickness: 2.0
              BurnedInAnnotation: NO
              ImageType: [ORIGINAL, "DERIV*"]
              CalledAET: ROUTER
            send_to: [archive]
        """
    )
    assert config.rules[0].match == (
        ("Rows", ("512",)),
        ("SliceThickness", ("2",)),
        ("BurnedInAnnotation", ("NO",)),  # YAML 1.1 reads NO as false; the rule means the text
        ("ImageType", ("ORIGINAL", "DERIV*")),
        ("CalledAET", ("ROUTER",)),
    )


def test_match_everything_rule_followed_by_other_rules_warns():
    config = parse(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: catch-all
            send_to: [archive]
          - name: ct
            match: {Modality: CT}
            send_to: [archive]
          - name: mr
            match: {Modality: MR}
            send_to: [archive]
        """
    )
    assert config.warnings == (
        "node.yaml:4: rule 'catch-all' matches everything; later rules never apply: ct, mr",
    )
    assert [r.name for r in config.rules] == ["catch-all", "ct", "mr"]  # a warning, not an error


def test_match_everything_rule_at_the_end_gives_no_warning():
    config = parse(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: ct
            match: {Modality: CT}
            send_to: [archive]
          - name: rest
            send_to: [archive]
        """
    )
    assert config.warnings == ()


def test_shipped_config_validates_and_summary_names_every_rule_and_destination():
    done = check_config("config/node.yaml")

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == "config/node.yaml: OK"
    assert "destinations:" in lines
    assert f"  archive: folder {REPO / 'config' / 'archive'} layout {DEFAULT_LAYOUT}" in lines
    first_rule = "  1. lossy-input-as-received: TransferSyntaxUID="
    assert any(line.startswith(first_rule) for line in lines)
    assert (
        "  2. lossless-archive: everything -> JPEGLSLossless then JPEG2000Lossless then "
        "RLELossless -> archive"
    ) in lines


def test_embedded_default_is_byte_identical_to_the_shipped_config():
    embedded = REPO / "node" / "config" / "default.yaml"
    assert embedded.read_bytes() == (REPO / "config" / "node.yaml").read_bytes()


def test_without_a_path_the_embedded_default_is_used_when_there_is_no_config_folder(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    shipped = load_config(REPO / "config" / "node.yaml")

    assert config.source == "<embedded default>"
    assert config.rules == shipped.rules
    # relative paths of the embedded default are relative to the current directory
    assert config.node.spool == tmp_path / "spool"
    assert config.destinations["archive"].path == tmp_path / "archive"


def test_without_a_path_config_node_yaml_in_the_current_directory_is_used(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "node.yaml").write_text(CONTRACT_EXAMPLE)
    monkeypatch.chdir(tmp_path)

    config = load_config(None)

    assert config.source == "config/node.yaml"
    assert [r.name for r in config.rules][0] == "mammo-lossless"
    assert config.node.spool == tmp_path / "config" / "spool"


def test_example_full_yaml_validates_and_summary_names_every_rule_and_destination():
    done = check_config("config/example-full.yaml")

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    assert out.startswith("config/example-full.yaml: OK\n")
    for name in ("mammo-lossless", "color-ultrasound", "ct-from-scanner-1", "everything-else"):
        assert f". {name}: " in out
    assert "  archive: folder " in out
    assert "  pacs: DICOM PACS@127.0.0.1:4242 (as DICOM-NODE)" in out


def test_example_full_yaml_is_the_contract_example_plus_fallbacks():
    path = REPO / "config" / "example-full.yaml"
    full = load_config(path)
    contract = parse_config(CONTRACT_EXAMPLE, "contract", path.parent)

    assert full.warnings == ()
    assert full.node == contract.node
    assert full.accept == contract.accept
    assert full.destinations == contract.destinations
    assert [r.name for r in full.rules] == [r.name for r in contract.rules]
    documented = [r for r in full.rules if r.transcode.fallback]
    assert documented, "example-full.yaml should show fallbacks"
    for mine, theirs in zip(full.rules, contract.rules, strict=True):
        assert mine.match == theirs.match
        assert mine.send_to == theirs.send_to
        assert mine.transcode.target == theirs.transcode.target
    assert all(not t.is_lossy for r in documented for t in r.transcode.fallback)


# --- YAML-level problems -----------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line_of_the_error():
    assert problems(
        """\
        node:
          port: 11112
          host: 0.0.0.0: 1   # <- 3
        rules: []
        """
    ) == ["node.yaml:3: YAML syntax error: mapping values are not allowed here"]


def test_tab_indentation_is_a_yaml_syntax_error_on_its_line():
    assert problems(
        "node:\n  port: 11112\n\thost: x\nrules: []\n"  # tab on line 3
    ) == ["node.yaml:3: YAML syntax error: found character '\\t' that cannot start any token"]


# PyYAML stops where it notices the mistake, often a line later; the report leads with the line
# where the unclosed bracket, quote or block opened, which is the one to fix.


def test_unclosed_brace_names_the_line_where_it_opened():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: mr
            match: {Modality: MR
            send_to: [archive]
        """
    ) == ["node.yaml:5: '{' opened here is not closed (found ':' at line 6 col 12)"]


def test_unclosed_brace_found_on_its_own_line_gives_both_columns():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: mr
            match: {Modality: MR]
            send_to: [archive]
        """
    ) == ["node.yaml:5: '{' opened here (col 12) is not closed (found ']' at line 5 col 25)"]


def test_unclosed_bracket_names_the_line_where_it_opened():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive
            transcode: keep
        """
    ) == ["node.yaml:5: '[' opened here is not closed (found ':' at line 6 col 14)"]


def test_bracket_still_open_at_the_end_of_the_file_names_where_it_opened():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive,
                      archive
        """
    ) == ["node.yaml:5: '[' opened here is not closed (the file ends at line 6)"]


@pytest.mark.parametrize(
    ("quote", "shown"), [('"', "'\"'"), ("'", '"\'"')], ids=["double", "single"]
)
def test_unclosed_quote_names_the_line_where_it_opened(quote, shown):
    assert problems(
        f"""\
        node:
          ae_title: {quote}DICOM-NODE
          port: 11112
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [f"node.yaml:2: {shown} opened here is not closed (the file ends at line 6)"]


def test_badly_indented_key_in_a_list_item_names_the_line_where_the_list_starts():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
           send_to: [archive]
        """
    ) == [
        "node.yaml:4: the list that starts here (col 3) is broken at line 5 col 4: found a new "
        "mapping where its next item or its end was expected; check the indentation of line 5"
    ]


def test_badly_indented_key_in_a_mapping_names_the_line_where_the_mapping_starts():
    assert problems(
        """\
        node:
          ae_title: DICOM-NODE
          port: 11112
         spool: ./spool
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:1: the mapping that starts here (col 1) is broken at line 4 col 2: found a new "
        "mapping where its next key or its end was expected; check the indentation of line 4"
    ]


def test_key_without_a_colon_names_its_own_line_not_the_next():
    assert problems(
        """\
        node:
          ae_title: DICOM-NODE
          port 11112
          spool: ./spool
        rules: []
        """
    ) == [
        "node.yaml:3: the key that starts here (col 3) is missing its ':' "
        "(the parser stopped at line 4 col 3)"
    ]


def test_control_character_is_a_yaml_syntax_error_on_its_line():
    assert problems("node:\n  ae_title: DICOM\x01NODE\nrules: []\n") == [
        "node.yaml:2: YAML syntax error: unacceptable character #x0001: "
        "special characters are not allowed"
    ]


def test_duplicate_key_names_the_line_of_the_second_occurrence():
    assert problems(
        """\
        node:
          port: 11112
          ae_title: A
          port: 104      # <- 4
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:4: duplicate key 'port' (the later one would silently win)"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text\n"])
def test_a_file_that_is_not_a_mapping_is_rejected(text):
    assert problems(text) == ["node.yaml:1: the file must be a mapping with node:, rules: ..."]


# --- unknown and missing keys ------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rule:            # <- 3
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:1: top level: missing required key 'rules'",
        "node.yaml:3: top level: unknown key 'rule' (did you mean 'rules'?); "
        "allowed: accept, destinations, http, limits, node, rules",
    ]


def test_unknown_key_without_a_close_match_gives_no_hint():
    assert problems(
        """\
        logging: debug   # <- 1
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:1: top level: unknown key 'logging'; "
        "allowed: accept, destinations, http, limits, node, rules"
    ]


def test_unknown_key_in_node_suggests_the_close_one():
    assert problems(
        """\
        node:
          ae_title: DICOM-NODE
          prot: 104      # <- 3
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:3: node: unknown key 'prot' (did you mean 'port'?); "
        "allowed: ae_title, host, log_patient_names, port, spool, spool_max_size, spool_min_free, "
        "tls, workers"
    ]


def test_unknown_key_in_accept_is_reported():
    assert problems(
        """\
        accept:
          calling_aet: ["*"]   # <- 2
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:2: accept: unknown key 'calling_aet' (did you mean 'calling_aets'?); "
        "allowed: called_aets, calling_aets, echo_any_aet, networks"
    ]


def test_unknown_key_in_a_folder_destination_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          archive:
            type: folder
            path: ./archive
            layuot: "{SOPInstanceUID}.dcm"   # <- 5
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:5: destinations.archive: unknown key 'layuot' (did you mean 'layout'?); "
        "allowed: layout, path, retry, type"
    ]


def test_unknown_key_in_a_dicom_destination_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          pacs:
            type: dicom
            host: 127.0.0.1
            port: 104
            ae_title: PACS
            calling_aet: ME     # <- 7
        rules:
          - name: r
            send_to: [pacs]
        """
    ) == [
        "node.yaml:7: destinations.pacs: unknown key 'calling_aet' "
        "(did you mean 'calling_ae_title'?); "
        "allowed: accept_syntaxes, ae_title, calling_ae_title, host, idle_timeout, "
        "max_per_association, port, retry, timeout, tls, type"
    ]


def test_missing_keys_of_a_dicom_destination_are_reported_at_the_destination():
    assert problems(
        """\
        destinations:
          pacs:
            type: dicom     # <- 3
            host: 127.0.0.1
        rules:
          - name: r
            send_to: [pacs]
        """
    ) == [
        "node.yaml:3: destinations.pacs: missing required key 'ae_title'",
        "node.yaml:3: destinations.pacs: missing required key 'port'",
    ]


def test_unknown_key_in_a_rule_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            macth: {Modality: CT}   # <- 5
            send_to: [archive]
        """
    ) == [
        "node.yaml:5: rules[0]: unknown key 'macth' (did you mean 'match'?); "
        "allowed: match, name, send_to, transcode"
    ]


def test_unknown_key_in_transcode_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            transcode:
              syntax: JPEG2000
              j2k_ratio: [10]      # <- 7
            send_to: [archive]
        """
    ) == ["node.yaml:7: rule 'r'.transcode: unknown key 'j2k_ratio' (did you mean 'j2k_cr'?)"]


def test_misspelled_fallback_key_suggests_fallback():
    assert problems(rule_with_transcode("{syntax: JPEGLSLossless, falback: [RLELossless]}")) == [
        "node.yaml:6: rule 'r'.transcode: unknown key 'falback' (did you mean 'fallback'?)"
    ]


def test_missing_rules_is_reported():
    assert problems(
        """\
        node:            # <- 1 (the top-level mapping starts here)
          port: 11112
        destinations:
          archive: {type: folder, path: ./archive}
        """
    ) == ["node.yaml:1: top level: missing required key 'rules'"]


@pytest.mark.parametrize("value", ["[]", "", "archive"])
def test_rules_must_be_a_non_empty_list(value):
    assert problems(
        f"""\
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules: {value}   # <- 3
        """
    ) == ["node.yaml:3: rules: expected a non-empty list of rules"]


def test_rule_without_send_to_is_reported_at_the_rule():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: ct
            match: {Modality: CT}
            send_to: [archive]
          - name: forgotten      # <- 7
            match: {Modality: MR}
        """
    ) == ["node.yaml:7: rules[1]: missing required key 'send_to'"]


def test_rule_with_an_empty_send_to_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: []    # <- 5
        """
    ) == ["node.yaml:5: rule 'r'.send_to: name at least one destination"]


def test_rule_sending_to_undefined_destination_names_its_line():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
          pacs: {type: dicom, host: h, port: 104, ae_title: PACS}
        rules:
          - name: r
            send_to:
              - archive
              - pcas       # <- 8
              - pacs
        """
    ) == ["node.yaml:8: rule 'r'.send_to: undefined destination 'pcas' (known: archive, pacs)"]


def test_rule_sending_to_a_single_undefined_destination_without_a_list():
    assert problems(
        """\
        rules:
          - name: r
            send_to: archive    # <- 3
        """
    ) == ["node.yaml:3: rule 'r'.send_to: undefined destination 'archive' (known: none defined)"]


def test_rule_that_is_not_a_mapping_is_reported_at_its_item():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
          - archive      # <- 6
        """
    ) == ["node.yaml:6: rules[1]: expected a mapping (key: value), got str 'archive'"]


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
        ("JPEGBaseline8Bit", "JPEGBaseline8Bit (1.2.840.10008.1.2.4.50)"),
        ("1.2.840.10008.1.2.4.50", "JPEGBaseline8Bit (1.2.840.10008.1.2.4.50)"),
        ("JPEGLosslessSV1", "JPEGLosslessSV1 (1.2.840.10008.1.2.4.70)"),
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
        "node.yaml:9: rule 'r'.transcode.fallback[1]: the node cannot encode JPEGBaseline8Bit "
        f"(1.2.840.10008.1.2.4.50); {SUPPORTED}",
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


# --- node and destinations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "port, shown", [("70000", "int 70000"), ("-1", "int -1"), ("http", "str 'http'")]
)
def test_node_port_out_of_range_is_reported(port, shown):
    assert problems(
        f"""\
        node:
          port: {port}    # <- 2
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [f"node.yaml:2: node.port: expected a whole number from 0 to 65535, got {shown}"]


def test_destination_port_out_of_range_is_reported():
    assert problems(
        """\
        destinations:
          pacs:
            type: dicom
            host: h
            port: 0           # <- 5
            ae_title: PACS
        rules:
          - name: r
            send_to: [pacs]
        """
    ) == ["node.yaml:5: destinations.pacs.port: expected a whole number from 1 to 65535, got int 0"]


def test_workers_out_of_range_is_reported():
    assert problems(
        """\
        node: {workers: 1000}   # <- 1
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:1: node.workers: expected a whole number from 0 to 256, got int 1000"]


@pytest.mark.parametrize(
    "title, shown",
    [
        ("THIS-TITLE-IS-TOO-LONG", "THIS-TITLE-IS-TOO-LONG"),
        ("'A\\B'", "A\\B"),
        ("''", ""),
        ("'   '", "   "),
        ("NÖDE", "NÖDE"),
    ],
)
def test_bad_node_ae_title_is_reported(title, shown):
    assert problems(
        f"""\
        node:
          ae_title: {title}    # <- 2
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        f"node.yaml:2: node.ae_title: '{shown}' is not a valid AE title "
        "(1-16 ASCII characters, no '\\')"
    ]


def test_sixteen_character_ae_title_is_accepted():
    config = parse(
        """\
        node: {ae_title: SIXTEEN-CHARS-OK}
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    )
    assert config.node.ae_title == "SIXTEEN-CHARS-OK"


def test_bad_destination_ae_titles_are_reported_on_their_lines():
    assert problems(
        """\
        destinations:
          pacs:
            type: dicom
            host: h
            port: 104
            ae_title: A-PACS-WITH-A-LONG-NAME       # <- 6
            calling_ae_title: ""                    # <- 7
        rules:
          - name: r
            send_to: [pacs]
        """
    ) == [
        "node.yaml:6: destinations.pacs.ae_title: 'A-PACS-WITH-A-LONG-NAME' is not a valid AE "
        "title (1-16 ASCII characters, no '\\')",
        "node.yaml:7: destinations.pacs.calling_ae_title: '' is not a valid AE title "
        "(1-16 ASCII characters, no '\\')",
    ]


def test_bad_node_ae_title_is_reported_once_not_again_for_each_dicom_destination():
    # the destinations inherit it as their calling AE title; the mistake is on line 2 only
    assert problems(
        """\
        node:
          ae_title: THIS-TITLE-IS-TOO-LONG     # <- 2
        destinations:
          pacs: {type: dicom, host: h, port: 104, ae_title: PACS}
          mirror: {type: dicom, host: h, port: 105, ae_title: MIRROR}
        rules:
          - name: r
            send_to: [pacs, mirror]
        """
    ) == [
        "node.yaml:2: node.ae_title: 'THIS-TITLE-IS-TOO-LONG' is not a valid AE title "
        "(1-16 ASCII characters, no '\\')"
    ]


@pytest.mark.parametrize(
    "timeout, ok", [("0", False), ("-5", False), ("soon", False), ("0.5", True)]
)
def test_destination_timeout_must_be_positive_seconds(timeout, ok):
    text = f"""\
        destinations:
          pacs:
            type: dicom
            host: h
            port: 104
            ae_title: PACS
            timeout: {timeout}     # <- 7
        rules:
          - name: r
            send_to: [pacs]
        """
    if ok:
        assert parse(text).destinations["pacs"].timeout == float(timeout)
    else:
        assert problems(text) == ["node.yaml:7: destinations.pacs.timeout: expected seconds > 0"]


@pytest.mark.parametrize(
    "kind, shown", [("smb", "str 'smb'"), ("Folder", "str 'Folder'"), (None, "nothing")]
)
def test_unknown_destination_type_is_reported(kind, shown):
    type_line = f"type: {kind}" if kind else "kind: folder"
    assert problems(
        f"""\
        destinations:
          archive: {{type: folder, path: ./archive}}
          nas:
            {type_line}     # <- 4 (the type, or where the destination starts)
            path: /mnt/nas
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [f"node.yaml:4: destinations.nas.type: expected 'folder' or 'dicom', got {shown}"]


def test_destination_that_is_not_a_mapping_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
          nas: /mnt/nas       # <- 3
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:3: destinations.nas: expected a mapping (key: value), got str '/mnt/nas'"]


@pytest.mark.parametrize(
    "layout, message",
    [
        ("/data/{SOPInstanceUID}.dcm",
         "the layout must be a relative path without '.' or '..' components"),
        ("../{SOPInstanceUID}.dcm",
         "the layout must be a relative path without '.' or '..' components"),
        ("{StudyInstanceUID}/../../{SOPInstanceUID}.dcm",
         "the layout must be a relative path without '.' or '..' components"),
        ("{StudyUID}/{SOPInstanceUID}.dcm", "'{StudyUID}' is not a DICOM keyword"),
        ("{InstanceNumber:05d}.dcm",
         "'{InstanceNumber}': format specs and conversions are not supported"),
        ("{SOPInstanceUID!r}.dcm",
         "'{SOPInstanceUID}': format specs and conversions are not supported"),
        ("{StudyInstanceUID}/", "the layout must end with a file name"),
        ("{SOPInstanceUID.dcm",
         "bad template '{SOPInstanceUID.dcm': expected '}' before end of string"),
    ],
)  # fmt: skip
def test_folder_layout_errors_are_reported_on_the_layout_line(layout, message):
    assert problems(
        f"""\
        destinations:
          archive:
            type: folder
            path: ./archive
            layout: "{layout}"      # <- 5
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [f"node.yaml:5: destinations.archive.layout: {message}"]


def test_folder_layout_with_an_empty_placeholder_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive, layout: "{}.dcm"}    # <- 2
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:2: destinations.archive.layout: '{}' is not a DICOM keyword"]


def test_folder_layout_with_backslashes_is_reported():
    assert problems(
        """\
        destinations:
          archive:
            type: folder
            path: ./archive
            layout: '{StudyInstanceUID}\\{SOPInstanceUID}.dcm'     # <- 5
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:5: destinations.archive.layout: use '/' to separate folders"]


def test_folder_destination_without_path_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder}    # <- 2
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:2: destinations.archive: missing required key 'path'"]


def test_calling_aets_must_be_patterns():
    assert problems(
        """\
        accept:
          calling_aets: {CT1: yes}     # <- 2
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:2: accept.calling_aets: expected a list of patterns"]


def test_a_single_calling_aet_pattern_is_a_one_item_list():
    config = parse(
        """\
        accept: {calling_aets: "CT*"}
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    )
    assert config.accept == AcceptPolicy(calling_aets=("CT*",), called_aets=("DICOM-NODE",))


# --- match ---------------------------------------------------------------------------------------


def test_match_on_a_misspelled_keyword_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: ct
            match:
              Modalty: CT      # <- 6
            send_to: [archive]
        """
    ) == [
        "node.yaml:6: rule 'ct'.match: 'Modalty' is not a DICOM keyword "
        "(nor CallingAET / CalledAET)"
    ]


def test_match_on_a_sequence_keyword_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            match:
              Modality: CT
              ReferencedImageSequence: "*"    # <- 7
            send_to: [archive]
        """
    ) == [
        "node.yaml:7: rule 'r'.match: 'ReferencedImageSequence' is a sequence; "
        "rules match on plain attributes only"
    ]


@pytest.mark.parametrize("value", ["{a: b}", "[]", "", "[CT, [MR]]", "[CT, null]"])
def test_match_value_must_be_a_value_or_a_list_of_values(value):
    assert problems(
        f"""\
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules:
          - name: r
            match:
              Modality: {value}      # <- 6
            send_to: [archive]
        """
    ) == ["node.yaml:6: rule 'r'.match.Modality: expected a value or a list of values"]


def test_match_that_is_not_a_mapping_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            match: [Modality, CT]      # <- 5
            send_to: [archive]
        """
    ) == ["node.yaml:5: rule 'r'.match: expected a mapping (key: value), got a list"]


# --- rules as a whole --------------------------------------------------------------------------


def test_duplicate_rule_names_point_to_the_first_use():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: ct           # first at 4
            match: {Modality: CT}
            send_to: [archive]
          - name: ct           # <- 7
            match: {Modality: PT}
            send_to: [archive]
          - name: ct           # <- 10
            send_to: [archive]
        """
    ) == [
        "node.yaml:7: rule name 'ct' is used twice (first at line 4)",
        "node.yaml:10: rule name 'ct' is used twice (first at line 4)",
    ]


SEVERAL_PROBLEMS = """\
node:
  port: 99999                         # 2
  workers: 2
destinations:
  archive:
    type: folder
    path: ./archive
    layout: "{PatientName}/{Bogus}"   # 8
  pacs:
    type: dicom
    host: pacs
    port: 104
    ae_title: PACS
    colour: blue                      # 14
rules:
  - name: ct
    match: {Modalty: CT}              # 17
    transcode: {syntax: JPEG2000}     # 18
    send_to: [archive, nowhere]       # 19
  - name: ct                          # 20
    send_to: [pacs]
"""
SEVERAL_PROBLEMS_EXPECTED = [
    "2: node.port: expected a whole number from 0 to 65535, got int 99999",
    "8: destinations.archive.layout: '{Bogus}' is not a DICOM keyword",
    "14: destinations.pacs: unknown key 'colour'; "
    "allowed: accept_syntaxes, ae_title, calling_ae_title, host, idle_timeout, "
    "max_per_association, port, retry, timeout, tls, type",
    "17: rule 'ct'.match: 'Modalty' is not a DICOM keyword (nor CallingAET / CalledAET)",
    "18: rule 'ct'.transcode: JPEG2000 needs exactly one of j2k_cr or j2k_psnr",
    "19: rule 'ct'.send_to: undefined destination 'nowhere' (known: archive, pacs)",
    # reported although the first 'ct' has a bad transcode
    "20: rule name 'ct' is used twice (first at line 16)",
]


def test_several_problems_are_all_reported_sorted_by_line():
    found = problems(SEVERAL_PROBLEMS)
    assert found == [f"node.yaml:{p}" for p in SEVERAL_PROBLEMS_EXPECTED]


def test_problems_found_in_a_later_section_are_sorted_among_earlier_ones():
    # the duplicate key (found by the YAML loader) and the rule problem come before node's
    assert problems(
        """\
        rules:
          - name: r
            send_to: [archive]     # <- 3
        node:
          port: 1
          port: 70000              # <- 6
        """
    ) == [
        "node.yaml:3: rule 'r'.send_to: undefined destination 'archive' (known: none defined)",
        "node.yaml:6: duplicate key 'port' (the later one would silently win)",
        "node.yaml:6: node.port: expected a whole number from 0 to 65535, got int 70000",
    ]


# --- load_config and check-config --------------------------------------------------------------


def test_load_config_reports_problems_with_the_files_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("node:\n  prot: 1\nrules: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:2: node: unknown key 'prot' (did you mean 'port'?); "
        "allowed: ae_title, host, log_patient_names, port, spool, spool_max_size, spool_min_free, "
        "tls, workers",
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


def test_config_objects_are_immutable(tmp_path):
    config = parse_config(CONTRACT_EXAMPLE, SRC, tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rules[0].name = "other"  # type: ignore[misc]
    assert isinstance(config.rules, tuple)
    assert isinstance(config.rules[0].send_to, tuple)


# --- delivery settings -------------------------------------------------------------------------


def test_delivery_settings_parse_durations_sizes_and_syntaxes():
    config = parse(
        """\
        node: {spool_max_size: 20GiB, spool_min_free: 500 MB}
        destinations:
          pacs:
            type: dicom
            host: 10.0.0.5
            port: 104
            ae_title: PACS
            accept_syntaxes: [JPEGLSLossless, 1.2.840.10008.1.2.1]
            idle_timeout: 30s
            max_per_association: 500
            retry: {initial_delay: 1.5, max_delay: 10m, give_up_after: 2d, max_failures: 3}
        rules:
          - {name: r, send_to: [pacs]}
        """
    )
    assert (config.node.spool_max_size, config.node.spool_min_free) == (20 << 30, 500_000_000)
    pacs = config.destinations["pacs"]
    assert pacs.accept_syntaxes == (uid.JPEGLSLossless, uid.ExplicitVRLittleEndian)
    assert (pacs.idle_timeout, pacs.max_per_association) == (30.0, 500)
    assert pacs.retry == RetryPolicy(1.5, 600.0, 2 * 86400.0, 3)


def test_bad_delivery_settings_name_their_lines():
    assert problems(
        """\
        node: {spool_min_free: lots}      # <- 1
        destinations:
          pacs:
            type: dicom
            host: h
            port: 104
            ae_title: PACS
            accept_syntaxes: [JPEGLS]     # <- 8
            retry:
              initial_delay: 10m
              max_delay: 1m               # 9: initial above max
              give_up_after: soon         # <- 12
        rules:
          - {name: r, send_to: [pacs]}
        """
    ) == [
        "node.yaml:1: node.spool_min_free: expected a size (bytes, or e.g. 500MB, 20GiB), "
        "got 'lots'",
        "node.yaml:8: destinations.pacs.accept_syntaxes: unknown transfer syntax 'JPEGLS'",
        "node.yaml:10: destinations.pacs.retry: initial_delay is longer than max_delay",
        "node.yaml:12: destinations.pacs.retry.give_up_after: expected a duration (seconds, "
        "or e.g. 30s, 5m, 2h, 7d), got 'soon'",
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


def test_log_patient_names_must_be_a_boolean():
    assert problems("node: {log_patient_names: sometimes}\nrules: []\n") == [
        "node.yaml:1: node.log_patient_names: expected true or false, got str 'sometimes'",
        "node.yaml:2: rules: expected a non-empty list of rules",
    ]


def test_accept_networks_and_called_aets_parse_and_report_bad_entries_by_line():
    config = parse(
        "node: {ae_title: ARCHIVE}\n"
        "accept:\n"
        "  networks: [10.1.2.0/24, 192.168.1.5, 'fd00::/8']\n"
        "destinations: {a: {type: folder, path: ./a}}\n"
        "rules:\n"
        "  - {name: r, match: {CalledAET: [ROUTE*]}, send_to: [a]}\n"
    )
    assert config.accept.called_aets == ("ARCHIVE", "ROUTE*")  # its own, and what rules route on
    assert config.accept.allows_address("10.1.2.77")
    assert config.accept.allows_address("::ffff:192.168.1.5")  # IPv4 through a dual-stack socket
    assert not config.accept.allows_address("10.1.3.1")
    assert not config.accept.allows_address("not an address")
    assert problems(
        "accept:\n  networks:\n    - 10.0.0.0/8\n    - 10.0.0.300/32\n"
        "  called_aets: 5\nrules: []\n"
    ) == [
        "node.yaml:4: accept.networks: '10.0.0.300/32' is not an address or network "
        "(e.g. 10.1.2.0/24, 192.168.1.5, fd00::/8)",
        "node.yaml:5: accept.called_aets: expected a list of patterns",
        "node.yaml:6: rules: expected a non-empty list of rules",
    ]


def test_limits_parse_and_their_problems_have_lines():
    config = parse(
        "limits: {max_associations: 4, association_timeout: 5s, max_pdu_size: 64KiB,"
        " max_instance_size: 2GB}\n"
        "destinations: {a: {type: folder, path: ./a}}\nrules: [{name: r, send_to: [a]}]\n"
    )
    limits = config.limits
    assert (limits.max_associations, limits.association_timeout, limits.max_pdu_size) == (
        4, 5.0, 65536
    )  # fmt: skip
    assert limits.max_instance_size == 2 * 10**9 and limits.dimse_timeout == 60.0
    assert problems(
        "limits:\n  max_associations: 0\n  idle_timeout: 0\n  max_pdu: 1\nrules: []\n"
    ) == [
        "node.yaml:2: limits.max_associations: expected a whole number from 1 to 1000, got int 0",
        "node.yaml:3: limits.idle_timeout: must be above 0",
        "node.yaml:4: limits: unknown key 'max_pdu' (did you mean 'max_pdu_size'?); allowed: "
        "association_timeout, dimse_timeout, idle_timeout, max_associations, max_connections, "
        "max_connections_per_address, max_instance_size, max_pdu_size",
        "node.yaml:5: rules: expected a non-empty list of rules",
    ]


def test_tls_settings_are_checked_with_lines():
    assert problems(
        "node:\n  tls:\n    cert: /nonexistent/server.pem\n    require_client_cert: true\n"
        "rules: []\n"
    ) == [
        "node.yaml:3: node.tls: missing required key 'key'",
        "node.yaml:3: node.tls.cert: no such file: /nonexistent/server.pem",
        "node.yaml:3: node.tls: 'cert' and 'key' go together",
        "node.yaml:4: node.tls.require_client_cert: needs 'ca' to verify client certificates",
        "node.yaml:5: rules: expected a non-empty list of rules",
    ]
