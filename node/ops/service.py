"""The running node: spool, codec pipeline, DICOM listener and HTTP endpoint, put together.

It reloads its configuration on SIGHUP and when the file changes on disk (validated first: a
broken file changes nothing), tells systemd how it is doing (READY, RELOADING, STOPPING,
WATCHDOG), and stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from node import __version__, pynetdicom_patches
from node.config import Config, ConfigError, load_config
from node.ops import observe as metrics
from node.ops.observe import REGISTRY, ObservabilityServer, QueueCollector, spool_write_problem
from node.ops.stage_cpu import StageCpuCollector
from node.pipeline import Pipeline
from node.receive.scp import StorageSCP
from node.spool import Spool

log = logging.getLogger("dicom_node")

WATCH_INTERVAL = 1.0  # seconds between looks at the config file
SETTLE = 0.3  # a changed file must stay unchanged this long (editors write in steps)
PID_FILE = "node.pid"  # in the spool, while the node runs
STOP_DEADLINE = 30.0  # seconds running associations get to finish on stop or listener restart


SWITCH_INTERVAL = 0.0005  # seconds


def _count_reload(result: str) -> None:
    metrics.RELOADS.labels(result).inc()
    metrics.RELOAD_OK.set(0 if result == "failed" else 1)


class _Queues:
    """Queue statistics of whichever pipeline runs (the collector is registered once)."""

    pipeline: Pipeline | None = None

    def __call__(self) -> list:
        pipeline = self.pipeline
        return pipeline.queue.stats(list(pipeline.destinations)) if pipeline else []


_collector: _Queues | None = None


def sd_notify(*states: str) -> None:
    """systemd's notification protocol (sd_notify(3)); nothing when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6  # ping twice per period


