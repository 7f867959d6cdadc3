"""DICOM TLS with certificates made here: a TLS-only node refuses plain clients, mutual TLS
refuses clients without a certificate its CA signed, and destinations speak TLS too."""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import data_file, free_port, require, storescu, wait_for

pytestmark = pytest.mark.integration


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(cwd: Path, ca: str, name: str, cn: str, server: bool) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj",
            f"/CN={cn}", "-out", f"{name}.csr", cwd=cwd)  # fmt: skip
    ext = cwd / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n" if server else
                   "extendedKeyUsage=clientAuth\n")  # fmt: skip
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", ext.name,
            "-out", f"{name}.pem", cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A hospital CA with a server and a client certificate, and a stranger's CA and client."""
    require("openssl")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                "-subj", f"/CN={ca}", "-days", "2", "-out", f"{ca}.pem", cwd=d)  # fmt: skip
    issue(d, "ca", "server", "localhost", server=True)
    issue(d, "ca", "client", "modality", server=False)
    issue(d, "rogue-ca", "rogue", "stranger", server=False)
    return d


def tls_node(node_factory, pki: Path, mutual: bool, name: str = "node", extra: str = ""):
    port = free_port()
    client_part = f", ca: {pki}/ca.pem, require_client_cert: true" if mutual else ""
    return node_factory(
        f"node: {{host: 127.0.0.1, port: {port}, spool: ./spool, ae_title: {name.upper()},\n"
        f"  tls: {{cert: {pki}/server.pem, key: {pki}/server.key{client_part}}}}}\n"
        f"destinations: {{archive: {{type: folder, path: ./archive}}{extra}}}\n"
        "rules: [{name: r, send_to: [archive]}]\n",
        name=name, port=port,
    )  # fmt: skip


def tls_echo(port: int, pki: Path, called: str, client: str | None) -> bool:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.pem"), str(pki / f"{client}.key"))
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.Status == 0


def plain_echo(port: int, called: str) -> bool:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    ok = assoc.is_established
    if ok:
        assoc.release()
    return ok


def test_a_tls_only_node_refuses_plain_clients_and_serves_tls_ones(node_factory, pki):
    node = tls_node(node_factory, pki, mutual=False)
    assert not plain_echo(node.port, "NODE")
    assert tls_echo(node.port, pki, "NODE", client=None)
    node.assert_alive()


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(node_factory, pki):
    node = tls_node(node_factory, pki, mutual=True)
    assert not tls_echo(node.port, pki, "NODE", client=None)
    assert not tls_echo(node.port, pki, "NODE", client="rogue")
    assert tls_echo(node.port, pki, "NODE", client="client")
    node.assert_alive()


def test_dcmtk_storescu_over_mutual_tls_and_a_tls_destination(node_factory, pki):
    """DCMTK storescu -> node A (mutual TLS) -> node B (mutual TLS) as A's TLS destination."""
    b = tls_node(node_factory, pki, mutual=True, name="b")
    a = tls_node(node_factory, pki, mutual=True, name="a", extra=(
        f", b: {{type: dicom, host: 127.0.0.1, port: {b.port}, ae_title: B,"
        f" tls: {{ca: {pki}/ca.pem, cert: {pki}/client.pem, key: {pki}/client.key,"
        " server_name: localhost}}"))  # fmt: skip
    a.config.write_text(a.config.read_text().replace("send_to: [archive]", "send_to: [b]"))
    os.kill(a.process.pid, 1)  # SIGHUP: route to b
    wait_for(lambda: "reloaded" in a.log_text(), 30, "the reload")
    storescu(a.port, [data_file("CT_small.dcm")], called="A", extra=(
        "+tls", str(pki / "client.key"), str(pki / "client.pem"),
        "+cf", str(pki / "ca.pem")))  # fmt: skip
    wait_for(lambda: list(b.archive.rglob("*.dcm")), 60, "the instance at b, over TLS")


def test_a_client_that_never_starts_tls_blocks_no_one_and_failures_are_logged(node_factory, pki):
    import socket

    node = tls_node(node_factory, pki, mutual=True)
    silent = socket.create_connection(("127.0.0.1", node.port), timeout=10)  # no ClientHello
    try:
        assert tls_echo(node.port, pki, "NODE", client="client")
    finally:
        silent.close()
    assert not tls_echo(node.port, pki, "NODE", client="rogue")
    wait_for(lambda: "TLS with 127.0.0.1 failed" in node.log_text(), 10, "the log line")
