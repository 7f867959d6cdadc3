"""The delivery queue: entries and their outputs, deliveries per (output, destination), dead
letters, and the schema's version (migrating a queue an older node wrote, refusing a newer one)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from node.config import FolderDestination, RetryPolicy
from node.deliver import queue as queue_module
from node.deliver.queue import (
    SCHEMA_VERSION,
    DeliveryQueue,
    FinishedEntry,
    NewDelivery,
    NewEntry,
    NewOutput,
    QueueVersionError,
)
from node.deliver.worker import DestinationWorker
from node.spool import Spool
from tests.conftest import wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEGLS = "1.2.840.10008.1.2.4.80"


def entry(name: str, outputs: list[NewOutput], *deliveries: NewDelivery) -> NewEntry:
    return NewEntry(name, f"/spool/incoming/{name}.dcm", tuple(outputs), deliveries)


@pytest.fixture
def queue(tmp_path: Path):
    q = DeliveryQueue(tmp_path / "queue.sqlite3")
    yield q
    q.close()


def schema(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        db.close()


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


# --- entries, outputs, deliveries ----------------------------------------------------------


def test_a_new_queue_has_the_current_schema_version(tmp_path: Path, queue):
    assert user_version(tmp_path / "queue.sqlite3") == SCHEMA_VERSION
    tables = {row[1] for row in schema(tmp_path / "queue.sqlite3") if row[0] == "table"}
    assert tables == {"entries", "outputs", "deliveries"}


def test_an_entry_is_finished_when_every_destination_has_its_output(queue):
    out = NewOutput("/spool/out/e.0.dcm", CT, JPEGLS)
    queue.add_all([entry("e", [out], NewDelivery("a", 0, "x/e.dcm"), NewDelivery("b", 0))])
    assert queue.known_entries() == {"e"}
    (to_a,) = queue.due("a", time.time(), 10)
    assert (to_a.entry, to_a.output, to_a.path, to_a.relpath) == ("e", 0, out.path, "x/e.dcm")
    assert (to_a.sop_class, to_a.syntax, to_a.attempts, to_a.failures) == (CT, JPEGLS, 0, 0)
    assert queue.delivered_all([to_a]) == []  # b has not got it yet
    (to_b,) = queue.due("b", time.time(), 10)
    assert to_b.relpath is None
    assert queue.delivered_all([to_b]) == [
        FinishedEntry("e", "/spool/incoming/e.dcm", ("/spool/out/e.0.dcm",))
    ]
    assert queue.finished_entries() == [
        FinishedEntry("e", "/spool/incoming/e.dcm", ("/spool/out/e.0.dcm",))
    ]
    queue.forget_all(["e"])
    assert queue.known_entries() == set() and queue.referenced_files() == set()


def test_an_output_sent_as_received_is_not_a_file_of_its_own(queue):
    queue.add_all([entry("e", [NewOutput("/spool/incoming/e.dcm", CT, EXPLICIT)],
                         NewDelivery("a", 0))])  # fmt: skip
    assert queue.referenced_files() == {"/spool/incoming/e.dcm"}
    (d,) = queue.due("a", time.time(), 10)
    (finished,) = queue.delivered_all([d])
    assert finished.outputs == ()  # the received file is removed as the entry's own


def test_each_destination_can_get_another_output_of_the_same_entry(queue):
    outputs = [NewOutput("/spool/out/e.0.dcm", CT, JPEGLS),
               NewOutput("/spool/out/e.1.dcm", CT, EXPLICIT)]  # fmt: skip
    queue.add_all([entry("e", outputs, NewDelivery("archive", 0, "e.dcm"),
                         NewDelivery("viewer", 1))])  # fmt: skip
    assert queue.referenced_files() == {"/spool/out/e.0.dcm", "/spool/out/e.1.dcm"}
    (archive,) = queue.due("archive", time.time(), 10)
    (viewer,) = queue.due("viewer", time.time(), 10)
    assert (archive.output, archive.path, archive.syntax) == (0, "/spool/out/e.0.dcm", JPEGLS)
    assert (viewer.output, viewer.path, viewer.syntax) == (1, "/spool/out/e.1.dcm", EXPLICIT)
    assert queue.delivered_all([viewer]) == []
    (finished,) = queue.delivered_all([archive])
    assert finished.outputs == ("/spool/out/e.0.dcm", "/spool/out/e.1.dcm")


def test_a_delivery_of_an_output_the_entry_does_not_have_queues_nothing(queue):
    good = entry("good", [NewOutput("/o/good.0.dcm", CT, EXPLICIT)], NewDelivery("a", 0))
    bad = entry("bad", [NewOutput("/o/bad.0.dcm", CT, EXPLICIT)], NewDelivery("a", 1))
    with pytest.raises(ValueError, match="bad has no output 1 for a"):
        queue.add_all([good, bad])
    assert queue.known_entries() == set() and queue.due("a", time.time(), 10) == []


def test_failures_wait_for_their_next_attempt_and_are_counted(queue):
    queue.add_all([entry("e", [NewOutput("/o/e.0.dcm", CT, EXPLICIT)], NewDelivery("a", 0))])
    (d,) = queue.due("a", time.time(), 10)
    later = time.time() + 60
    queue.failed(d, "peer busy", later, failure=False)
    assert queue.due("a", time.time(), 10) == []
    assert queue.next_attempt("a") == pytest.approx(later)
    (again,) = queue.due("a", later, 10)
    assert (again.attempts, again.failures) == (1, 0)
    queue.failed(again, "refused", later, failure=True)
    (third,) = queue.due("a", later, 10)
    assert (third.attempts, third.failures) == (2, 1)
    (stats,) = queue.stats(["a"])
    assert (stats.pending, stats.retries, stats.dead, stats.last_error) == (1, 2, 0, "refused")
    assert queue.expired("a", time.time() + 1) == [third]
    assert queue.expired("a", third.enqueued) == []


def test_a_dead_letter_outlives_its_entry_and_can_be_retried(queue):
    queue.add_all([entry("e", [NewOutput("/o/e.0.dcm", CT, JPEGLS)], NewDelivery("a", 0, "r"))])
    (d,) = queue.due("a", time.time(), 10)
    finished = queue.dead(d, "/spool/dead-letter/a/e.dcm", "refused 5 times")
    assert finished == FinishedEntry("e", "/spool/incoming/e.dcm", ("/o/e.0.dcm",))
    queue.forget_all(["e"])  # the node removes the entry's files: the dead letter is a copy
    assert queue.referenced_files() == {"/spool/dead-letter/a/e.dcm"}
    (stats,) = queue.stats(["a"])
    assert (stats.pending, stats.dead, stats.last_error) == (0, 1, "refused 5 times")
    assert queue.retry_dead("a") == 1
    (retried,) = queue.due("a", time.time(), 10)
    assert (retried.path, retried.relpath, retried.output) == ("/spool/dead-letter/a/e.dcm", "r", 0)
    assert (retried.sop_class, retried.syntax, retried.attempts) == (CT, JPEGLS, 0)
    assert queue.delivered_all([retried]) == []  # its entry was forgotten already
    assert queue.stats(["a"])[0].dead == 0


# --- schema versions -------------------------------------------------------------------------

# The schema of every queue written before the schema carried a version (node/deliver/queue.py
# at commit dd1a32e), verbatim: version 0, no user_version set.
SCHEMA_V0 = """
CREATE TABLE IF NOT EXISTS entries (
    entry TEXT PRIMARY KEY,          -- spool entry id
    incoming TEXT NOT NULL,          -- the received file
    output TEXT,                     -- the transcoded file, NULL when sent as received
    done INTEGER NOT NULL DEFAULT 0  -- every destination has it (or dead-lettered it)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    entry TEXT NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,              -- the file to send
    relpath TEXT,                    -- for folder destinations: where it goes
    sop_class TEXT NOT NULL,
    syntax TEXT NOT NULL,
    enqueued REAL NOT NULL,
    next_attempt REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,   -- every failed try
    failures INTEGER NOT NULL DEFAULT 0,   -- refusals that are not transient
    last_error TEXT,
    state TEXT NOT NULL DEFAULT 'pending'  -- pending | dead
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_attempt);
CREATE INDEX IF NOT EXISTS deliveries_entry ON deliveries (entry, state);
"""

_V0_DELIVERY_COLUMNS = (
    "id, entry, destination, path, relpath, sop_class, syntax, enqueued, next_attempt, attempts,"
    " failures, last_error, state"
)
LATER = 4_000_000_000.0  # a next attempt long after the test


def v0_queue(path: Path, entries: list[tuple], deliveries: list[tuple]) -> None:
    """A queue file as the node wrote it before the schema had a version (WAL, as it ran)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(SCHEMA_V0)
    db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?)", entries)
    db.executemany(f"INSERT INTO deliveries ({_V0_DELIVERY_COLUMNS}) VALUES"
                   " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", deliveries)  # fmt: skip
    assert db.execute("PRAGMA user_version").fetchone() == (0,)
    db.close()


