"""What the benchmarks in bench/ share (delivery.py, throughput.py and its parts, node_cpu.py).

- From tests/harness.py (shared with the tests): `Processes` (every long-running child is the
  leader of its own process group; `stop` SIGTERMs the group, SIGKILLs it after a grace
  period, then SIGKILLs whatever is left in it; `stop_all` is what a `finally` calls),
  `free_ports`, `http_get` (never through an http_proxy from the environment), `tail`, and
  the Orthanc launcher, which `Orthanc` here gives free ports and the benchmarks' errors.
- `Orthanc`: the Debian package's server with a JSON config in a fresh folder (extra options,
  e.g. plugins or IngestTranscoding, merged in), started and polled until its REST API answers.
- `Node`: `dicom-node serve -c FILE` with a config rendered for a free port, started and polled
  until it listens; its log split into records.
- `Sender`: one DCMTK storescu run (one association for all its files, TCP_NODELAY=1); `done_at`
  is when it exited, i.e. when it had every acknowledgement.
- `install_signal_handlers`, `start_workspace`: Ctrl-C, SIGTERM and SIGHUP unwind through the
  `finally` blocks; a temporary folder with logs/ inside.
- /proc: process trees, their memory (`RssSampler`) and CPU (`CpuWindow`, `process_ticks`).
- `archive_files`, `folder_bytes`: what a folder destination (or Orthanc's storage) holds.
- `table` and the cell formats (`num`, `mib`, `factor`, `div`): the printed tables.

Imported as `common` (the scripts run as `python bench/NAME.py`, so bench/ is on sys.path);
it puts the repository root on sys.path too, for `tests.harness`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # for tests.harness

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tests import harness
from tests.harness import ORTHANC as ORTHANC
from tests.harness import ORTHANC_AET as ORTHANC_AET
from tests.harness import POLL as POLL
from tests.harness import START_TIMEOUT as START_TIMEOUT
from tests.harness import Processes as Processes
from tests.harness import free_ports as free_ports
from tests.harness import http_get as http_get
from tests.harness import tail as tail
from tests.harness import wait_for

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / ".venv" / "bin" / "dicom-node"
STORESCU = shutil.which("storescu") or "/usr/bin/storescu"
STORESCU_OPTIONS = ("-R", "-xe")  # only the contexts the files need, Explicit VR LE first
NODE_AET = "DICOM-NODE"
CPU = os.cpu_count() or 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE = 0.1  # seconds between RSS samples
MB = 1e6
MIB = 1 << 20
LOG_RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
LOG_TROUBLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


class BenchError(Exception):
    pass


def first_line(argv: list[str]) -> str:
    """The first line a command prints (for version strings)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


# --- Orthanc and the node ------------------------------------------------------------------


class Orthanc(harness.Orthanc):
    """Orthanc on free ports with fresh storage in `folder` (which must not exist yet);
    `extra` is merged into its JSON config. `start` returns the time its REST API answered."""

    error = BenchError
    stop_grace = 15.0

    def __init__(
        self, procs: Processes, folder: Path, log: Path, extra: dict[str, Any] | None = None
    ):
        folder.mkdir(parents=True)
        dicom_port, http_port = free_ports(2)
        super().__init__(folder, dicom_port, http_port, log=log, name="bench", extra=extra,
                         procs=procs)  # fmt: skip
        self.folder = folder


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

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the node exited with status {self.proc.returncode}:\n{tail(self.log)}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(listening, START_TIMEOUT, "the node to listen", error=BenchError)

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


# --- signals and the workspace -------------------------------------------------------------


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


