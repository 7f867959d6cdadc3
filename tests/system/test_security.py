"""Hostile and unwanted peers: access rules answered with the right A-ASSOCIATE-RJ, logged and
counted; the shipped configuration denies by default."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Callable

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import load_config
from tests.conftest import REPO, data_file, free_port, wait_for
from tests.ops.test_observe import get, metric

pytestmark = pytest.mark.integration


def associate(port: int, calling: str, called: str):
    """An association as a modality asks for one: storage, and verification beside it."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")  # CT Image
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called)


def node_with(node_factory, accept: str):
    http, port = free_port(), free_port()
    node = node_factory(
        f"node: {{host: 127.0.0.1, port: {port}, spool: ./spool}}\n"
        f"http: {{host: 127.0.0.1, port: {http}}}\n"
        f"accept: {accept}\n"
        "destinations: {archive: {type: folder, path: ./archive}}\n"
        "rules: [{name: r, match: {CalledAET: [ROUTED]}, send_to: [archive]},"
        " {name: rest, send_to: [archive]}]\n",
        port=port,
    )
    wait_for(lambda: node.assert_alive() or get(http, "/healthz")[0] == 200, 30, "/healthz")
    return node, http


@pytest.mark.parametrize(
    "accept, calling, called, reason, kind, logged",
    [
        ('{calling_aets: ["CT*"]}', "WORKSTATION", "DICOM-NODE", 0x03, "calling-aet",
         "calling AE title not allowed"),
        ("{}", "CT1", "SOMEONE-ELSE", 0x07, "called-aet",
         "called AE title 'SOMEONE-ELSE' is not this node's"),
        ("{networks: [192.0.2.0/24]}", "CT1", "DICOM-NODE", 0x01, "network",
         "address 127.0.0.1 is outside accept.networks"),
    ],
)  # fmt: skip
def test_each_access_rule_rejects_with_its_reason_logs_and_counts(
    node_factory, accept, calling, called, reason, kind, logged
):
    node, http = node_with(node_factory, accept)
    assoc = associate(node.port, calling, called)
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, reason)
    assert f"rejected association from {calling} (127.0.0.1) to {called}: {logged}" in (
        node.log_text()
    )
    text = get(http, "/metrics")[1]
    assert metric(text, "dicom_node_associations_rejected_total", reason=kind) == 1


def test_allowed_peers_and_called_titles_a_rule_routes_on_are_accepted(node_factory):
    node, _ = node_with(node_factory, '{calling_aets: ["CT*"], networks: [127.0.0.0/8]}')
    for called in ("DICOM-NODE", "ROUTED"):
        assoc = associate(node.port, "CT1", called)
        assert assoc.is_established, called
        assoc.release()


def test_the_shipped_configuration_denies_by_default():
    config = load_config(REPO / "config" / "node.yaml")
    accept = config.accept
    assert "*" not in accept.calling_aets
    assert accept.allows_address("127.0.0.1") and accept.allows_address("::1")
    assert not accept.allows_address("10.0.0.5") and not accept.allows_address("192.168.1.20")
    assert accept.called_aets == (config.node.ae_title,)


def limited_node(node_factory, limits: str):
    port = free_port()
    return node_factory(
        f"node: {{host: 127.0.0.1, port: {port}, spool: ./spool}}\n"
        f"limits: {limits}\n"
        "destinations: {archive: {type: folder, path: ./archive}}\n"
        "rules: [{name: r, send_to: [archive]}]\n",
        port=port,
    )


def silent_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(0.2)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        return True


def test_silent_sockets_neither_starve_real_senders_nor_stay_open(node_factory):
    node = limited_node(
        node_factory, "{max_associations: 2, max_connections: 40, association_timeout: 2}"
    )
    silent = [silent_socket(node.port) for _ in range(20)]
    try:
        assoc = associate(node.port, "CT1", "DICOM-NODE")
        assert assoc.is_established  # 20 idle sockets do not count as associations
        assoc.release()
        started = time.monotonic()
        for sock in silent:
            wait_for(lambda s=sock: closed_by_peer(s), 15, "the node to drop a silent socket")
        assert time.monotonic() - started < 10
    finally:
        for sock in silent:
            sock.close()