def rows(path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute(sql))
    finally:
        db.close()


@pytest.fixture
def old_spool(tmp_path: Path):
    """A spool whose queue has today's schema (version 0) with work in every state:
    - t: transcoded (out/t.dcm), pending for the archive, and for a PACS that refused it once
      and is to be tried again much later;
    - r: sent as received (output NULL), pending for the archive;
    - d: dead-lettered by the archive, its entry since forgotten (the copy is in dead-letter/);
    - f: delivered everywhere, but the node stopped before it removed the files."""
    spool = Spool(tmp_path / "spool")
    files = {}
    for name in ("t", "r", "f"):
        files[name] = spool.incoming / f"{name}.dcm"
        files[name].write_bytes(f"received {name}".encode())
    for name in ("t", "f"):
        (spool.out / f"{name}.dcm").write_bytes(f"transcoded {name}".encode())
    dead = spool.dead_letter(
        "archive", "d", _written(tmp_path / "d.dcm", b"dead d"), "refused 5 times"
    )
    enqueued = time.time() - 60
    entries = [
        ("t", str(files["t"]), str(spool.out / "t.dcm"), 0),
        ("r", str(files["r"]), None, 0),
        ("f", str(files["f"]), str(spool.out / "f.dcm"), 1),
    ]
    deliveries = [
        (1, "d", "archive", str(dead), "a/d.dcm", CT, JPEGLS, enqueued - 100, 0, 5, 5,
         "refused 5 times", "dead"),
        (2, "t", "archive", str(spool.out / "t.dcm"), "a/t.dcm", CT, JPEGLS, enqueued, 0, 0, 0,
         None, "pending"),
        (3, "t", "pacs", str(spool.out / "t.dcm"), None, CT, JPEGLS, enqueued, LATER, 1, 1,
         "pacs answered status 0xC000", "pending"),
        (4, "r", "archive", str(files["r"]), "a/r.dcm", CT, EXPLICIT, enqueued, 0, 0, 0, None,
         "pending"),
    ]  # fmt: skip
    path = spool.root / "queue.sqlite3"
    v0_queue(path, entries, deliveries)
    return spool, path, deliveries


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_queue_without_a_version_is_migrated_with_every_delivery(old_spool, tmp_path: Path):
    spool, path, before = old_spool
    DeliveryQueue(path).close()
    assert user_version(path) == SCHEMA_VERSION
    after = rows(path, f"SELECT {_V0_DELIVERY_COLUMNS}, output FROM deliveries")
    assert after == sorted((*row, 0) for row in before)  # every one, as it was, of output 0
    assert rows(path, "SELECT entry, output, path FROM outputs") == [
        ("f", 0, str(spool.out / "f.dcm")),
        ("r", 0, str(spool.incoming / "r.dcm")),  # sent as received: the received file
        ("t", 0, str(spool.out / "t.dcm")),
    ]
    assert rows(path, "SELECT entry, done FROM entries") == [("f", 1), ("r", 0), ("t", 0)]
    # a migrated queue and a new one are the same schema
    assert schema(path) == schema(_fresh(tmp_path / "fresh.sqlite3"))
    DeliveryQueue(path).close()  # opening it again changes nothing
    assert rows(path, f"SELECT {_V0_DELIVERY_COLUMNS}, output FROM deliveries") == after


