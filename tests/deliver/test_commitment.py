"""Storage Commitment without a network: the queue's awaiting-commitment state (and the
schema version 1 -> 2 migration that brought it), the report parsed from an N-EVENT-REPORT,
and the destination worker with a committing destination type of the tests' own: what the
peer took is held until it commits it, failed references are sent again and counted, no
answer asks again after commitment_timeout, and a new worker asks again at once."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.config import RetryPolicy, parse_config
from node.config.schema import ConfigError
from node.deliver import destinations
from node.deliver import queue as queue_module
from node.deliver.commitment import (
    ALL_COMMITTED,
    SOME_FAILED,
    CommitmentReport,
    Reference,
    report_from,
    request_dataset,
)
from node.deliver.destinations import (
    Delivered,
    DeliveryError,
    DestinationSession,
    DestinationType,
    Result,
)
from node.deliver.queue import (
    SCHEMA_VERSION,
    DeliveryQueue,
    FinishedEntry,
    NewDelivery,
    NewEntry,
    NewOutput,
)
from node.deliver.worker import DestinationWorker
from node.ops.observe import REGISTRY, QueueCollector
from node.spool import Spool
from tests.conftest import wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
FAST = RetryPolicy(initial_delay=0.05, max_delay=0.1)


def counted(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


# --- configuration -----------------------------------------------------------------------------


def _dicom(extra: str) -> str:
    return (f"destinations: {{pacs: {{type: dicom, host: h, port: 104, ae_title: PACS{extra}}}}}\n"
            "rules: [{name: r, send_to: [pacs]}]\n")  # fmt: skip


def test_storage_commitment_is_off_by_default_and_waits_an_hour():
    pacs = parse_config(_dicom(""), "node.yaml", Path(".")).destinations["pacs"]
    assert (pacs.storage_commitment, pacs.commitment_timeout) == (False, 3600.0)
    text = _dicom(", storage_commitment: true, commitment_timeout: 2m")
    pacs = parse_config(text, "node.yaml", Path(".")).destinations["pacs"]
    assert (pacs.storage_commitment, pacs.commitment_timeout) == (True, 120.0)


@pytest.mark.parametrize("extra, message", [
    (", storage_commitment: yes please", "storage_commitment: expected true or false"),
    (", commitment_timeout: 0", "commitment_timeout: must be above 0"),
    (", commitment_timeout: soon", "commitment_timeout: expected a duration"),
])  # fmt: skip
def test_bad_storage_commitment_settings_are_reported_with_their_line(extra, message):
    with pytest.raises(ConfigError) as failed:
        parse_config(_dicom(extra), "node.yaml", Path("."))
    (problem,) = failed.value.problems
    assert problem.line == 1 and f"destinations.pacs.{message}" in problem.message


# --- the report --------------------------------------------------------------------------------


def _item(sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


def test_a_report_names_its_transaction_and_what_was_and_was_not_committed():
    info = Dataset()
    info.TransactionUID = "1.2.3"
    info.ReferencedSOPSequence = DicomSequence([_item("1.1")])
    info.FailedSOPSequence = DicomSequence([_item("1.2", 0x0112), _item("1.3")])
    assert report_from(SOME_FAILED, info) == CommitmentReport(
        "1.2.3", SOME_FAILED, (Reference(CT, "1.1"),),
        ((Reference(CT, "1.2"), 0x0112), (Reference(CT, "1.3"), None)),
    )  # fmt: skip
    with pytest.raises(ValueError, match="Event Type ID 3"):
        report_from(3, info)
    with pytest.raises(ValueError, match="no Transaction UID"):
        report_from(ALL_COMMITTED, Dataset())


def test_the_request_lists_each_reference_under_its_transaction():
    ds = request_dataset("1.2.3", [Reference(CT, "1.1"), Reference(CT, "1.2")])
    assert ds.TransactionUID == "1.2.3"
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in ds.ReferencedSOPSequence] == [(CT, "1.1"), (CT, "1.2")]  # fmt: skip


# --- the queue ---------------------------------------------------------------------------------


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[DeliveryQueue]:
    q = DeliveryQueue(tmp_path / "queue.sqlite3")
    yield q
    q.close()


def _entry(name: str, *destinations: str) -> NewEntry:
    path = f"/spool/incoming/{name}.dcm"
    return NewEntry(name, path, (NewOutput(path, CT, EXPLICIT),),
                    tuple(NewDelivery(d, 0) for d in destinations))  # fmt: skip


def test_an_entry_awaiting_commitment_is_not_finished_until_it_is_committed(queue):
    queue.add_all([_entry("e", "pacs", "archive")])
    (pacs,) = queue.due("pacs", time.time(), 10)
    (archive,) = queue.due("archive", time.time(), 10)
    queue.await_commitment([(pacs, "1.9")], "1.2.3", time.time() + 60)
    assert queue.due("pacs", time.time(), 10) == []  # not sent again
    assert queue.delivered_all([archive]) == []  # the PACS still holds it: not finished
    (held,) = queue.awaiting("1.2.3")
    assert (held.delivery, held.sop_instance, held.transaction_uid) == (pacs, "1.9", "1.2.3")
    (stats,) = queue.stats(["pacs"])
    assert (stats.pending, stats.awaiting, stats.dead) == (0, 1, 0)
    assert queue.expired("pacs", time.time() + 1) == [pacs]  # give_up_after counts it too
    assert queue.delivered_all([held.delivery]) == [FinishedEntry("e", "/spool/incoming/e.dcm", ())]
    assert queue.awaiting("1.2.3") == [] and queue.stats(["pacs"])[0].awaiting == 0


def test_a_reference_that_was_not_committed_is_pending_again_and_counted(queue):
    queue.add_all([_entry("e", "pacs")])
    (d,) = queue.due("pacs", time.time(), 10)
    queue.await_commitment([(d, "1.9")], "1.2.3", time.time() + 60)
    queue.failed(d, "not committed", 0, failure=True)
    (again,) = queue.due("pacs", time.time(), 10)
    assert (again.failures, again.attempts) == (1, 1)
    assert queue.awaiting("1.2.3") == []
    assert queue.stats(["pacs"])[0].last_error == "not committed"


def test_requests_fall_due_by_transaction_and_move_to_a_new_uid(queue):
    queue.add_all([_entry(n, "pacs") for n in "abc"])
    a, b, c = queue.due("pacs", time.time(), 10)
    now = time.time()
    queue.await_commitment([(a, "1.1"), (b, "1.2")], "T1", now - 1)
    queue.await_commitment([(c, "1.3")], "T2", now + 60)
    assert queue.next_commitment_due("pacs") == pytest.approx(now - 1)
    due = queue.commitments_due("pacs", now)
    assert list(due) == ["T1"] and [h.sop_instance for h in due["T1"]] == ["1.1", "1.2"]
    queue.commitment_requested("T1", "T3", now + 60)
    assert queue.awaiting("T1") == [] and len(queue.awaiting("T3")) == 2
    assert queue.commitments_due("pacs", now) == {}
    assert queue.request_all_commitments_now("pacs", now) == 3  # a worker starts
    assert sorted(queue.commitments_due("pacs", now)) == ["T2", "T3"]


# --- schema version 1 -> 2 ---------------------------------------------------------------------


def _v1_queue(path: Path) -> list[tuple]:
    """A queue as version 1 wrote it (its own schema statements), with work in each state."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for statement in queue_module._SCHEMA_V1:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO entries (entry, incoming) VALUES ('t', '/spool/incoming/t.dcm')")
    db.execute("INSERT INTO outputs VALUES ('t', 0, '/spool/out/t.0.dcm')")
    rows = [
        (1, "t", 0, "archive", "/spool/out/t.0.dcm", "a/t.dcm", CT, EXPLICIT, 10.0, 0.0, 0, 0,
         None, "pending"),
        (2, "t", 0, "pacs", "/spool/out/t.0.dcm", None, CT, EXPLICIT, 10.0, 99.0, 2, 1,
         "pacs answered status 0xC000", "pending"),
        (3, "d", 0, "pacs", "/spool/dead-letter/pacs/d.dcm", None, CT, EXPLICIT, 5.0, 0.0, 5, 5,
         "refused 5 times", "dead"),
    ]  # fmt: skip
    db.executemany(f"INSERT INTO deliveries ({queue_module._V1_DELIVERY_COLUMNS})"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)  # fmt: skip
    db.close()
    return rows


