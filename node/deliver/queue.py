"""Durable delivery state: one row per (instance, destination), in SQLite (WAL, synchronous
FULL) inside the spool, so queue state survives kill -9 and power loss together with the files.

An entry (a received instance) is forgotten only when no destination still has it pending;
what a destination gave up on is kept in the dead-letter folder, never deleted.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
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

QUEUE_FILE = "queue.sqlite3"


@dataclass(frozen=True)
class Delivery:
    id: int
    entry: str
    destination: str
    path: str
    relpath: str | None
    sop_class: str
    syntax: str
    enqueued: float
    attempts: int
    failures: int


@dataclass(frozen=True)
class NewDelivery:
    destination: str
    path: str
    relpath: str | None
    sop_class: str
    syntax: str


@dataclass(frozen=True)
class FinishedEntry:
    entry: str
    incoming: str
    output: str | None


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
        self.path = path
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(_SCHEMA)

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

    def add_all(self, rows: list[tuple[str, str, str | None, list[NewDelivery]]]) -> None:
        """Queue each entry (id, incoming file, output file or None) for its deliveries, all
        in one transaction (one commit, one fsync)."""
        now = time.time()

        def add(db):
            for entry, incoming, output, items in rows:
                db.execute(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, 0)", (entry, incoming, output)
                )
                db.executemany(
                    "INSERT INTO deliveries (entry, destination, path, relpath, sop_class,"
                    " syntax, enqueued) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (entry, d.destination, d.path, d.relpath, d.sop_class, d.syntax, now)
                        for d in items
                    ],  # fmt: skip
                )

        if rows:
            self._tx(add)

    def known_entries(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT entry FROM entries")}

    def referenced_files(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT output FROM entries UNION SELECT path FROM deliveries")
            return {row[0] for row in rows if row[0]}

    def finished_entries(self) -> list[FinishedEntry]:
        with self._lock:
            rows = self._db.execute("SELECT entry, incoming, output FROM entries WHERE done = 1")
            return [FinishedEntry(*row) for row in rows]

    def forget_all(self, entries: list[str]) -> None:
        self._tx(
            lambda db: db.executemany(
                "DELETE FROM entries WHERE entry = ?", [(entry,) for entry in entries]
            )
        )

    # --- a destination worker's side -------------------------------------------------------

    def due(self, destination: str, now: float, limit: int) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, entry, destination, path, relpath, sop_class, syntax, enqueued,"
                " attempts, failures FROM deliveries WHERE destination = ? AND state = 'pending'"
                " AND next_attempt <= ? ORDER BY id LIMIT ?",
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
                "SELECT id, entry, destination, path, relpath, sop_class, syntax, enqueued,"
                " attempts, failures FROM deliveries WHERE destination = ? AND state = 'pending'"
                " AND enqueued < ? ORDER BY id",
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
        row = db.execute(
            "SELECT entry, incoming, output FROM entries WHERE entry = ?", (d.entry,)
        ).fetchone()
        return FinishedEntry(*row) if row else None

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
