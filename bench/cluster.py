"""Cluster benchmark (issue 20): images/s through HAProxy in front of 1, 2 and 3 nodes on this
machine, beside storescu straight to one node, and the arithmetic for N machines.

Run from the repository root:

    .venv/bin/python bench/cluster.py [--count N] [--runs R] [--no-htj2k] [--keep]

About 4-5 minutes on 2 cores with the defaults (300 images, 3 runs per case, both tables).

Corpus: bench/corpora.py's CT (512x512, signed, 16 allocated, 14 stored, from pydicom-data's
693_UNCR.dcm; every image differs), Explicit VR Little Endian, N images (default 300).

Cases, each with fresh nodes (their own spool and archive folder) and a fresh HAProxy:
  (a) storescu -> one node directly, no HAProxy;
  (b) storescu -> HAProxy -> 1 node; (c) -> 2 nodes; (d) -> 3 nodes.
HAProxy runs deploy/haproxy/haproxy.cfg as shipped (TCP mode, leastconn, /healthz checks) via
tests/harness.py's HAProxy; with fewer than 3 nodes its other servers point at a dead port and
stay DOWN. Each node: `dicom-node serve` with workers: 0 (one codec process per core), an
`http:` section (for the health checks), one rule (`transcode: {syntax: keep}`; the second
table HTJ2KLossless) sending to a folder destination: the files are written under a hidden
name, fsync'd and renamed, so the archive is not the bottleneck (no PACS in the loop).

Every case has 3 senders started together, each a DCMTK storescu (-R -xe, TCP_NODELAY=1) with
its own association and a third of the files, so leastconn can spread them over the nodes.
Before the clock, each node gets 2 x cores - 1 warm-up instances directly (its codec
processes are started) and, with HAProxy, one more goes through HAProxy.

Measured per run:
  img/s        images / seconds from the first sender's start until every instance is
               durable in the nodes' archive folders (polled every 50 ms: +-0.05 s).
  acked img/s  images / seconds from the first sender's start until the last sender exited
               (it had every acknowledgement).
  vs direct    img/s / row (a)'s img/s.
  HAProxy CPU  utime + stime of the haproxy process (/proc/PID/stat, all its threads), before
               and after the run, in seconds per 1000 images (clock ticks of 10 ms: a row's
               figure is coarse; the arithmetic sums all runs, and cross-checks with the
               threads' schedstat run time, in ns).
  nodes CPU    the same for the nodes' process trees (each node and its codec processes, the
               ones it reaped included), in ms per image.
  ours CPU     the same for this bench's whole process tree (the nodes, HAProxy, the senders
               once reaped, and the bench itself, which polls the folders), in ms per image;
  our cores    ours CPU / the window's wall time: how much of the machine the run got.
  others       the share of all cores used by processes outside this bench's process tree
               during the run (/proc/stat busy less ours; as bench/codec_table.py: the machine
               is shared; over 15% is marked busy).
Each case runs --runs times (default 3), the cases taken in turns (a b c d a b c d), so drift
falls on all of them alike; the fastest run of a case is its row (its notes list every run).
After each run every output's transfer syntax is checked (file meta), the instances per node
counted, and the nodes' logs searched for WARNING/ERROR records.

On this machine the N nodes, HAProxy and the senders share the same cores, so rows (c) and (d)
cannot scale once the cores are full; they show what HAProxy costs. (When row (a) leaves cores
idle, the arithmetic says so: one node alone need not fill the machine.) The arithmetic for
N machines at the end uses r (row a: one node with the machine to itself) and h (HAProxy's
CPU per image): N machines give about min(N x r, 1/h) img/s per HAProxy core.

Every process started here runs in its own process group and is stopped in a `finally`, also
on Ctrl-C and SIGTERM. The temporary folder is removed at the end (--keep keeps the logs; after
a failure they are kept too).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    CLOCK_TICKS,
    CPU,
    LOG_RECORD_START,
    LOG_TROUBLE,
    MB,
    MIB,
    NODE,
    NODE_AET,
    POLL,
    ROOT,
    START_TIMEOUT,
    STORESCU,
    STORESCU_OPTIONS,
    BenchError,
    CpuWindow,
    Node,
    Processes,
    Sender,
    archive_files,
    end_workspace,
    factor,
    first_line,
    free_ports,
    http_get,
    num,
    process_ticks,
    start_workspace,
    table,
    tail,
    tree_pids,
)
from corpora import CT, HTJ2K, KEEP, Corpus, Syntax, make_corpus
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from tests.harness import HAPROXY, HAProxy, wait_for

SENDERS = 3  # storescu processes per run, each with a third of the files
BUSY = 0.15  # others using more than this share of all cores: marked busy
# What a node logs when it is stopped (SIGTERM): it drains first (at WARNING in some versions
# of the node, INFO in others). Expected here: counted, not a problem.
SHUTDOWN_DRAINING = re.compile(r" (?:WARNING|INFO) dicom_node: draining: /healthz answers 503 ")
# What http.server prints to stderr (not a log record) when a request handler raises: a banner,
# "Exception occurred during processing of request from ...", the traceback, a banner. When
# HAProxy's check reads the status line of the node's /healthz answer and closes with a reset
# (no TIME_WAIT) before the node wrote the body, that is a ConnectionResetError in
# node/ops/observe.py: counted and reported, not a problem. Other threads' log records may come
# in between those lines.
BANNER = "-" * 40
HANDLE_ERROR = "Exception occurred during processing of request from "
RESET_ERROR = re.compile(r"^(?:ConnectionResetError|BrokenPipeError)\b")


def split_node_log(text: str) -> tuple[list[str], list[list[str]]]:
    """(the log records, each with its continuation lines; http.server's handler errors, each
    as its lines): the second are taken out of the first, wherever they were interleaved."""
    records: list[str] = []
    errors: list[list[str]] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if LOG_RECORD_START.match(line):
            records.append(line)
        elif line.startswith(HANDLE_ERROR):
            block = [line]
            errors.append(block)
        elif line == BANNER:
            block = None  # the banner before a block, or the one that closes it
        elif block is not None:
            block.append(line)
        elif records:
            records[-1] += "\n" + line
        else:
            records.append(line)
    return records, errors


def healthz_reset(block: list[str]) -> bool:
    return any("node/ops/observe.py" in line for line in block) and any(
        RESET_ERROR.match(line) for line in block
    )


# HAProxy's tcplog line for a connection: client [date] frontend backend/server Tw/Tc/Tt bytes
# termination-state ...; "--" is a normal end. And its health-check verdicts.
TCPLOG = re.compile(r"^\S+ \[[^\]]+\] dicom (\S+) \S+ \d+ (\S\S) ", re.M)
SERVER_DOWN = re.compile(r"^Server nodes/(node\d+) is DOWN[^\n]*", re.M)
LINK_BYTES = 10e9 / 8  # a 10 Gb/s link, bytes per second each way


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    nodes: int
    balanced: bool  # through HAProxy


CASES = (
    Case("a", "(a) storescu -> node, no HAProxy", 1, False),
    Case("b", "(b) storescu -> HAProxy -> 1 node", 1, True),
    Case("c", "(c) storescu -> HAProxy -> 2 nodes", 2, True),
    Case("d", "(d) storescu -> HAProxy -> 3 nodes", 3, True),
)

NODE_CONFIG = """\
node: {{name: {name}, ae_title: {aet}, host: 127.0.0.1, port: {port}, spool: ./spool, workers: 0}}
http: {{host: 127.0.0.1, port: {http_port}}}
destinations:
  archive: {{type: folder, path: ./archive}}
