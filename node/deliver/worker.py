"""One thread per destination drains that destination's queue, so a dead or slow destination
never delays the others. Failures back off exponentially with jitter; what is still not
delivered after `give_up_after`, or refused `max_failures` times, goes to the dead-letter folder.

How a destination takes a batch is its type's (node/deliver/destinations/): the worker asks the
registry for a session, hands it what is due, and settles each result the session yields.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from node.config import Destination, RetryPolicy
from node.deliver.destinations import Delivered, describe_error, session_for
from node.deliver.queue import Delivery, DeliveryQueue, FinishedEntry
from node.ops import observe as metrics
from node.spool import Spool

log = logging.getLogger("dicom_node.deliver")

BATCH = 32  # deliveries handed to a session at once (it may look ahead: dicom.py proposes
# the batch's SOP classes and syntaxes when it opens an association)
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
        self.session.close()

    def _round(self) -> None:
        now = time.time()
        for d in self.queue.expired(self.dest.name, now - self.dest.retry.give_up_after):
            self._dead_letter(d, f"not delivered within {self.dest.retry.give_up_after:.0f} s")
        batch = self.queue.due(self.dest.name, now, BATCH)
        if not batch:
            self.session.close_if_idle()
            upcoming = self.queue.next_attempt(self.dest.name)
            wait = IDLE_POLL if upcoming is None else min(IDLE_POLL, max(0.01, upcoming - now))
            self._wake.wait(wait)
            self._wake.clear()
            return
        for result in self.session.deliver(batch, self._stopping.is_set):
            if isinstance(result, Delivered):
                self._delivered(list(result.deliveries))
            elif self.session.transient(result.error):
                self._transient(list(result.deliveries), result.error)
            else:
                for d in result.deliveries:
                    self._refused(d, describe_error(result.error))
        if self.session.gather and len(batch) < BATCH:
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
        delay = backoff(self.dest.retry, self.failures_in_row)
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

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        metrics.DELIVERY_FAILURES.labels(self.dest.name, "dead-lettered").inc()
        path = self.spool.dead_letter(self.dest.name, d.entry, Path(d.path), reason)
        finished = self.queue.dead(d, str(path), reason)
        log.error("dead-lettered %s for %s: %s (kept in %s)", d.entry, self.dest.name, reason, path)
        if finished is not None:
            self.on_finished([finished])
