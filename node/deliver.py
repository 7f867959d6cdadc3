"""Delivery: put a processed instance where its rule says — a folder (atomic, fsync'd) or a DICOM
peer (C-STORE). Raises DeliveryError on failure; the caller keeps the spool entry and retries.
"""

from __future__ import annotations

import re
import socket
import string
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from node.config import DicomDestination, FolderDestination
from node.spool import write_durably

_MAX_COMPONENT = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._^=+-]")
# DIMSE statuses that mean the peer has the instance (PS3.7 Annex C: 0x0000, 0x0001, 0xBxxx).
_DELIVERED = (0x0000, 0x0001, 0x0107, 0x0116)


class DeliveryError(Exception):
    """The destination did not take the instance; `retryable` says whether trying later may help."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


# --- folder layout -------------------------------------------------------------------------


def layout_problem(layout: str) -> str | None:
    """Why `layout` is not a usable template, or None."""
    try:
        fields = list(string.Formatter().parse(layout))
    except ValueError as exc:
        return f"bad template {layout!r}: {exc}"
    for literal, name, spec, conversion in fields:
        if "\\" in literal or "\0" in literal:
            return "use '/' to separate folders"
        if name is None:
            continue
        if spec or conversion:
            return f"'{{{name}}}': format specs and conversions are not supported"
        if not name or tag_for_keyword(name) is None:
            return f"'{{{name}}}' is not a DICOM keyword"
    parts = PurePosixPath(layout).parts
    if layout.startswith("/") or any(p in ("..", ".") for p in parts):
        return "the layout must be a relative path without '.' or '..' components"
    if not parts or layout.endswith("/"):
        return "the layout must end with a file name"
    return None


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


def _read_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def deliver_to_folder(dest: FolderDestination, relative: PurePosixPath, source: Path) -> Path:
    """Copy `source` to dest.path/relative atomically (temporary name, fsync, rename)."""
    root = dest.path.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or target == root:
        raise DeliveryError(f"path {relative} leaves {root}; refused", retryable=False)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_durably(target, _read_chunks(source), target.parent)
    except OSError as exc:
        raise DeliveryError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


# --- DICOM peer ----------------------------------------------------------------------------


def deliver_to_peer(dest: DicomDestination, source: Path, sop_class: str, syntax: str) -> int:
    """C-STORE the file at `source` (sent without decoding) to `dest`; returns the status."""
    from pynetdicom import AE

    ae = AE(ae_title=dest.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout
    ae.connection_timeout = dest.timeout
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise DeliveryError(
            f"association with {dest.ae_title}@{dest.host}:{dest.port} "
            f"{'rejected' if assoc.is_rejected else 'failed'}"
        )
    try:
        set_nodelay(assoc)
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            raise DeliveryError(f"{dest.name} does not accept {sop_class} in {syntax}")
        status = assoc.send_c_store(source)
        code = int(status.Status) if "Status" in status else None
        if code is None:
            raise DeliveryError(f"{dest.name}: no C-STORE response (aborted or timed out)")
        if code not in _DELIVERED and code >> 12 != 0xB:
            comment = status.get("ErrorComment", "")
            raise DeliveryError(
                f"{dest.name} answered status 0x{code:04X} {comment}".strip(),
                retryable=(code >> 8) == 0xA7,
            )
        return code
    finally:
        if assoc.is_established:
            assoc.release()


def set_nodelay(assoc) -> None:
    """pynetdicom never sets TCP_NODELAY; without it small PDUs wait on delayed ACKs."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
