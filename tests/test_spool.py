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


def test_the_spool_header_adds_the_ae_titles_to_pynetdicoms_file_meta(tmp_path):
    """The receiver rewrites pynetdicom's File Meta on bytes; pydicom must read the result as
    if it had written it, dataset untouched."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    from node.received_file import spool_header

    source = dcmread(get_testdata_file("CT_small.dcm", download=False))
    dataset = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    dataset = dataset[dataset.find(b"\x08\x00\x05\x00") :]  # the dataset after the meta
    received = tmp_path / "received.dcm"
    with received.open("wb") as f:  # what pynetdicom's chunked receive writes
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, create_file_meta(
            sop_class_uid=source.SOPClassUID, sop_instance_uid=source.SOPInstanceUID,
            transfer_syntax="1.2.840.10008.1.2.1"))  # fmt: skip
        f.write(dataset)
    header, offset = spool_header(received, "DICOM-NODE", "CT1", "ROUTE-ME")
    assert received.read_bytes()[offset:] == dataset
    out = tmp_path / "spooled.dcm"
    out.write_bytes(header + dataset)
    ds = dcmread(out)
    meta = ds.file_meta
    assert (meta.SourceApplicationEntityTitle, meta.SendingApplicationEntityTitle,
            meta.ReceivingApplicationEntityTitle) == ("DICOM-NODE", "CT1", "ROUTE-ME")  # fmt: skip
    assert meta.FileMetaInformationGroupLength == len(header) - 132 - 12
    assert meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert ds.PatientName == source.PatientName and ds.PixelData == source.PixelData
