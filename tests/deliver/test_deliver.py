"""Folder delivery: atomic writes, and layouts that no dataset value can escape."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from node.config import FolderDestination
from node.deliver.destinations import DeliveryError
from node.deliver.destinations.folder import deliver_to_folder, layout_path

LAYOUT = "{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm"


def dataset(**values: str) -> Dataset:
    ds = Dataset()
    ds.PatientID = values.get("PatientID", "P1")
    ds.StudyInstanceUID = values.get("StudyInstanceUID", "1.2.3")
    ds.SOPInstanceUID = values.get("SOPInstanceUID", "1.2.3.4")
    return ds


@pytest.mark.parametrize(
    "hostile",
    ["../../etc", "/etc/passwd", "..", ".", "a/../../b", "x\0y", "C:\\Windows", "A" * 500, ""],
)
def test_no_patient_id_can_make_a_path_outside_the_folder(tmp_path: Path, hostile: str):
    rel = layout_path(LAYOUT, dataset(PatientID=hostile))
    first = rel.parts[0]
    assert len(rel.parts) == 3  # the template's own separators only
    assert first not in ("", ".", "..") and not first.startswith(".")
    assert "/" not in first and "\\" not in first and "\0" not in first
    assert len(first) <= 64
    dest = FolderDestination("archive", tmp_path / "archive", LAYOUT)
    source = tmp_path / "in.dcm"
    source.write_bytes(b"DICM")
    written = deliver_to_folder(dest, rel, source)
    assert written.resolve().is_relative_to((tmp_path / "archive").resolve())


def test_missing_values_become_unknown():
    ds = Dataset()
    assert str(layout_path("{Modality}/{SOPInstanceUID}.dcm", ds)) == "UNKNOWN/UNKNOWN.dcm"


def test_folder_write_is_complete_and_leaves_no_temporary_file(tmp_path: Path):
    dest = FolderDestination("archive", tmp_path / "archive", LAYOUT)
    source = tmp_path / "in.dcm"
    source.write_bytes(b"x" * (3 << 20))
    rel = layout_path(LAYOUT, dataset())
    written = deliver_to_folder(dest, rel, source)
    assert written.read_bytes() == source.read_bytes()
    written_again = deliver_to_folder(dest, rel, source)  # re-delivery after a crash: idempotent
    assert written_again == written
    assert [p.name for p in written.parent.iterdir()] == [written.name]


def test_an_unwritable_folder_is_a_retryable_delivery_error(tmp_path: Path):
    blocker = tmp_path / "archive"
    blocker.write_text("a file where the folder should be")
    dest = FolderDestination("archive", blocker, LAYOUT)
    source = tmp_path / "in.dcm"
    source.write_bytes(b"DICM")
    with pytest.raises(DeliveryError) as err:
        deliver_to_folder(dest, layout_path(LAYOUT, dataset()), source)
    assert err.value.retryable


def test_on_the_spools_filesystem_the_file_is_linked_not_copied(tmp_path: Path):
    """The spool's files are durable: the archive gets the same file (no copy, no write)."""
    dest = FolderDestination("archive", tmp_path / "archive", LAYOUT)
    source = tmp_path / "in.dcm"
    source.write_bytes(b"x" * 1000)
    written = deliver_to_folder(dest, layout_path(LAYOUT, dataset()), source)
    assert written.samefile(source)
    source.unlink()  # the spool forgets it once delivered: the archive keeps it
    assert written.read_bytes() == b"x" * 1000


def test_across_filesystems_the_file_is_copied(tmp_path: Path, monkeypatch):
    import errno
    import os

    def no_link(*_args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    dest = FolderDestination("archive", tmp_path / "archive", LAYOUT)
    source = tmp_path / "in.dcm"
    source.write_bytes(b"y" * 1000)
    written = deliver_to_folder(dest, layout_path(LAYOUT, dataset()), source)
    assert not written.samefile(source) and written.read_bytes() == source.read_bytes()
    assert [p.name for p in written.parent.iterdir()] == [written.name]
