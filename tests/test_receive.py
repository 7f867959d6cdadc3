"""The receive path's changes to pynetdicom, driven without an association."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from pydicom.uid import UID
from pynetdicom import dimse_messages
from pynetdicom.transport import AssociationSocket

from node import received_file


def _socket_pair() -> tuple[AssociationSocket, socket.socket]:
    received_file.read_pdus_in_large_reads()
    ours, theirs = socket.socketpair()
    wrapped = AssociationSocket.__new__(AssociationSocket)
    wrapped.socket = ours
    return wrapped, theirs


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


def test_a_connection_closed_mid_pdu_returns_what_arrived():
    wrapped, peer = _socket_pair()
    peer.sendall(b"x" * 5000)
    peer.close()
    data = wrapped.recv(1 << 30)  # a lying length: no 1 GiB buffer, only what arrived
    assert data == bytearray(b"x" * 5000)


def _pynetdicom_writes(file, dataset: bytes) -> None:
    """What pynetdicom's chunked receive writes into the file it gets: preamble, File Meta
    (through the names it imported, which the node replaces), then the dataset fragments."""
    file.write(b"\0" * 128)
    file.write(b"DICM")
    dimse_messages.write_file_meta_info(file, dimse_messages.create_file_meta(
        sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"), sop_instance_uid=UID("1.2.3.4"),
        transfer_syntax=UID("1.2.840.10008.1.2.1")))  # fmt: skip
    for start in range(0, len(dataset), 4096):
        file.write(dataset[start : start + 4096])
        file.file.flush()


def test_the_received_file_has_the_spool_header_and_is_renamed_not_copied(tmp_path):
    """The File Meta written on bytes, titles included, is what pydicom writes plus what the
    copy path (spool_header) adds; the handler then renames the file into the spool."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from node.spool import Spool

    raw = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    dataset = raw[raw.find(b"\x08\x00\x05\x00") :]
    spool = Spool(tmp_path / "spool")
    received_file.stream_received_datasets_to(spool.tmp)

    files = []

    def received(titles):
        file = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
        file.spool_titles = titles  # a test has no DUL thread to find them from
        _pynetdicom_writes(file, dataset)
        file.close()
        files.append(file)
        return Path(file.name)

    copied = received(None)  # pydicom's File Meta: the handler adds the titles and copies
    header, offset = received_file.spool_header(copied, "DICOM-NODE", "CT1", "ROUTE-ME")
    expected = header + copied.read_bytes()[offset:]

    in_place = received(("DICOM-NODE", "CT1", "ROUTE-ME"))
    assert in_place.read_bytes() == expected
    assert received_file.spool_header(in_place, "X", "Y", "Z") == (b"", len(header))
    def request(file):  # what the handler gets: the C-STORE primitive, with pynetdicom's file
        return type("Request", (), {"_dataset_file": file})()

    assert received_file.written_in_place(request(files[-1])) == len(header)
    assert received_file.written_in_place(request(files[0])) is None  # the copy path
    entry = spool.adopt_received(in_place, "k")
    assert not in_place.exists() and entry.path.read_bytes() == expected
    assert entry.path.stat().st_mode & 0o777 == 0o640
    meta = dcmread(entry.path).file_meta
    titles = (meta.SourceApplicationEntityTitle, meta.SendingApplicationEntityTitle,
              meta.ReceivingApplicationEntityTitle)  # fmt: skip
    assert titles == ("DICOM-NODE", "CT1", "ROUTE-ME")
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4"


def test_odd_uids_from_a_sender_take_the_copy_path(tmp_path):
    """A UID over 64 characters is encoded by pydicom, as before; the titles come later."""
    received_file.stream_received_datasets_to(tmp_path)
    file = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    file.spool_titles = ("DICOM-NODE", "CT1", "ROUTE-ME")
    file.write(b"\0" * 128 + b"DICM")
    dimse_messages.write_file_meta_info(file, dimse_messages.create_file_meta(
        sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"), sop_instance_uid=UID("1." * 40 + "1"),
        transfer_syntax=UID("1.2.840.10008.1.2.1")))  # fmt: skip
    file.close()
    header, _offset = received_file.spool_header(Path(file.name), "DICOM-NODE", "CT1", "X")
    assert header.endswith(b"X ")  # not there yet: added by the copy path


def test_a_data_pdu_decoded_from_a_memoryview_has_the_same_values(monkeypatch):
    """decode_data_pdus_without_copies: the PDV values are views, equal to pynetdicom's."""
    from pynetdicom import _config
    from pynetdicom.pdu import P_DATA_TF

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the node runs without -v
    from pynetdicom.pdu_primitives import P_DATA

    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, b"\x02" + bytes(range(256)) * 300],
                                              [3, b"\x03" + b"x" * 7]]  # fmt: skip
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    encoded = bytearray(pdu.encode())

    class Assoc:
        def get_handlers(self, _event):
            return []

    provider = type("Dul", (), {"assoc": Assoc()})()
    original, event = received_file._original_decode_pdu(provider, bytearray(encoded))
    viewed, event_too = received_file._decode_pdu(provider, encoded)
    assert event == event_too == "Evt10"
    want = [(i.presentation_context_id, i.presentation_data_value)
            for i in original.presentation_data_value_items]  # fmt: skip
    got = [(i.presentation_context_id, bytes(i.presentation_data_value))
           for i in viewed.presentation_data_value_items]  # fmt: skip
    assert got == want
    assert isinstance(viewed.presentation_data_value_items[0].presentation_data_value, memoryview)
