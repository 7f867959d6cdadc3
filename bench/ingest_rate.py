"""Ingest throughput, a part of bench/throughput.py (whose docstring describes the method):
how fast the node, and Orthanc with ingest transcoding, take in a corpus and make every
instance durable in the target syntax, with one sender and two. `Bench` also holds what the
other parts measure (bench/codec_ceiling.py, bench/large_instance.py) for the report
(bench/throughput_report.py).
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from common import (
    LOG_TROUBLE,
    MB,
    NODE,
    NODE_AET,
    ORTHANC_AET,
    POLL,
    STORESCU_OPTIONS,
    BenchError,
    CpuWindow,
    Node,
    Orthanc,
    Processes,
    RssSampler,
    Sender,
    archive_files,
    exit_text,
    fmt_exc,
    folder_bytes,
    http_get,
    mib,
    num,
    tail,
)
from corpora import J2K, KEEP, SYNTAXES, Corpus, Syntax
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

if TYPE_CHECKING:
    from codec_ceiling import Ceiling
    from large_instance import Large

STALL = 30.0  # seconds without progress before a run is called stalled
RUNS = 2  # runs per peer measurement (fresh peer each); the fastest counts
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
J2K_FAMILY_UIDS = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                   "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93")  # fmt: skip
ORTHANC_DCMTK = "Orthanc-DCMTK"  # Orthanc with GDCM limited to JPEG 2000 (the crash fallback)


def gdcm_plugin() -> Path:
    found = sorted(PLUGIN_DIR.glob("*Gdcm*.so"))
    if not found:
        raise BenchError(f"no GDCM plugin in {PLUGIN_DIR} (Debian package orthanc-gdcm)")
    return found[0]


# --- peers ---------------------------------------------------------------------------------

NODE_CONFIG = """\
node: {{ae_title: {aet}, host: 127.0.0.1, port: {port}, spool: ./spool, workers: 0}}
destinations:
  archive: {{type: folder, path: ./archive}}
rules:
  - {{name: bench, transcode: {{syntax: {syntax}}}, send_to: [archive]}}
