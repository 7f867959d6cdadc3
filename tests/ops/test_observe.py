"""/metrics and /healthz of a running node."""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import data_file, echo, free_port, storescu, wait_for

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:  # not listening yet (the HTTP server starts just after the DICOM one)
        return 0, ""


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format, 0 when absent."""
    for line in text.splitlines():
        match = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


@pytest.fixture
def observed_node(node_factory):
    http_port = free_port()
    node = node_factory(
        "node: {host: 127.0.0.1, port: {port}, spool: ./spool}\n"
        f"http: {{host: 127.0.0.1, port: {http_port}}}\n"
        'accept: {calling_aets: ["CT*"], echo_any_aet: false}\n'
        "destinations: {archive: {type: folder, path: ./archive}}\n"
        "rules: [{name: ct, transcode: {syntax: JPEGLSLossless}, send_to: [archive]}]\n"
    )
    wait_for(lambda: get(http_port, "/healthz")[0] == 200, 30, "/healthz")
    return node, http_port


def test_metrics_counters_move_as_instances_flow(observed_node):
    node, http = observed_node
    storescu(node.port, [data_file("CT_small.dcm"), data_file("MR_small.dcm")], calling="CT1")
    assert not echo(node.port, calling="WORKSTATION")
    node.wait_archived(2)

    def settled():
        text = get(http, "/metrics")[1]
        return text if metric(text, "dicom_node_instances_forwarded_total") == 2 else None

    text = wait_for(settled, 30, "2 forwarded in /metrics")
    assert metric(text, "dicom_node_instances_received_total", calling_aet="CT1") == 2
    assert metric(text, "dicom_node_instances_processed_total", rule="ct",
                  outcome="recompressed") == 2  # fmt: skip
    assert metric(text, "dicom_node_instances_forwarded_total", destination="archive") == 2
    assert metric(text, "dicom_node_associations_rejected_total", reason="calling-aet") == 1
    assert metric(text, "dicom_node_bytes_received_total") > 40_000  # CT_small + MR_small
    rule_in = metric(text, "dicom_node_rule_bytes_in_total", rule="ct")
    assert 1.2 < rule_in / metric(text, "dicom_node_bytes_out_total", rule="ct") < 5
    assert metric(text, "dicom_node_codec_seconds_count", rule="ct") == 2
    assert "dicom_node_queue_pending" in text
    assert metric(text, "dicom_node_queue_pending", destination="archive") == 0


def test_healthz_turns_503_when_the_spool_cannot_be_written(observed_node):
    node, http = observed_node
    assert get(http, "/healthz") == (200, "ok\n")
    tmp = node.spool / "tmp"
    shutil.rmtree(tmp)
    tmp.write_text("a file where the spool's tmp folder should be")
    code, body = get(http, "/healthz")
    assert code == 503 and "spool not writable" in body
    tmp.unlink()
    tmp.mkdir()
    assert get(http, "/healthz") == (200, "ok\n")


def test_cpu_time_by_stage_puts_each_thread_in_its_stage():
    """dicom_node_cpu_seconds{stage}: a thread named as the node names its threads is counted
    in its stage; what ended is counted too (the process's total less the live threads)."""
    from node.ops.stage_cpu import ENDED, WORKERS, stage_of, stage_seconds

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    done = threading.Event()
    commit = threading.Thread(target=lambda: (spin(0.3), done.wait()), name="commit")
    commit.start()
    try:
        wait_for(lambda: stage_seconds().get("queue", 0) >= 0.25, 10, "the commit thread's CPU")
    finally:
        done.set()
        commit.join()
    assert stage_of(threading.Thread(name="deliver-archive")) == "delivery"
    assert stage_of(threading.Thread(name="Thread-9")) == "other"
    seconds = stage_seconds()
    assert seconds[ENDED] >= 0.25  # the commit thread has ended: its CPU is still there
    assert WORKERS in seconds
