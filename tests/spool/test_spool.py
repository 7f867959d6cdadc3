"""The spool's durability bookkeeping and limits, without a network."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.receive.received_file import file_meta
from node.spool import Spool, SpoolEntry


def received(spool: Spool, dataset: bytes) -> SpoolEntry:
    """An instance spooled as c_store spools one: its file written in tmp/, then adopted."""
    path = spool.tmp / "received.dcm"
    meta = file_meta(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, ("NODE", "CT", "NODE"))
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + dataset)
    return spool.adopt_received(path)


def test_spool_over_its_maximum_size_refuses_until_entries_complete(tmp_path: Path):
    spool = Spool(tmp_path, max_size=1000, min_free=0)
    assert spool.room_problem() is None
    entry = received(spool, b"\0" * 2000)
    assert "the limit is 1000" in spool.room_problem()
    spool.complete_all([(entry.path, None)])
    assert spool.usage == 0 and spool.room_problem() is None


def test_usage_survives_a_restart(tmp_path: Path):
    received(Spool(tmp_path), b"\0" * 500)
    again = Spool(tmp_path, max_size=400)
    assert again.usage > 500
    assert again.room_problem() is not None


def test_a_stored_entry_is_a_readable_part10_file(tmp_path: Path):
    entry = received(Spool(tmp_path), b"")
    ds = dcmread(entry.path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not list((tmp_path / "tmp").iterdir())  # the temporary name is gone