rules:
  - {{name: bench, transcode: {{syntax: {syntax}}}, send_to: [archive]}}
"""


def node_config(name: str, port: int, http_port: int, syntax: str) -> str:
    return NODE_CONFIG.format(name=name, aet=NODE_AET, port=port, http_port=http_port,
                              syntax=syntax)  # fmt: skip


class ClusterNode(Node):
    """A node with its `http:` section (HAProxy's /healthz checks) and a folder destination."""

    def __init__(self, procs: Processes, folder: Path, log: Path, name: str, syntax: str):
        self.name = name
        self.http_port = free_ports(1)[0]
        super().__init__(procs, folder, log,
                         lambda port: node_config(name, port, self.http_port, syntax))  # fmt: skip
        self.archive = folder / "archive"

    def start(self) -> None:
        """Start it; return when /healthz answers 200. The node listens for DICOM before its
        HTTP endpoint is up: HAProxy started in between would mark it DOWN at its first check."""
        super().start()

        def healthy() -> bool:
            if not self.alive():
                raise BenchError(f"node {self.name} exited:\n{tail(self.log)}")
            try:
                return http_get(self.http_port, "/healthz", timeout=2).startswith(b"ok")
            except OSError:  # not up yet, or 503 (urllib raises HTTPError, an OSError)
                return False

        wait_for(healthy, START_TIMEOUT, f"node {self.name}'s /healthz", error=BenchError)

    def count(self) -> int:
        return sum(1 for _ in archive_files(self.archive))

    def cpu_ticks(self) -> int:
        """CPU of the node's process tree: itself, its codec processes, the ones it reaped."""
        if self.proc is None:
            return 0
        return tree_ticks(self.proc.pid)


def tree_ticks(root: int) -> int:
    """CPU of a process tree: every process in it, and the children each has reaped."""
    return sum(sum(process_ticks(pid)) for pid in tree_pids(root))


def schedstat_ns(pid: int) -> int | None:
    """Nanoseconds on a CPU of every thread of `pid` (/proc/PID/task/*/schedstat, field 1):
    finer than utime+stime's clock ticks; None when the kernel does not give it."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    return total


class Balancer(HAProxy):
    error = BenchError


# --- runs ----------------------------------------------------------------------------------


@dataclass
class Run:
    case: Case
    syntax: Syntax
    images: int
    seconds: float  # first sender's start -> every instance durable
    acked: float  # first sender's start -> the last sender exited
    node_cpu: float  # CPU seconds of the nodes' trees in the window
    haproxy_cpu: float | None  # CPU seconds of haproxy in the window
    haproxy_ns: int | None  # haproxy's threads' run time in the window (schedstat)
    ours_cpu: float  # CPU seconds of this bench's whole tree (nodes, HAProxy, senders, itself)
    window: float  # seconds the CPU window lasted
    others: float  # share of all cores used outside this bench
    per_node: list[int]  # instances each node stored
    sessions: list[int]  # HAProxy's sessions to each server in the run (stot)
    threads: int = 0  # haproxy's threads

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def acked_rate(self) -> float:
        return self.images / self.acked


class Bench:
    def __init__(
        self, procs: Processes, work: Path, logs: Path, corpus: Corpus, timeout: float
    ):  # fmt: skip
        self.procs = procs
        self.work = work
        self.logs = logs
        self.corpus = corpus
        self.timeout = timeout
        self.runs: list[Run] = []
        self.problems: list[str] = []
        self.checks: list[str] = []
        self.shutdown_drains = 0
        self.healthz_resets = 0  # /healthz ConnectionResetError tracebacks in the node logs
        self.connections = 0  # through HAProxy, all ended normally unless a problem says so
        self.nodes_started = 0
        self._uses: collections.Counter[str] = collections.Counter()

    def say(self, message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    def node_accepts(self, syntax: Syntax) -> str | None:
        """None when `dicom-node check-config` takes a rule with `syntax`, else its message."""
        folder = self.work / "check-config"
        folder.mkdir(exist_ok=True)
        path = folder / f"{syntax.name}.yaml"
        path.write_text(node_config("n1", 11112, 8080, syntax.name))
        done = subprocess.run([str(NODE), "check-config", str(path)], cwd=folder,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        if done.returncode == 0:
            return None
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[0] if lines else f"exit status {done.returncode}"

    def wait_durable(
        self, nodes: list[ClusterNode], expected: int, senders: list[Sender], timeout: float
    ) -> tuple[float, int]:
        """Poll the archive folders until they hold `expected` instances and every sender has
        exited; (the time they first held them, how many they hold then)."""
        deadline = time.monotonic() + timeout
        durable: float | None = None
        while True:
            got = sum(node.count() for node in nodes)
            now = time.monotonic()
            if durable is None and got >= expected:
                durable = now
            for sender in senders:
                sender.check()
            for node in nodes:
                if not node.alive():
                    raise BenchError(f"node {node.name} exited:\n{tail(node.log)}")
            if durable is not None and all(s.done_at is not None for s in senders):
                for sender in senders:
                    self.procs.stop(sender.proc)  # it has exited: forget it
                return durable, got
            if now > deadline:
                running = sum(s.done_at is None for s in senders)
                raise BenchError(f"after {timeout:.0f} s the archives hold {got} of {expected}; "
                                 f"{running} sender(s) still running")  # fmt: skip
            time.sleep(POLL)

    def measure(self, case: Case, syntax: Syntax) -> Run:
        tag = f"{syntax.short}-{case.key}"
        self._uses[tag] += 1
        tag += f"-run{self._uses[tag]}"
        folder = self.work / tag
        nodes = [
            ClusterNode(self.procs, folder / f"n{k + 1}", self.logs / f"{tag}-n{k + 1}.log",
                        f"n{k + 1}", syntax.name)
            for k in range(case.nodes)
        ]  # fmt: skip
        balancer: Balancer | None = None
        try:
            for node in nodes:
                node.start()
                self.nodes_started += 1
            if case.balanced:
                port = free_ports(1)[0]
                balancer = Balancer(folder / "haproxy", port,
                                    [(n.port, n.http_port) for n in nodes], self.procs)  # fmt: skip
                balancer.log = self.logs / f"{tag}-haproxy.log"
                balancer.start()
            self._warm_up(tag, nodes, balancer)
            base = [node.count() for node in nodes]
            files = self.corpus.files
            n = len(files)
            parts = [files[n * i // SENDERS : n * (i + 1) // SENDERS] for i in range(SENDERS)]
            target = balancer.port if balancer else nodes[0].port
            stot0 = self._stot(balancer)
            hap0 = self._haproxy_ticks(balancer)
            ns0 = self._haproxy_ns(balancer)
            ours0 = tree_ticks(os.getpid())
            opened = time.monotonic()
            node0 = sum(node.cpu_ticks() for node in nodes)
            window = CpuWindow()
            senders = [
                Sender(self.procs, target, NODE_AET, part, self.logs / f"{tag}-storescu{i}.log",
                       STORESCU_OPTIONS)
                for i, part in enumerate(parts)
            ]  # fmt: skip
            durable, got = self.wait_durable(nodes, sum(base) + n, senders, self.timeout)
            node1 = sum(node.cpu_ticks() for node in nodes)
            hap1 = self._haproxy_ticks(balancer)
            ns1 = self._haproxy_ns(balancer)
            ours1 = tree_ticks(os.getpid())
            _, others = window.close()
            closed = time.monotonic()
            stot1 = self._stot(balancer)
            start = senders[0].started
            done = max(s.done_at for s in senders if s.done_at is not None)
            if got > sum(base) + n:
                self.problems.append(f"{tag}: the archives hold {got - sum(base) - n} more "
                                     "instance(s) than sent")  # fmt: skip
            run = Run(
                case, syntax, n, durable - start, done - start, (node1 - node0) / CLOCK_TICKS,
                (hap1 - hap0) / CLOCK_TICKS if balancer else None,
                ns1 - ns0 if balancer and ns0 is not None and ns1 is not None else None,
                (ours1 - ours0) / CLOCK_TICKS, closed - opened, others,
                [node.count() - b for node, b in zip(nodes, base, strict=True)],
                [b - a for a, b in zip(stot0, stot1, strict=True)],
            )  # fmt: skip
            if balancer is not None and balancer.process is not None:
                with contextlib.suppress(OSError):
                    run.threads = len(os.listdir(f"/proc/{balancer.process.pid}/task"))
            self._check_syntaxes(tag, nodes, syntax)
            self.runs.append(run)
            spread = "/".join(map(str, run.per_node))
            self.say(f"{tag}: {run.rate:.1f} img/s durable, {run.acked_rate:.1f} acked, "
                     f"per node {spread}, others {others:.0%}")  # fmt: skip
            return run
        finally:
            if balancer is not None:
                balancer.stop()
                self._haproxy_log(tag, balancer)
            for node in nodes:
                node.stop()
            self._node_logs(tag, nodes)
            shutil.rmtree(folder, ignore_errors=True)

    def _warm_up(self, tag: str, nodes: list[ClusterNode], balancer: Balancer | None) -> None:
        """The warm-ups but the last straight to each node; the last one through HAProxy."""
        warm = self.corpus.warmups
        senders = [Sender(self.procs, node.port, NODE_AET, warm[:-1],
                          self.logs / f"{tag}-warmup-{node.name}.log", STORESCU_OPTIONS)
                   for node in nodes]  # fmt: skip
        expected = (len(warm) - 1) * len(nodes)
        if balancer is not None:
            senders.append(
                Sender(
                    self.procs,
                    balancer.port,
                    NODE_AET,
                    warm[-1:],
                    self.logs / f"{tag}-warmup-haproxy.log",
                    STORESCU_OPTIONS,
                )
            )
            expected += 1
        self.wait_durable(nodes, expected, senders, START_TIMEOUT)

    @staticmethod
    def _stot(balancer: Balancer | None) -> list[int]:
        if balancer is None:
            return [0]
        stats = balancer.stats()
        return [int(stats[f"node{k + 1}"]["stot"] or 0) for k in range(len(balancer.nodes))]

    @staticmethod
    def _haproxy_ns(balancer: Balancer | None) -> int | None:
        if balancer is None or balancer.process is None:
            return None
        return schedstat_ns(balancer.process.pid)

    @staticmethod
    def _haproxy_ticks(balancer: Balancer | None) -> int:
        if balancer is None or balancer.process is None:
            return 0
        return process_ticks(balancer.process.pid)[0]

    def _check_syntaxes(self, tag: str, nodes: list[ClusterNode], syntax: Syntax) -> None:
        want = syntax.uid or str(ExplicitVRLittleEndian)  # keep: as sent
        found: collections.Counter[str] = collections.Counter()
        for node in nodes:
            for entry in archive_files(node.archive):
                try:
                    found[str(read_file_meta_info(entry.path).TransferSyntaxUID)] += 1
                except Exception as exc:
                    found[f"unreadable ({type(exc).__name__})"] += 1
        wrong = {uid: k for uid, k in found.items() if uid != want}
        if wrong:
            self.problems.append(f"{tag}: outputs not in {want}: {dict(wrong)}")
        else:
            self.checks.append(f"{tag}: all {sum(found.values())} outputs in {want}")

    def _haproxy_log(self, tag: str, balancer: Balancer) -> None:
        """Connections that did not end normally, and nodes marked DOWN, become problems."""
        try:
            text = balancer.log.read_text(errors="replace")
        except OSError:
            return
        ends = collections.Counter(state for _, state in TCPLOG.findall(text))
        self.connections += sum(ends.values())
        odd = {state: k for state, k in ends.items() if state != "--"}
        if odd:
            self.problems.append(f"{tag} haproxy: connections ended with termination states "
                                 f"{odd} (normal: --)")  # fmt: skip
        ours = {f"node{k + 1}" for k in range(len(balancer.nodes))}
        for match in SERVER_DOWN.finditer(text):
            if match.group(1) in ours:
                self.problems.append(f"{tag} haproxy: {match.group(0)}")

    def _node_logs(self, tag: str, nodes: list[ClusterNode]) -> None:
        """Unexpected WARNING/ERROR records and tracebacks become problems; the drain message
        at the stop and the /healthz connection resets (`split_node_log`) are counted."""
        for node in nodes:
            try:
                text = node.log.read_text(errors="replace")
            except OSError:
                continue
            records, errors = split_node_log(text)
            troubles = []
            for block in errors:
                if healthz_reset(block):
                    self.healthz_resets += 1
                else:
                    troubles.append("\n".join(block))
            for record in records:
                if SHUTDOWN_DRAINING.search(record):
                    self.shutdown_drains += 1
                elif LOG_TROUBLE.search(record):
                    troubles.append(record)
            for record in troubles[:5]:
                self.problems.append(f"{tag} {node.name} log: {record}")
            if len(troubles) > 5:
                self.problems.append(f"{tag} {node.name} log: ... {len(troubles) - 5} more")


# --- report --------------------------------------------------------------------------------


def best(runs: list[Run], case: Case, syntax: Syntax) -> tuple[Run | None, list[Run]]:
    mine = [r for r in runs if r.case is case and r.syntax is syntax]
    return max(mine, key=lambda r: r.rate, default=None), mine


def _others(share: float) -> str:
    return f"{share:.0%}" + (" busy" if share > BUSY else "")


def print_table(bench: Bench, syntax: Syntax) -> None:
    direct, _ = best(bench.runs, CASES[0], syntax)
    header = ["case", "nodes", "img/s", "acked img/s", "vs direct", "HAProxy CPU s/1000 img",
              "nodes CPU ms/img", "ours CPU ms/img", "our cores", "others", "notes"]  # fmt: skip
    rows = []
    for case in CASES:
        run, mine = best(bench.runs, case, syntax)
        if run is None:
            continue
        notes = f"instances per node {'/'.join(map(str, run.per_node))}"
        if case.balanced:
            notes += f", sessions {'/'.join(map(str, run.sessions))}"
        notes += "; runs " + ", ".join(f"{r.rate:.1f}" for r in mine) + " img/s"
        rows.append([
            case.label, str(case.nodes), num(run.rate), num(run.acked_rate),
            factor(run.rate / direct.rate) if direct else "-",
            num(run.haproxy_cpu * 1000 / run.images, 2) if run.haproxy_cpu is not None else "-",
            num(run.node_cpu * 1000 / run.images, 2), num(run.ours_cpu * 1000 / run.images, 2),
            num(run.ours_cpu / run.window, 2), _others(run.others), notes,
        ])  # fmt: skip
    print(f"rule `transcode: {{syntax: {syntax.name}}}` ({syntax.label})")
    print(table(header, rows))


def haproxy_cost(bench: Bench, syntax: Syntax) -> tuple[float | None, float | None, int]:
    """HAProxy's CPU seconds per image over every run through it with `syntax`: from
    utime+stime, from schedstat (None when missing), and how many runs."""
    runs = [r for r in bench.runs if r.syntax is syntax and r.haproxy_cpu is not None]
    images = sum(r.images for r in runs)
    if not images:
        return None, None, 0
    ticks = sum(r.haproxy_cpu or 0.0 for r in runs) / images
    fine = None
    if all(r.haproxy_ns is not None for r in runs):
        fine = sum(r.haproxy_ns or 0 for r in runs) / 1e9 / images
    return ticks, fine, len(runs)


def print_arithmetic(bench: Bench, syntax: Syntax, image_bytes: float) -> None:
    direct, _ = best(bench.runs, CASES[0], syntax)
    h, fine, runs = haproxy_cost(bench, syntax)
    if direct is None or not h:
        print(f"the arithmetic for N machines ({syntax.name}): not enough measurements")
        return
    r = direct.rate
    cap = 1 / h
    node_ms = direct.node_cpu * 1000 / direct.images
    print(f"the arithmetic for N machines, rule {syntax.name} "
          "(HAProxy forwards bytes, it does no DICOM):")  # fmt: skip
    print(f"  r = {r:.1f} img/s per node: row (a), one node with this {CPU}-core machine to "
          f"itself (but the 3 senders ran on it too, and others used {direct.others:.0%} of "
          "it meanwhile)")  # fmt: skip
    print(f"  h = {h * 1000:.3f} ms of HAProxy CPU per image (utime+stime over its {runs} runs, "
          "rows b-d" + (f"; schedstat says {fine * 1000:.3f} ms" if fine else "") +
          f"): one HAProxy core forwards about 1/h = {cap:.0f} img/s "
          f"({cap * image_bytes / MB:.0f} MB/s)")  # fmt: skip
    print("  N machines, one node each, behind one HAProxy core: about min(N x r, 1/h) img/s")
    cells = []
    for n in (1, 2, 3, 4, 8, 16, 32, 64):
        cells.append(f"N={n}: {min(n * r, cap):.0f}" + (" (HAProxy)" if n * r > cap else ""))
    print("    " + "; ".join(cells))
    print(f"  HAProxy is the limit past N = 1/(h x r) = {cap / r:.0f} nodes per HAProxy core; "
          "HAProxy 2.6 starts one thread per core (nbthread; here "
          f"{max((x.threads for x in bench.runs), default=0)}), so c cores give about c/h; a "
          f"10 Gb/s link carries about {LINK_BYTES / image_bytes:.0f} img/s each way "
          f"({image_bytes / MIB:.2f} MiB per image; HAProxy receives and sends each byte "
          "once)")  # fmt: skip
    print(f"  the node's own CPU in row (a) is {node_ms:.2f} ms per image: a node machine "
          f"with {CPU} cores that were CPU-bound on the node alone would give about "
          f"{CPU} / {node_ms:.2f} ms = {CPU * 1000 / node_ms:.0f} img/s, an upper bound on r "
          "(fsync latency and the network are not in it)")  # fmt: skip
    print(
        f"  here ({CPU} cores) the N nodes share the same cores with HAProxy and the senders, "
        "so rows (c) and (d) cannot scale: they show HAProxy's cost (vs direct), not N x r"
    )
    used = direct.ours_cpu / direct.window + direct.others * CPU
    if used < 0.9 * CPU:
        print(f"  but row (a) kept only {used:.2f} of the {CPU} cores busy (ours "
              f"{direct.ours_cpu / direct.window:.2f}, others {direct.others * CPU:.2f}): one "
              "node alone does not fill this machine (what it does is not all CPU: fsync "
              "waits, and one Python process for the associations), so more nodes on the same "
              "cores can go faster until the cores are full; r above is then low for a machine "
              "with the node to itself")  # fmt: skip


def print_report(bench: Bench, syntaxes: list[Syntax], command: str, elapsed: float,
                 busy: float, skipped: str) -> None:  # fmt: skip
    corpus = bench.corpus
    size = corpus.file_bytes / len(corpus.files)
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    print()
    print(f"dicom-node cluster benchmark (issue 20): {len(corpus.files)} CT images, "
          f"{CT.label}, {size / 1024:.0f} KiB each, Explicit VR LE")  # fmt: skip
    print(f"command: {command}")
    print(f"machine: {CPU} cores ({model}); {platform.platform()}; Python "
          f"{platform.python_version()}")  # fmt: skip
    print(f"versions: {first_line([HAPROXY, '-v'])}; dicom-node "
          f"{importlib.metadata.version('dicom-node')} ({git or 'unknown'}); "
          f"{first_line([STORESCU, '--version']).strip('$ ')}")  # fmt: skip
    print(f"setup: {SENDERS} storescu senders at once (-R -xe, one association each, a third of "
          "the files each); nodes workers: 0 (one codec process per core each), one folder "
          "destination (fsync'd files: the archive is not the bottleneck; no PACS in the loop); "
          "HAProxy: deploy/haproxy/haproxy.cfg as shipped (TCP mode, leastconn)")  # fmt: skip
    print("img/s: first sender's start -> every instance durable in the archive folders (polled "
          "every 50 ms); acked img/s: -> the last sender exited; CPU from /proc/PID/stat "
          "(utime+stime) and /proc/stat in the same window; each row the fastest of its runs, "
          "the cases taken in turns; ours = the nodes + HAProxy + the senders + this "
          "bench")  # fmt: skip
    for syntax in syntaxes:
        print()
        print_table(bench, syntax)
    if skipped:
        print()
        print(skipped)
    for syntax in syntaxes:
        print()
        print_arithmetic(bench, syntax, size)
    print()
    print(f"others: the share of all cores used by processes outside this bench during each "
          f"run (busy: over {BUSY:.0%}); over the whole bench {busy:.0%}")  # fmt: skip
    print(f"checks: {len(bench.checks)} runs, every output in the rule's transfer syntax"
          if bench.checks and not any("outputs not in" in p for p in bench.problems)
          else "checks: see problems")  # fmt: skip
    if bench.shutdown_drains:
        print(
            f"check: {bench.shutdown_drains} of {bench.nodes_started} node(s) logged "
            "'draining: /healthz answers 503 draining' when stopped after a run (expected)"
        )
    if bench.connections:
        print(f"check: HAProxy logged {bench.connections} DICOM connections (warm-ups included); "
              "any that did not end normally (termination state --), or a node of the run "
              "marked DOWN, is listed under problems")  # fmt: skip
    if bench.healthz_resets:
        print(
            f"note: the nodes printed {bench.healthz_resets} traceback(s) (ConnectionResetError, "
            "BrokenPipeError) from node/ops/observe.py's /healthz handler: HAProxy's check "
            "reads the status line and resets the connection, and the node writes the body after "
            "the "
            "headers (http.server's handle_error prints it to stderr; not counted as a problem)"
        )
    if bench.problems:
        print("PROBLEMS:")
        for problem in bench.problems:
            print(f"  {problem}")
    else:
        print("problems: none (no unexpected WARNING/ERROR in the node logs, no extra instances)")
    print(f"bench took {elapsed:.0f} s")


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="images per run (300)")
    parser.add_argument("--runs", type=int, default=3, help="runs per case; the fastest counts")
    parser.add_argument("--no-htj2k", action="store_true", help="only the keep table")
    parser.add_argument("--keep", action="store_true", help="keep the logs (and print where)")
    args = parser.parse_args(argv)
    if args.count < SENDERS:
        parser.error(f"--count must be at least {SENDERS}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not Path(HAPROXY).exists():
        print(f"missing {HAPROXY} (Debian package haproxy)", file=sys.stderr)
        return 2
    command = shlex.join([".venv/bin/python", "bench/cluster.py", *sys.argv[1:]])
    workspace = start_workspace("dicom-node-cluster-")
    if workspace is None:
        return 2
    work, logs = workspace
    started = time.monotonic()
    procs = Processes()
    ok = False
    try:
        print(f"making {args.count} CT images in {work} ...", file=sys.stderr, flush=True)
        corpus = make_corpus(work / "corpus", CT, args.count)
        bench = Bench(procs, work, logs, corpus, timeout=60 + args.count * 0.5)
        syntaxes, skipped = [KEEP], ""
        if not args.no_htj2k:
            refusal = bench.node_accepts(HTJ2K)
            if refusal is None:
                syntaxes.append(HTJ2K)
            else:
                skipped = f"HTJ2K lossless table skipped: check-config says {refusal}"
        cpu = CpuWindow()
        for syntax in syntaxes:
            for _ in range(args.runs):
                for case in CASES:
                    bench.measure(case, syntax)
        busy = cpu.close()[1]
        print_report(bench, syntaxes, command, time.monotonic() - started, busy, skipped)
        sys.stdout.flush()
        ok = True
        return 0
    except BenchError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping what was started", file=sys.stderr)
        return 130
    finally:
        end_workspace(procs, work, logs, ok, "logs" if args.keep else None)


if __name__ == "__main__":
    sys.exit(main())
