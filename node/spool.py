"""The spool: the durable store an instance is written to (and fsync'd) before the sender is
told Success, and that the node resumes from after any crash.

Layout under the spool root:
  incoming/<time>-<random>.dcm   acknowledged instances, as received (DICOM Part 10 files; the
                                 calling and called AE titles are in the file meta, (0002,0017)
                                 Sending and (0002,0018) Receiving Application Entity Title)
  work/<entry>.<n>.dcm           transcoded output waiting for delivery
  quarantine/<entry>.dcm         what the node could not route, with <entry>.reason.txt beside it
  tmp/                           partial writes; anything here was never acknowledged
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info


def fsync_directory(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, chunks: Iterable[bytes], tmp_dir: Path) -> None:
    """Write to a temporary file in `tmp_dir`, fsync, rename to `path`, fsync the directory.

    `tmp_dir` must be on the same filesystem as `path` so the rename is atomic.
    """
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            for chunk in chunks:
                f.write(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)


def part10_header(file_meta: FileMetaDataset) -> bytes:
    """Preamble, 'DICM' and the encoded File Meta Information group."""
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    write_file_meta_info(buf, file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue()


@dataclass(frozen=True, order=True)
class SpoolEntry:
    path: Path

    @property
    def id(self) -> str:
        return self.path.stem


class Spool:
    def __init__(self, root: Path):
        self.root = root
        self.incoming = root / "incoming"
        self.work = root / "work"
        self.quarantine_dir = root / "quarantine"
        self.tmp = root / "tmp"
        for d in (self.incoming, self.work, self.quarantine_dir, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def discard_partial_writes(self) -> int:
        """Remove leftovers of writes that never completed (nothing there was acknowledged)."""
        count = 0
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
            count += 1
        return count

    def store(self, file_meta: FileMetaDataset, dataset_bytes: bytes) -> SpoolEntry:
        """Durably store one received instance; when this returns, Success may be sent."""
        name = f"{time.time_ns():020d}-{secrets.token_hex(6)}.dcm"
        path = self.incoming / name
        write_durably(path, (part10_header(file_meta), dataset_bytes), self.tmp)
        return SpoolEntry(path)

    def pending(self) -> list[SpoolEntry]:
        """Acknowledged instances not yet completed, oldest first."""
        return sorted(SpoolEntry(p) for p in self.incoming.glob("*.dcm"))

    def work_path(self, entry: SpoolEntry, index: int) -> Path:
        return self.work / f"{entry.id}.{index}.dcm"

    def quarantine(self, entry: SpoolEntry, reason: str) -> Path:
        """Keep the instance, as received, with a reason file an operator can read."""
        target = self.quarantine_dir / entry.path.name
        write_durably(
            self.quarantine_dir / f"{entry.id}.reason.txt",
            (f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {reason}\n".encode(),),
            self.tmp,
        )
        os.replace(entry.path, target)
        fsync_directory(self.quarantine_dir)
        fsync_directory(self.incoming)
        self._remove_work(entry)
        return target

    def complete(self, entry: SpoolEntry) -> None:
        """Every destination has the instance: forget it."""
        entry.path.unlink(missing_ok=True)
        fsync_directory(self.incoming)
        self._remove_work(entry)

    def _remove_work(self, entry: SpoolEntry) -> None:
        for p in self.work.glob(f"{entry.id}.*"):
            p.unlink(missing_ok=True)
