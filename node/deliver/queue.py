"""Durable delivery state: the outputs of each received instance, and one row per (output,
destination), in SQLite (WAL, synchronous FULL) inside the spool, so queue state survives
kill -9 and power loss together with the files.

An entry (a received instance) is forgotten only when no destination still has any of its
outputs pending or awaiting commitment (a DICOM destination with Storage Commitment holds what
it sent until the peer's N-EVENT-REPORT commits it); what a destination gave up on is kept in
the dead-letter folder, never deleted.
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
SCHEMA_VERSION = 2

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

# Version 2: a delivery may await Storage Commitment. The peer has it (C-STORE answered), the
# node asked it to commit it (N-ACTION, transaction_uid) and holds it until an N-EVENT-REPORT
# says it did; a failed reference goes back to pending. commit_due: when the request is (re)sent.
_DELIVERIES_V2 = (
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
    state TEXT NOT NULL DEFAULT 'pending', -- pending | awaiting-commitment | dead
    sop_instance TEXT,               -- awaiting-commitment: the SOP Instance UID the peer got
    transaction_uid TEXT,            -- awaiting-commitment: the Storage Commitment request
    commit_due REAL                  -- awaiting-commitment: when the request is (re)sent
)""",
    "CREATE INDEX deliveries_due ON deliveries (destination, state, next_attempt)",
    "CREATE INDEX deliveries_entry ON deliveries (entry, state)",
    "CREATE INDEX deliveries_transaction ON deliveries (transaction_uid)",
)
_SCHEMA_V2 = (*_SCHEMA_V1[:2], *_DELIVERIES_V2)  # entries and outputs as in version 1
_SCHEMA = _SCHEMA_V2  # what a new queue is created with: version SCHEMA_VERSION
_V1_DELIVERY_COLUMNS = (
    "id, entry, output, destination, path, relpath, sop_class, syntax, enqueued, next_attempt,"
    " attempts, failures, last_error, state"
)

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
    # 1 -> 2: deliveries get the Storage Commitment columns (NULL: nothing awaits commitment)
    (
        "ALTER TABLE deliveries RENAME TO deliveries_v1",
        "DROP INDEX deliveries_due",
        "DROP INDEX deliveries_entry",
        *_DELIVERIES_V2,
        f"INSERT INTO deliveries ({_V1_DELIVERY_COLUMNS})"
        f" SELECT {_V1_DELIVERY_COLUMNS} FROM deliveries_v1",
        "DROP TABLE deliveries_v1",
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
AWAITING = "awaiting-commitment"  # the state of a delivery held until the peer commits it


@dataclass(frozen=True)
class Awaiting:
    """A delivery the peer has, held until it commits it (Storage Commitment)."""

    delivery: Delivery
    sop_instance: str  # the SOP Instance UID the peer got (the output's own)
    transaction_uid: str  # the request that asked for it


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
    awaiting: int = 0  # the peer has them; held until it commits them (Storage Commitment)


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
        """Deliveries still not delivered (pending, or awaiting commitment) enqueued before."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE destination = ?"
                " AND state != 'dead' AND enqueued < ? ORDER BY id",
                (destination, enqueued_before),
            )
            return [Delivery(*row) for row in rows]

    def failed(self, d: Delivery, error: str, next_attempt: float, failure: bool) -> None:
        """A failed try: `d` is pending again (also one that awaited commitment and was not
        committed), due at `next_attempt`."""
        self._tx(
            lambda db: db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, failures = failures + ?,"
                " next_attempt = ?, last_error = ?, state = 'pending', sop_instance = NULL,"
                " transaction_uid = NULL, commit_due = NULL WHERE id = ?",
                (int(failure), next_attempt, error, d.id),
            )
        )

    # --- Storage Commitment ------------------------------------------------------------------

    def await_commitment(
        self, held: list[tuple[Delivery, str]], transaction_uid: str, due: float
    ) -> None:
        """The peer has these (delivery, SOP Instance UID it got): hold them, awaiting
        commitment under `transaction_uid`, whose request is (re)sent at `due`; one commit."""
        self._tx(
            lambda db: db.executemany(
                f"UPDATE deliveries SET state = '{AWAITING}', sop_instance = ?,"
                " transaction_uid = ?, commit_due = ? WHERE id = ?",
                [(sop_instance, transaction_uid, due, d.id) for d, sop_instance in held],
            )
        )

    def commitment_requested(self, old_uid: str, new_uid: str, due: float) -> None:
        """The deliveries awaiting under `old_uid` were asked again as `new_uid`; if nothing
        answers, the request is sent again at `due`."""
        self._tx(
            lambda db: db.execute(
                "UPDATE deliveries SET transaction_uid = ?, commit_due = ?"
                f" WHERE transaction_uid = ? AND state = '{AWAITING}'",
                (new_uid, due, old_uid),
            )
        )

    def awaiting(self, transaction_uid: str) -> list[Awaiting]:
        """What awaits commitment under `transaction_uid` (of whichever destination)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_DELIVERY_COLUMNS}, sop_instance, transaction_uid FROM deliveries"
                f" WHERE transaction_uid = ? AND state = '{AWAITING}' ORDER BY id",
                (transaction_uid,),
            )
            return [_awaiting(row) for row in rows]

    def commitments_due(self, destination: str, now: float) -> dict[str, list[Awaiting]]:
        """The destination's commitment requests to (re)send now, by transaction UID."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_DELIVERY_COLUMNS}, sop_instance, transaction_uid FROM deliveries"
                f" WHERE destination = ? AND state = '{AWAITING}' AND commit_due <= ?"
                " ORDER BY id",
                (destination, now),
            ).fetchall()
        due: dict[str, list[Awaiting]] = {}
        for row in rows:
            held = _awaiting(row)
            due.setdefault(held.transaction_uid, []).append(held)
        return due

    def next_commitment_due(self, destination: str) -> float | None:
        with self._lock:
            (value,) = self._db.execute(
                "SELECT min(commit_due) FROM deliveries WHERE destination = ?"
                f" AND state = '{AWAITING}'",
                (destination,),
            ).fetchone()
            return value

    def request_all_commitments_now(self, destination: str, now: float) -> int:
        """Every request of the destination is due now (its worker starts: whatever the peer
        reported while the node was down was lost). How many deliveries await."""
        return self._tx(
            lambda db: db.execute(
                "UPDATE deliveries SET commit_due = ? WHERE destination = ?"
                f" AND state = '{AWAITING}' AND commit_due > ?",
                (now, destination, now),
            ).rowcount
        )

    def delivered_all(self, ds: list[Delivery]) -> list[FinishedEntry]:
        """Remove the rows (pending, or committed by the peer), in one transaction (one commit,
        one fsync); the entries whose last delivery still to be made this was."""

        def settle_all(db) -> list[FinishedEntry]:
            settled = (self._settle(db, d, "DELETE FROM deliveries WHERE id = ?", ()) for d in ds)
            return [finished for finished in settled if finished is not None]

        return self._tx(settle_all)

    def dead(self, d: Delivery, dead_path: str, error: str) -> FinishedEntry | None:
        sql = ("UPDATE deliveries SET state = 'dead', path = ?, last_error = ?,"
               " sop_instance = NULL, transaction_uid = NULL, commit_due = NULL WHERE id = ?")
        return self._tx(lambda db: self._settle(db, d, sql, (dead_path, error)))

    @staticmethod
    def _settle(db, d: Delivery, sql: str, params: tuple) -> FinishedEntry | None:
        db.execute(sql, (*params, d.id))
        (left,) = db.execute(  # pending, or awaiting commitment: the entry is still needed
            "SELECT count(*) FROM deliveries WHERE entry = ? AND state != 'dead'", (d.entry,)
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
                (awaiting,) = self._db.execute(
                    "SELECT count(*) FROM deliveries WHERE destination = ?"
                    f" AND state = '{AWAITING}'",
                    (name,),
                ).fetchone()
                last = self._db.execute(
                    "SELECT last_error FROM deliveries WHERE destination = ? AND last_error"
                    " IS NOT NULL ORDER BY id DESC LIMIT 1",
                    (name,),
                ).fetchone()
                age = now - oldest if oldest is not None else None
                result.append(DestinationStats(
                    name, pending, age, retries, dead, last[0] if last else None, awaiting
                ))  # fmt: skip
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


def _awaiting(row: tuple) -> Awaiting:
    *delivery, sop_instance, transaction_uid = row
    return Awaiting(Delivery(*delivery), sop_instance, transaction_uid)


def _finished(db, entry: str, incoming: str) -> FinishedEntry:
    rows = db.execute(
        "SELECT path FROM outputs WHERE entry = ? AND path != ? ORDER BY output", (entry, incoming)
    )
    return FinishedEntry(entry, incoming, tuple(path for (path,) in rows))
