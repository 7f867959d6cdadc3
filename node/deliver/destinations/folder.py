"""Folder destinations: each instance is placed at the destination's layout path, atomically
(a temporary name, then a rename), and made durable.

A batch commits as a group: its files are placed, each folder is fsync'd once, and the worker
records them all in one transaction (at most a batch per commit). While instances stream in,
the worker lets them gather for GATHER between rounds.

The layout's grammar is checked with the configuration (node/config/checks.py).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from pydicom.dataset import Dataset

from node.config import FolderDestination
from node.deliver.destinations.base import (
    Delivered,
    DeliveryError,
    DestinationSession,
    DestinationType,
    Failed,
    Result,
)
from node.deliver.queue import Delivery
from node.spool import fsync_directory, link_into, write_durably

GATHER = 0.05  # seconds the worker lets work gather after a round that had some: the next
# round then takes all of it with one fsync per folder and one commit

_MAX_COMPONENT = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._^=+-]")


# --- layout --------------------------------------------------------------------------------


def _safe_component(value: object) -> str:
    text = str(value).strip() if value not in (None, "") else ""
    text = _UNSAFE.sub("_", text)[:_MAX_COMPONENT].lstrip(".")
    return text or "UNKNOWN"


def layout_path(layout: str, ds: Dataset) -> PurePosixPath:
    """The relative file path for `ds`: every dataset value is reduced to a safe single path
    component (no separators, no leading dots, at most 64 characters), so no value can make
    the path leave the destination folder."""
    out = []
    for literal, name, _spec, _conv in string.Formatter().parse(layout):
        out.append(literal)
        if name is not None:
            out.append(_safe_component(ds.get(name, "")))
    return PurePosixPath("".join(out))


def deliver_to_folder(
    dest: FolderDestination, relative: PurePosixPath, source: Path, sync_directory: bool = True
) -> Path:
    """Put `source` at dest.path/relative atomically (temporary name, rename).

    `source` is durable already (the spool fsyncs everything it hands out), so on the same
    filesystem it is hard-linked: no copy, no second write of the data. Elsewhere it is
    copied and fsync'd. The folder is fsync'd unless the caller does that for a group of files
    (`sync_directory=False`).
    """
    root = dest.path.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or target == root:
        raise DeliveryError(f"path {relative} leaves {root}; refused", retryable=False)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if link_into(target, source):
            if sync_directory:
                fsync_directory(target.parent)
        else:
            write_durably(target, target.parent, source=source, sync_directory=sync_directory)
    except OSError as exc:
        raise DeliveryError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


# --- session -------------------------------------------------------------------------------


class FolderSession(DestinationSession):
    """Places a batch's files, then fsyncs each folder they went to once."""

    gather = GATHER

    def __init__(self, dest: FolderDestination):
        self.dest = dest

    def deliver(self, batch: Sequence[Delivery], stopping: Callable[[], bool]) -> Iterator[Result]:
        placed: list[Delivery] = []
        folders: set[Path] = set()
        for d in batch:
            if stopping():
                break
            assert d.relpath is not None
            try:
                target = deliver_to_folder(
                    self.dest, PurePosixPath(d.relpath), Path(d.path), sync_directory=False
                )
            except Exception as exc:  # e.g. a file that cannot be read: not transient
                if self.transient(exc):  # e.g. the disk is full: the rest would fail too
                    yield from self._commit(placed, folders)
                    yield Failed((d,), exc)
                    return
                yield Failed((d,), exc)
                continue
            placed.append(d)
            folders.add(target.parent)
        yield from self._commit(placed, folders)

    @staticmethod
    def _commit(placed: list[Delivery], folders: set[Path]) -> Iterator[Result]:
        try:
            for folder in folders:
                fsync_directory(folder)
        except OSError as exc:
            error = DeliveryError(f"cannot sync {folder}: {exc.strerror or exc}")
            yield Failed(tuple(placed), error)
            return
        if placed:
            yield Delivered(tuple(placed))


def _relpath(dest: FolderDestination, ds: Dataset) -> str:
    return str(layout_path(dest.layout, ds))


TYPE = DestinationType(FolderDestination, FolderSession, relpath=_relpath)
