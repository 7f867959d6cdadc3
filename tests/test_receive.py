"""The receive path's changes to pynetdicom, driven without an association."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

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


def _pynetdicom_writes(file, dataset: bytes, chunk: int) -> None:
    """What pynetdicom's chunked receive writes into the file it gets: preamble, File Meta,
    then the dataset fragment by fragment."""
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    file.write(b"\0" * 128)
    file.write(b"DICM")
    write_file_meta_info(file, create_file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4",
        transfer_syntax="1.2.840.10008.1.2.1"))  # fmt: skip
    for start in range(0, len(dataset), chunk):
        file.write(dataset[start : start + chunk])
        file.file.flush()


def test_the_received_file_is_written_with_the_spool_header_and_renamed_not_copied(tmp_path):
    """_SpoolHeaderWriter gives the same bytes as the copy path (spool_header + dataset), so
    the handler can rename the file into the spool."""
    import tempfile

    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from node.spool import Spool

    raw = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    dataset = raw[raw.find(b"\x08\x00\x05\x00") :]
    copied = tmp_path / "copied.dcm"
    with copied.open("wb") as f:
        _pynetdicom_writes(type("F", (), {"write": f.write, "file": f})(), dataset, 4096)
    header, offset = receive.spool_header(copied, "DICOM-NODE", "CT1", "ROUTE-ME")
    expected = header + copied.read_bytes()[offset:]

    spool = Spool(tmp_path / "spool")
    for chunk in (1, 7, 100_000):  # however pynetdicom splits its writes
        inner = tempfile.NamedTemporaryFile(dir=spool.tmp, delete=False, mode="wb")  # noqa: SIM115
        writer = receive._SpoolHeaderWriter(inner, "DICOM-NODE", "CT1", "ROUTE-ME")
        _pynetdicom_writes(writer, dataset, chunk)
        writer.close()
        received = Path(writer.name)
        assert received.read_bytes() == expected
        assert receive.spool_header(received, "X", "Y", "Z") == (b"", len(header))
        entry = spool.adopt_received(received, "k")
        assert not received.exists() and entry.path.read_bytes() == expected
        assert entry.path.stat().st_mode & 0o777 == 0o640
        meta = dcmread(entry.path).file_meta
        titles = (meta.SourceApplicationEntityTitle, meta.SendingApplicationEntityTitle,
                  meta.ReceivingApplicationEntityTitle)  # fmt: skip
        assert titles == ("DICOM-NODE", "CT1", "ROUTE-ME")
