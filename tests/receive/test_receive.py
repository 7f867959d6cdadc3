"""How the receive path reads PDUs and writes the File Meta, driven without an association."""

from __future__ import annotations

import socket
import threading

import pytest
from pydicom.uid import UID
from pynetdicom.transport import AssociationSocket

from node.receive import received_file


def _socket_pair() -> tuple[AssociationSocket, socket.socket]:
    """An AssociationSocket whose reads are the node's (the tests use pynetdicom_patched)."""
    ours, theirs = socket.socketpair()
    wrapped = AssociationSocket.__new__(AssociationSocket)
    wrapped.socket = ours
    return wrapped, theirs


@pytest.mark.usefixtures("pynetdicom_patched")
@pytest.mark.parametrize("size", [1 << 20, (3 << 20) + 1])  # one read's worth; the buffer grows
def test_a_pdu_sent_in_many_pieces_is_read_whole_and_exactly(size):
    wrapped, peer = _socket_pair()
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
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


@pytest.mark.usefixtures("pynetdicom_patched")
def test_a_connection_closed_mid_pdu_returns_what_arrived():
    wrapped, peer = _socket_pair()
    peer.sendall(b"x" * 5000)
    peer.close()
    data = wrapped.recv(1 << 30)  # a lying length: no 1 GiB buffer, only what arrived
    assert data == bytearray(b"x" * 5000)


def test_the_file_meta_is_what_pydicom_writes_for_pynetdicoms_with_the_ae_titles(tmp_path):
    """file_meta writes on bytes what pydicom writes for pynetdicom's create_file_meta plus
    (0002,0016)-(0002,0018); pydicom reads the file back with those values."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    titles = ("DICOM-NODE", "CT1", "ROUTE-ME")
    for uid in ("1.2.3.4", "1.2.3.45"):  # odd and even lengths: padding
        expected = create_file_meta(
            sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"), sop_instance_uid=UID(uid),
            transfer_syntax=UID("1.2.840.10008.1.2.1"))  # fmt: skip
        expected.SourceApplicationEntityTitle = titles[0]
        expected.SendingApplicationEntityTitle = titles[1]
        expected.ReceivingApplicationEntityTitle = titles[2]
        written = DicomBytesIO()
        written.is_little_endian, written.is_implicit_VR = True, False
        write_file_meta_info(written, expected)
        ours = received_file.file_meta(
            "1.2.840.10008.5.1.4.1.1.2", uid, "1.2.840.10008.1.2.1", titles
        )
        assert ours == written.getvalue()
        path = tmp_path / f"{uid}.dcm"
        path.write_bytes(b"\0" * 128 + b"DICM" + ours + b"\x08\x00\x18\x00UI\x08\x001.2.3.4\0")
        meta = dcmread(path).file_meta
        assert meta.ReceivingApplicationEntityTitle == "ROUTE-ME"
        assert meta.MediaStorageSOPInstanceUID == uid