def _schema(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        db.close()


def _rows(path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute(sql))
    finally:
        db.close()


def test_a_version_1_queue_is_migrated_with_every_delivery_awaiting_nothing(tmp_path: Path):
    path = tmp_path / "queue.sqlite3"
    before = _v1_queue(path)
    readonly = DeliveryQueue(path, readonly=True)  # `dicom-node queue` before the restart
    archive, pacs = readonly.stats(["archive", "pacs"])
    readonly.close()
    assert (archive.pending, pacs.pending, pacs.dead, pacs.awaiting) == (1, 1, 1, 0)
    assert _rows(path, "PRAGMA user_version") == [(1,)]

    DeliveryQueue(path).close()
    assert SCHEMA_VERSION == 2 and _rows(path, "PRAGMA user_version") == [(2,)]
    columns = queue_module._V1_DELIVERY_COLUMNS
    assert _rows(path, f"SELECT {columns} FROM deliveries") == before
    assert _rows(path, "SELECT sop_instance, transaction_uid, commit_due FROM deliveries") == [
        (None, None, None)] * 3  # fmt: skip
    fresh = tmp_path / "fresh.sqlite3"
    DeliveryQueue(fresh).close()
    assert _schema(path) == _schema(fresh)  # a migrated queue and a new one are the same

    queue = DeliveryQueue(path)
    try:  # and it works as any other: the migrated deliveries can await commitment
        (d,) = queue.due("archive", time.time(), 10)
        queue.await_commitment([(d, "1.9")], "T", time.time())
        assert [h.delivery.id for h in queue.awaiting("T")] == [1]
        assert queue.retry_dead("pacs") == 1
    finally:
        queue.close()


def test_a_failed_migration_from_version_1_leaves_it_as_it_was(tmp_path: Path, monkeypatch):
    path = tmp_path / "queue.sqlite3"
    before = _v1_queue(path)
    written = _schema(path)
    broken = (*queue_module._MIGRATIONS[1], "INSERT INTO no_such_table VALUES (1)")
    monkeypatch.setattr(queue_module, "_MIGRATIONS", (queue_module._MIGRATIONS[0], broken))
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        DeliveryQueue(path)
    assert _rows(path, "PRAGMA user_version") == [(1,)] and _schema(path) == written
    assert _rows(path, f"SELECT {queue_module._V1_DELIVERY_COLUMNS} FROM deliveries") == before


# --- the worker, with a committing destination type of the tests' own --------------------------


@dataclass
class CommittingPeer:
    """What the fake peer does: it takes every C-STORE; each request is recorded, and raises
    `request_errors`' next item if there is one (None: taken)."""

    stored: list[str] = field(default_factory=list)  # entries, in the order sent
    requests: list[tuple[str, tuple[Reference, ...], float]] = field(default_factory=list)
    request_errors: list[Exception | None] = field(default_factory=list)
    reports: list[Callable] = field(default_factory=list)  # the on_report of each request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def transactions(self) -> list[str]:
        with self.lock:
            return [uid for uid, _, _ in self.requests]


@dataclass(frozen=True)
class CommittingDestination:
    name: str
    peer: CommittingPeer = field(compare=False)
    retry: RetryPolicy = FAST
    storage_commitment: bool = True
    commitment_timeout: float = 3600.0


class CommittingSession(DestinationSession):
    def __init__(self, dest: CommittingDestination):
        self.peer = dest.peer

    def deliver(self, batch: Sequence, stopping: Callable[[], bool]) -> Iterator[Result]:
        for d in batch:
            with self.peer.lock:
                self.peer.stored.append(d.entry)
            yield Delivered((d,))

    def reference(self, d) -> Reference:  # a lossy output's own UID: not the entry's name
        return Reference(d.sop_class, f"9.{d.entry}")

    def request_commitment(self, transaction_uid, references, on_report) -> None:
        with self.peer.lock:
            self.peer.requests.append((transaction_uid, tuple(references), time.monotonic()))
            self.peer.reports.append(on_report)
            error = self.peer.request_errors.pop(0) if self.peer.request_errors else None
        if error is not None:
            raise error


@pytest.fixture(autouse=True)
def committing_type(monkeypatch):
    registered = (*destinations.REGISTERED, DestinationType(CommittingDestination,
                                                            CommittingSession))  # fmt: skip
    monkeypatch.setattr(destinations, "REGISTERED", registered)


@dataclass
class Rig:
    spool: Spool
    queue: DeliveryQueue
    finished: list[FinishedEntry]
    workers: list[DestinationWorker]

    def add(self, dest: str, *names: str) -> None:
        entries = []
        for name in names:
            path = self.spool.incoming / f"{name}.dcm"
            path.write_bytes(f"instance {name}".encode())
            entries.append(NewEntry(name, str(path), (NewOutput(str(path), CT, EXPLICIT),),
                                    (NewDelivery(dest, 0),)))  # fmt: skip
        self.queue.add_all(entries)

    def worker(self, dest) -> DestinationWorker:
        w = DestinationWorker(dest, self.queue, self.spool, self.finished.extend)
        self.workers.append(w)
        w.start()
        return w

    def stop(self, w: DestinationWorker) -> None:
        self.workers.remove(w)
        w.stop()

    def names(self) -> list[str]:
        return sorted(f.entry for f in self.finished)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    spool = Spool(tmp_path / "spool")
    queue = DeliveryQueue(spool.root / "queue.sqlite3")
    r = Rig(spool, queue, [], [])
    yield r
    for w in r.workers:
        w.stop()
    queue.close()


def report(uid: str, committed: str = "", failed: str = "", event: int = 0) -> CommitmentReport:
    return CommitmentReport(
        uid, event or (SOME_FAILED if failed else ALL_COMMITTED),
        tuple(Reference(CT, f"9.{n}") for n in committed),
        tuple((Reference(CT, f"9.{n}"), 0x0110) for n in failed),
    )  # fmt: skip


def test_what_the_peer_took_is_held_until_its_report_commits_it(rig: Rig):
    peer = CommittingPeer()
    rig.add("pacs", "a", "b", "c")
    forwarded = counted("dicom_node_instances_forwarded_total", destination="pacs")
    w = rig.worker(CommittingDestination("pacs", peer))
    wait_for(lambda: peer.requests, 30, "a commitment request")
    ((uid, refs, _),) = peer.requests  # one request for the batch, the files' own UIDs
    assert refs == tuple(Reference(CT, f"9.{n}") for n in "abc")
    assert peer.stored == ["a", "b", "c"] and rig.finished == []
    (stats,) = rig.queue.stats(["pacs"])
    assert (stats.pending, stats.awaiting) == (0, 3)
    (gauge,) = [m for m in QueueCollector(lambda: [stats]).collect()
                if m.name == "dicom_node_queue_awaiting_commitment"]  # fmt: skip
    assert [s.value for s in gauge.samples] == [3]
    assert counted("dicom_node_instances_forwarded_total", destination="pacs") == forwarded

    assert w.settle_commitment(report(uid, "ab")) == 0x0000  # a and b committed
    assert rig.names() == ["a", "b"]
    assert rig.queue.stats(["pacs"])[0].awaiting == 1  # c not reported: it keeps waiting
    assert w.settle_commitment(report(uid, event=ALL_COMMITTED)) == 0x0000  # "all": c too
    assert rig.names() == ["a", "b", "c"]
    assert counted("dicom_node_instances_forwarded_total", destination="pacs") == forwarded + 3
    assert w.settle_commitment(report(uid, "abc")) == 0x0000  # again: nothing left, no harm
    assert rig.names() == ["a", "b", "c"] and peer.stored == ["a", "b", "c"]


def test_a_reference_that_failed_is_sent_again_and_the_others_are_released(rig: Rig):
    peer = CommittingPeer()
    rig.add("pacs", "a", "b")
    w = rig.worker(CommittingDestination("pacs", peer))
    wait_for(lambda: peer.requests, 30, "a commitment request")
    first = peer.transactions()[0]
    assert w.settle_commitment(report(first, committed="a", failed="b")) == 0x0000
    assert rig.names() == ["a"]
    wait_for(lambda: len(peer.requests) == 2, 30, "b sent and asked for again")
    assert peer.stored == ["a", "b", "b"]
    second, refs, _ = peer.requests[1]
    assert second != first and refs == (Reference(CT, "9.b"),)
    (again,) = rig.queue.awaiting(second)
    assert (again.delivery.failures, again.delivery.attempts) == (1, 1)
    assert rig.names() == ["a"]  # b is not released before it is committed
    peer.reports[1](report(second, "b"))  # on the association it was asked on
    assert rig.names() == ["a", "b"]


def test_a_reference_that_keeps_failing_goes_to_the_dead_letters(rig: Rig):
    peer = CommittingPeer()
    rig.add("pacs", "a")
    w = rig.worker(CommittingDestination("pacs", peer, RetryPolicy(0.05, 0.1, max_failures=2)))
    for n in (1, 2):
        wait_for(lambda n=n: len(peer.requests) == n, 30, f"request {n}")
        w.settle_commitment(report(peer.transactions()[-1], failed="a"))
    wait_for(lambda: rig.finished, 30, "a dead-lettered")
    reason = (rig.spool.dead_letter_dir / "pacs" / "a.reason.txt").read_text()
    assert "refused 2 times; last: not committed (Failure Reason 0x0110)" in reason
    assert peer.stored == ["a", "a"]
    assert rig.queue.stats(["pacs"])[0].dead == 1


def test_no_report_within_commitment_timeout_asks_again_with_a_new_transaction(rig: Rig):
    peer = CommittingPeer()
    rig.add("pacs", "a", "b")
    rig.worker(CommittingDestination("pacs", peer, commitment_timeout=0.5))
    wait_for(lambda: len(peer.requests) >= 2, 30, "a second request")
    (uid1, refs1, t1), (uid2, refs2, t2) = peer.requests[:2]
    assert uid1 != uid2 and refs1 == refs2 and t2 - t1 >= 0.45
    assert peer.stored == ["a", "b"]  # asked again, not sent again
    assert rig.finished == [] and rig.queue.stats(["pacs"])[0].awaiting == 2
    peer.reports[0](report(uid1, "ab"))  # the first request's late report: asked again since
    assert rig.finished == []
    peer.reports[-1](report(peer.transactions()[-1], "ab"))
    assert rig.names() == ["a", "b"]


def test_a_new_worker_asks_again_for_what_awaits_and_its_report_releases_it(rig: Rig):
    """A restart: whatever the peer reported while nothing listened is lost."""
    peer = CommittingPeer()
    rig.add("pacs", "a")
    dest = CommittingDestination("pacs", peer)
    first = rig.worker(dest)
    wait_for(lambda: peer.requests, 30, "a commitment request")
    rig.stop(first)
    assert rig.queue.stats(["pacs"])[0].awaiting == 1
    restarted = rig.worker(dest)
    wait_for(lambda: len(peer.requests) == 2, 30, "the request sent again")
    assert peer.stored == ["a"] and rig.finished == []
    restarted.settle_commitment(report(peer.transactions()[1], "a"))
    assert rig.names() == ["a"]


def test_a_refused_request_sends_the_instances_again_a_transient_one_asks_later(rig: Rig):
    peer = CommittingPeer(request_errors=[
        DeliveryError("PACS did not accept Storage Commitment (Push Model)", retryable=False),
        DeliveryError("no N-ACTION response (association aborted or timed out)"),
    ])  # fmt: skip
    rig.add("pacs", "a")
    rig.worker(CommittingDestination("pacs", peer))
    wait_for(lambda: len(peer.requests) == 3, 30, "three requests")
    assert peer.stored == ["a", "a"]  # the refusal sent it again; the timeout only asked again
    (held,) = rig.queue.awaiting(peer.transactions()[2])
    assert (held.delivery.failures, held.delivery.attempts) == (1, 1)
    last_error = rig.queue.stats(["pacs"])[0].last_error or ""
    assert last_error.startswith("commitment request refused: PACS did not accept Storage")


def test_a_destination_that_no_longer_asks_for_commitment_has_what_it_got(rig: Rig):
    """storage_commitment turned off by a reload: what awaited is delivered (its C-STOREs
    succeeded), not held for a report that will not be asked for."""
    peer = CommittingPeer()
    rig.add("pacs", "a")
    first = rig.worker(CommittingDestination("pacs", peer))
    wait_for(lambda: peer.requests, 30, "a commitment request")
    rig.stop(first)
    rig.worker(CommittingDestination("pacs", peer, storage_commitment=False))
    wait_for(lambda: rig.finished, 30, "a delivered")
    assert rig.names() == ["a"] and peer.stored == ["a"] and len(peer.requests) == 1