def _fresh(path: Path) -> Path:
    DeliveryQueue(path).close()
    return path


def test_a_migrated_queue_delivers_retries_and_finishes_what_it_held(old_spool, tmp_path: Path):
    spool, path, _before = old_spool
    queue = DeliveryQueue(path)
    finished: list[FinishedEntry] = []

    def on_finished(entries: list[FinishedEntry]) -> None:  # what the pipeline does
        spool.complete_all([(Path(f.incoming), *map(Path, f.outputs)) for f in entries])
        queue.forget_all([f.entry for f in entries])
        finished.extend(entries)

    # the node's start: finish what was delivered before the stop, keep what is referenced
    (stopped,) = queue.finished_entries()
    assert stopped == FinishedEntry("f", str(spool.incoming / "f.dcm"), (str(spool.out / "f.dcm"),))
    on_finished([stopped])
    spool.remove_orphan_outputs(queue.referenced_files())
    assert sorted(p.name for p in spool.out.iterdir()) == ["t.dcm"]

    archive = FolderDestination("archive", tmp_path / "archive", "{SOPInstanceUID}.dcm",
                                RetryPolicy(initial_delay=0.05, max_delay=0.1))  # fmt: skip
    worker = DestinationWorker(archive, queue, spool, on_finished)
    worker.start()
    try:
        wait_for(lambda: len(finished) == 2, 30, "r delivered to the archive")
        assert (tmp_path / "archive/a/t.dcm").read_bytes() == b"transcoded t"
        assert (tmp_path / "archive/a/r.dcm").read_bytes() == b"received r"
        assert finished[1] == FinishedEntry("r", str(spool.incoming / "r.dcm"), ())
        assert not (spool.incoming / "r.dcm").exists()
        assert (spool.out / "t.dcm").exists()  # the PACS has not got t yet

        # the PACS's refusal is remembered, and its retry is still due when it was
        assert queue.due("pacs", time.time(), 10) == []
        (pacs,) = queue.due("pacs", LATER, 10)
        assert (pacs.entry, pacs.output, pacs.path) == ("t", 0, str(spool.out / "t.dcm"))
        assert (pacs.attempts, pacs.failures) == (1, 1)
        on_finished(queue.delivered_all([pacs]))
        assert finished[2] == FinishedEntry("t", str(spool.incoming / "t.dcm"),
                                            (str(spool.out / "t.dcm"),))  # fmt: skip
        assert not list(spool.out.iterdir()) and not list(spool.incoming.iterdir())

        # the dead letter comes back and is delivered from its copy, which then goes
        assert queue.retry_dead("archive") == 1
        worker.wake()
        wait_for(lambda: (tmp_path / "archive/a/d.dcm").exists(), 30, "the retried dead letter")
        assert (tmp_path / "archive/a/d.dcm").read_bytes() == b"dead d"
        wait_for(lambda: not list((spool.dead_letter_dir / "archive").iterdir()), 30,
                 "the dead-letter copy to be removed")  # fmt: skip
        assert queue.stats(["archive", "pacs"])[0].dead == 0
    finally:
        worker.stop()
        queue.close()