class Service:
    def __init__(self, config: Config, config_path: str | None):
        pynetdicom_patches.install()  # every patch to pynetdicom, once, before any association
        self.config = config
        self.config_path = config_path
        node = config.node
        self.spool = Spool(node.spool, node.spool_max_size, node.spool_min_free)
        self.spool.save_config(config)
        self.pipeline = Pipeline(config, self.spool)
        self.scp = self._storage_scp(config)
        self.http: ObservabilityServer | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._drain = threading.Event()  # `dicom-node drain` (SIGUSR1) until SIGUSR2 or a restart
        self._shown_draining = False  # the draining state last logged and exported
        self._file_state = self._stat()
        self._name(config)

    def _storage_scp(self, config: Config) -> StorageSCP:
        """The listener: spooled instances go to the pipeline, and so do the Storage
        Commitment reports a peer sends on an association it opens."""
        return StorageSCP(config, self.spool, self.pipeline.submit, self.pipeline.commitment_report)

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> bool:
        """Listener, workers, HTTP; False (logged) when a port cannot be bound."""
        node = self.config.node
        # A thread that waits for the GIL takes it after this long at most (Python's default:
        # 5 ms). A sender waits for each acknowledgement while the dispatch, commit and
        # delivery threads hold the GIL in turns: their turns must be short.
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            self.scp.start()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", node.host, node.port, exc.strerror)
            return False
        backlog = self.pipeline.start()
        global _collector
        if _collector is None:  # one registry per process
            _collector = _Queues()
            REGISTRY.register(QueueCollector(_collector))
            REGISTRY.register(StageCpuCollector())
        _collector.pipeline = self.pipeline
        if not self._start_http(self.config):
            self.scp.stop(deadline=0)
            self.pipeline.stop(timeout=0)
            return False
        log.info("config %s; %d rule(s); %d instance(s) resumed from the spool %s; %d worker(s)",
                 self.config.source, len(self.config.rules), backlog, self.spool.root,
                 self.pipeline.workers)  # fmt: skip
        sd_notify("READY=1", f"STATUS=listening as {node.ae_title} on port {self.scp.port}")
        return True

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; reload on SIGHUP or a changed file; drain on SIGUSR1
        (`dicom-node drain`), stop draining on SIGUSR2. Exit code."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        signal.signal(signal.SIGUSR1, lambda *_: self._drain.set())  # /healthz sees it at once
        signal.signal(signal.SIGUSR2, lambda *_: self._drain.clear())
        if not self.start():
            return 1
        self._write_pid_file()
        watchdog = _watchdog_interval()
        next_ping = time.monotonic()
        while not self._stop.is_set():
            self._stop.wait(min(WATCH_INTERVAL, watchdog or WATCH_INTERVAL))
            if self._reload.is_set():
                self._reload.clear()
                self.reload("SIGHUP")
            elif self._file_changed():
                self.reload("the file changed")
            self._show_draining()  # a drain signal's log line and metric
            if watchdog and time.monotonic() >= next_ping and self._alive():
                sd_notify("WATCHDOG=1")
                next_ping = time.monotonic() + watchdog
        self.stop()
        return 0

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        self._drain.set()  # /healthz says draining at once: a balancer sends new work elsewhere
        self._show_draining()
        log.info("stopping: no new associations; finishing work in flight")
        self.scp.stop(STOP_DEADLINE)
        self.pipeline.stop()
        if self.http is not None:
            self.http.stop()
        log.info("stopped; %d instance(s) left in the spool for the next start",
                 len(self.spool.pending()))  # fmt: skip
        self.pid_file.unlink(missing_ok=True)

    def _alive(self) -> bool:
        """What the systemd watchdog vouches for: the threads that must never stop."""
        return self.scp.alive() and self.pipeline.health_problem() is None

    # --- draining and the node's name ------------------------------------------------------

    @property
    def pid_file(self) -> Path:
        """Where `dicom-node drain` finds the running node: its spool (one node per spool)."""
        return self.spool.root / PID_FILE

    def _write_pid_file(self) -> None:
        try:
            self.pid_file.write_text(f"{os.getpid()}\n")
        except OSError as exc:  # drain by signal still works; `dicom-node drain` will say so
            log.warning("cannot write %s: %s", self.pid_file, exc)

    def draining(self) -> bool:
        return self.config.node.draining or self._drain.is_set()

    def _show_draining(self) -> None:
        """Log and export a change of the draining state (called after signals and reloads)."""
        now = self.draining()
        if now != self._shown_draining:
            self._shown_draining = now
            metrics.DRAINING.set(int(now))
            if now:  # an operator's act (or a stop), not a problem: INFO
                log.info("draining: /healthz answers 503 draining; the associations open "
                         "are served and the queues keep delivering")  # fmt: skip
            else:
                log.info("no longer draining: /healthz answers 200 again")

    @staticmethod
    def _name(config: Config) -> None:
        metrics.NODE_NAME["name"] = config.node.name
        metrics.INFO.clear()
        metrics.INFO.labels(config.node.name, __version__).set(1)

    def health_problem(self) -> str | None:
        if self.draining():
            return "draining"
        if not self.scp.alive():
            return "the DICOM listener is not running"
        return self.pipeline.health_problem() or spool_write_problem(str(self.spool.tmp))

    # --- reload ----------------------------------------------------------------------------

    def reload(self, why: str) -> bool:
        """Validate the file again and apply it; on any problem keep the running config."""
        sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return self._reload_config(why)
        finally:
            sd_notify("READY=1")

    def _reload_config(self, why: str) -> bool:
        try:
            new = load_config(self.config_path)  # None: the same default as at start
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload (%s) refused: %s", why, problem)
            log.error("reload refused: %d problem(s); still running the previous configuration",
                      len(exc.problems))  # fmt: skip
            _count_reload("failed")
            return False
        if new.key == self.config.key:
            log.info("reload (%s): configuration unchanged", why)
            _count_reload("unchanged")
            return True
        old = self.config
        for warning in new.warnings:
            log.warning("reload: %s", warning)
        new = self._keep_restart_only_settings(old, new)
        self.spool.save_config(new)  # before any entry is received under it
        changes = self.pipeline.apply(new)
        if not self._apply_listener(old, new):
            _count_reload("failed")
            return False
        self._apply_http(old, new)
        self.config = new
        self.spool.max_size, self.spool.min_free = new.node.spool_max_size, new.node.spool_min_free
        self.spool.forget_configs({new.key})
        changes += [f"{len(new.rules)} rule(s)"]
        self._name(new)
        self._show_draining()
        log.info("reloaded (%s) from %s: %s", why, new.source, "; ".join(changes))
        _count_reload("applied")
        return True

    def _keep_restart_only_settings(self, old: Config, new: Config) -> Config:
        """The spool and the number of workers change only with a restart: keep them, say so."""
        kept = {}
        if new.node.spool != old.node.spool:
            kept["spool"] = old.node.spool
        if new.node.workers != old.node.workers:
            kept["workers"] = old.node.workers
        for name in kept:
            log.warning("reload: node.%s changes only with a restart; kept %s",
                        name, getattr(old.node, name))  # fmt: skip
        return replace(new, node=replace(new.node, **kept)) if kept else new

    def _apply_listener(self, old: Config, new: Config) -> bool:
        """A new AE title, host or port: a new listener, after the running associations end.
        Any other change (accepted calling AE titles, ...) takes effect at the next request."""
        before, after = old.node, new.node
        same = (before.ae_title, before.host, before.port, old.limits) == (
            after.ae_title,
            after.host,
            after.port,
            new.limits,
        )
        if same:
            self.scp.config = new
            return True
        log.info("restarting the DICOM listener: %s on %s:%d -> %s on %s:%d",
                 before.ae_title, before.host, before.port,
                 after.ae_title, after.host, after.port)  # fmt: skip
        self.scp.stop(STOP_DEADLINE)
        scp = self._storage_scp(new)
        try:
            scp.start()
        except OSError as exc:
            log.error("reload: cannot listen on %s:%d (%s); listening as before",
                      after.host, after.port, exc.strerror)  # fmt: skip
            self.pipeline.apply(old)
            self.scp = self._storage_scp(old)
            self.scp.start()
            return False
        self.scp = scp
        return True

    def _start_http(self, config: Config) -> bool:
        if config.http is None:
            return True
        try:
            self.http = ObservabilityServer(config.http.host, config.http.port, self.health_problem)
        except OSError as exc:
            log.error("cannot serve http on %s:%d: %s", config.http.host, config.http.port,
                      exc.strerror)  # fmt: skip
            return False
        self.http.start()
        return True

    def _apply_http(self, old: Config, new: Config) -> None:
        """Metrics and health move with the config; a port that cannot be bound is logged, and
        DICOM goes on regardless."""
        if old.http == new.http:
            return
        if self.http is not None:
            self.http.stop()
            self.http = None
        self._start_http(new)

    # --- the config file -------------------------------------------------------------------

    def _is_file(self) -> bool:
        return self.config.source != "<embedded default>"

    def _stat(self) -> tuple[int, int] | None:
        if not self._is_file():
            return None
        try:
            st = Path(self.config.source).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _file_changed(self) -> bool:
        state = self._stat()
        if state is None or state == self._file_state:
            return False
        time.sleep(SETTLE)
        if self._stat() != state:
            return False  # still being written: look again next time
        self._file_state = state
        return True
