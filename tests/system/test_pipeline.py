"""The pipeline's group commit, driven without workers or a network."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from node.config import parse_config
from node.ops.observe import REGISTRY
from node.pipeline import Pipeline, keeps_only
from node.spool import Spool, SpoolEntry
from node.transcode.process import Delivery, Output, ProcessOutcome
from tests.conftest import wait_for

CONFIG = """\
node: {spool: ./spool}
destinations: {archive: {type: folder, path: ./archive}}
rules: [{name: r, send_to: [archive]}]
"""


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch):
    config = parse_config(CONFIG, "node.yaml", tmp_path)
    pipe = Pipeline(config, Spool(tmp_path / "spool"))
    retried: list[str] = []
    monkeypatch.setattr(pipe, "_retry_later", lambda entry: retried.append(entry.id))
    pipe.retried = retried
    yield pipe
    pipe._executor.shutdown(wait=False)
    pipe.queue.close()


def outcome(pipe: Pipeline, name: str, quarantine: str | None = None) -> ProcessOutcome:
    path = pipe.spool.incoming / f"{name}.dcm"
    path.write_bytes(b"DICM")
    entry = SpoolEntry(path)
    pipe._in_flight.add(entry.id)
    if quarantine:
        return ProcessOutcome(entry, None, quarantine_reason=quarantine)
    return ProcessOutcome(entry, "r", outputs=(Output(path, "1.2.840.10008.1.2.1", 4, "kept"),),
                          deliveries=(Delivery("archive", 0, "x"),))  # fmt: skip


def commit(pipe: Pipeline, outcomes: list[ProcessOutcome]) -> None:
    for o in outcomes:
        pipe._outcomes.put((o, pipe.config))
    pipe._outcomes.put(None)
    pipe._commit_loop()  # runs the group, then stops at the sentinel


def test_a_failed_queue_commit_retries_what_it_did_not_queue(pipeline, monkeypatch):
    def broken(_rows):
        raise OSError("database or disk is full")

    monkeypatch.setattr(pipeline.queue, "add_all", broken)
    commit(pipeline, [outcome(pipeline, "a"), outcome(pipeline, "b"),
                      outcome(pipeline, "q", quarantine="no rule matched")])  # fmt: skip
    assert sorted(pipeline.retried) == ["a", "b"]  # the quarantined one is done, not retried
    assert pipeline.idle()


def test_each_output_is_queued_for_its_destinations_and_counted_per_destination(
    pipeline, monkeypatch
):
    """Two outputs of one entry: one file each in the queue, each destination told which, and
    the metrics per rule, destination, syntax and outcome."""
    monkeypatch.setattr(pipeline, "_worker", lambda *a: type("W", (), {"wake": lambda s: 0})())
    entry_path = pipeline.spool.incoming / "m.dcm"
    entry_path.write_bytes(b"DICM" * 25)
    work = pipeline.spool.work_path(SpoolEntry(entry_path), 0).with_suffix(".1.dcm")
    work.write_bytes(b"x" * 40)
    entry = SpoolEntry(entry_path)
    pipeline._in_flight.add(entry.id)
    jls, keep = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1"
    outputs = (Output(work, jls, 40, "recompressed"), Output(entry_path, keep, 100, "kept"))
    deliveries = (Delivery("archive", 0, "a.dcm"), Delivery("viewer", 1, None))
    before = REGISTRY.get_sample_value("dicom_node_outputs_total", {
        "rule": "multi", "destination": "archive", "syntax": "JPEGLSLossless",
        "outcome": "recompressed",
    }) or 0  # fmt: skip
    commit(pipeline, [ProcessOutcome(entry, "multi", outputs, deliveries, bytes_in=100)])
    rows = {d.destination: d for d in pipeline.queue.due("archive", time.time() + 1, 10)
            + pipeline.queue.due("viewer", time.time() + 1, 10)}  # fmt: skip
    assert rows["archive"].path == str(pipeline.spool.output_path(entry, 0))
    assert (rows["archive"].syntax, rows["archive"].relpath) == (jls, "a.dcm")
    assert (rows["viewer"].path, rows["viewer"].syntax) == (str(entry_path), keep)
    labels = {"rule": "multi", "destination": "archive", "syntax": "JPEGLSLossless",
              "outcome": "recompressed"}  # fmt: skip
    assert REGISTRY.get_sample_value("dicom_node_outputs_total", labels) == before + 1
    assert REGISTRY.get_sample_value("dicom_node_output_bytes_total", labels) >= 40
    viewer = {"rule": "multi", "destination": "viewer", "syntax": "ExplicitVRLittleEndian",
              "outcome": "kept"}  # fmt: skip
    assert REGISTRY.get_sample_value("dicom_node_outputs_total", viewer) >= 1


def test_a_failure_after_the_queue_commit_processes_nothing_twice(pipeline, monkeypatch):
    def broken_wake(*_args):
        raise RuntimeError("surprise after the commit")

    monkeypatch.setattr(pipeline, "_worker", broken_wake)
    commit(pipeline, [outcome(pipeline, "a"), outcome(pipeline, "b")])
    assert pipeline.retried == []  # both are queued: a retry would deliver them twice
    assert pipeline.queue.known_entries() == {"a", "b"}
    assert pipeline.idle()


def crash_on_marked(entry: SpoolEntry, config, work: Path, as_received: bool) -> ProcessOutcome:
    """The workers' function in the crash test (imported by them): the process dies on an
    entry named *crash* unless it is to be sent as received; every run that returns is
    recorded in ran/ as <entry>.<as_received>."""
    if "crash" in entry.path.name and not as_received:
        os._exit(70)
    time.sleep(0.5)  # codec work: the others are still in flight when a worker dies
    (entry.path.parent.parent / "ran" / f"{entry.path.stem}.{int(as_received)}").touch()
    return ProcessOutcome(entry, None, quarantine_reason="recorded by the test")


def test_a_worker_crash_is_counted_against_the_instance_that_crashes_only(tmp_path: Path):
    """The process pool fails every task in flight when a worker dies; those run alone next,
    so only the instance that crashes twice is sent as received, the others are processed
    as their rule says."""
    text = CONFIG.replace("./spool}", "./spool, workers: 2}").replace(
        "send_to", "transcode: {syntax: JPEGLSLossless}, send_to"
    )  # codec work: the codec workers run it (a keep-only node routes in its dispatcher)
    config = parse_config(text, "node.yaml", tmp_path)
    spool = Spool(tmp_path / "spool")
    (spool.root / "ran").mkdir()
    names = ["a", "b-crash", "c", "d", "e"]
    for name in names:
        (spool.incoming / f"{name}.dcm").write_bytes(b"DICM")
    pipe = Pipeline(config, spool, work=crash_on_marked)
    try:
        pipe.start()
        ran = spool.root / "ran"
        wait_for(lambda: len(list(ran.iterdir())) >= len(names) and pipe.idle(), 120, "all runs")
    finally:
        pipe.stop()
    assert sorted(p.name for p in ran.iterdir()) == ["a.0", "b-crash.1", "c.0", "d.0", "e.0"]


def page_faults_reallocating(size: int = 8 << 20, times: int = 20) -> int:
    """Minor page faults while a buffer of `size` is allocated, written and freed `times`
    times (run in a codec worker)."""
    import resource

    import numpy as np

    np.ones(size, np.uint8)  # the first one may fault: the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        np.ones(size, np.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_codec_workers_reuse_freed_buffers_instead_of_faulting_them_in_again(pipeline):
    # By default glibc unmaps an 8 MiB block when it is freed: ~2000 faults per allocation.
    assert pipeline._executor.submit(page_faults_reallocating).result(timeout=60) < 100


def test_a_keep_only_node_processes_in_its_dispatcher_without_codec_workers(tmp_path: Path):
    """Every rule keeps what it received: no instance is handed to a worker process (which
    cost more CPU than the routing itself), and each is still routed, queued, delivered."""
    layout = "./archive, layout: '{SOPInstanceUID}.dcm'}"
    config = parse_config(CONFIG.replace("./archive}", layout), "node.yaml", tmp_path)
    assert keeps_only(config)
    spool = Spool(tmp_path / "spool")
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(spool.incoming / "a.dcm")
    received = (spool.incoming / "a.dcm").read_bytes()
    pipe = Pipeline(config, spool)
    try:
        pipe.start()
        archived = tmp_path / "archive" / f"{ds.SOPInstanceUID}.dcm"
        wait_for(lambda: archived.exists() and pipe.idle(), 30, "the archive")
        assert not pipe._executor._processes  # no codec worker was ever started
    finally:
        pipe.stop()
    assert archived.read_bytes() == received
    codec = parse_config(CONFIG.replace("send_to", "transcode: {syntax: RLELossless}, send_to"),
                         "node.yaml", tmp_path)  # fmt: skip
    assert not keeps_only(codec)