def test_a_failed_migration_leaves_the_old_queue_as_it_was(old_spool, monkeypatch):
    _spool, path, before = old_spool
    v0_schema = schema(path)
    broken = (*queue_module._MIGRATIONS[0], "INSERT INTO no_such_table VALUES (1)")
    monkeypatch.setattr(queue_module, "_MIGRATIONS", (broken,))
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        DeliveryQueue(path)
    assert user_version(path) == 0 and schema(path) == v0_schema
    assert rows(path, f"SELECT {_V0_DELIVERY_COLUMNS} FROM deliveries") == sorted(before)
    monkeypatch.undo()
    DeliveryQueue(path).close()
    assert user_version(path) == SCHEMA_VERSION


def test_reading_an_old_queue_migrates_nothing(old_spool):
    """`dicom-node queue` beside a node that has not been restarted yet."""
    _spool, path, _before = old_spool
    queue = DeliveryQueue(path, readonly=True)
    try:
        archive, pacs = queue.stats(["archive", "pacs"])
    finally:
        queue.close()
    assert (archive.pending, archive.dead, pacs.pending, pacs.retries) == (2, 1, 1, 1)
    assert user_version(path) == 0


@pytest.mark.parametrize("readonly", [False, True])
def test_a_queue_from_a_newer_node_is_refused(tmp_path: Path, readonly: bool):
    path = tmp_path / "queue.sqlite3"
    _fresh(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    written = schema(path)
    with pytest.raises(QueueVersionError) as refused:
        DeliveryQueue(path, readonly=readonly)
    assert str(refused.value) == (
        f"{path}: the delivery queue has schema version {SCHEMA_VERSION + 1}, and this "
        f"dicom-node knows versions up to {SCHEMA_VERSION}: it was written by a newer "
        "dicom-node, which this one cannot read (nothing was changed); run that one or a "
        "newer one"
    )
    assert user_version(path) == SCHEMA_VERSION + 1 and schema(path) == written


def test_serve_on_a_spool_from_a_newer_node_says_so_and_starts_nothing(tmp_path: Path):
    import subprocess
    import sys

    spool = tmp_path / "spool"
    spool.mkdir()
    db = sqlite3.connect(spool / queue_module.QUEUE_FILE)
    db.execute("PRAGMA user_version = 99")
    db.close()
    config = tmp_path / "node.yaml"
    config.write_text(
        "node: {host: 127.0.0.1, port: 0, spool: ./spool}\n"
        "destinations: {archive: {type: folder, path: ./archive}}\n"
        "rules: [{name: all, send_to: [archive]}]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "node.ops.cli", "serve", "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "schema version 99" in done.stderr and "nothing was started" in done.stderr
    assert "Traceback" not in done.stderr
