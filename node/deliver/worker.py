"""One thread per destination drains that destination's queue, so a dead or slow destination
never delays the others. Failures back off exponentially with jitter; what is still not
delivered after `give_up_after`, or refused `max_failures` times, goes to the dead-letter folder.

How a destination takes a batch is its type's (node/deliver/destinations/): the worker asks the
registry for a session, hands it what is due, and settles each result the session yields.

A destination with Storage Commitment (node/deliver/commitment.py) keeps what the peer took,
awaiting commitment, and asks the peer to commit each batch in one request; the peer's report
(settle_commitment) releases what it committed and sends again what it did not. No report
within `commitment_timeout`, or a worker that starts (a report may have come while the node was
down): the request is sent again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from node.config import Destination, RetryPolicy
from node.deliver.commitment import (
    ALL_COMMITTED,
    REPORT_TAKEN,
    CommitmentReport,
    CommittingSession,
    Reference,
)
from node.deliver.destinations import Delivered, describe_error, session_for
from node.deliver.queue import Awaiting, Delivery, DeliveryQueue, FinishedEntry
from node.ops import observe as metrics
from node.spool import Spool

log = logging.getLogger("dicom_node.deliver")

IDLE_POLL = 1.0  # seconds between queue checks when nothing is due


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
        self.session = session_for(dest)
        self.failures_in_row = 0  # consecutive transient failures: the destination's health
        self.committing = bool(getattr(dest, "storage_commitment", False))
        self.commitment_timeout = float(getattr(dest, "commitment_timeout", 0.0))
        self._settling = threading.Lock()  # one commitment report at a time (report threads)
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
        try:
            self._resume_commitments()
        except Exception:
            log.exception("delivery to %s: cannot resume Storage Commitment", self.dest.name)
        while not self._stopping.is_set():
            try:
                self._round()
            except Exception:  # never let a surprise stop this destination for good
                log.exception("delivery to %s: unexpected error; continuing", self.dest.name)
                self._stopping.wait(IDLE_POLL)
        self.session.close()

    def _round(self) -> None:
        now = time.time()
        for d in self.queue.expired(self.dest.name, now - self.dest.retry.give_up_after):
            self._dead_letter(d, f"not delivered within {self.dest.retry.give_up_after:.0f} s")
        if self.committing:
            self._request_due_commitments(now)
        batch = self.queue.due(self.dest.name, now, self.session.batch_size)
        if not batch:
            self.session.close_if_idle()
            upcoming = self.queue.next_attempt(self.dest.name)
            if self.committing:
                asked = self.queue.next_commitment_due(self.dest.name)
                upcoming = asked if upcoming is None else min(upcoming, asked or upcoming)
            wait = IDLE_POLL if upcoming is None else min(IDLE_POLL, max(0.01, upcoming - now))
            self._wake.wait(wait)
            self._wake.clear()
            return
        transaction_uid = _new_uid() if self.committing else ""
        held: list[Reference] = []  # what the peer took in this batch, awaiting commitment
        for result in self.session.deliver(batch, self._stopping.is_set):
            if isinstance(result, Delivered) and self.committing:
                held += self._hold(list(result.deliveries), transaction_uid)
            elif isinstance(result, Delivered):
                self._delivered(list(result.deliveries))
            elif self.session.transient(result.error):
                self._transient(list(result.deliveries), result.error)
            else:
                for d in result.deliveries:
                    self._refused(d, describe_error(result.error))
        if held:
            self._request_commitment(transaction_uid, held, transaction_uid)
        if self.session.gather and len(batch) < self.session.batch_size:
            self._stopping.wait(self.session.gather)

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

    def _transient(self, ds: list[Delivery], exc: Exception) -> None:
        """The destination cannot take anything now: all of `ds` wait, and so does it."""
        self.failures_in_row += 1
        delay = max(backoff(self.dest.retry, self.failures_in_row),
                    self.session.wait_at_least(exc))  # fmt: skip
        error = describe_error(exc)
        for d in ds:
            self.queue.failed(d, error, time.time() + delay, failure=False)
        metrics.DELIVERY_FAILURES.labels(self.dest.name, "transient").inc(len(ds))
        log.warning("%s: %s; next try in %.1f s", self.dest.name, error, delay)
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

    # --- Storage Commitment ------------------------------------------------------------------

    def _hold(self, ds: list[Delivery], transaction_uid: str) -> list[Reference]:
        """The peer has `ds`: keep them, awaiting commitment under `transaction_uid` (asked for
        after the batch: a report may follow the request at once, so they are held first)."""
        self.failures_in_row = 0
        held: list[tuple[Delivery, Reference]] = []
        for d in ds:
            try:
                held.append((d, self._committer.reference(d)))
            except Exception as exc:  # its UIDs cannot be read: it cannot be committed
                self._refused(d, describe_error(exc))
        due = time.time() + self.commitment_timeout
        self.queue.await_commitment([(d, ref.sop_instance) for d, ref in held],
                                    transaction_uid, due)  # fmt: skip
        return [ref for _, ref in held]

    def _resume_commitments(self) -> None:
        """At start: what awaits commitment is asked for again at once (what the peer reported
        while no worker listened is lost). A destination that no longer asks for Storage
        Commitment has what its C-STOREs gave it: that is delivered."""
        if self.committing:
            self.queue.request_all_commitments_now(self.dest.name, time.time())
            return
        held = [h.delivery for group in self.queue.commitments_due(self.dest.name, float("inf"))
                .values() for h in group]  # fmt: skip
        if held:
            log.info("%s no longer asks for Storage Commitment: %d instance(s) it has are "
                     "delivered", self.dest.name, len(held))  # fmt: skip
            self._delivered(held)

    def _request_due_commitments(self, now: float) -> None:
        """Ask again for what no report answered within commitment_timeout (or since start)."""
        for old_uid, held in self.queue.commitments_due(self.dest.name, now).items():
            if self._stopping.is_set():
                return
            log.info("%s: no Storage Commitment report for %d instance(s) (transaction %s); "
                     "asking again", self.dest.name, len(held), old_uid)  # fmt: skip
            refs = [Reference(h.delivery.sop_class, h.sop_instance) for h in held]
            if not self._request_commitment(old_uid, refs, _new_uid()):
                return  # the peer cannot take anything now: the others wait too

    def _request_commitment(self, old_uid: str, refs: list[Reference], new_uid: str) -> bool:
        """Send the request for what awaits under `old_uid`, as transaction `new_uid` (a new
        UID for each request; the rows carry it before it leaves, so its report finds them).
        False after a transient failure (asked again after a backoff)."""
        dest = self.dest
        self.queue.commitment_requested(old_uid, new_uid, time.time() + self.commitment_timeout)
        try:
            self._committer.request_commitment(new_uid, refs, self.settle_commitment)
        except Exception as exc:
            error = describe_error(exc)
            if self.session.transient(exc):  # asked again after a backoff
                self.failures_in_row += 1
                delay = backoff(dest.retry, self.failures_in_row)
                self.queue.commitment_requested(new_uid, new_uid, time.time() + delay)
                metrics.DELIVERY_FAILURES.labels(dest.name, "transient").inc(len(refs))
                log.warning("%s: Storage Commitment request: %s; asking again in %.1f s",
                            dest.name, error, delay)  # fmt: skip
                self.session.close()
                return False
            with self._settling:  # refused: what it held is sent again, a failure each
                for h in self.queue.awaiting(new_uid):
                    self._refused(h.delivery, f"commitment request refused: {error}")
        return True

    @property
    def _committer(self) -> CommittingSession:
        return cast(CommittingSession, self.session)

    def settle_commitment(self, report: CommitmentReport) -> int:
        """A Storage Commitment report for one of this destination's transactions (from any
        thread): release what the peer committed, send again what it did not (a failure each,
        toward max_failures); what it names neither way keeps waiting. The status to answer."""
        with self._settling:
            held = [h for h in self.queue.awaiting(report.transaction_uid)
                    if h.delivery.destination == self.dest.name]  # fmt: skip
            if not held:
                log.warning("%s: Storage Commitment report for transaction %s, which awaits "
                            "nothing (settled already, or asked again since)", self.dest.name,
                            report.transaction_uid)  # fmt: skip
                return REPORT_TAKEN
            waiting = {h.sop_instance: h for h in held}
            failed: list[tuple[Awaiting, int | None]] = []
            for ref, reason in report.failed:
                if ref.sop_instance in waiting:
                    failed.append((waiting.pop(ref.sop_instance), reason))
            if report.event_type == ALL_COMMITTED and not report.committed and not report.failed:
                committed = list(waiting.values())  # "all of them", without the list
            else:
                committed = [waiting.pop(ref.sop_instance) for ref in report.committed
                             if ref.sop_instance in waiting]  # fmt: skip
            if committed:
                self._delivered([h.delivery for h in committed])
            for h, reason in failed:
                why = "" if reason is None else f" (Failure Reason 0x{reason:04X})"
                self._refused(h.delivery, f"not committed{why}")
            log.info("%s committed %d instance(s) of transaction %s%s%s", self.dest.name,
                     len(committed), report.transaction_uid,
                     f"; {len(failed)} not committed, to be sent again" if failed else "",
                     f"; {len(waiting)} not reported" if waiting else "")  # fmt: skip
        if failed:
            self.wake()
        return REPORT_TAKEN

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        metrics.DELIVERY_FAILURES.labels(self.dest.name, "dead-lettered").inc()
        path = self.spool.dead_letter(self.dest.name, d.entry, Path(d.path), reason)
        finished = self.queue.dead(d, str(path), reason)
        log.error("dead-lettered %s for %s: %s (kept in %s)", d.entry, self.dest.name, reason, path)
        if finished is not None:
            self.on_finished([finished])


def _new_uid() -> str:
    """A Transaction UID: unique for each Storage Commitment request (PS3.4 J.3.2)."""
    from pydicom.uid import generate_uid

    return str(generate_uid())
