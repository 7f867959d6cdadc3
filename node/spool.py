"""The spool: the durable store an instance is written to (and fsync'd) before the sender is
told Success, and that the node resumes from after any crash.

Layout under the spool root:
  incoming/<time>-<random>-<config>.dcm
                                 acknowledged instances, as received (DICOM Part 10 files; the
                                 calling and called AE titles are in the file meta, (0002,0017)
                                 Sending and (0002,0018) Receiving Application Entity Title);
                                 <config> names the configuration it was received under
  configs/<config>.json          those configurations (YAML text, source, base folder)
  work/<entry>.<n>.dcm           output n of an entry being written (discarded on restart)
  out/<entry>.<n>.dcm            output n, fsync'd, waiting in the delivery queue (which keeps
                                 each output's path: one from before outputs were numbered is
                                 out/<entry>.dcm)
  queue.sqlite3                  the delivery queue (node/deliver/queue.py)
  quarantine/<entry>.dcm         what the node could not route, with <entry>.reason.txt beside it
  dead-letter/<destination>/     what a destination never took, with <entry>.reason.txt
  tmp/                           partial writes; anything here was never acknowledged
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from node.config import Config, ConfigError, parse_config

SYNC_EVERY = 64 << 20  # bytes written between fdatasyncs of a large file


def fsync_directory(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(
    path: Path,
    tmp_dir: Path,
    head: bytes = b"",
    source: Path | None = None,
    sync_directory: bool = True,
) -> int:
    """Write `head` and then `source` to a temporary file in `tmp_dir`, fsync, rename to
    `path`, fsync the directory (unless the caller does that for several files:
    `sync_directory=False`). Returns the bytes written.

    `tmp_dir` must be on the same filesystem as `path` so the rename is atomic. The source is
    copied by the kernel (copy_file_range), never through Python buffers.
    """
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        written = _write_all(fd, head)
        if source is not None:
            written += _copy(source, fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync_directory:
        fsync_directory(path.parent)
    return written


def link_into(path: Path, durable_source: Path) -> bool:
    """Give the already durable file `durable_source` the name `path` too (a hard link under
    a temporary name, renamed over `path`): no data is copied or written again. The caller
    fsyncs `path`'s directory. False where the filesystem cannot (another device, no links)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.link(durable_source, tmp)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            return False
        raise
    try:
        os.replace(tmp, path)
    finally:  # rename() leaves both names when they are links to one file (a re-delivery)
        tmp.unlink(missing_ok=True)
    return True


def _fsync_and_rename(source: Path, target: Path, mode: int | None = None) -> int:
    """fsync `source` (after setting `mode`, if given) and rename it to `target`; its size."""
    fd = os.open(source, os.O_RDONLY)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    os.replace(source, target)
    return size


def _copy(source: Path, fd: int) -> int:
    """Append `source` to `fd`; a large file is fdatasync'd every SYNC_EVERY bytes so other
    fsyncs (small instances' acks) do not queue behind a gigabyte."""
    copied = unsynced = 0
    with source.open("rb") as f:
        while True:
            try:
                n = os.copy_file_range(f.fileno(), fd, SYNC_EVERY, copied)
            except OSError as exc:  # e.g. across filesystems on older kernels: copy ourselves
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                f.seek(copied)
                n = _write_all(fd, f.read(SYNC_EVERY))
            if n == 0:
                return copied
            copied += n
            unsynced += n
            if unsynced >= SYNC_EVERY:
                os.fdatasync(fd)
                unsynced = 0


def _write_all(fd: int, data: bytes) -> int:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    return done


@dataclass(frozen=True, order=True)
class SpoolEntry:
    path: Path

    @property
    def id(self) -> str:
        return self.path.stem

    @property
    def config_key(self) -> str | None:
        """The configuration it was received under (None: before configs were pinned)."""
        parts = self.path.stem.split("-")
        return parts[2] if len(parts) == 3 else None


