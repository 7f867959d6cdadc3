"""The destination worker, with a destination type of the tests' own in the registry (a fake
session scripted per delivery), and with the folder type: delivery, backoff, refusals, dead
letters, give_up_after, retried dead letters, and the folder's grouped commits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from node.config import DicomDestination, FolderDestination, RetryPolicy
from node.deliver import destinations
from node.deliver.destinations import (
    Delivered,
    DeliveryError,
    DestinationSession,
    DestinationType,
    Failed,
    Result,
    relpath_for,
    session_for,
    type_for,
)
from node.deliver.destinations import folder as folder_type
from node.deliver.destinations.base import BATCH
from node.deliver.queue import (
    Delivery,
    DeliveryQueue,
    FinishedEntry,
    NewDelivery,
    NewEntry,
    NewOutput,
)
from node.deliver.worker import DestinationWorker, backoff
from node.ops.observe import REGISTRY
from node.spool import Spool
from tests.conftest import wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
FAST = RetryPolicy(initial_delay=0.05, max_delay=0.1)


# --- a destination type of the tests' own ------------------------------------------------------


@dataclass
class Peer:
    """What the fake destination does: `script` maps an entry to what its next tries raise
    (None: it takes it); every try is recorded with its time."""

    script: dict[str, list[Exception | None]] = field(default_factory=dict)
    tries: list[tuple[str, float]] = field(default_factory=list)
    received: list[Delivery] = field(default_factory=list)
    closed: int = 0
    idle_checks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tried(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.tries]


@dataclass(frozen=True)
class FakeDestination:
    """A configuration class, as node/config/schema.py would have for a new type."""

    name: str
    peer: Peer = field(compare=False)
    retry: RetryPolicy = FAST


class FakeSession(DestinationSession):
    """Settles each delivery on its own, as dicom.py does."""

    def __init__(self, dest: FakeDestination):
        self.peer = dest.peer

    def deliver(self, batch: Sequence[Delivery], stopping: Callable[[], bool]) -> Iterator[Result]:
        for d in batch:
            if stopping():
                return
            with self.peer.lock:
                self.peer.tries.append((d.entry, time.monotonic()))
                answers = self.peer.script.get(d.entry) or [None]
                answer = answers.pop(0) if len(answers) > 1 else answers[0]
            if answer is not None:
                yield Failed((d,), answer)
                if self.transient(answer):
                    return
                continue
            Path(d.path).read_bytes()  # what a real one does: the file must be there
            with self.peer.lock:
                self.peer.received.append(d)
            yield Delivered((d,))

    def close_if_idle(self) -> None:
        self.peer.idle_checks += 1

    def close(self) -> None:
        self.peer.closed += 1


@pytest.fixture(autouse=True)
def fake_type(monkeypatch):
    """Registering a type is one entry in REGISTERED."""
    registered = (*destinations.REGISTERED, DestinationType(FakeDestination, FakeSession))
    monkeypatch.setattr(destinations, "REGISTERED", registered)


@dataclass
class Rig:
    spool: Spool
    queue: DeliveryQueue
    finished: list[FinishedEntry]
    workers: list[DestinationWorker]

    def add(self, dest: str, *names: str) -> list[Path]:
        """Spool and queue one instance per name, for `dest`."""
        paths = []
        for name in names:
            path = self.spool.incoming / f"{name}.dcm"
            path.write_bytes(f"instance {name}".encode())
            paths.append(path)
        self.queue.add_all([
            NewEntry(p.stem, str(p), (NewOutput(str(p), CT, EXPLICIT),),
                     (NewDelivery(dest, 0, f"{p.stem}/{p.name}"),))
            for p in paths
        ])  # fmt: skip
        return paths

    def worker(self, dest) -> DestinationWorker:
        w = DestinationWorker(dest, self.queue, self.spool, self.finished.extend)
        self.workers.append(w)
        w.start()
        return w

    def finished_names(self) -> list[str]:
        return [f.entry for f in self.finished]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    spool = Spool(tmp_path / "spool")
    queue = DeliveryQueue(spool.root / "queue.sqlite3")
    r = Rig(spool, queue, [], [])
    yield r
    for w in r.workers:
        w.stop()
    queue.close()


def counted(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def test_the_registry_serves_each_configuration_class_with_its_type(tmp_path: Path):
    archive = FolderDestination("archive", tmp_path, "{PatientID}/{SOPInstanceUID}.dcm")
    pacs = DicomDestination("pacs", "127.0.0.1", 104, "PACS", "NODE", 5.0)
    assert type_for(archive) is folder_type.TYPE
    assert isinstance(session_for(archive), folder_type.FolderSession)
    ds = Dataset()
    ds.PatientID, ds.SOPInstanceUID = "../P", "1.2.3"
    assert relpath_for(archive, ds) == "_P/1.2.3.dcm"  # the folder's layout, made safe
    assert relpath_for(pacs, ds) is None  # a DICOM peer lays out no files
    fake = FakeDestination("fake", Peer())
    assert isinstance(session_for(fake), FakeSession) and relpath_for(fake, ds) is None
    with pytest.raises(LookupError, match="no destination type serves str"):
        session_for("not a destination")


def test_backoff_doubles_up_to_the_maximum_with_jitter():
    policy = RetryPolicy(initial_delay=2.0, max_delay=10.0)
    for failures, full in [(0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)]:
        for _ in range(50):
            assert full / 2 <= backoff(policy, failures) <= full


def test_every_delivery_arrives_in_order_and_its_entry_is_finished(rig: Rig):
    peer = Peer()
    paths = rig.add("ok", "a", "b", "c")
    before = counted("dicom_node_instances_forwarded_total", destination="ok")
    rig.worker(FakeDestination("ok", peer))
    wait_for(lambda: len(rig.finished) == 3, 30, "three finished entries")
    assert [d.entry for d in peer.received] == ["a", "b", "c"]
    assert rig.finished == [FinishedEntry(p.stem, str(p), ()) for p in paths]
    assert counted("dicom_node_instances_forwarded_total", destination="ok") == before + 3
    (stats,) = rig.queue.stats(["ok"])
    assert (stats.pending, stats.retries, stats.dead) == (0, 0, 0)
    wait_for(lambda: peer.idle_checks, 30, "an idle check once nothing is due")


def test_a_transient_failure_stops_the_batch_and_the_destination_backs_off(rig: Rig, caplog):
    busy = DeliveryError("peer busy", retryable=True)
    peer = Peer(script={"a": [busy, None]})
    rig.add("busy", "a", "b")
    transient = counted("dicom_node_delivery_failures_total", destination="busy", kind="transient")
    w = rig.worker(FakeDestination("busy", peer, RetryPolicy(initial_delay=0.2, max_delay=0.4)))
    wait_for(lambda: len(rig.finished) == 2, 30, "both delivered")
    assert peer.tried() == ["a", "a", "b"]  # b waited with a: the destination could take nothing
    assert peer.tries[1][1] - peer.tries[0][1] >= 0.1  # at least half of initial_delay
    assert peer.closed >= 1  # a transient failure drops the connection
    assert w.failures_in_row == 0  # healthy again
    assert (
        counted("dicom_node_delivery_failures_total", destination="busy", kind="transient")
        == transient + 1
    )
    assert "busy: peer busy; next try in" in caplog.text
    assert [d.attempts for d in peer.received] == [1, 0]  # a's failed try is counted


def test_a_refusal_is_retried_then_dead_lettered_and_the_batch_goes_on(rig: Rig, caplog):
    refused = DeliveryError("peer answered status 0xC000", retryable=False)
    peer = Peer(script={"a": [refused]})  # refuses a every time
    rig.add("picky", "a", "b")
    dest = FakeDestination("picky", peer, RetryPolicy(initial_delay=0.05, max_failures=3))
    rig.worker(dest)
    wait_for(lambda: len(rig.finished) == 2, 30, "b delivered and a dead-lettered")
    assert peer.tried() == ["a", "b", "a", "a"]  # b did not wait for a's refusals
    assert [d.entry for d in peer.received] == ["b"]
    dead = rig.spool.dead_letter_dir / "picky"
    assert (dead / "a.dcm").read_bytes() == b"instance a"
    reason = (dead / "a.reason.txt").read_text()
    assert "refused 3 times; last: peer answered status 0xC000" in reason
    (stats,) = rig.queue.stats(["picky"])
    assert (stats.pending, stats.dead) == (0, 1)
    assert "picky refused a: peer answered status 0xC000; next try in" in caplog.text
    assert "dead-lettered a for picky: refused 3 times" in caplog.text


def test_an_error_that_is_not_a_delivery_error_is_a_refusal(rig: Rig):
    peer = Peer(script={"a": [FileNotFoundError("gone")]})
    rig.add("strict", "a")
    rig.worker(FakeDestination("strict", peer, RetryPolicy(initial_delay=0.05, max_failures=1)))
    wait_for(lambda: rig.finished, 30, "a dead-lettered")
    reason = (rig.spool.dead_letter_dir / "strict" / "a.reason.txt").read_text()
    assert "refused 1 times; last: FileNotFoundError: gone" in reason


def test_what_is_not_delivered_within_give_up_after_is_dead_lettered(rig: Rig):
    down = DeliveryError("association with PEER@127.0.0.1:1 failed")
    peer = Peer(script={"a": [down]})  # never reachable
    rig.add("gone", "a")
    policy = RetryPolicy(initial_delay=0.05, max_delay=0.1, give_up_after=1.0)
    rig.worker(FakeDestination("gone", peer, policy))
    wait_for(lambda: rig.finished, 30, "a dead-lettered")
    assert len(peer.tries) >= 2 and peer.received == []
    reason = (rig.spool.dead_letter_dir / "gone" / "a.reason.txt").read_text()
    assert "not delivered within 1 s" in reason
    (stats,) = rig.queue.stats(["gone"])
    assert (stats.pending, stats.dead) == (0, 1)


def test_a_retried_dead_letter_is_delivered_from_its_copy_which_then_goes(rig: Rig):
    refused = DeliveryError("refused", retryable=False)
    peer = Peer(script={"a": [refused, None]})
    (path,) = rig.add("again", "a")
    w = rig.worker(FakeDestination("again", peer, RetryPolicy(max_failures=1)))
    wait_for(lambda: rig.finished, 30, "a dead-lettered")
    dead = rig.spool.dead_letter_dir / "again"
    assert sorted(p.name for p in dead.iterdir()) == ["a.dcm", "a.reason.txt"]
    path.unlink()  # the pipeline removes the entry's files: only the dead letter is left
    assert rig.queue.retry_dead("again") == 1
    w.wake()
    wait_for(lambda: peer.received, 30, "the retried instance")
    (d,) = peer.received
    assert Path(d.path) == dead / "a.dcm" and d.attempts == 0
    wait_for(lambda: not list(dead.iterdir()), 30, "the dead letter and its reason to go")
    assert rig.queue.stats(["again"])[0].dead == 0


def test_stopping_closes_the_session(rig: Rig):
    peer = Peer()
    w = rig.worker(FakeDestination("stop", peer))
    rig.workers.remove(w)
    w.stop()
    assert not w.alive() and peer.closed == 1


# --- the folder type: a batch is one fsync per folder and one commit ---------------------------


def test_a_folder_batch_fsyncs_each_folder_once_and_commits_once(rig: Rig, tmp_path, monkeypatch):
    synced: list[Path] = []
    commits: list[int] = []
    real_fsync, real_delivered = folder_type.fsync_directory, rig.queue.delivered_all
    monkeypatch.setattr(folder_type, "fsync_directory", lambda p: synced.append(p) or real_fsync(p))
    monkeypatch.setattr(rig.queue, "delivered_all",
                        lambda ds: commits.append(len(ds)) or real_delivered(ds))  # fmt: skip
    names = [f"{series}{i}" for series in "xy" for i in range(5)]
    for name in names:  # two folders: x0 .. x4 go to x/, y0 .. y4 to y/
        path = rig.spool.incoming / f"{name}.dcm"
        path.write_bytes(name.encode())
        rig.queue.add_all([NewEntry(name, str(path), (NewOutput(str(path), CT, EXPLICIT),),
                                    (NewDelivery("archive", 0, f"{name[0]}/{name}.dcm"),))])
    rig.worker(FolderDestination("archive", tmp_path / "archive", "unused", FAST))
    wait_for(lambda: len(rig.finished) == len(names), 30, "every instance in the archive")
    assert commits == [len(names)]  # fewer than BATCH: all in one round, one transaction
    assert len(names) < BATCH
    assert sorted(p.name for p in synced) == ["x", "y"]
    for name in names:
        assert (tmp_path / "archive" / name[0] / f"{name}.dcm").read_bytes() == name.encode()


def test_a_full_disk_commits_what_was_placed_and_the_rest_waits(rig: Rig, tmp_path, monkeypatch):
    real = folder_type.deliver_to_folder
    full = {"b": 1}  # b fails once, as a disk that fills up and is freed

    def place(dest, relative, source, sync_directory=True):
        if full.get(source.stem):
            full[source.stem] -= 1
            raise DeliveryError(f"cannot write {relative}: No space left on device")
        return real(dest, relative, source, sync_directory)

    monkeypatch.setattr(folder_type, "deliver_to_folder", place)
    rig.add("disk", "a", "b", "c")
    rig.worker(FolderDestination("disk", tmp_path / "archive", "unused", FAST))
    wait_for(lambda: len(rig.finished) == 3, 30, "every instance in the archive")
    assert rig.finished_names() == ["a", "b", "c"]  # a committed before b failed