def end_workspace(procs: Processes, work: Path, logs: Path, ok: bool, keep: str | None) -> None:
    """What a benchmark's `finally` does: stop everything it started (a second Ctrl-C cannot
    interrupt that), then remove its temporary folder `work`, except what `keep` names
    ("folder": all of it; "logs": its logs/) and, after a failure (`ok` false), the logs."""
    ignore_signals_for_cleanup()
    procs.stop_all()
    if keep == "folder":
        print(f"temporary folder kept: {work}", file=sys.stderr)
        return
    if ok and keep is None:
        shutil.rmtree(work, ignore_errors=True)
        return
    for child in work.iterdir():  # the corpora and stores can be large: the logs only
        if child != logs:
            shutil.rmtree(child, ignore_errors=True)
    print(f"logs kept in {logs}", file=sys.stderr)


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


# --- /proc: process trees, their memory and CPU --------------------------------------------


def _children(pid: int) -> list[int]:
    """Child pids of every thread of `pid` (a process started by any thread is listed there)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return found


def tree_pids(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


def rss_of(pid: int) -> int:
    """VmRSS of one process in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) of one process: its own CPU, its reaped children's."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])  # proc(5) 14-17


def _cpu_ticks(pid: int) -> int:
    """One process's CPU, its reaped children's included."""
    return sum(process_ticks(pid))


def machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = values[:7]
    return user + nice + system + irq + softirq


class CpuWindow:
    """The machine's CPU use in a window: all of it (every process and the kernel, hypervisor
    steal excluded), and the share of all cores used by processes outside this bench's tree
    (0.0-1.0): the machine is shared, and that says which numbers suffered."""

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, int, int]:
        ours = sum(_cpu_ticks(pid) for pid in tree_pids(os.getpid()))
        return time.monotonic(), machine_busy_ticks(), ours

    def close(self) -> tuple[float, float]:
        """(CPU-seconds the whole machine was busy, the share others used)."""
        t0, busy0, ours0 = self._start
        t1, busy1, ours1 = self._snapshot()
        capacity = (t1 - t0) * CLOCK_TICKS * CPU
        others = (busy1 - busy0) - (ours1 - ours0)
        share = max(0.0, min(1.0, others / capacity)) if capacity > 0 else 0.0
        return (busy1 - busy0) / CLOCK_TICKS, share


class RssSampler:
    """Samples the summed VmRSS of a process tree every SAMPLE s in a thread."""

    def __init__(self, root: int):
        self.root = root
        self.samples: list[tuple[float, int, int, int]] = []  # time, tree, root, processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def sample(self) -> tuple[float, int, int, int]:
        pids = tree_pids(self.root)
        sizes = [rss_of(pid) for pid in pids]
        return time.monotonic(), sum(sizes), sizes[0], len(pids)

    def _run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(SAMPLE):
                return

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def peak(self, start: float | None = None, end: float | None = None, what: int = 1) -> int:
        values = [
            s[what]
            for s in self.samples
            if (start is None or s[0] >= start) and (end is None or s[0] <= end)
        ]
        return max(values, default=0)


# --- stored files --------------------------------------------------------------------------


def archive_files(root: Path) -> Iterable[os.DirEntry]:
    """Instance files under `root`; hidden names (a write in progress) are skipped."""
    todo = [str(root)]
    while todo:
        try:
            entries = list(os.scandir(todo.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                todo.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                yield entry


def folder_bytes(root: Path) -> int:
    total = 0
    for entry in archive_files(root):
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat().st_size
    return total


# --- text: exit statuses, exceptions, cells, tables ----------------------------------------


def exit_text(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def fmt_exc(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def mib(value: int | None) -> str:
    if not value:
        return "-"
    return f"{value / MIB / 1024:.2f} GiB" if value >= 10 * 1024 * MIB else f"{value / MIB:.0f} MiB"


def factor(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table(header: list[str], rows: list[list[str]]) -> str:
    """First column left-aligned, the last (notes) free, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells += [row[i].rjust(widths[i]) for i in range(1, len(widths))]
        return " | ".join([*cells, row[-1]]).rstrip()

    rule = "-+-".join("-" * w for w in widths) + "-+-" + "-" * 5
    return "\n".join([line(header), rule, *map(line, rows)])
