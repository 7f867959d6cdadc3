"""One thread per destination drains that destination's queue, so a dead or slow destination
never delays the others. Failures back off exponentially with jitter; what is still not
delivered after `give_up_after`, or refused `max_failures` times, goes to the dead-letter folder.

A folder destination commits in groups: the files of a batch are placed, each folder is
fsync'd once, and the queue records them all in one transaction (at most BATCH per commit).
While instances stream in, it lets them gather for GATHER between rounds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from node.config import Destination, DicomDestination, RetryPolicy
from node.deliver.destinations import DeliveryError, PeerSession, deliver_to_folder
from node.deliver.queue import Delivery, DeliveryQueue, FinishedEntry
from node.ops import observe as metrics
from node.spool import Spool, fsync_directory

log = logging.getLogger("dicom_node.deliver")

BATCH = 32  # deliveries fetched at once; also the look-ahead that shapes a new association
IDLE_POLL = 1.0  # seconds between queue checks when nothing is due
GATHER = 0.05  # seconds a folder destination lets work gather after a round that had some:
# the next round then takes all of it with one fsync per folder and one commit


def backoff(policy: RetryPolicy, failures: int) -> float:
    """Delay before the next try after `failures` consecutive failures: exponential, capped,
    with jitter (half to full delay) so many nodes do not retry in lockstep."""
    delay = min(policy.max_delay, policy.initial_delay * 2 ** max(0, failures - 1))
    return delay * random.uniform(0.5, 1.0)


class DestinationWorker:
    def __init__(
        self,
        dest: Destination,
        queue: DeliveryQueue,
        spool: Spool,
        on_finished: Callable[[list[FinishedEntry]], None],
    ):
        self.dest = dest
        self.queue = queue
        self.spool = spool
        self.on_finished = on_finished
        self.session = PeerSession(dest) if isinstance(dest, DicomDestination) else None
        self.failures_in_row = 0  # consecutive transient failures: the destination's health
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"deliver-{dest.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._round()
            except Exception:  # never let a surprise stop this destination for good
                log.exception("delivery to %s: unexpected error; continuing", self.dest.name)
                self._stopping.wait(IDLE_POLL)
        if self.session is not None:
            self.session.close()

    def _round(self) -> None:
        now = time.time()
        for d in self.queue.expired(self.dest.name, now - self.dest.retry.give_up_after):
            self._dead_letter(d, f"not delivered within {self.dest.retry.give_up_after:.0f} s")
        batch = self.queue.due(self.dest.name, now, BATCH)
        if not batch:
            if self.session is not None:
                self.session.close_if_idle()
            upcoming = self.queue.next_attempt(self.dest.name)
            wait = IDLE_POLL if upcoming is None else min(IDLE_POLL, max(0.01, upcoming - now))
            self._wake.wait(wait)
            self._wake.clear()
            return
        if self.session is None:
            self._deliver_to_folder(batch)
            if len(batch) < BATCH:
                self._stopping.wait(GATHER)
            return
        for i, d in enumerate(batch):
            if self._stopping.is_set() or not self._deliver(d, batch[i + 1 :]):
                return

    def _deliver(self, d: Delivery, rest: list[Delivery]) -> bool:
        """Try one delivery; False when the destination is unreachable (stop this batch)."""
        assert self.session is not None
        try:
            upcoming = [(r.sop_class, r.syntax) for r in rest]
            self.session.send(Path(d.path), d.sop_class, d.syntax, upcoming)
        except DeliveryError as exc:
            if exc.retryable:
                self._transient([d], exc)
                return False
            self._refused(d, str(exc))
            return True
        except Exception as exc:  # e.g. a file that cannot be read: not transient
            self._refused(d, f"{type(exc).__name__}: {exc}")
            return True
        self._delivered([d])
        return True

    def _deliver_to_folder(self, batch: list[Delivery]) -> None:
        """Place every file of `batch`, fsync each folder once, record them in one commit."""
        placed: list[Delivery] = []
        folders: set[Path] = set()
        for d in batch:
            if self._stopping.is_set():
                break
            assert d.relpath is not None
            try:
                target = deliver_to_folder(
                    self.dest, PurePosixPath(d.relpath), Path(d.path), sync_directory=False
                )
            except DeliveryError as exc:
                if exc.retryable:  # e.g. the disk is full: the rest of the batch would fail too
                    self._commit(placed, folders)
                    self._transient([d], exc)
                    return
                self._refused(d, str(exc))
                continue
            except Exception as exc:  # e.g. a file that cannot be read: not transient
                self._refused(d, f"{type(exc).__name__}: {exc}")
                continue
            placed.append(d)
            folders.add(target.parent)
        self._commit(placed, folders)

    def _commit(self, placed: list[Delivery], folders: set[Path]) -> None:
        try:
            for folder in folders:
                fsync_directory(folder)
        except OSError as exc:
            self._transient(placed, DeliveryError(f"cannot sync {folder}: {exc.strerror or exc}"))
            return
        if placed:
            self._delivered(placed)

    def _delivered(self, ds: list[Delivery]) -> None:
        self.failures_in_row = 0
        finished = self.queue.delivered_all(ds)
        metrics.DELIVERED.labels(self.dest.name).inc(len(ds))
        for d in ds:
            if self.spool.is_dead_letter(Path(d.path)):  # a re-queued dead letter made it
                Path(d.path).unlink(missing_ok=True)
                Path(d.path).with_suffix(".reason.txt").unlink(missing_ok=True)
            log.debug("%s has %s", self.dest.name, d.entry)
        if finished:
            self.on_finished(finished)

    def _transient(self, ds: list[Delivery], exc: DeliveryError) -> None:
        """The destination cannot take anything now: all of `ds` wait, and so does it."""
        self.failures_in_row += 1
        delay = backoff(self.dest.retry, self.failures_in_row)
        for d in ds:
            self.queue.failed(d, str(exc), time.time() + delay, failure=False)
        metrics.DELIVERY_FAILURES.labels(self.dest.name, "transient").inc(len(ds))
        log.warning("%s: %s; next try in %.1f s", self.dest.name, exc, delay)
        if self.session is not None:
            self.session.close()
        self._stopping.wait(delay)  # the whole destination waits, not just this one

    def _refused(self, d: Delivery, error: str) -> None:
        metrics.DELIVERY_FAILURES.labels(self.dest.name, "refused").inc()
        failures = d.failures + 1
        if failures >= self.dest.retry.max_failures:
            self._dead_letter(d, f"refused {failures} times; last: {error}")
        else:
            delay = backoff(self.dest.retry, failures)
            self.queue.failed(d, error, time.time() + delay, failure=True)
            log.warning("%s refused %s: %s; next try in %.1f s", self.dest.name, d.entry, error,
                        delay)  # fmt: skip

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        metrics.DELIVERY_FAILURES.labels(self.dest.name, "dead-lettered").inc()
        path = self.spool.dead_letter(self.dest.name, d.entry, Path(d.path), reason)
        finished = self.queue.dead(d, str(path), reason)
        log.error("dead-lettered %s for %s: %s (kept in %s)", d.entry, self.dest.name, reason, path)
        if finished is not None:
            self.on_finished([finished])