class Spool:
    def __init__(self, root: Path, max_size: int = 0, min_free: int = 0):
        self.root = root
        self.incoming = root / "incoming"
        self.work = root / "work"
        self.out = root / "out"
        self.quarantine_dir = root / "quarantine"
        self.dead_letter_dir = root / "dead-letter"
        self.tmp = root / "tmp"
        self.configs = root / "configs"
        for d in (self.incoming, self.work, self.out, self.quarantine_dir, self.tmp, self.configs):
            d.mkdir(parents=True, exist_ok=True)
        self.max_size = max_size
        self.min_free = min_free
        self._lock = threading.Lock()
        self._usage = sum(p.stat().st_size for d in (self.incoming, self.out) for p in d.iterdir())

    @property
    def usage(self) -> int:
        """Bytes of instances waiting: received, and transcoded outputs."""
        return self._usage

    def _account(self, delta: int) -> None:
        with self._lock:
            self._usage = max(0, self._usage + delta)

    def room_problem(self) -> str | None:
        """Why a new instance must be refused (0xA700), or None."""
        if self.max_size and self._usage >= self.max_size:
            return f"spool holds {self._usage} bytes, the limit is {self.max_size}"
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:  # e.g. the spool's disk is gone: nothing can be stored
            return f"cannot tell whether the spool has room: {exc}"
        if free < self.min_free:
            return f"{free} bytes free on the spool's disk, the floor is {self.min_free}"
        return None

    def discard_partial_writes(self) -> int:
        """Remove leftovers of writes that never completed (nothing there was acknowledged)."""
        count = 0
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
            count += 1
        return count

    def adopt_received(self, received: Path, config_key: str = "0") -> SpoolEntry:
        """Durably store one received instance, a complete Part 10 file the receiver wrote in
        tmp/ (the same filesystem): fsync'd and renamed into incoming/, never copied (a copy
        costs as much CPU as receiving did). When this returns, Success may be sent."""
        path = self._incoming_path(config_key)
        # 0o640 as write_durably's files, not the temporary file's 0600
        self._account(_fsync_and_rename(received, path, mode=0o640))
        fsync_directory(self.incoming)
        return SpoolEntry(path)

    def _incoming_path(self, config_key: str) -> Path:
        return self.incoming / f"{time.time_ns():020d}-{secrets.token_hex(6)}-{config_key}.dcm"

    def save_config(self, config: Config) -> None:
        """Keep the configuration entries are received under, for their processing later."""
        path = self.configs / f"{config.key}.json"
        if not path.exists():
            record = {"source": config.source, "base": str(config.base), "text": config.text}
            write_durably(path, self.tmp, json.dumps(record).encode())

    def saved_config(self, key: str) -> Config | None:
        """A configuration saved by `save_config`, parsed again; None if gone or now invalid."""
        try:
            record = json.loads((self.configs / f"{key}.json").read_text(encoding="utf-8"))
            return parse_config(record["text"], record["source"], Path(record["base"]))
        except (OSError, ValueError, KeyError, ConfigError):
            return None

    def forget_configs(self, keep: set[str]) -> None:
        """Remove saved configurations no entry and no running listener refers to."""
        used = keep | {e.config_key for e in self.pending()}
        for path in self.configs.glob("*.json"):
            if path.stem not in used:
                path.unlink(missing_ok=True)

    def pending(self) -> list[SpoolEntry]:
        """Acknowledged instances not yet completed, oldest first."""
        return sorted(SpoolEntry(p) for p in self.incoming.glob("*.dcm"))

    def work_path(self, entry: SpoolEntry, index: int) -> Path:
        """Where processing writes output `index` of `entry`."""
        return self.work / f"{entry.id}.{index}.dcm"

    def output_path(self, entry: SpoolEntry, index: int) -> Path:
        """Where output `index` of `entry` is kept until every destination has it."""
        return self.out / f"{entry.id}.{index}.dcm"

    def adopt_outputs(
        self, outputs: list[tuple[SpoolEntry, int, Path]]
    ) -> dict[tuple[str, int], Path | OSError]:
        """Make processing outputs (entry, output number, work file) durable before the queue
        refers to them (each file fsync'd, renamed into out/, one fsync of out/ for all): per
        (entry id, output number), the output's durable path, or the error that kept it out."""
        adopted: dict[tuple[str, int], Path | OSError] = {}
        for entry, index, work_file in outputs:
            target = self.output_path(entry, index)
            try:
                size = _fsync_and_rename(work_file, target)
            except OSError as exc:
                adopted[entry.id, index] = exc
                continue
            self._account(size)
            adopted[entry.id, index] = target
        if any(isinstance(path, Path) for path in adopted.values()):
            fsync_directory(self.out)
        return adopted

    def remove_orphan_outputs(self, referenced: set[str]) -> None:
        """Outputs no queue row refers to (a crash before they were queued)."""
        for p in self.out.iterdir():
            if str(p) not in referenced:
                self._account(-p.stat().st_size)
                p.unlink(missing_ok=True)
        for stale in self.work.iterdir():
            stale.unlink(missing_ok=True)

    def dead_letter(self, destination: str, entry: str, source: Path, reason: str) -> Path:
        """Keep a copy of what `destination` never took, with the reason; never deleted."""
        folder = self.dead_letter_dir / destination
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{entry}.dcm"
        write_durably(folder / f"{entry}.reason.txt", self.tmp, _stamped(reason))
        if not target.exists():
            try:
                linked = link_into(target, source)
            except OSError:
                linked = False
            if linked:
                fsync_directory(folder)
            else:
                write_durably(target, self.tmp, source=source)
        return target

    def is_dead_letter(self, path: Path) -> bool:
        return path.is_relative_to(self.dead_letter_dir)

    def quarantine(self, entry: SpoolEntry, reason: str) -> Path:
        """Keep the instance, as received, with a reason file an operator can read."""
        target = self.quarantine_dir / entry.path.name
        write_durably(self.quarantine_dir / f"{entry.id}.reason.txt", self.tmp, _stamped(reason))
        self._account(-entry.path.stat().st_size)
        os.replace(entry.path, target)
        fsync_directory(self.quarantine_dir)
        fsync_directory(self.incoming)
        self._remove_work(entry)
        return target

    def complete_all(self, finished: list[tuple[Path | None, ...]]) -> None:
        """Every destination has these instances (or dead-lettered them): forget them, with
        one fsync of incoming/ for all. `finished`: (incoming file, its output files...); a
        None is skipped."""
        for paths in finished:
            for path in paths:
                if path is None:
                    continue
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                path.unlink(missing_ok=True)
                self._account(-size)
        fsync_directory(self.incoming)

    def _remove_work(self, entry: SpoolEntry) -> None:
        for p in self.work.glob(f"{entry.id}.*"):
            p.unlink(missing_ok=True)


def _stamped(reason: str) -> bytes:
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {reason}\n".encode()