def test_an_established_association_that_goes_silent_is_ended_after_idle_timeout(node_factory):
    """The node's reactors wait for work instead of polling (node/pynetdicom_patches.py); they
    must still notice pynetdicom's idle timer on an association where nothing happens."""
    node = limited_node(node_factory, "{idle_timeout: 1}")
    assoc = associate(node.port, "CT1", "DICOM-NODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0  # answered at once, not after a poll interval
    wait_for(lambda: not assoc.is_alive(), 10, "the node to end the idle association")
    assert not assoc.is_established
    assert associate(node.port, "CT1", "DICOM-NODE").is_established  # and it still listens


def test_beyond_max_associations_the_peer_is_told_to_come_back_later(node_factory):
    node = limited_node(node_factory, "{max_associations: 2}")
    held = [associate(node.port, f"CT{i}", "DICOM-NODE") for i in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = associate(node.port, "CT3", "DICOM-NODE")
        assert third.is_rejected
        rejection = third.acceptor.primitive
        # rejected-transient, service provider (presentation), local limit exceeded
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
    finally:
        for a in held:
            a.release()
    assert associate(node.port, "CT3", "DICOM-NODE").is_established


def test_beyond_max_connections_sockets_are_closed_at_once(node_factory):
    node = limited_node(node_factory, "{max_connections: 3, association_timeout: 60}")
    socks = [silent_socket(node.port) for _ in range(6)]
    try:
        wait_for(lambda: sum(closed_by_peer(s) for s in socks) >= 3, 10, "3 sockets closed")
        assert "limits.max_connections is 3" in node.log_text()
    finally:
        for sock in socks:
            sock.close()


def test_an_instance_above_max_instance_size_is_refused_and_not_spooled(node_factory):
    from pydicom.data import get_testdata_file

    node = limited_node(node_factory, "{max_instance_size: 4kB}")
    ae = AE(ae_title="CT1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM-NODE")
    status = assoc.send_c_store(get_testdata_file("MR_small.dcm", download=False))
    assoc.release()
    assert status.Status == 0xA700
    assert not list((node.spool / "incoming").glob("*.dcm"))
    assert "above limits.max_instance_size" in node.log_text()


def probe(port: int, payload: bytes = b"") -> None:
    """What a port scanner or a load balancer's TCP health check does: connect, maybe send a
    few bytes that are no A-ASSOCIATE-RQ, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if payload:
            sock.sendall(payload)


def dcmtk_succeeds(command: list[str]) -> bool:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "TCP_NODELAY": "1"})  # fmt: skip
    return done.returncode == 0 and "Failed" not in done.stderr


def test_probes_and_garbage_free_their_connection_slot_at_once(node_factory):
    """200 connect-and-close probes and 100 connections sending garbage: with the defaults
    (64 connections, a 30 s association timeout) real senders get in within 1 s after."""
    node = limited_node(node_factory, "{}")
    randoms = random.Random(22)
    for _ in range(200):
        probe(node.port)
    for _ in range(100):
        probe(node.port, randoms.randbytes(randoms.randint(1, 64)))
    started = time.monotonic()
    echo = ["echoscu", "-to", "5", "-aec", "DICOM-NODE", "127.0.0.1", str(node.port)]
    wait_for(lambda: dcmtk_succeeds(echo), 1, "a C-ECHO from DCMTK to succeed", interval=0.01)
    image = str(data_file("CT_small.dcm"))
    store = ["storescu", "-to", "5", "-aec", "DICOM-NODE", "127.0.0.1", str(node.port), image]
    wait_for(lambda: dcmtk_succeeds(store), 1, "a C-STORE from DCMTK to succeed", interval=0.01)
    assert time.monotonic() - started < 2
    assert "limits.max_connections" not in node.log_text()
    node.wait_archived(1)


def test_one_address_cannot_take_every_connection(node_factory):
    """64 silent sockets from one address (the default limits.max_connections) get 16 slots
    (limits.max_connections_per_address); another address still gets in."""
    node = limited_node(node_factory, "{association_timeout: 60}")
    socks = [silent_socket(node.port) for _ in range(64)]
    try:
        wait_for(lambda: sum(closed_by_peer(s) for s in socks) >= 48, 10, "48 sockets closed")
        assert "16 open from it, limits.max_connections_per_address is 16" in node.log_text()
        ae = AE(ae_title="CT1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM-NODE",
                             bind_address=("127.0.0.2", 0))  # fmt: skip
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        for sock in socks:
            sock.close()


def shipped_node(node_factory, edit: Callable[[str], str] = lambda text: text):
    port = free_port()
    text = (REPO / "config" / "node.yaml").read_text().replace("port: 11112", f"port: {port}")
    return node_factory(edit(text), port=port)


def test_the_shipped_configuration_answers_dcmtks_first_echo(node_factory):
    """`echoscu -aec DICOM-NODE localhost 11112` (calling AE title ECHOSCU, not an allowed
    one) is how an administrator tests a new link; storage still needs an allowed title."""
    node = shipped_node(node_factory)
    echo = ["echoscu", "-aec", "DICOM-NODE", "localhost", str(node.port)]
    assert dcmtk_succeeds(echo)
    store = ["storescu", "-aet", "ECHOSCU", "-aec", "DICOM-NODE", "localhost", str(node.port),
             str(data_file("CT_small.dcm"))]  # fmt: skip
    assert not dcmtk_succeeds(store)
    assert "rejected association from ECHOSCU (127.0.0.1) to DICOM-NODE: calling AE title " \
           "not allowed" in node.log_text()  # fmt: skip
    # a C-ECHO association cannot carry a C-STORE: its only context is Verification
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assert ae.associate("127.0.0.1", node.port, ae_title="DICOM-NODE").is_rejected


def test_echo_from_any_calling_ae_title_can_be_turned_off(node_factory):
    node = shipped_node(
        node_factory, lambda text: text.replace("echo_any_aet: true", "echo_any_aet: false")
    )
    assert not dcmtk_succeeds(["echoscu", "-aec", "DICOM-NODE", "localhost", str(node.port)])
    assert dcmtk_succeeds(["echoscu", "-aet", "STORESCU", "-aec", "DICOM-NODE", "localhost",
                           str(node.port)])  # fmt: skip
