"""Helpers shared by the benchmarks in bench/ (delivery.py, throughput.py).

- `Processes`: every long-running child (Orthanc, the node, storescu) is the leader of its own
  process group; `stop` SIGTERMs the group, SIGKILLs it after a grace period, then SIGKILLs
  whatever is left in the group; `stop_all` is what a `finally` calls.
- `free_ports`, `http_get` (never through an http_proxy from the environment), `tail`.
- `Orthanc`: the Debian package's server with a JSON config in a fresh folder (extra options,
  e.g. plugins or IngestTranscoding, merged in), started and polled until its REST API answers.
- `Node`: `dicom-node serve -c FILE` with a config rendered for a free port, started and polled
  until it listens; its log split into records.
- `Sender`: one DCMTK storescu run (one association for all its files, TCP_NODELAY=1); `done_at`
  is when it exited, i.e. when it had every acknowledgement.
- `install_signal_handlers`: Ctrl-C, SIGTERM and SIGHUP unwind through the `finally` blocks.

Imported as `common` (the scripts run as `python bench/NAME.py`, so bench/ is on sys.path).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / ".venv" / "bin" / "dicom-node"
ORTHANC = "/usr/sbin/Orthanc"
STORESCU = shutil.which("storescu") or "/usr/bin/storescu"
NODE_AET = "DICOM-NODE"
ORTHANC_AET = "ORTHANC"
POLL = 0.05  # seconds between polls of Orthanc's instance count (or an archive folder)
START_TIMEOUT = 60.0  # seconds for Orthanc or the node to become ready
LOG_RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
LOG_TROUBLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
# The local REST API must not go through an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(Exception):
    pass


# --- processes and ports -------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Processes:
    """Every long-running child, each the leader of its own process group."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def start(
        self, argv: list[str], log: Path, cwd: Path | None = None, env: dict | None = None
    ) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 15.0) -> None:
        """SIGTERM the group, SIGKILL it after `grace` s; then SIGKILL whatever is left in the
        group (the node's codec worker processes, should the node have died without them)."""
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait(10)
        signal_group(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc, grace=5.0)
            except Exception as exc:  # keep going: the others must still be stopped
                print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"    {line}" for line in text[-lines:])


def first_line(argv: list[str]) -> str:
    """The first line a command prints (for version strings)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


# --- Orthanc -------------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.read()
    except http.client.HTTPException as exc:  # e.g. the server died in mid-answer
        raise ConnectionError(f"http://127.0.0.1:{port}{path}: {exc!r}") from exc


class Orthanc:
    """Orthanc with fresh storage in `folder`; `extra` is merged into its JSON config."""

    def __init__(
        self, procs: Processes, folder: Path, log: Path, extra: dict[str, Any] | None = None
    ):
        self.procs = procs
        self.folder = folder
        self.log = log
        self.dicom_port, self.http_port = free_ports(2)
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True)
        storage = str(folder / "storage")
        config = {
            "Name": "bench", "StorageDirectory": storage, "IndexDirectory": storage,
            "DicomAet": ORTHANC_AET, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "Plugins": [],
        }  # fmt: skip
        config.update(extra or {})
        self.storage = Path(config["StorageDirectory"])
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))

    def start(self) -> float:
        """Start Orthanc (same ports and storage on a restart); the time /system answered."""
        self.proc = self.procs.start([ORTHANC, str(self.config)], self.log, cwd=self.folder)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"Orthanc exited with status {self.proc.returncode}:\n{tail(self.log)}"
                )
            try:
                http_get(self.http_port, "/system", timeout=2)
                return time.monotonic()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"Orthanc did not answer within {START_TIMEOUT:.0f} s")
            time.sleep(POLL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None

    def count(self) -> int:
        return int(json.loads(http_get(self.http_port, "/statistics"))["CountInstances"])


# --- the node ------------------------------------------------------------------------------


class Node:
    """`dicom-node serve -c FOLDER/node.yaml`; `render(port)` gives the YAML."""

    def __init__(
        self,
        procs: Processes,
        folder: Path,
        log: Path,
        render: Callable[[int], str],
        program: Path = NODE,  # bench/node_cpu.py runs another checkout's as well
    ):
        self.procs = procs
        self.program = program
        self.folder = folder
        self.log = log
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True)
        self.config = folder / "node.yaml"
        self.config.write_text(render(self.port))

    def start(self) -> None:
        argv = [str(self.program), "serve", "-c", str(self.config)]
        self.proc = self.procs.start(argv, self.log, cwd=self.folder)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the node exited with status {self.proc.returncode}:\n{tail(self.log)}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the node did not listen within {START_TIMEOUT:.0f} s")
            time.sleep(POLL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, grace=40.0)  # it finishes work in flight (up to 30 s)
            self.proc = None

    def log_records(self) -> list[str]:
        """The log, one string per record (a traceback stays with the line that logged it)."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        records: list[str] = []
        for line in lines:
            if records and not LOG_RECORD_START.match(line):
                records[-1] += "\n" + line
            else:
                records.append(line)
        return records


# --- sending -------------------------------------------------------------------------------


class Sender:
    """One storescu run; `done_at` is when it exited (it had every acknowledgement).
    `options` go before the host (e.g. ["-R", "-xe"])."""

    def __init__(
        self,
        procs: Processes,
        port: int,
        aet: str,
        files: list[Path],
        log: Path,
        options: Sequence[str] = (),
    ):
        env = dict(os.environ, TCP_NODELAY="1")
        argv = [STORESCU, *options, "-aec", aet, "127.0.0.1", str(port), *map(str, files)]
        self.procs = procs
        self.log = log
        self.count = len(files)
        self.done_at: float | None = None
        self.started = time.monotonic()
        self.proc = procs.start(argv, log, env=env)
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        self.proc.wait()
        self.done_at = time.monotonic()

    @property
    def failed(self) -> bool:
        return self.done_at is not None and self.proc.returncode != 0

    def check(self) -> None:
        if self.failed:
            raise BenchError(f"storescu exited with status {self.proc.returncode}:\n"
                             f"{tail(self.log)}")  # fmt: skip

    def wait(self, timeout: float) -> float:
        """Seconds from start until storescu exited successfully."""
        deadline = time.monotonic() + timeout
        while self.done_at is None:
            if time.monotonic() > deadline:
                raise BenchError(f"storescu did not finish within {timeout:.0f} s")
            time.sleep(POLL)
        self.check()
        self.procs.stop(self.proc)
        return self.done_at - self.started


# --- signals -------------------------------------------------------------------------------


def _terminate(signum: int, _frame: object) -> None:
    print(f"\n{signal.Signals(signum).name}; stopping what was started", file=sys.stderr)
    raise SystemExit(128 + signum)  # unwinds through the finally blocks


def install_signal_handlers() -> None:
    """Ctrl-C raises KeyboardInterrupt, SIGTERM/SIGHUP SystemExit: both reach the `finally`."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect nohup
        signal.signal(signal.SIGHUP, _terminate)


def ignore_signals_for_cleanup() -> None:
    """A second Ctrl-C (or SIGTERM) must not skip the cleanup that is under way."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def start_workspace(prefix: str) -> tuple[Path, Path] | None:
    """Check the programs a benchmark runs, install the signal handlers, and make its
    temporary folder with a logs/ folder inside; None (reported) when a program is missing."""
    for path in (NODE, Path(ORTHANC), Path(STORESCU)):
        if not path.exists():
            print(f"missing {path}", file=sys.stderr)
            return None
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    logs = work / "logs"
    logs.mkdir()
    return work, logs