"""


def node_config(port: int, syntax: str) -> str:
    return NODE_CONFIG.format(aet=NODE_AET, port=port, syntax=syntax)


class NodePeer:
    kind = "node"
    aet = NODE_AET

    def __init__(self, procs: Processes, folder: Path, log: Path, syntax: str):
        self.node = Node(procs, folder, log, lambda port: node_config(port, syntax))
        self.folder = folder
        self.archive = folder / "archive"

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def pid(self) -> int:
        assert self.node.proc is not None
        return self.node.proc.pid

    def start(self) -> None:
        self.node.start()

    def alive(self) -> bool:
        return self.node.alive()

    def exit_status(self) -> int | None:
        return self.node.proc.returncode if self.node.proc else None

    def count(self) -> int:
        return sum(1 for _ in archive_files(self.archive))

    def stored_bytes(self) -> int:
        return folder_bytes(self.archive)

    def syntaxes(self) -> collections.Counter[str]:
        found: collections.Counter[str] = collections.Counter()
        for entry in archive_files(self.archive):
            try:
                found[str(read_file_meta_info(entry.path).TransferSyntaxUID)] += 1
            except Exception as exc:
                found[f"unreadable ({type(exc).__name__})"] += 1
        return found

    def problems(self) -> list[str]:
        return [r for r in self.node.log_records() if LOG_TROUBLE.search(r)]

    def stop(self) -> None:
        self.node.stop()


class OrthancPeer:
    kind = "Orthanc"
    aet = ORTHANC_AET

    def __init__(
        self, procs: Processes, folder: Path, log: Path, uid: str, plugin: Path,
        gdcm_j2k_only: bool = False,
    ):  # fmt: skip
        gdcm: dict[str, Any] = {"Enable": True}
        if gdcm_j2k_only:  # the other syntaxes go to Orthanc's built-in (DCMTK) transcoder
            gdcm["RestrictTransferSyntaxes"] = list(J2K_FAMILY_UIDS)
        extra = {
            "Plugins": [str(plugin)],
            "Gdcm": gdcm,
            "IngestTranscoding": uid,
            "IngestTranscodingOfUncompressed": True,
            "SyncStorageArea": True,
            "IndexDirectory": str(folder / "index"),
        }
        self.orthanc = Orthanc(procs, folder, log, extra)
        self.folder = folder
        self.log = log

    @property
    def port(self) -> int:
        return self.orthanc.dicom_port

    @property
    def pid(self) -> int:
        assert self.orthanc.process is not None
        return self.orthanc.process.pid

    def start(self) -> None:
        self.orthanc.start()

    def alive(self) -> bool:
        return self.orthanc.alive()

    def exit_status(self) -> int | None:
        return self.orthanc.process.returncode if self.orthanc.process else None

    def count(self) -> int:
        return self.orthanc.count()

    def stored_bytes(self) -> int:
        return folder_bytes(self.orthanc.storage)

    def syntaxes(self) -> collections.Counter[str]:
        port = self.orthanc.http_port
        found: collections.Counter[str] = collections.Counter()
        for orthanc_id in json.loads(http_get(port, "/instances", timeout=30)):
            data = http_get(port, f"/instances/{orthanc_id}/metadata/TransferSyntax", timeout=30)
            found[data.decode().strip()] += 1
        return found

    def problems(self) -> list[str]:
        if self.alive():
            return []
        lines = [line.strip() for line in tail(self.log, 40).splitlines() if line.strip()]
        crash = [line for line in lines if "Assertion" in line or line.startswith("E")]
        last = (crash or lines or ["(empty log)"])[-1]
        return [f"Orthanc {exit_text(self.exit_status())}; last log line: {last}"]

    def stop(self) -> None:
        self.orthanc.stop()


Peer = NodePeer | OrthancPeer


# --- results -------------------------------------------------------------------------------


@dataclass
class Run:
    peer: str  # node / Orthanc
    corpus: str
    syntax: str
    senders: int
    images: int
    input_bytes: int
    pixel_bytes: int
    status: str = "ok"  # ok, crashed, stalled, failed, n/a
    detail: str = ""
    got: int = 0
    seconds: float | None = None  # start of storescu -> last instance durable
    ack: float | None = None  # start of storescu -> (last) storescu exited
    rss_before: int | None = None
    peak_rss: int | None = None
    stored_bytes: int | None = None
    stored_syntaxes: dict[str, int] = field(default_factory=dict)
    other_load: float | None = None  # CPU share of processes outside the bench, timed window
    cpu_seconds: float | None = None  # the whole machine's busy CPU in the timed window
    beside: str = ""  # a keep run taken in turns with this syntax's runs (the ack time target)
    tries: list[float] = field(default_factory=list)  # img/s of each run; this is the fastest

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.seconds is not None

    @property
    def rate(self) -> float | None:
        return self.images / self.seconds if self.ok and self.seconds else None

    @property
    def mbps(self) -> float | None:
        return self.pixel_bytes / self.seconds / MB if self.ok and self.seconds else None

    @property
    def ratio(self) -> float | None:
        return self.input_bytes / self.stored_bytes if self.ok and self.stored_bytes else None

    @property
    def cpu_ms(self) -> float | None:
        """The machine's CPU per instance: sender, peer and kernel together."""
        return self.cpu_seconds * 1000 / self.images if self.ok and self.cpu_seconds else None


# --- the benchmark's state, and the ingest runs ------------------------------------------


