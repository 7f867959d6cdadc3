"""The spool's durability bookkeeping and limits, without a network."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.spool import Spool


def meta() -> FileMetaDataset:
    m = FileMetaDataset()
    m.MediaStorageSOPClassUID = CTImageStorage
    m.MediaStorageSOPInstanceUID = "1.2.3"
    m.TransferSyntaxUID = ExplicitVRLittleEndian
    return m


def test_spool_over_its_maximum_size_refuses_until_entries_complete(tmp_path: Path):
    spool = Spool(tmp_path, max_size=1000, min_free=0)
    assert spool.room_problem() is None
    entry = spool.store(meta(), b"\0" * 2000)
    assert "the limit is 1000" in spool.room_problem()
    spool.complete_all([(entry.path, None)])
    assert spool.usage == 0 and spool.room_problem() is None


def test_usage_survives_a_restart(tmp_path: Path):
    Spool(tmp_path).store(meta(), b"\0" * 500)
    again = Spool(tmp_path, max_size=400)
    assert again.usage > 500
    assert again.room_problem() is not None


def test_a_stored_entry_is_a_readable_part10_file(tmp_path: Path):
    entry = Spool(tmp_path).store(meta(), b"")
    ds = dcmread(entry.path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not list((tmp_path / "tmp").iterdir())  # the temporary name is gone
