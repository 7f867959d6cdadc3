"""Durable delivery state: the outputs of each received instance, and one row per (output,
destination), in SQLite (WAL, synchronous FULL) inside the spool, so queue state survives
kill -9 and power loss together with the files.

An entry (a received instance) is forgotten only when no destination still has any of its
outputs pending;
what a destination gave up on is kept in the dead-letter folder, never deleted.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

log = logging.getLogger("dicom_node.deliver")

# The schema's version is the file's `PRAGMA user_version`. A queue of an older version is
# migrated when it is opened for writing, in one transaction with the new version number (a
# crash leaves it as it was); a newer one is refused (QueueVersionError).
SCHEMA_VERSION = 1

# Version 1. An entry's outputs are numbered from 0 (today processing makes one); each delivery
# says which output it sends. A delivery row is self-contained (the file, its SOP class and
# syntax) so that a dead letter's row outlives its entry and can still be retried.
_SCHEMA_V1 = (
    """CREATE TABLE entries (
    entry TEXT PRIMARY KEY,          -- spool entry id
    incoming TEXT NOT NULL,          -- the received file
    done INTEGER NOT NULL DEFAULT 0  -- every destination has it (or dead-lettered it)
)""",
    """CREATE TABLE outputs (
    entry TEXT NOT NULL,             -- whose output
    output INTEGER NOT NULL,         -- its number: 0, 1, ...
    path TEXT NOT NULL,              -- the file: in out/, or the received file sent as received
    PRIMARY KEY (entry, output)
)""",
    """CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    entry TEXT NOT NULL,
    output INTEGER NOT NULL,         -- which of the entry's outputs it sends (outputs.output)
    destination TEXT NOT NULL,
    path TEXT NOT NULL,              -- the file to send: the output, or its dead-letter copy
    relpath TEXT,                    -- where the destination puts it, for types that lay out files
    sop_class TEXT NOT NULL,
    syntax TEXT NOT NULL,
    enqueued REAL NOT NULL,
    next_attempt REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,   -- every failed try
    failures INTEGER NOT NULL DEFAULT 0,   -- refusals that are not transient
    last_error TEXT,
    state TEXT NOT NULL DEFAULT 'pending'  -- pending | dead
)""",
    "CREATE INDEX deliveries_due ON deliveries (destination, state, next_attempt)",
    "CREATE INDEX deliveries_entry ON deliveries (entry, state)",
)
_SCHEMA = _SCHEMA_V1  # what a new queue is created with: version SCHEMA_VERSION

# _MIGRATIONS[n] takes a queue from version n to n + 1. Each step names the tables of the
# version it makes itself (never _SCHEMA, which moves on), so a migrated queue and a new one
# have the same schema.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: entries.output (the one transcoded file, NULL when sent as received) becomes
    # output 0 of the entry, and every delivery sends output 0. Version 0 set no user_version.
    (
        "ALTER TABLE entries RENAME TO entries_v0",
        "ALTER TABLE deliveries RENAME TO deliveries_v0",
        "DROP INDEX deliveries_due",
        "DROP INDEX deliveries_entry",
        *_SCHEMA_V1,
        "INSERT INTO entries (entry, incoming, done) SELECT entry, incoming, done FROM entries_v0",
        "INSERT INTO outputs (entry, output, path)"
        " SELECT entry, 0, coalesce(output, incoming) FROM entries_v0",
        "INSERT INTO deliveries (id, entry, output, destination, path, relpath, sop_class, syntax,"
        " enqueued, next_attempt, attempts, failures, last_error, state)"
        " SELECT id, entry, 0, destination, path, relpath, sop_class, syntax, enqueued,"
        " next_attempt, attempts, failures, last_error, state FROM deliveries_v0",
        "DROP TABLE entries_v0",
        "DROP TABLE deliveries_v0",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

QUEUE_FILE = "queue.sqlite3"


class QueueVersionError(Exception):
    """The queue was written by a newer dicom-node than this one: its schema is unknown here."""


@dataclass(frozen=True)
class Delivery:
    id: int
    entry: str
    output: int  # which of the entry's outputs
    destination: str
    path: str
    relpath: str | None
    sop_class: str
    syntax: str
    enqueued: float
    attempts: int
    failures: int


_DELIVERY_COLUMNS = ", ".join(f.name for f in fields(Delivery))  # deliveries columns, in order


@dataclass(frozen=True)
class NewOutput:
    path: str  # durable already: in out/, or the received file itself
    sop_class: str
    syntax: str


@dataclass(frozen=True)
class NewDelivery:
    destination: str
    output: int  # which output it sends: an index into NewEntry.outputs
    relpath: str | None = None  # where the destination puts it (relpath_for)


@dataclass(frozen=True)
class NewEntry:
    entry: str  # spool entry id
    incoming: str  # the received file
    outputs: tuple[NewOutput, ...]  # output n is outputs[n]
    deliveries: tuple[NewDelivery, ...]


@dataclass(frozen=True)
class FinishedEntry:
    entry: str
    incoming: str
    outputs: tuple[str, ...]  # the files it made to send, by number; not the received file


@dataclass(frozen=True)
class DestinationStats:
    destination: str
    pending: int
    oldest_age: float | None  # seconds
    retries: int
    dead: int
    last_error: str | None


class DeliveryQueue:
    def __init__(self, path: Path, readonly: bool = False):
        """Open (or create) the queue at `path`, migrating an older schema unless `readonly`:
        read-only (`stats`, for `dicom-node queue` beside any node) reads only columns every
        version has. A schema newer than SCHEMA_VERSION raises QueueVersionError, before
        anything is written."""
        self.path = path
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        try:
            self._db.execute("PRAGMA busy_timeout = 10000")
            self._refuse_newer(_user_version(self._db))
            if not readonly:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                self._tx(self._prepare)
        except BaseException:
            self._db.close()
            raise

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise QueueVersionError(
                f"{self.path}: the delivery queue has schema version {version}, and this "
                f"dicom-node knows versions up to {SCHEMA_VERSION}: it was written by a newer "
                "dicom-node, which this one cannot read (nothing was changed); run that one"
                " or a newer one"
            )

    def _prepare(self, db) -> None:
        """Create the schema, or migrate an older one to SCHEMA_VERSION (inside _tx)."""
        version = _user_version(db)  # again: another process may have migrated it meanwhile
        self._refuse_newer(version)
        if version == SCHEMA_VERSION:
            return
        (tables,) = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()
        if version == 0 and not tables:
            for statement in _SCHEMA:
                db.execute(statement)
        else:
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    db.execute(statement)
            log.info("delivery queue %s: schema version %d migrated to %d", self.path, version,
                     SCHEMA_VERSION)  # fmt: skip
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def _tx(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    # --- the dispatcher's side -------------------------------------------------------------

    def add_all(self, entries: list[NewEntry]) -> None:
        """Queue each entry's outputs for their deliveries, all in one transaction (one commit,
        one fsync)."""
        now = time.time()

        def add(db):
            for e in entries:
                db.execute("INSERT OR REPLACE INTO entries (entry, incoming) VALUES (?, ?)",
                           (e.entry, e.incoming))  # fmt: skip
                db.executemany(
                    "INSERT OR REPLACE INTO outputs (entry, output, path) VALUES (?, ?, ?)",
                    [(e.entry, n, output.path) for n, output in enumerate(e.outputs)],
                )
                rows = []
                for d in e.deliveries:
                    if not 0 <= d.output < len(e.outputs):
                        raise ValueError(f"{e.entry} has no output {d.output} for {d.destination}")
                    output = e.outputs[d.output]
                    rows.append((e.entry, d.output, d.destination, output.path, d.relpath,
                                 output.sop_class, output.syntax, now))  # fmt: skip
                db.executemany(
                    "INSERT INTO deliveries (entry, output, destination, path, relpath, sop_class,"
                    " syntax, enqueued) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

        if entries:
            self._tx(add)

    def known_entries(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT entry FROM entries")}

    def referenced_files(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT path FROM outputs UNION SELECT path FROM deliveries")
            return {row[0] for row in rows if row[0]}

    def finished_entries(self) -> list[FinishedEntry]:
        with self._lock:
            rows = self._db.execute("SELECT entry, incoming FROM entries WHERE done = 1")
            return [_finished(self._db, entry, incoming) for entry, incoming in rows.fetchall()]

    def forget_all(self, entries: list[str]) -> None:
        """Forget entries and their outputs (their deliveries are gone, or dead letters that
        refer to their own copies)."""

        def forget(db):
            keys = [(entry,) for entry in entries]
            db.executemany("DELETE FROM outputs WHERE entry = ?", keys)
            db.executemany("DELETE FROM entries WHERE entry = ?", keys)

        self._tx(forget)

    # --- a destination worker's side -------------------------------------------------------

    def due(self, destination: str, now: float, limit: int) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE destination = ?"
                " AND state = 'pending' AND next_attempt <= ? ORDER BY id LIMIT ?",
                (destination, now, limit),
            )
            return [Delivery(*row) for row in rows]

    def next_attempt(self, destination: str) -> float | None:
        with self._lock:
            (value,) = self._db.execute(
                "SELECT min(next_attempt) FROM deliveries WHERE destination = ?"
                " AND state = 'pending'",
                (destination,),
            ).fetchone()
            return value

    def expired(self, destination: str, enqueued_before: float) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE destination = ?"
                " AND state = 'pending' AND enqueued < ? ORDER BY id",
                (destination, enqueued_before),
            )
            return [Delivery(*row) for row in rows]

    def failed(self, d: Delivery, error: str, next_attempt: float, failure: bool) -> None:
        self._tx(
            lambda db: db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, failures = failures + ?,"
                " next_attempt = ?, last_error = ? WHERE id = ?",
                (int(failure), next_attempt, error, d.id),
            )
        )

    def delivered_all(self, ds: list[Delivery]) -> list[FinishedEntry]:
        """Remove the rows, in one transaction (one commit, one fsync); the entries whose last
        pending delivery this was."""

        def settle_all(db) -> list[FinishedEntry]:
            settled = (self._settle(db, d, "DELETE FROM deliveries WHERE id = ?", ()) for d in ds)
            return [finished for finished in settled if finished is not None]

        return self._tx(settle_all)

    def dead(self, d: Delivery, dead_path: str, error: str) -> FinishedEntry | None:
        sql = "UPDATE deliveries SET state = 'dead', path = ?, last_error = ? WHERE id = ?"
        return self._tx(lambda db: self._settle(db, d, sql, (dead_path, error)))

    @staticmethod
    def _settle(db, d: Delivery, sql: str, params: tuple) -> FinishedEntry | None:
        db.execute(sql, (*params, d.id))
        (left,) = db.execute(
            "SELECT count(*) FROM deliveries WHERE entry = ? AND state = 'pending'", (d.entry,)
        ).fetchone()
        if left:
            return None
        db.execute("UPDATE entries SET done = 1 WHERE entry = ?", (d.entry,))
        row = db.execute("SELECT incoming FROM entries WHERE entry = ?", (d.entry,)).fetchone()
        return _finished(db, d.entry, row[0]) if row else None

    # --- operators -------------------------------------------------------------------------

    def stats(self, destinations: list[str]) -> list[DestinationStats]:
        now = time.time()
        result = []
        with self._lock:
            for name in destinations:
                pending, oldest, retries = self._db.execute(
                    "SELECT count(*), min(enqueued), coalesce(sum(attempts), 0) FROM deliveries"
                    " WHERE destination = ? AND state = 'pending'",
                    (name,),
                ).fetchone()
                (dead,) = self._db.execute(
                    "SELECT count(*) FROM deliveries WHERE destination = ? AND state = 'dead'",
                    (name,),
                ).fetchone()
                last = self._db.execute(
                    "SELECT last_error FROM deliveries WHERE destination = ? AND last_error"
                    " IS NOT NULL ORDER BY id DESC LIMIT 1",
                    (name,),
                ).fetchone()
                age = now - oldest if oldest is not None else None
                result.append(
                    DestinationStats(name, pending, age, retries, dead, last[0] if last else None)
                )
        return result

    def retry_dead(self, destination: str) -> int:
        """Put a destination's dead letters back in its queue, as if just received."""
        now = time.time()

        def retry(db):
            cursor = db.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, failures = 0,"
                " next_attempt = 0, enqueued = ? WHERE destination = ? AND state = 'dead'",
                (now, destination),
            )
            db.execute(
                "UPDATE entries SET done = 0 WHERE entry IN (SELECT entry FROM deliveries"
                " WHERE destination = ? AND state = 'pending')",
                (destination,),
            )
            return cursor.rowcount

        return self._tx(retry)


def _user_version(db) -> int:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    return version


def _finished(db, entry: str, incoming: str) -> FinishedEntry:
    rows = db.execute(
        "SELECT path FROM outputs WHERE entry = ? AND path != ? ORDER BY output", (entry, incoming)
    )
    return FinishedEntry(entry, incoming, tuple(path for (path,) in rows))
