"""The shipped configuration, the embedded default and config/example-full.yaml."""

from __future__ import annotations

from node.config import DEFAULT_LAYOUT, load_config, parse_config
from tests.config.helpers import CONTRACT_EXAMPLE, REPO, check_config

# --- shipped config, embedded default and examples ---------------------------------------------


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
