"""The dispatcher: feeds spool entries to the codec worker processes, makes their output
durable and queues it for each destination of the rule (node/deliver/queue.py); one
DestinationWorker per destination delivers. An entry is deleted only when every destination has it.

Codec work in flight is bounded (two entries per worker), so memory stays flat whatever the
senders do; the spool on disk is the backlog.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from node.config import Config
from node.deliver.commitment import REPORT_TAKEN, CommitmentReport
from node.deliver.queue import (
    QUEUE_FILE,
    DeliveryQueue,
    FinishedEntry,
    NewDelivery,
    NewEntry,
    NewOutput,
)
from node.deliver.worker import DestinationWorker
from node.ops import observe as metrics
from node.spool import Spool, SpoolEntry
from node.transcode.process import ProcessOutcome, keep_freed_memory_for_reuse, process_entry
from node.vocabulary.syntaxes import syntax_name

log = logging.getLogger("dicom_node.pipeline")

COMMIT_BATCH = 64  # processed instances made durable and queued together, at most
RETRY_DELAY = 5.0  # seconds before an entry whose processing failed unexpectedly is retried
# Recycle workers: pylibjpeg-openjpeg leaks ~450 bytes per encoded frame, so
# 1000 single-frame instances leak under 0.5 MB. A new worker costs ~0.5 s of CPU (imports):
# every 200 tasks that was a fifth of an HTJ2K worker's time under a steady stream.
TASKS_PER_WORKER = 1000
CRASHES_BEFORE_AS_RECEIVED = 2
FAILURES_BEFORE_QUARANTINE = 3  # unexpected errors (not crashes) on one entry
# Output 0 of an entry (spool work/ and out/ names, the queue): processing writes the others
# beside it, one per distinct output of the rule (process.py).
OUTPUT = 0


WORKER_NICENESS = 5


def _start_worker() -> None:
    """Codec workers yield the CPU to the receiving process: when all cores are busy, a
    sender's acknowledgements must not wait for codec work (which can wait in the spool).
    They keep freed buffers for the next instance instead of page-faulting them in again."""
    os.nice(WORKER_NICENESS)
    keep_freed_memory_for_reuse()


def keeps_only(config: Config) -> bool:
    """Every output of every rule is the instance as received: no codec work at all."""
    return all(
        spec.target.syntax is None for rule in config.rules for spec in rule.distinct_specs()
    )


def worker_count(configured: int) -> int:
    return configured or os.cpu_count() or 1


class Pipeline:
    def __init__(
        self, config: Config, spool: Spool, work: Callable[..., ProcessOutcome] = process_entry
    ):
        self.config = config
        self.spool = spool
        self.workers = worker_count(config.node.workers)
        self._work = work  # runs in the worker processes: a module-level function
        self._queue: queue.Queue[SpoolEntry] = queue.Queue()
        self._slot_count = self.workers * 2
        self._slots = threading.BoundedSemaphore(self._slot_count)
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._crashes: dict[str, int] = {}  # crashes of an entry running alone: its own
        # Entries in flight when a worker died: the pool fails them all, so each runs alone
        # next, and only a crash then is counted against it.
        self._suspects: set[str] = set()
        self._failures: dict[str, int] = {}
        self._stopping = threading.Event()
        self._executor = self._new_executor()
        # Outputs are made durable and queued by one thread, in groups (_commit).
        self._outcomes: queue.Queue[tuple[ProcessOutcome, Config] | None] = queue.Queue()
        self._committer = threading.Thread(target=self._commit_loop, name="commit", daemon=True)
        self._thread = threading.Thread(target=self._dispatch, name="dispatch", daemon=True)
        self.queue = DeliveryQueue(spool.root / QUEUE_FILE)
        self._configs: dict[str, Config] = {config.key: config}
        self.destinations = {
            name: DestinationWorker(dest, self.queue, spool, self._entry_finished)
            for name, dest in config.destinations.items()
        }
        self._started = False
        self._workers_lock = threading.RLock()

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn (not fork): the parent has pynetdicom threads; max_tasks_per_child needs it too.
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            max_tasks_per_child=TASKS_PER_WORKER,
            initializer=_start_worker,
        )

    def start(self) -> int:
        """Resume whatever the spool holds, then wait for new entries. Returns the backlog."""
        self.spool.discard_partial_writes()
        finished = self.queue.finished_entries()  # a crash between delivery and cleanup
        if finished:
            self._entry_finished(finished)
        self.spool.remove_orphan_outputs(self.queue.referenced_files())
        queued = self.queue.known_entries()  # already processed: their deliveries resume
        backlog = [e for e in self.spool.pending() if e.id not in queued]
        for entry in backlog:
            self.submit(entry)
        self._thread.start()
        self._committer.start()
        for worker in self.destinations.values():
            worker.start()
        self._started = True
        return len(backlog)

    # --- configuration ---------------------------------------------------------------------

    def config_for(self, entry: SpoolEntry) -> Config:
        """The configuration `entry` was received under; the current one if it is unknown."""
        key = entry.config_key
        if key is None:
            return self.config
        with self._lock:
            known = self._configs.get(key)
        if known is None:
            known = self.spool.saved_config(key)
            if known is None:
                log.warning("%s: the configuration it was received under (%s) is gone; "
                            "using the current one", entry.id, key)  # fmt: skip
                known = self.config
            with self._lock:
                self._configs[key] = known
        return known

    def apply(self, config: Config) -> list[str]:
        """Use `config` for entries received from now on, and its destination settings.

        Entries already spooled keep their own configuration (`config_for`). A destination
        that is gone from `config` keeps delivering what was queued for it. Returns what
        changed, for the log.
        """
        changes = []
        with self._lock:
            self.config = config
            self._configs[config.key] = config
        for name, dest in config.destinations.items():
            worker = self.destinations.get(name)
            if worker is not None and worker.dest == dest:
                continue
            changes.append(f"destination {name} {'changed' if worker else 'added'}")
            self._replace_worker(name, dest)
        for name in set(self.destinations) - set(config.destinations):
            changes.append(f"destination {name} removed (it finishes what is queued for it)")
        return changes

    def _replace_worker(self, name: str, dest) -> DestinationWorker:
        with self._workers_lock:
            new = DestinationWorker(dest, self.queue, self.spool, self._entry_finished)
            old = self.destinations.get(name)
            if old is not None:
                old.stop()  # waits for the delivery in progress
            self.destinations = {**self.destinations, name: new}  # readers never see a gap
            if self._started:
                new.start()
            return new

    def _worker(self, name: str, config: Config) -> DestinationWorker:
        """The worker for `name`, created from `config` (an entry's own) if the current
        configuration no longer has it."""
        worker = self.destinations.get(name)
        return (
            worker if worker is not None else self._replace_worker(name, config.destinations[name])
        )

    def submit(self, entry: SpoolEntry) -> None:
        """Called by the receiver after the entry is durable."""
        with self._lock:
            if entry.id in self._in_flight:
                return
            self._in_flight.add(entry.id)
        self._queue.put(entry)

    def health_problem(self) -> str | None:
        """Why processing or delivery cannot go on, or None."""
        if not self._thread.is_alive():
            return "the dispatcher thread is not running"
        if not self._committer.is_alive():
            return "the thread that queues processed instances is not running"
        dead = [name for name, w in self.destinations.items() if not w.alive()]
        if dead:
            return f"delivery stopped for {', '.join(dead)}"
        return None

    def idle(self) -> bool:
        with self._lock:
            return not self._in_flight

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is in flight (up to `timeout`), then stop; the rest stays in the spool."""
        deadline = time.monotonic() + timeout
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping.set()
        self._thread.join(timeout=5)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._outcomes.put(None)
        self._committer.join(timeout=30)
        for worker in self.destinations.values():
            worker.stop()
        self.queue.close()

    # --- dispatch ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                entry = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            alone = entry.id in self._suspects
            slots = self._slot_count if alone else 1  # alone: every slot, nothing else runs
            if not self._take_slots(slots):
                return
            if not entry.path.exists():  # completed meanwhile (a duplicate submit)
                self._release_slots(slots)
                self._finish(entry)
                continue
            as_received = self._crashes.get(entry.id, 0) >= CRASHES_BEFORE_AS_RECEIVED
            work = self.spool.work_path(entry, OUTPUT)
            executor = self._executor
            try:
                config = self.config_for(entry)
                if keeps_only(config):
                    future = self._process_here(entry, config, work, as_received)
                else:
                    future = executor.submit(self._work, entry, config, work, as_received)
            except (BrokenProcessPool, RuntimeError):
                self._release_slots(slots)
                self._restart_executor(executor)
                self._queue.put(entry)
                continue
            future.add_done_callback(
                lambda f, e=entry, c=config, x=executor, n=slots: self._processed(e, f, c, x, n)
            )

    def _process_here(
        self, entry: SpoolEntry, config: Config, work: Path, as_received: bool
    ) -> Future:
        """Process `entry` in this thread: a rule that keeps what it received has no codec
        work, and handing it to a worker process cost more CPU than processing it (pickling
        both ways, two more threads, a process woken: about 1.5 ms of a CT slice's 2.3)."""
        future: Future = Future()
        try:
            future.set_result(self._work(entry, config, work, as_received))
        except Exception as exc:  # what a worker's would raise: retried, then quarantined
            future.set_exception(exc)
        return future

    def _take_slots(self, count: int) -> bool:
        taken = 0
        while taken < count:
            if self._slots.acquire(timeout=0.2):
                taken += 1
            elif self._stopping.is_set():
                self._release_slots(taken)
                return False
        return True

    def _release_slots(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    def _restart_executor(self, broken: ProcessPoolExecutor) -> None:
        """Replace `broken` (once: every future it had fails, each calls this)."""
        with self._lock:
            if self._executor is not broken:
                return
            self._executor = self._new_executor()
        broken.shutdown(wait=False, cancel_futures=True)

    def _processed(
        self,
        entry: SpoolEntry,
        future: Future,
        config: Config,
        executor: ProcessPoolExecutor,
        slots: int,
    ) -> None:
        self._release_slots(slots)
        try:
            outcome: ProcessOutcome = future.result()
        except BrokenProcessPool:
            if slots == self._slot_count:  # it ran alone: the crash was its own
                self._crashes[entry.id] = self._crashes.get(entry.id, 0) + 1
                log.error("codec worker died while processing %s (alone); will retry",
                          entry.id)  # fmt: skip
            else:
                self._suspects.add(entry.id)
                log.error("a codec worker died while %s was in flight; it runs alone next",
                          entry.id)  # fmt: skip
            if not self._stopping.is_set():
                self._restart_executor(executor)
                self._queue.put(entry)
            return
        except Exception as exc:
            failures = self._failures[entry.id] = self._failures.get(entry.id, 0) + 1
            if failures >= FAILURES_BEFORE_QUARANTINE:  # deterministic: retrying cannot help
                self._failures.pop(entry.id, None)
                reason = f"processing failed {failures} times; last: {type(exc).__name__}: {exc}"
                outcome = ProcessOutcome(entry, None, quarantine_reason=reason)
                self._outcomes.put((outcome, config))
                return
            log.exception("processing %s failed unexpectedly; will retry", entry.id)
            self._retry_later(entry)
            return
        if not self._stopping.is_set():
            self._outcomes.put((outcome, config))

    def _commit_loop(self) -> None:
        """Take what the workers finished, as much as is there (up to COMMIT_BATCH), and commit
        it as one group: while one group is being fsync'd, the next one gathers."""
        while True:
            item = self._outcomes.get()
            if item is None:
                return
            group = [item]
            while len(group) < COMMIT_BATCH:
                try:
                    item = self._outcomes.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._outcomes.put(None)  # stop after this group
                    break
                group.append(item)
            settled: set[str] = set()
            try:
                self._commit(group, settled)
            except Exception:  # never let a surprise stop the pipeline; what is not queued retries
                log.exception("could not queue processed instance(s); will retry")
                for outcome, _config in group:
                    if outcome.entry.id not in settled:
                        self._settle(outcome.entry, settled, retry=True)

    def _settle(self, entry: SpoolEntry, settled: set[str], retry: bool = False) -> None:
        """This entry's group commit is over for it (queued, quarantined, or to be retried)."""
        settled.add(entry.id)
        if retry:
            self._retry_later(entry)
        self._finish(entry)

    def _commit(self, group: list[tuple[ProcessOutcome, Config]], settled: set[str]) -> None:
        """Quarantine what must be; make the other outputs durable (a file fsync each, one
        fsync of out/), queue their deliveries in one transaction, then wake the
        destinations. Each entry is settled once (`settled`): what fails is retried later,
        nothing is dropped, and nothing already queued is processed twice."""
        ready: list[tuple[ProcessOutcome, Config]] = []
        for outcome, config in group:
            if outcome.quarantine_reason is None:
                ready.append((outcome, config))
                continue
            try:
                path = self.spool.quarantine(outcome.entry, outcome.quarantine_reason)
                metrics.QUARANTINED.inc()
                log.warning("quarantined %s: %s", path, outcome.quarantine_reason)
                self._settle(outcome.entry, settled)
            except Exception:
                log.exception("could not quarantine %s; will retry", outcome.entry.id)
                self._settle(outcome.entry, settled, retry=True)
        if not ready:
            return
        adopted = self.spool.adopt_outputs(
            [(o.entry, n, output.path) for o, _ in ready
             for n, output in enumerate(o.outputs) if output.path != o.entry.path]
        )  # fmt: skip
        rows, queued = [], []
        for outcome, config in ready:
            entry = outcome.entry
            paths = [adopted.get((entry.id, n), entry.path) for n in range(len(outcome.outputs))]
            failed = [p for p in paths if isinstance(p, OSError)]
            if failed:  # all of an entry's outputs are queued together, or none is
                log.error("could not keep the output of %s (%s); will retry", entry.id, failed[0])
                self._settle(entry, settled, retry=True)
                continue
            outputs = tuple(
                NewOutput(str(path), outcome.sop_class, output.syntax)
                for path, output in zip(paths, outcome.outputs, strict=True)
            )
            deliveries = tuple(
                NewDelivery(d.destination, d.output, d.relpath) for d in outcome.deliveries
            )
            rows.append(NewEntry(entry.id, str(entry.path), outputs, deliveries))
            queued.append((outcome, config))
        self.queue.add_all(rows)  # on failure, the caller retries these (not settled yet)
        for outcome, _config in queued:
            self._settle(outcome.entry, settled)
        woken: set[str] = set()
        for outcome, config in queued:
            log.info("%s", outcome.summary(), extra={"fields": outcome.fields()})
            rule = outcome.rule or ""
            metrics.PROCESSED.labels(rule, outcome.outcome).inc()
            metrics.RULE_BYTES_IN.labels(rule).inc(outcome.bytes_in)
            metrics.BYTES_OUT.labels(rule).inc(sum(o.size for o in outcome.outputs))
            metrics.CODEC_SECONDS.labels(rule).observe(outcome.milliseconds / 1000)
            for d in outcome.deliveries:
                output = outcome.outputs[d.output]
                labels = (rule, d.destination, syntax_name(output.syntax), output.outcome)
                metrics.OUTPUTS.labels(*labels).inc()
                metrics.OUTPUT_BYTES.labels(*labels).inc(output.size)
            for name in set(outcome.send_to) - woken:
                woken.add(name)
                self._worker(name, config).wake()

    def commitment_report(self, report: CommitmentReport) -> int:
        """A Storage Commitment report that came on an association the peer opened (the
        Storage SCP's thread): settled by the worker of the destination whose transaction it
        is. The status to answer it with."""
        held = self.queue.awaiting(report.transaction_uid)
        worker = self.destinations.get(held[0].delivery.destination) if held else None
        if worker is None:
            log.warning("Storage Commitment report for transaction %s, which awaits nothing"
                        " (settled already, or asked again since)",
                        report.transaction_uid)  # fmt: skip
            return REPORT_TAKEN
        return worker.settle_commitment(report)

    def _entry_finished(self, finished: list[FinishedEntry]) -> None:
        """Every destination has them (or dead-lettered a copy): delete their spool files."""
        self.spool.complete_all([(Path(f.incoming), *map(Path, f.outputs)) for f in finished])
        self.queue.forget_all([f.entry for f in finished])

    def _retry_later(self, entry: SpoolEntry) -> None:
        def again() -> None:
            if not self._stopping.is_set():
                self._queue.put(entry)

        timer = threading.Timer(RETRY_DELAY, again)
        timer.daemon = True
        timer.start()

    def _finish(self, entry: SpoolEntry) -> None:
        with self._lock:
            self._in_flight.discard(entry.id)
        self._crashes.pop(entry.id, None)
        self._suspects.discard(entry.id)
