"""Destination types as plugins: one module per type (folder.py: a folder on a filesystem;
dicom.py: a DICOM peer, over C-STORE; dicomweb.py: a DICOMweb archive, over STOW-RS), each a
`DestinationType` (base.py) that serves one configuration class of node/config/schema.py.
Registering one is one entry in REGISTERED; the destination workers (node/deliver/worker.py)
and processing (node/transcode/process.py) read this registry, at the time they ask, and know
no type by name.

A new type is its module here and its configuration: a class in node/config/schema.py (and in
its `Destination` union), parsed by node/config/parse.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from node.deliver.destinations import dicom, dicomweb, folder
from node.deliver.destinations.base import (
    Delivered,
    DeliveryError,
    DestinationSession,
    DestinationType,
    Failed,
    Result,
    describe_error,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "REGISTERED", "Delivered", "DeliveryError", "DestinationSession", "DestinationType", "Failed",
    "Result", "describe_error", "relpath_for", "session_for", "type_for",
]  # fmt: skip

REGISTERED: tuple[DestinationType, ...] = (
    folder.TYPE,
    dicom.TYPE,
    dicomweb.TYPE,
)


def type_for(dest: object) -> DestinationType:
    """The registered type serving `dest`, a destination's configuration."""
    for registered in REGISTERED:
        if isinstance(dest, registered.config):
            return registered
    known = ", ".join(t.config.__name__ for t in REGISTERED)
    raise LookupError(f"no destination type serves {type(dest).__name__} (registered: {known})")


def session_for(dest: object) -> DestinationSession:
    """Open a session for `dest` (it connects when it first has something to send)."""
    return type_for(dest).open(dest)


def relpath_for(dest: object, ds: Dataset) -> str | None:
    """Where `dest` puts the instance `ds` (a folder: its layout path), or None when its type
    lays out no files."""
    relpath = type_for(dest).relpath
    return relpath(dest, ds) if relpath is not None else None
