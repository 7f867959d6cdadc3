"""Valid configurations: what parse_config and load_config make of them, defaults, warnings."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
from pydicom import uid

from node.config import (
    DEFAULT_LAYOUT,
    AcceptPolicy,
    DicomDestination,
    FolderDestination,
    NodeSettings,
    Problem,
    load_config,
    parse_config,
)
from node.config.targets import Target, TranscodeSpec
from tests.config.helpers import CONTRACT_EXAMPLE, SRC, parse

# --- valid configurations ----------------------------------------------------------------------


def test_problem_renders_as_file_colon_line_colon_message():
    problem = Problem("a/node.yaml", 12, "something is wrong")
    assert str(problem) == "a/node.yaml:12: something is wrong"


def test_contract_example_parses_into_typed_objects(tmp_path):
    config = parse_config(CONTRACT_EXAMPLE, SRC, tmp_path)

    assert config.source == SRC
    assert config.warnings == ()
    assert config.node == NodeSettings(
        ae_title="DICOM-NODE", host="0.0.0.0", port=11112, spool=tmp_path / "spool", workers=0,
        name=socket.gethostname(),
    )  # fmt: skip
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
    assert config.node == NodeSettings("DICOM-NODE", "0.0.0.0", 11112, Path("/srv/node/spool"), 0,
                                       name=socket.gethostname())  # the host name  # fmt: skip
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


def test_config_objects_are_immutable(tmp_path):
    config = parse_config(CONTRACT_EXAMPLE, SRC, tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rules[0].name = "other"  # type: ignore[misc]
    assert isinstance(config.rules, tuple)
    assert isinstance(config.rules[0].send_to, tuple)