class Bench:
    """One throughput benchmark: where it works, and what it found (the runs, the ceilings,
    the large instance, the problems). The ingest runs are measured here; the ceilings by
    codec_ceiling.measure_ceiling, the large instance by large_instance.measure_large."""

    def __init__(self, procs: Processes, work: Path, logs: Path, keep: bool, plugin: Path):
        self.procs = procs
        self.work = work
        self.logs = logs
        self.keep = keep
        self.plugin = plugin
        self.runs: list[Run] = []
        self._tag_uses: collections.Counter[str] = collections.Counter()
        self.ceilings: list[Ceiling] = []
        self.large: Large | None = None
        self.problems: list[str] = []
        self.node_lacks: dict[str, str] = {}  # syntax name -> check-config's message

    def say(self, message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    # --- what the node accepts ---------------------------------------------------------

    def check_node_syntaxes(self) -> None:
        folder = self.work / "check-config"
        folder.mkdir()
        for syntax in (*SYNTAXES, KEEP):
            path = folder / f"{syntax.name}.yaml"
            path.write_text(node_config(11112, syntax.name))
            done = subprocess.run(
                [str(NODE), "check-config", str(path)],
                cwd=folder, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if done.returncode != 0:
                message = (done.stderr or done.stdout).strip().splitlines()
                self.node_lacks[syntax.name] = message[0] if message else f"exit {done.returncode}"
                self.say(f"check-config rejects {syntax.name}: {self.node_lacks[syntax.name]}")

    # --- one run -------------------------------------------------------------------------

    def measure(
        self, corpus: Corpus, syntax: Syntax, senders: int, peer_kind: str,
        make: Callable[[str], Peer],
    ) -> Run:  # fmt: skip
        """One run: a fresh peer, warm-up, `senders` storescu at once, until all is durable."""
        run = Run(peer_kind, corpus.kind.key, syntax.name, senders, len(corpus.files),
                  corpus.file_bytes, corpus.pixel_bytes)  # fmt: skip
        tag = f"{corpus.kind.key}-{syntax.short}-{senders}snd-{peer_kind.lower()}"
        self._tag_uses[tag] += 1
        if self._tag_uses[tag] > 1:  # another run of the same measurement: its own folder, logs
            tag += f"-run{self._tag_uses[tag]}"
        peer = None
        sampler: RssSampler | None = None
        sends: list[Sender] = []
        try:
            peer = make(tag)
            peer.start()
            # warm-up: all codec workers started, Orthanc's plugin loaded; then the clock runs
            warm = Sender(self.procs, peer.port, peer.aet, corpus.warmups,
                          self.logs / f"{tag}-warmup.log", STORESCU_OPTIONS)  # fmt: skip
            status, got, _ = self.wait_durable(peer, 0, len(corpus.warmups), [warm])
            if status != "ok":
                run.status = status
                run.detail = f"in warm-up, {got} of {len(corpus.warmups)} stored"
                if not peer.alive():
                    run.detail += f"; {exit_text(peer.exit_status())}"
                for record in peer.problems()[:5]:
                    self.problems.append(f"{tag}: {record}")
                return run
            self.wait_exit([warm], 30)
            base, base_bytes = peer.count(), peer.stored_bytes()
            sampler = RssSampler(peer.pid)
            run.rss_before = sampler.sample()[1]
            sampler.start()
            n = len(corpus.files)
            halves = [corpus.files[n * i // senders : n * (i + 1) // senders]
                      for i in range(senders)]  # fmt: skip
            window = CpuWindow()
            started = time.monotonic()
            sends = [
                Sender(self.procs, peer.port, peer.aet, files,
                       self.logs / f"{tag}-storescu{i}.log", STORESCU_OPTIONS)
                for i, files in enumerate(halves)
            ]  # fmt: skip
            status, run.got, durable = self.wait_durable(peer, base, run.images, sends)
            run.cpu_seconds, run.other_load = window.close()
            run.status = status
            if status == "ok":
                assert durable is not None
                run.seconds = durable - started
                if self.wait_exit(sends, 60):
                    run.ack = max(s.done_at or 0.0 for s in sends) - started
            else:
                run.detail = f"after {run.got} of {run.images}"
                if not peer.alive():
                    run.detail += f"; {exit_text(peer.exit_status())}"
            sampler.stop()
            run.peak_rss = sampler.peak()
            failed = [s for s in sends if s.failed]
            if failed and run.status == "ok":
                run.detail = "storescu reported a failure (see its log)"
            for s in failed:
                self.problems.append(
                    f"{tag}: storescu exited {s.proc.returncode}:\n{tail(s.log, 4)}"
                )
            if run.status == "ok":
                run.stored_bytes = peer.stored_bytes() - base_bytes
                found = peer.syntaxes()
                run.stored_syntaxes = dict(found)
                expected = syntax.uid or str(ExplicitVRLittleEndian)
                wrong = sum(n for uid, n in found.items() if uid != expected)
                if wrong:
                    self.problems.append(
                        f"{tag}: {wrong} stored instance(s) not in {expected}: {dict(found)}"
                    )
            for record in peer.problems()[:5]:
                self.problems.append(f"{tag}: {record}")
        except BenchError as exc:
            run.status, run.detail = "failed", fmt_exc(exc)
            self.problems.append(f"{tag}: {exc}")
        finally:
            if sampler is not None:
                sampler.stop()
            for s in sends:
                self.procs.stop(s.proc, grace=2)
            if peer is not None:
                peer.stop()
                if not self.keep:
                    shutil.rmtree(peer.folder, ignore_errors=True)
        return run

    def _node_peer(self, syntax: Syntax) -> Callable[[str], Peer]:
        def make(tag: str) -> Peer:
            return NodePeer(self.procs, self.work / tag, self.logs / f"{tag}.log", syntax.name)

        return make

    def _orthanc_peer(self, syntax: Syntax, gdcm_j2k_only: bool) -> Callable[[str], Peer]:
        uid = syntax.uid
        assert uid is not None

        def make(tag: str) -> Peer:
            return OrthancPeer(self.procs, self.work / tag, self.logs / f"{tag}.log", uid,
                               self.plugin, gdcm_j2k_only)  # fmt: skip

        return make

    def wait_durable(
        self, peer: Peer, base: int, expected: int, senders: list[Sender],
        stall: float = STALL, limit: float | None = None,
    ) -> tuple[str, int, float | None]:  # fmt: skip
        """Poll until `expected` more instances are durable: ("ok", count, when) or
        ("crashed" | "stalled", count so far, None)."""
        got = 0
        started = last_change = time.monotonic()
        while True:
            if not peer.alive():
                if isinstance(peer, NodePeer):  # its archive can still be counted
                    got = peer.count() - base
                return "crashed", got, None
            try:
                now_got = peer.count() - base
            except OSError:
                now_got = got  # Orthanc busy or going down: no progress this time
            now = time.monotonic()
            if now_got != got:
                got, last_change = now_got, now
            if got >= expected:
                return "ok", got, now
            if now - last_change > stall or (limit is not None and now - started > limit):
                return "stalled", got, None
            time.sleep(POLL)

    @staticmethod
    def wait_exit(senders: list[Sender], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while any(s.done_at is None for s in senders):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)
        return True

    def node_runs(
        self, corpus: Corpus, syntax: Syntax, senders: tuple[int, ...], with_keep: bool = False
    ) -> list[Run]:
        """The node with each number of senders (and, `with_keep`, the node with rule `keep`),
        measured in turns (1, 2, keep, 1, 2, keep): this VM's speed drifts by 15% within
        minutes, and these figures are compared with each other."""
        if syntax.name in self.node_lacks:
            runs = [Run("node", corpus.kind.key, syntax.name, n, len(corpus.files),
                        corpus.file_bytes, corpus.pixel_bytes, status="n/a",
                        detail=f"node lacks {syntax.name}") for n in senders]  # fmt: skip
        else:
            measures = [self._node_measure(corpus, syntax, n) for n in senders]
            if with_keep:
                measures.append(self._node_measure(corpus, KEEP, 1))
            runs = self._fastest(*measures)
            if with_keep:
                runs[-1].beside = syntax.name
        for run in runs:
            self._record(run)
        return runs

    def _node_measure(self, corpus: Corpus, syntax: Syntax, senders: int) -> Callable[[], Run]:
        return lambda: self.measure(corpus, syntax, senders, "node", self._node_peer(syntax))

    @staticmethod
    def _fastest(*measures: Callable[[], Run]) -> list[Run]:
        """For each measurement the fastest of RUNS runs, the measurements taken in turns; a
        run that did not succeed is reported, and that measurement not repeated."""
        best: list[Run | None] = [None] * len(measures)
        rates: list[list[float]] = [[] for _ in measures]
        failed: set[int] = set()
        for _ in range(RUNS):
            for i, measure in enumerate(measures):
                if i in failed:
                    continue
                run = measure()
                if not run.ok:
                    failed.add(i)
                    best[i] = best[i] or run
                    continue
                rates[i].append(cast(float, run.rate))
                if best[i] is None or cast(float, run.rate) > cast(float, best[i].rate):
                    best[i] = run
        done = [cast(Run, run) for run in best]
        for run, tries in zip(done, rates, strict=True):
            if run.ok:
                run.tries = tries
        return done

    def orthanc_run(self, corpus: Corpus, syntax: Syntax, senders: int) -> Run:
        """Orthanc + GDCM plugin as configured by Debian (plugins transcode first). If it
        crashes on a syntax GDCM need not handle (not JPEG 2000), once more with GDCM limited
        to JPEG 2000, so Orthanc's built-in DCMTK codec does the work (ORTHANC_DCMTK)."""
        [run] = self._fastest(lambda: self.measure(
            corpus, syntax, senders, "Orthanc", self._orthanc_peer(syntax, False)))  # fmt: skip
        self._record(run)
        if run.status == "crashed" and syntax is not J2K:
            peer = self._orthanc_peer(syntax, True)
            [again] = self._fastest(
                lambda: self.measure(corpus, syntax, senders, ORTHANC_DCMTK, peer)
            )
            self._record(again)
        return run

    def _record(self, run: Run) -> None:
        self.runs.append(run)
        beside = f" (in turns with {run.beside})" if run.beside else ""
        what = f"{run.corpus} {run.syntax} {run.peer}, {run.senders} sender(s){beside}:"
        if run.ok:
            tries = f" (fastest of {', '.join(f'{r:.1f}' for r in run.tries)})" if len(
                run.tries) > 1 else ""  # fmt: skip
            self.say(f"{what} {run.rate:.1f} img/s{tries}, ack {num(run.ack, 2)} s, "
                     f"ratio {num(run.ratio, 2)}, peak RSS {mib(run.peak_rss)}, "
                     f"others used {run.other_load or 0:.0%} CPU")  # fmt: skip
        else:
            self.say(f"{what} {run.status} {run.detail}")

    def find(self, peer: str, corpus: str, syntax: str, senders: int = 1) -> Run | None:
        key = (peer, corpus, syntax, senders)
        for run in self.runs:
            if (run.peer, run.corpus, run.syntax, run.senders) == key and not run.beside:
                return run
        return None

    def keep_beside(self, corpus: str, syntax: str) -> Run | None:
        """The keep run taken in turns with `syntax`'s, else the corpus's keep run."""
        for run in self.runs:
            if (run.corpus, run.syntax, run.beside) == (corpus, KEEP.name, syntax):
                return run
        return self.find("node", corpus, KEEP.name)

    def find_ceiling(self, corpus: str, syntax: str, mode: str) -> Ceiling | None:
        for c in self.ceilings:
            if (c.corpus, c.syntax, c.mode) == (corpus, syntax, mode):
                return c
        return None
