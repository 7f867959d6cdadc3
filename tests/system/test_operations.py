"""What the person on call does to a running node: edit the config (reload on SIGHUP or when
the file changes), and stop it (SIGTERM) while a modality is sending."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless
from pynetdicom import AE

from tests.conftest import REPO, data_file, echo, free_port, require, storescu, wait_for
from tests.ops.test_observe import get, metric
from tests.system.test_crash import make_series

pytestmark = pytest.mark.integration

CONFIG = """\
node: {{host: 127.0.0.1, port: {port}, ae_title: {aet}, spool: ./spool, workers: {workers}}}
http: {{host: 127.0.0.1, port: {http}}}
destinations:
  archive: {{type: folder, path: ./archive, layout: "{{SOPInstanceUID}}.dcm"}}
rules:
  - {{name: {rule}, transcode: {{syntax: {syntax}}}, send_to: [archive]}}
"""


def config(port, http, syntax="keep", rule="first", aet="DICOM-NODE", workers=0) -> str:
    return CONFIG.format(port=port, http=http, syntax=syntax, rule=rule, aet=aet, workers=workers)


def syntax_of(path: Path) -> str:
    return dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


def reloads(http: int, result: str) -> float:
    return metric(get(http, "/metrics")[1], "dicom_node_config_reloads_total", result=result)


@pytest.fixture
def running(node_factory):
    http = free_port()
    port = free_port()
    node = node_factory(config(port, http), port=port)
    wait_for(lambda: node.assert_alive() or get(http, "/healthz")[0] == 200, 30, "/healthz")
    return node, http


def test_sighup_with_a_valid_change_applies_to_the_next_instance(running):
    node, http = running
    storescu(node.port, [data_file("CT_small.dcm")])
    (first,) = node.wait_archived(1)
    assert syntax_of(first) != JPEGLSLossless  # kept as received
    node.process.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads(http, "unchanged") == 1, 30, "SIGHUP to re-read the file")
    assert "reload (SIGHUP): configuration unchanged" in node.log_text()

    # The file watcher may see the change before the signal arrives; either applies it once.
    node.config.write_text(config(node.port, http, "JPEGLSLossless", "second"))
    node.process.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads(http, "applied") == 1, 30, "the reload")
    storescu(node.port, [data_file("MR_small.dcm")])
    files = node.wait_archived(2)
    (second,) = [f for f in files if f != first]
    assert syntax_of(second) == JPEGLSLossless
    assert "rule=second" in node.log_text()


def test_an_edited_file_is_reloaded_without_a_signal(running):
    node, http = running
    node.config.write_text(config(node.port, http, "RLELossless"))
    wait_for(lambda: reloads(http, "applied") == 1, 30, "the reload")
    assert "reloaded (the file changed)" in node.log_text()
    storescu(node.port, [data_file("CT_small.dcm")])
    assert syntax_of(node.wait_archived(1)[0]) == "1.2.840.10008.1.2.5"


def test_a_broken_file_keeps_the_old_rules_and_says_where(running):
    node, http = running
    node.config.write_text(config(node.port, http, "JPEGLSLosless"))  # a typo
    node.process.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads(http, "failed") >= 1, 30, "the refused reload")
    text = get(http, "/metrics")[1]
    assert metric(text, "dicom_node_config_last_reload_ok") == 0
    log = node.log_text()
    assert f"refused: {node.config}:6: rule 'first'.transcode: unknown transfer syntax" in log
    assert "still running the previous configuration" in log

    storescu(node.port, [data_file("CT_small.dcm")])  # still served, under the old rule
    (out,) = node.wait_archived(1)
    assert syntax_of(out) == dcmread(data_file("CT_small.dcm")).file_meta.TransferSyntaxUID
    assert get(http, "/healthz")[0] == 200


def test_spooled_work_finishes_under_the_rules_it_arrived_with(node_factory, tmp_path):
    """40 MR slices into JPEG 2000 on one worker take seconds to process; the rule changes to
    JPEG-LS right after the acks. The 40 stay JPEG 2000, the next instance is JPEG-LS."""
    make_series(tmp_path / "series", 40)
    http, port = free_port(), free_port()
    node = node_factory(config(port, http, "JPEG2000Lossless", workers=1), port=port)
    storescu(node.port, sorted((tmp_path / "series").glob("*.dcm")))
    node.config.write_text(config(port, http, "JPEGLSLossless", "second", workers=1))
    node.process.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads(http, "applied") == 1, 30, "the reload")
    assert len(node.archived()) < 40, "the test needs a backlog at the time of the reload"
    storescu(node.port, [data_file("CT_small.dcm")])
    files = node.wait_archived(41, timeout=180)
    syntaxes = {f.name: syntax_of(f) for f in files}
    ct = dcmread(data_file("CT_small.dcm")).SOPInstanceUID + ".dcm"
    assert syntaxes.pop(ct) == JPEGLSLossless
    assert set(syntaxes.values()) == {JPEG2000Lossless}


def test_a_new_port_and_ae_title_restart_the_listener_and_keep_queued_work(running):
    node, http = running
    new_port = free_port()
    node.config.write_text(config(new_port, http, aet="NEW-AET"))
    node.process.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads(http, "applied") == 1, 60, "the reload")
    assert echo(new_port, called="NEW-AET")
    assert not echo(node.port)  # the old listener is closed
    storescu(new_port, [data_file("CT_small.dcm")], called="NEW-AET")
    node.wait_archived(1)
    assert "restarting the DICOM listener" in node.log_text()


def test_sigterm_during_a_transfer_exits_0_and_loses_nothing(node_factory, tmp_path):
    require("storescu")
    pixels = make_series(tmp_path / "series", 30)
    http, port = free_port(), free_port()
    node = node_factory(config(port, http, "JPEG2000Lossless", workers=1), port=port)
    sender = subprocess.Popen(
        ["storescu", "-R", "-xe", "-aec", "DICOM-NODE", "127.0.0.1", str(port),
         *map(str, sorted((tmp_path / "series").glob("*.dcm")))],
        env={**os.environ, "TCP_NODELAY": "1"}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    incoming = node.spool / "incoming"
    wait_for(lambda: len(list(incoming.glob("*.dcm"))) >= 3, 60, "the transfer to be under way")
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=90) == 0, node.log_text()[-3000:]
    _, errors = sender.communicate(timeout=60)
    acked = 30 if sender.returncode == 0 and "Store Failed" not in errors else None
    assert acked == 30, f"the running association should finish: {errors[-2000:]}"
    log = node.log_text()
    assert "stopping: no new associations" in log and "stopped;" in log

    restarted = node_factory(config(port, http, "JPEG2000Lossless"), port=port)
    files = restarted.wait_archived(30, timeout=180)
    assert {dcmread(f).SOPInstanceUID for f in files} == set(pixels)


@pytest.mark.parametrize("allowed", [False, True])
def test_json_logs_have_one_object_per_instance_and_no_patient_names_unless_allowed(
    node_factory, tmp_path, allowed
):
    source = dcmread(data_file("CT_small.dcm"))
    source.PatientName, source.PatientID = "Doe^Jane", "PID-4711"
    source.save_as(tmp_path / "ct.dcm")
    port = free_port()
    text = config(port, free_port(), "JPEGLSLossless").replace(
        "workers: 0}", f"workers: 0, log_patient_names: {str(allowed).lower()}}}"
    )
    node = node_factory(text, port=port, args=("--log-format", "json"))
    storescu(node.port, [tmp_path / "ct.dcm"], calling="CT1")
    node.wait_archived(1)
    node.stop()
    records = [json.loads(line) for line in node.log_text().splitlines() if line.strip()]
    (instance,) = [r for r in records if r.get("event") == "instance"]
    assert instance["calling_aet"] == "CT1" and instance["rule"] == "first"
    assert instance["syntax_out"] == JPEGLSLossless and instance["destinations"] == ["archive"]
    assert instance["bytes_in"] > instance["bytes_out"] > 0 and instance["ratio"] > 1
    assert instance["sop_class"] == source.SOPClassUID and instance["ms"] >= 0
    assert ("Doe^Jane" in node.log_text()) is allowed
    assert ("PID-4711" in node.log_text()) is allowed


# --- draining: out of a balancer's rotation, still serving ------------------------------------


def test_drain_and_undo_by_command_and_by_config(running):
    node, http = running
    assert metric(get(http, "/metrics")[1], "dicom_node_info", node=socket.gethostname()) == 1
    drain = [sys.executable, "-m", "node.ops.cli", "drain", "-c", str(node.config)]
    done = subprocess.run(drain, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert get(http, "/healthz") == (503, "draining\n")  # at once
    storescu(node.port, [data_file("CT_small.dcm")])  # a sender that comes directly is served
    node.wait_archived(1)
    wait_for(lambda: metric(get(http, "/metrics")[1], "dicom_node_draining") == 1, 30, "gauge")
    done = subprocess.run([*drain, "--undo"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode == 0 and get(http, "/healthz")[0] == 200

    node.config.write_text(node.config.read_text().replace("workers: 0}", "workers: 0, "
                                                           "draining: true}"))  # fmt: skip
    node.process.send_signal(signal.SIGHUP)
    wait_for(lambda: get(http, "/healthz") == (503, "draining\n"), 30, "draining by config")
    assert "draining: /healthz answers 503 draining" in node.log_text()


def test_drain_finds_no_node_when_none_runs(tmp_path):
    (tmp_path / "node.yaml").write_text(
        "node: {spool: ./spool}\ndestinations: {a: {type: folder, path: ./a}}\n"
        "rules: [{name: r, send_to: [a]}]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "node.ops.cli", "drain", "-c", str(tmp_path / "node.yaml")],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 1 and "no running node found" in done.stderr


def test_sigterm_drains_at_once_and_serves_the_open_association(running):
    node, http = running
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM-NODE")
    assert assoc.is_established
    try:
        node.process.send_signal(signal.SIGTERM)
        wait_for(lambda: get(http, "/healthz") == (503, "draining\n"), 10, "draining")
        assert assoc.send_c_store(data_file("CT_small.dcm")).Status == 0  # still served
    finally:
        assoc.release()
    assert node.process.wait(timeout=60) == 0
    assert len(node.archived()) == 1
