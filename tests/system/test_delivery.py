"""Reliable delivery to real downstream peers: Orthanc (Debian package), DCMTK storescp that
accepts only uncompressed syntaxes, and a scripted pynetdicom SCP for DIMSE statuses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.pixels import pixel_array
from pynetdicom import AE

from tests.conftest import (
    Orthanc,
    ScriptedPeer,
    data_file,
    echo,
    free_port,
    require,
    storescu,
    wait_for,
)
from tests.system.test_crash import make_series

pytestmark = pytest.mark.integration

FAST_RETRY = "retry: {initial_delay: 0.2, max_delay: 1, give_up_after: 1h, max_failures: 2}"


def config(destinations: str, rules: str, node_extra: str = "") -> str:
    return (
        f"node: {{host: 127.0.0.1, port: {{port}}, spool: ./spool, workers: 2{node_extra}}}\n"
        f"destinations:\n{destinations}\nrules:\n{rules}\n"
    )


def dicom_dest(name: str, port: int, ae: str = "ORTHANC", extra: str = "") -> str:
    return (
        f"  {name}: {{type: dicom, host: 127.0.0.1, port: {port}, ae_title: {ae}, "
        f"timeout: 10, {FAST_RETRY}{extra}}}"
    )


def queue_table(node) -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "node.ops.cli", "queue", "-c", str(node.config)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}


def raw(ds) -> np.ndarray:
    return pixel_array(ds, raw=True)


def test_orthanc_gets_each_instance_as_the_rule_says(node_factory, orthanc: Orthanc):
    orthanc.start()
    node = node_factory(config(
        dicom_dest("pacs", orthanc.dicom_port),
        "  - {name: us, match: {Modality: US}, transcode: {syntax: JPEG2000Lossless, mct: true},"
        " send_to: [pacs]}\n"
        "  - {name: rest, transcode: {syntax: JPEGLSLossless}, send_to: [pacs]}",
    ))  # fmt: skip
    sources = {n: dcmread(data_file(n)) for n in ("CT_small.dcm", "US1_UNCR.dcm", "MR_small.dcm")}
    storescu(node.port, [data_file(n) for n in sources])
    orthanc.wait_count(3)
    node.wait_spool_empty()
    got = {ds.SOPInstanceUID: ds for ds in orthanc.datasets()}
    for name, source in sources.items():
        ds = got[source.SOPInstanceUID]
        expected = uid.JPEG2000Lossless if name == "US1_UNCR.dcm" else uid.JPEGLSLossless
        assert ds.file_meta.TransferSyntaxUID == expected, name
        np.testing.assert_array_equal(raw(ds), raw(source), err_msg=name)


def test_uncompressed_only_peer_gets_the_original_pixels_bit_exact(node_factory, tmp_path):
    """DCMTK storescp accepts only uncompressed syntaxes by default: the node proposes JPEG-LS
    and Explicit VR Little Endian, and sends the decoded original when JPEG-LS is refused."""
    require("storescp")
    port, received = free_port(), tmp_path / "storescp"
    received.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "PLAIN", "-od", str(received), str(port)],
                           start_new_session=True, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: echo(port, called="PLAIN"), 30, "storescp")
        node = node_factory(config(
            dicom_dest("plain", port, "PLAIN"),
            "  - {name: us, match: {Modality: US}, transcode: {syntax: JPEG2000Lossless, "
            "mct: true}, send_to: [plain]}\n"
            "  - {name: rest, transcode: {syntax: JPEGLSLossless}, send_to: [plain]}",
        ))  # fmt: skip
        names = ["CT_small.dcm", "US1_UNCR.dcm", "MR_small_bigendian.dcm", "693_UNCR.dcm"]
        storescu(node.port, [data_file(n) for n in names])
        files = wait_for(lambda: (f := list(received.iterdir())) and len(f) == 4 and f, 60,
                         "4 files at storescp")  # fmt: skip
        node.wait_spool_empty()
        originals = {dcmread(data_file(n)).SOPInstanceUID: dcmread(data_file(n)) for n in names}
        for path in files:
            ds = dcmread(path)
            assert not ds.file_meta.TransferSyntaxUID.is_compressed
            source = originals[ds.SOPInstanceUID]
            assert ds.PhotometricInterpretation == source.PhotometricInterpretation
            np.testing.assert_array_equal(raw(ds), raw(source))
        log = node.log_text()
        # once per destination and SOP class: CT, US, MR (two CT instances, one line)
        assert len(re.findall(r"plain does not accept .* sending uncompressed", log)) == 3
    finally:
        os.killpg(scp.pid, signal.SIGTERM)
        scp.wait(timeout=10)


def test_outage_then_kill_9_then_recovery_delivers_everything(node_factory, orthanc, tmp_path):
    count = 20
    pixels = make_series(tmp_path / "series", count)
    rule = "  - {name: all, transcode: {syntax: JPEGLSLossless}, send_to: [pacs]}"
    cfg = config(dicom_dest("pacs", orthanc.dicom_port), rule)
    node = node_factory(cfg)  # Orthanc is down
    storescu(node.port, sorted((tmp_path / "series").glob("*.dcm")))  # all acked
    wait_for(lambda: queue_table(node).get("pacs", [0, "0"])[1] == str(count), 60,
             f"{count} pending for pacs")  # fmt: skip
    node.kill9()
    restarted = node_factory(cfg, port=node.port)
    orthanc.start()
    orthanc.wait_count(count)
    restarted.wait_spool_empty()
    for ds in orthanc.datasets():
        assert ds.file_meta.TransferSyntaxUID == uid.JPEGLSLossless
        np.testing.assert_array_equal(raw(ds), pixels[ds.SOPInstanceUID])
    assert queue_table(restarted)["pacs"][1] == "0"


def test_kill_9_in_the_middle_of_deliveries_loses_nothing(node_factory, orthanc, tmp_path):
    count = 40
    pixels = make_series(tmp_path / "series", count)
    orthanc.start()
    rule = "  - {name: all, transcode: {syntax: JPEG2000Lossless}, send_to: [pacs]}"
    cfg = config(dicom_dest("pacs", orthanc.dicom_port), rule)
    node = node_factory(cfg)
    storescu(node.port, sorted((tmp_path / "series").glob("*.dcm")))
    orthanc.wait_count(3)  # deliveries under way
    node.kill9()
    at_kill = orthanc.count()
    restarted = node_factory(cfg, port=node.port)
    orthanc.wait_count(count)
    restarted.wait_spool_empty()
    print(f"Orthanc had {at_kill} of {count} at kill -9")
    assert {ds.SOPInstanceUID for ds in orthanc.datasets()} == set(pixels)


def test_a_dead_destination_does_not_delay_the_other(node_factory, orthanc, tmp_path):
    count = 20
    make_series(tmp_path / "series", count)
    orthanc.start()
    dead_port = free_port()  # nothing listens here
    node = node_factory(config(
        dicom_dest("pacs", orthanc.dicom_port) + "\n" + dicom_dest("dead", dead_port, "DEAD"),
        "  - {name: all, transcode: {syntax: keep}, send_to: [dead, pacs]}",
    ))  # fmt: skip
    started = time.monotonic()
    storescu(node.port, sorted((tmp_path / "series").glob("*.dcm")))
    orthanc.wait_count(count, timeout=30)
    elapsed = time.monotonic() - started
    table = queue_table(node)
    assert table["pacs"][1] == "0"
    assert table["dead"][1] == str(count) and int(table["dead"][3]) > 0  # pending, retried
    print(f"live destination had all {count} after {elapsed:.1f} s while the other was down")
    assert list((node.spool / "incoming").glob("*.dcm"))  # kept until `dead` has them too


def test_association_is_reused_for_many_instances(node_factory, tmp_path):
    peer = ScriptedPeer()
    try:
        make_series(tmp_path / "series", 12)
        node = node_factory(config(dicom_dest("peer", peer.port, "PEER", ", idle_timeout: 30"),
                                   "  - {name: all, send_to: [peer]}"))  # fmt: skip
        storescu(node.port, sorted((tmp_path / "series").glob("*.dcm")))
        wait_for(lambda: len(peer.received) == 12, 60, "12 instances at the peer")
        assert peer.associations <= 3  # not one per instance
    finally:
        peer.close()


def test_refusals_are_dead_lettered_and_can_be_retried(node_factory):
    """0xA700 is transient (retried, not counted); 0xC000 twice reaches max_failures."""
    peer = ScriptedPeer(statuses=[0xA700, 0xC000, 0xC000])
    try:
        node = node_factory(config(dicom_dest("peer", peer.port, "PEER"),
                                   "  - {name: all, send_to: [peer]}"))  # fmt: skip
        storescu(node.port, [data_file("CT_small.dcm")])
        dead = node.spool / "dead-letter" / "peer"
        # the reason is written first, then the instance: wait for both
        wait_for(lambda: list(dead.glob("*.dcm")), 60, "a dead letter")
        reasons = wait_for(lambda: list(dead.glob("*.reason.txt")), 60, "its reason")
        assert "refused 2 times; last: peer answered status 0xC000" in reasons[0].read_text()
        assert len(list(dead.glob("*.dcm"))) == 1
        node.wait_spool_empty()  # the dead letter holds its own copy
        assert queue_table(node)["peer"][4] == "1"
        assert peer.received == []

        done = subprocess.run(
            [sys.executable, "-m", "node.ops.cli", "queue", "-c", str(node.config), "retry",
             "peer"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert "1 dead-lettered instance(s) queued again" in done.stdout
        wait_for(lambda: len(peer.received) == 1, 60, "the retried instance at the peer")
        assert peer.received[0].SOPInstanceUID == dcmread(data_file("CT_small.dcm")).SOPInstanceUID
        wait_for(lambda: not list(dead.glob("*.dcm")), 30, "the dead letter to be cleared")
        assert queue_table(node)["peer"][4] == "0"
    finally:
        peer.close()


def test_an_instance_older_than_give_up_after_is_dead_lettered(node_factory):
    node = node_factory(
        "node: {host: 127.0.0.1, port: {port}, spool: ./spool}\n"
        "destinations:\n"
        f"  gone: {{type: dicom, host: 127.0.0.1, port: {free_port()}, ae_title: GONE,"
        " retry: {initial_delay: 0.2, max_delay: 0.5, give_up_after: 2s}}\n"
        "rules: [{name: all, send_to: [gone]}]\n"
    )
    storescu(node.port, [data_file("CT_small.dcm")])
    dead = node.spool / "dead-letter" / "gone"
    reasons = wait_for(lambda: list(dead.glob("*.reason.txt")), 60, "a dead letter")
    assert "not delivered within 2 s" in reasons[0].read_text()
    assert (
        dcmread(next(dead.glob("*.dcm"))).SOPInstanceUID
        == dcmread(data_file("CT_small.dcm")).SOPInstanceUID
    )


def test_a_full_spool_answers_out_of_resources(node_factory):
    node = node_factory(config(
        "  archive: {type: folder, path: ./archive}",
        "  - {name: all, send_to: [archive]}",
        node_extra=", spool_min_free: 1000000 TB",
    ))  # fmt: skip
    ae = AE(ae_title="SCU")
    ae.add_requested_context(uid.CTImageStorage, uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM-NODE")
    assert assoc.is_established
    status = assoc.send_c_store(dcmread(data_file("CT_small.dcm")))
    assoc.release()
    assert status.Status == 0xA700
    assert node.archived() == []
    assert "refused an instance from SCU with 0xA700" in node.log_text()


def test_accept_syntaxes_restricts_what_is_proposed(node_factory):
    """The peer would take JPEG-LS, but the destination allows only Explicit VR Little Endian."""
    peer = ScriptedPeer()
    try:
        node = node_factory(config(
            dicom_dest("peer", peer.port, "PEER", ", accept_syntaxes: [ExplicitVRLittleEndian]"),
            "  - {name: all, transcode: {syntax: JPEGLSLossless}, send_to: [peer]}",
        ))  # fmt: skip
        storescu(node.port, [data_file("CT_small.dcm")])
        wait_for(lambda: peer.received, 60, "the instance at the peer")
        (ds,) = peer.received
        assert ds.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
        np.testing.assert_array_equal(raw(ds), raw(dcmread(data_file("CT_small.dcm"))))
    finally:
        peer.close()


def test_a_warning_status_counts_as_delivered(node_factory):
    peer = ScriptedPeer(statuses=[0xB000])  # Coercion of data elements: stored
    try:
        node = node_factory(config(dicom_dest("peer", peer.port, "PEER"),
                                   "  - {name: all, send_to: [peer]}"))  # fmt: skip
        storescu(node.port, [data_file("CT_small.dcm")])
        node.wait_spool_empty()
        assert queue_table(node)["peer"][1:5] == ["0", "-", "0", "0"]
        assert not (node.spool / "dead-letter").exists()
    finally:
        peer.close()
