"""The dispatcher: feeds spool entries to the codec worker processes, delivers their output,
and completes the entry only when every destination of its rule has it.

Work in flight is bounded (two entries per worker), so memory stays flat whatever the senders
do; the spool on disk is the queue.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import PurePosixPath

from node.config import Config, DicomDestination, FolderDestination
from node.deliver import DeliveryError, deliver_to_folder, deliver_to_peer
from node.process import ProcessOutcome, process_entry
from node.spool import Spool, SpoolEntry

log = logging.getLogger("dicom_node.pipeline")

RETRY_DELAY = 5.0  # seconds before a failed delivery is tried again
TASKS_PER_WORKER = 200  # recycle workers: pylibjpeg-openjpeg leaks per encode (FIELD-NOTES 3)
CRASHES_BEFORE_AS_RECEIVED = 2


def worker_count(configured: int) -> int:
    return configured or os.cpu_count() or 1


class Pipeline:
    def __init__(self, config: Config, spool: Spool):
        self.config = config
        self.spool = spool
        self.workers = worker_count(config.node.workers)
        self._queue: queue.Queue[SpoolEntry] = queue.Queue()
        self._slots = threading.BoundedSemaphore(self.workers * 2)
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._crashes: dict[str, int] = {}
        self._stopping = threading.Event()
        self._executor = self._new_executor()
        self._delivery = ThreadPoolExecutor(max_workers=8, thread_name_prefix="deliver")
        self._thread = threading.Thread(target=self._dispatch, name="dispatch", daemon=True)

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn (not fork): the parent has pynetdicom threads; max_tasks_per_child needs it too.
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            max_tasks_per_child=TASKS_PER_WORKER,
        )

    def start(self) -> int:
        """Resume whatever the spool holds, then wait for new entries. Returns the backlog."""
        self.spool.discard_partial_writes()
        for stale in self.spool.work.iterdir():
            stale.unlink(missing_ok=True)  # outputs of an earlier run: recomputed
        backlog = self.spool.pending()
        for entry in backlog:
            self.submit(entry)
        self._thread.start()
        return len(backlog)

    def submit(self, entry: SpoolEntry) -> None:
        """Called by the receiver after the entry is durable."""
        with self._lock:
            if entry.id in self._in_flight:
                return
            self._in_flight.add(entry.id)
        self._queue.put(entry)

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
        self._delivery.shutdown(wait=True, cancel_futures=True)

    # --- dispatch ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                entry = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            while not self._slots.acquire(timeout=0.2):
                if self._stopping.is_set():
                    return
            if not entry.path.exists():  # completed meanwhile (a duplicate submit)
                self._slots.release()
                self._finish(entry)
                continue
            as_received = self._crashes.get(entry.id, 0) >= CRASHES_BEFORE_AS_RECEIVED
            work = self.spool.work_path(entry, 0)
            try:
                future = self._executor.submit(process_entry, entry, self.config, work, as_received)
            except (BrokenProcessPool, RuntimeError):
                self._slots.release()
                self._restart_executor()
                self._queue.put(entry)
                continue
            future.add_done_callback(lambda f, e=entry: self._processed(e, f))

    def _restart_executor(self) -> None:
        with self._lock:
            old, self._executor = self._executor, self._new_executor()
        old.shutdown(wait=False, cancel_futures=True)

    def _processed(self, entry: SpoolEntry, future: Future) -> None:
        self._slots.release()
        try:
            outcome: ProcessOutcome = future.result()
        except BrokenProcessPool:
            self._crashes[entry.id] = self._crashes.get(entry.id, 0) + 1
            log.error("codec worker died while processing %s; will retry", entry.id)
            if not self._stopping.is_set():
                self._restart_executor()
                self._queue.put(entry)
            return
        except Exception:
            log.exception("processing %s failed unexpectedly; will retry", entry.id)
            self._retry_later(entry)
            return
        if not self._stopping.is_set():
            self._delivery.submit(self._deliver, outcome)

    def _deliver(self, outcome: ProcessOutcome) -> None:
        entry = outcome.entry
        if outcome.quarantine_reason is not None:
            path = self.spool.quarantine(entry, outcome.quarantine_reason)
            log.warning("quarantined %s: %s", path, outcome.quarantine_reason)
            self._finish(entry)
            return
        assert outcome.output is not None
        failures = []
        for name in outcome.send_to:
            dest = self.config.destinations[name]
            try:
                if isinstance(dest, FolderDestination):
                    rel = PurePosixPath(outcome.folder_paths[name])
                    deliver_to_folder(dest, rel, outcome.output)
                elif isinstance(dest, DicomDestination):
                    deliver_to_peer(dest, outcome.output, outcome.sop_class, outcome.syntax_out)
            except DeliveryError as exc:
                failures.append(f"{name}: {exc}")
            except Exception as exc:  # never let one destination's surprise lose the entry
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
        if failures:
            log.error("delivery of %s failed (%s); retrying in %.0f s",
                      entry.id, "; ".join(failures), RETRY_DELAY)  # fmt: skip
            self._retry_later(entry)
            return
        self.spool.complete(entry)
        log.info("%s", outcome.summary())
        self._finish(entry)

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
