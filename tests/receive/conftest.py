"""Fixtures of the receive tests."""

from __future__ import annotations

import pytest

from node import pynetdicom_patches


@pytest.fixture
def pynetdicom_patched(monkeypatch):
    """pynetdicom with the node's patches (pynetdicom_patches.install), and as it was again
    after the test: other tests run pynetdicom peers in this process."""
    for owner, name in pynetdicom_patches.PATCHED:
        monkeypatch.setattr(owner, name, getattr(owner, name))
    pynetdicom_patches.install()
