"""C-STORE requests served in the socket's thread (node/receive/c_store.py): the node's Storage SCP
in this process, over real sockets, with pynetdicom as the sender and raw PDUs where a
sender misbehaves."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import struct
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, dimse_messages, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from node.config import parse_config
from node.receive import c_store
from node.receive.scp import StorageSCP
from node.spool import Spool
from tests.conftest import free_port, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def scp(tmp_path: Path, monkeypatch, pynetdicom_patched):
    """The node's Storage SCP on a free port; pynetdicom and pydicom as they were afterwards
    (StorageSCP changes them for the whole process, and other tests run pynetdicom peers here)."""
    from pydicom import config as pydicom_config

    for owner, name in [
        (pydicom_config.settings, "reading_validation_mode"),
        (pydicom_config.settings, "writing_validation_mode"),
    ]:
        monkeypatch.setattr(owner, name, getattr(owner, name))
    port = free_port()
    config = parse_config(
        f"node: {{ae_title: DICOM-NODE, host: 127.0.0.1, port: {port}, spool: ./spool}}\n"
        "accept: {called_aets: [DICOM-NODE, ROUTE-ME]}\n"
        "limits: {max_pdu_size: 16384}\n"  # a CT slice arrives in 33 PDUs
        "destinations: {archive: {type: folder, path: ./archive}}\n"
        "rules: [{name: r, send_to: [archive]}]\n",
        "node.yaml",
        tmp_path,
    )
    spool = Spool(tmp_path / "spool")
    stored: list = []
    server = StorageSCP(config, spool, stored.append)
    served_by_pynetdicom: list = []  # messages pynetdicom's DIMSE layer decoded, node side
    receive_primitive = DIMSEServiceProvider.receive_primitive

    def counting(self, primitive):
        receive_primitive(self, primitive)
        if self.assoc.is_acceptor and self.message is None:  # a whole message
            served_by_pynetdicom.append(primitive)

    monkeypatch.setattr(DIMSEServiceProvider, "receive_primitive", counting)
    server.start()
    server.stored, server.served_by_pynetdicom = stored, served_by_pynetdicom
    yield server
    server.stop(deadline=5)


def _associate(port: int, max_pdu: int = 0):
    ae = AE(ae_title="CT1")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    commands: list = []  # every DIMSE command set received, also ones pynetdicom drops
    handlers = [(evt.EVT_DIMSE_RECV, lambda event: commands.append(event.message.command_set))]
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTE-ME", evt_handlers=handlers)
    assert assoc.is_established
    assoc.commands_received = commands
    return assoc


def _ct(uid: str = "1.2.3.4.5"):
    ds = dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.SOPInstanceUID = uid
    return ds


def test_a_c_store_is_served_in_the_socket_thread_and_spooled_with_its_titles(scp):
    assoc = _associate(scp.port)
    try:
        assert assoc.send_c_echo().Status == 0  # pynetdicom's, between two C-STOREs
        statuses = [assoc.send_c_store(_ct(f"1.2.3.4.{n}")).Status for n in range(3)]
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
    assert len(scp.served_by_pynetdicom) == 2  # the C-ECHOs
    assert len(scp.stored) == 3
    ds = dcmread(scp.stored[0].path)
    meta = ds.file_meta
    assert (meta.SourceApplicationEntityTitle, meta.SendingApplicationEntityTitle,
            meta.ReceivingApplicationEntityTitle) == ("DICOM-NODE", "CT1", "ROUTE-ME")  # fmt: skip
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == "1.2.3.4.0"
    assert ds.PixelData == _ct().PixelData
    assert scp.stored[0].path.stat().st_mode & 0o777 == 0o640
    assert list(scp.spool.tmp.iterdir()) == []


def _dataset_bytes() -> bytes:
    raw = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    return raw[raw.find(b"\x08\x00\x05\x00") :]  # explicit VR little endian, after the meta


def _raw_command(sop_class: str, uid: str, message_id: int = 7) -> bytes:
    """A C-STORE-RQ command set as a sender may encode it, with values pynetdicom refuses."""

    def element(number: int, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HHI", 0, number, len(value)) + value

    body = b"".join([
        element(0x0002, sop_class.encode()), element(0x0100, struct.pack("<H", 1)),
        element(0x0110, struct.pack("<H", message_id)), element(0x0700, b"\0\0"),
        element(0x0800, b"\0\0"), element(0x1000, uid.encode()),
    ])  # fmt: skip
    return element(0x0000, struct.pack("<I", len(body))) + body


@pytest.mark.parametrize(
    "sop_class, uid, status",
    [("1.2.3.999", "1.2.3.4.5", 0x0122),  # not a storage class: SOP class not supported
     (CT, "1." * 40 + "1", 0xC000)],  # a SOP Instance UID over 64 characters: cannot understand
)  # fmt: skip
def test_a_c_store_the_node_cannot_take_gets_a_failure_status_and_leaves_nothing(
    scp, sop_class, uid, status
):
    """pynetdicom aborted these, and left the dataset's file in tmp/ until a restart. (The
    pynetdicom sender aborts on the long UID in the response, so the next C-STORE goes on a
    new association there.)"""
    assoc = _associate(scp.port)
    context_id = assoc.accepted_contexts[0].context_id
    command, dataset = _raw_command(sop_class, uid), _dataset_bytes()
    sock = assoc.dul.socket.socket
    sock.sendall(_pdu((context_id, 1, command[:20])) + _pdu((context_id, 3, command[20:])))
    sock.sendall(_pdu((context_id, 0, dataset[:1000])) + _pdu((context_id, 2, dataset[1000:])))
    (response,) = wait_for(lambda: assoc.commands_received, 10, "the response")
    assert response.Status == status and response.AffectedSOPInstanceUID == uid
    if status == 0xC000:
        wait_for(lambda: not assoc.is_alive(), 10, "pynetdicom to abort")
        assoc = _associate(scp.port)
    assert assoc.send_c_store(_ct()).Status == 0  # the node goes on
    assoc.release()
    assert len(scp.stored) == 1 and scp.served_by_pynetdicom == []
    assert list(scp.spool.tmp.iterdir()) == []


def test_a_c_store_on_a_context_that_was_not_accepted_is_aborted(scp):
    assoc = _associate(scp.port)
    assoc.dul.socket.socket.sendall(_pdu((99, 3, _command())) + _pdu((99, 2, _dataset_bytes())))
    wait_for(lambda: not assoc.is_alive(), 10, "the node to abort the association")
    assert assoc.is_aborted
    wait_for(lambda: not scp.ae.active_associations, 10, "the node's side to end")
    assert scp.stored == [] and list(scp.spool.tmp.iterdir()) == []


def test_a_full_spool_answers_out_of_resources_and_writes_nothing(scp, monkeypatch):
    real_write, written = os.write, []
    assoc = _associate(scp.port)
    with monkeypatch.context() as patch:
        patch.setattr(scp.spool, "room_problem", lambda: "full, for the test")
        patch.setattr(c_store.os, "write", lambda fd, data: written.append(len(data))
                      or real_write(fd, data))  # fmt: skip
        assert assoc.send_c_store(_ct()).Status == 0xA700
    assert written == []  # refused when the command came: not a byte of it on the disk
    assert assoc.send_c_store(_ct()).Status == 0  # same association, room again
    assoc.release()
    assert len(scp.stored) == 1
    assert list(scp.spool.tmp.iterdir()) == []


def test_a_large_instance_is_refused_midway_when_the_spool_runs_out_of_room(scp, monkeypatch):
    """Room is checked again at each fdatasync of a large instance (every SYNC_EVERY bytes;
    16 kB fragments here): the disk stops filling then, not when the instance is complete."""
    checks: list[int] = []
    real_write, written = os.write, []

    def room_problem() -> str | None:
        checks.append(sum(written))
        return "full, for the test" if len(checks) >= 3 else None  # command, first sync

    assoc = _associate(scp.port)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(c_store, "SYNC_EVERY", 8192)
            patch.setattr(scp.spool, "room_problem", room_problem)
            patch.setattr(c_store.os, "write", lambda fd, data: written.append(len(data))
                          or real_write(fd, data))  # fmt: skip
            assert assoc.send_c_store(_ct()).Status == 0xA700
        assert len(checks) == 3  # nothing more was written once it was refused
        assert sum(written) == checks[-1] < len(_dataset_bytes())
        assert list(scp.spool.tmp.iterdir()) == []
        assert assoc.send_c_store(_ct()).Status == 0
    finally:
        assoc.release()
    assert len(scp.stored) == 1


@pytest.mark.parametrize("failing", ["write", "mkstemp", "room"])
def test_a_disk_error_answers_out_of_resources_and_the_association_goes_on(
    scp, monkeypatch, failing
):
    real_write = os.write
    calls = []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 3:  # the header, a fragment, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def mkstemp(**_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_usage(_path):  # statvfs of a spool whose disk is gone
        raise OSError(errno.EIO, "Input/output error")

    assoc = _associate(scp.port)
    try:
        with monkeypatch.context() as patch:
            if failing == "write":
                patch.setattr(c_store.os, "write", write)
            elif failing == "mkstemp":
                patch.setattr(c_store.tempfile, "mkstemp", mkstemp)
            else:
                patch.setattr(shutil, "disk_usage", disk_usage)
            assert assoc.send_c_store(_ct()).Status == 0xA700
        assert assoc.send_c_store(_ct()).Status == 0
    finally:
        assoc.release()
    assert len(scp.stored) == 1
    assert list(scp.spool.tmp.iterdir()) == []


def test_an_instance_above_max_instance_size_is_refused_before_it_is_all_on_disk(scp, monkeypatch):
    limit = 20000  # CT_small's dataset is about 39 kB; it comes in 16 kB fragments here
    text = scp.config.text.replace(
        "max_pdu_size: 16384", f"max_pdu_size: 16384, max_instance_size: {limit}"
    )
    scp.config = parse_config(text, "node.yaml", scp.config.base)  # as a reload does
    real_write, written = os.write, []
    monkeypatch.setattr(
        c_store.os, "write", lambda fd, data: written.append(len(data)) or real_write(fd, data)
    )
    assoc = _associate(scp.port)
    try:
        assert assoc.send_c_store(_ct()).Status == 0xA700
    finally:
        assoc.release()
    header = written[0]
    assert sum(written) - header <= limit  # writing stopped at the limit
    assert scp.stored == [] and list(scp.spool.tmp.iterdir()) == []


def _command(uid: str = "1.2.3.4.5", message_id: int = 7, sop_class: str = CT) -> bytes:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = uid
    primitive.Priority = 0
    primitive.DataSet = BytesIO(b"\x08\x00\x05\x00CS\x00\x00")  # CommandDataSetType 0x0001
    message = dimse_messages.C_STORE_RQ()
    message.primitive_to_message(primitive)
    return _command_bytes(message)


def _command_bytes(message) -> bytes:
    pdvs = [
        value
        for p in message.encode_msg(1, 0)
        for _cid, value in p.presentation_data_value_list
        if value[0] & 1
    ]
    return b"".join(v[1:] for v in pdvs)


@pytest.mark.parametrize("uid", ["1.2.3.4.5", "1.2.3.4.56"])  # odd and even length
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000])
def test_the_response_is_the_command_set_pynetdicom_encodes(uid, status):
    request = c_store.StoreRequest(1, _command(uid, message_id=513))
    assert (request.sop_class, request.sop_instance, request.message_id) == (CT, uid, 513)
    assert request.has_dataset and request.command_field == 0x0001
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 513
    response.AffectedSOPClassUID = CT
    response.AffectedSOPInstanceUID = uid
    response.Status = status
    message = dimse_messages.C_STORE_RSP()
    message.primitive_to_message(response)
    assert request.response(status) == _command_bytes(message)


@pytest.mark.parametrize("max_length", [0, 16, 50, 1 << 20])
def test_a_response_fits_the_peers_maximum_pdu_length(max_length):
    command = c_store.StoreRequest(3, _command()).response(0)
    stream = c_store.command_pdus(3, command, max_length)
    fragments, at = [], 0
    while at < len(stream):
        pdu = P_DATA_TF()
        (length,) = struct.unpack(">I", stream[at + 2 : at + 6])
        assert max_length == 0 or length <= max_length
        pdu.decode(stream[at : at + 6 + length])
        fragments += [(i.presentation_context_id, i.presentation_data_value)
                      for i in pdu.presentation_data_value_items]  # fmt: skip
        at += 6 + length
    assert {cid for cid, _ in fragments} == {3}
    assert [v[0] for _, v in fragments] == [1] * (len(fragments) - 1) + [3]  # command; last
    assert b"".join(v[1:] for _, v in fragments) == command


def _pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    items = b"".join(struct.pack(">IBB", len(d) + 2, cid, ctl) + d for cid, ctl, d in pdvs)
    return struct.pack(">BBI", 4, 0, len(items)) + items


def test_a_dataset_cut_short_by_an_abort_or_a_closed_connection_leaves_nothing(scp):
    for end in ("abort", "close"):
        assoc = _associate(scp.port)
        sock: socket.socket = assoc.dul.socket.socket
        context_id = assoc.accepted_contexts[0].context_id
        sock.sendall(_pdu((context_id, 3, _command())) + _pdu((context_id, 0, b"\x08\x00" * 64)))
        wait_for(lambda: list(scp.spool.tmp.iterdir()), 10, "the partial file")
        if end == "abort":
            assoc.abort()
        else:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            assoc.kill()
        wait_for(lambda: not list(scp.spool.tmp.iterdir()), 10, f"the partial file gone ({end})")
    assert scp.stored == []


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    pdvs=st.lists(
        st.tuples(
            st.sampled_from([1, 3, 255]),
            st.integers(0, 3),
            st.one_of(st.binary(max_size=64), st.just(_command()), st.just(b"\x08\x00" * 8)),
        ),
        min_size=1,
        max_size=6,
    ),
    cut=st.one_of(st.none(), st.integers(0, 200)),
)
def _fuzz_one_association(port: int, tmp: Path, pdvs, cut) -> None:
    data = b"".join(_pdu(pdv) for pdv in pdvs)
    assoc = _associate(port)
    with contextlib.suppress(OSError):  # the node may have aborted already
        assoc.dul.socket.socket.sendall(data if cut is None else data[:cut])
    assoc.abort()
    wait_for(lambda: not list(tmp.iterdir()), 10, f"no partial file after {pdvs!r}")
    check = _associate(port)
    assert check.send_c_echo().Status == 0
    check.release()


def test_fuzzed_p_data_in_an_association_leaves_the_node_serving_and_nothing_behind(scp):
    _fuzz_one_association(scp.port, scp.spool.tmp)
    assoc = _associate(scp.port)
    assert assoc.send_c_store(_ct()).Status == 0
    assoc.release()
