"""DICOM TLS contexts (PS3.15 Annex B, BCP 195): TLS 1.2 or later, certificates verified.

The listener presents `cert`/`key` and, with `require_client_cert`, accepts only clients whose
certificate `ca` signed (mutual TLS). A destination verifies its peer against `ca` (else the
system's trust store) and its name, and presents `cert`/`key` when the peer asks for one.
"""

from __future__ import annotations

import logging
import ssl

from node.config import TlsSettings
from node.ops import observe as metrics

log = logging.getLogger("dicom_node.receive")


class _HandshakeLoggingSocket(ssl.SSLSocket):
    """Reports a failed handshake (no or a foreign client certificate, plain DICOM on the TLS
    port, ...) in the node's log and metrics; pynetdicom would just drop the connection."""

    def recv(self, *args, **kwargs):
        try:
            return super().recv(*args, **kwargs)
        except ssl.SSLError as exc:
            self._report(exc)
            raise

    def recv_into(self, *args, **kwargs):  # how the node reads PDUs (received_file)
        try:
            return super().recv_into(*args, **kwargs)
        except ssl.SSLError as exc:
            self._report(exc)
            raise

    def _report(self, exc: ssl.SSLError) -> None:
        try:
            peer = self.getpeername()[0]
        except OSError:
            peer = "?"
        log.warning("TLS with %s failed: %s", peer, exc.reason or exc)
        metrics.REJECTED_ASSOCIATIONS.labels("tls").inc()


class _ServerContext(ssl.SSLContext):
    """pynetdicom wraps accepted sockets in its accept thread, where a handshake that never
    comes would stop all accepting: the handshake moves to the association's own thread (the
    first read), under its ARTIM timeout like any silent connection."""

    sslsocket_class = _HandshakeLoggingSocket

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=False, **kwargs
        )


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca and str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx
