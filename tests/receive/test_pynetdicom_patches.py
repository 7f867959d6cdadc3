"""The private names of pynetdicom the node uses (node/pynetdicom_patches.py) still exist in the
installed pynetdicom, so an upgrade that renames or moves one fails here instead of making the
node misbehave; and nothing else in node/ reaches into pynetdicom's internals."""

from __future__ import annotations

import ast
import importlib
import inspect
import socket

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from node import pynetdicom_patches
from node.pynetdicom_patches import (
    MISSING,
    NODE_ATTRIBUTES,
    ORIGINALS,
    PATCHED,
    PRIVATE_NAMES,
    REACTOR_SLEEP,
    PrivateName,
    dotted,
)
from tests.conftest import REPO


def resolve(path: str):
    """A module or a class by its dotted path."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def instances():
    """An object of each class whose instances the node reads, as pynetdicom makes them for an
    accepted association (nothing started, not connected)."""
    assoc = Association(AE(), "acceptor")
    with socket.socket() as sock:
        wrapped = AssociationSocket(assoc, client_socket=sock)
        made = [assoc, assoc.dul, assoc.dimse, assoc.acse, assoc.requestor,
                assoc.dul.state_machine, wrapped, AE()]  # fmt: skip
        yield {type(thing): thing for thing in made}


@pytest.mark.parametrize("private", PRIVATE_NAMES, ids=lambda p: f"{p.owner}.{p.name}")
def test_each_private_name_the_node_uses_is_in_the_installed_pynetdicom(
    private: PrivateName, instances
):
    owner = resolve(private.owner)
    if (owner, private.name) in ORIGINALS:  # replaced by install(): pynetdicom's own, from before
        found = ORIGINALS[owner, private.name] is not MISSING
    else:
        found = hasattr(instances[owner] if private.instance else owner, private.name)
    assert found, (
        f"pynetdicom {pynetdicom.__version__} has no {private.owner}.{private.name}, which the "
        f"node uses: {private.use}"
    )


def test_pynetdicoms_reactors_still_sleep_what_the_node_replaces(instances):
    """The waits replace sleeps of REACTOR_SLEEP in pynetdicom's two reactor loops."""
    assert instances[DULServiceProvider]._run_loop_delay == REACTOR_SLEEP
    assert f"time.sleep({REACTOR_SLEEP})" in inspect.getsource(Association._run_reactor)


@pytest.mark.parametrize("owner, name", NODE_ATTRIBUTES)
def test_the_attributes_the_node_sets_on_pynetdicoms_objects_are_not_pynetdicoms(
    owner, name, instances
):
    cls = resolve(owner)
    assert not hasattr(cls, name)
    assert not hasattr(instances[cls], name)


def test_every_patch_is_listed_and_install_is_idempotent(pynetdicom_patched):
    listed = {(p.owner, p.name) for p in PRIVATE_NAMES}
    assert {(dotted(owner), name) for owner, name in PATCHED} <= listed
    installed = {(owner, name): getattr(owner, name) for owner, name in PATCHED}
    assert all(installed[key] is not ORIGINALS[key] for key in PATCHED)  # all replaced
    pynetdicom_patches.install()
    assert {(owner, name): getattr(owner, name) for owner, name in PATCHED} == installed


# Names that are pynetdicom's internals: used in node/ only by node/pynetdicom_patches.py.
_INTERNAL_ATTRIBUTES = {
    "dul", "acse", "dimse", "_accepted_cx", "to_user_queue", "to_provider_queue",
    "event_queue", "state_machine", "msg_queue", "_decode_pdu", "_recv_pdu", "_read_pdu_data",
    "send_pdu", "_run_loop_delay", "primitive",
}  # fmt: skip
_INTERNAL_IMPORTS = {"DULServiceProvider", "AssociationSocket", "dul"}


def test_no_other_module_of_the_node_uses_pynetdicoms_internals():
    fence = REPO / "node" / "pynetdicom_patches.py"
    found = []
    for path in sorted((REPO / "node").rglob("*.py")):
        if path == fence:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and (
                node.attr in _INTERNAL_ATTRIBUTES or node.attr.startswith("_node_")
            ):
                found.append(f"{where} .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pynetdicom"):
                parts = node.module.split(".") + [a.name for a in node.names]  # type: ignore[union-attr]
                bad = [p for p in parts[1:] if p.startswith("_") or p in _INTERNAL_IMPORTS]
                found += [f"{where} {node.module}: {p}" for p in bad]
    assert not found, "pynetdicom's internals outside node/pynetdicom_patches.py: " + str(found)
