"""The receive path's changes to pynetdicom, driven without an association."""

from __future__ import annotations

import socket
import threading

from pynetdicom.transport import AssociationSocket

from node import receive


def _socket_pair() -> tuple[AssociationSocket, socket.socket]:
    receive._read_pdus_in_large_reads()
    ours, theirs = socket.socketpair()
    wrapped = AssociationSocket.__new__(AssociationSocket)
    wrapped.socket = ours
    return wrapped, theirs


def test_a_pdu_sent_in_many_pieces_is_read_whole_and_exactly():
    wrapped, peer = _socket_pair()
    payload = bytes(range(256)) * 4096  # 1 MiB, more than one read
    tail = b"next PDU"

    def send():
        for start in range(0, len(payload), 7000):  # odd pieces, never aligned to a read
            peer.sendall(payload[start : start + 7000])
        peer.sendall(tail)

    sender = threading.Thread(target=send)
    sender.start()
    assert wrapped.recv(len(payload)) == payload
    assert wrapped.recv(len(tail)) == tail  # nothing of the next PDU was consumed
    sender.join()
    peer.close()


def test_a_connection_closed_mid_pdu_returns_what_arrived():
    wrapped, peer = _socket_pair()
    peer.sendall(b"x" * 5000)
    peer.close()
    data = wrapped.recv(1 << 30)  # a lying length: no 1 GiB buffer, only what arrived
    assert data == bytearray(b"x" * 5000)
