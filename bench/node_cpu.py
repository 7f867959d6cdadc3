"""Where the node's CPU goes, per instance, and an A/B of two checkouts.

    .venv/bin/python bench/node_cpu.py [--syntax HTJ2KLossless] [--corpus ct|mr] [--runs 3]
                                       [--senders 1] [--other PATH]

One storescu association (or `--senders` of them, each with its share of the files) sends the
corpus of bench/throughput.py (300 CT or 60 MR, bench/corpora.py) to a node whose one rule
transcodes to `--syntax` (or `keep`) into a folder. Per run the table gives: images/s until the last
instance is in the archive, the time to every acknowledgement, the CPU milliseconds per
instance of the receiving process (all its threads) and of the codec workers (from /proc,
including workers recycled meanwhile), and how busy the whole machine was.

`--other PATH` is a second checkout with its own .venv (`git worktree add /tmp/A HEAD~1`, then
`/tmp/A/bin/setup`); the two run alternately, A (PATH) then B (this one), `--runs` times each,
because this VM's speed drifts by 15% within minutes: compare the pairs and the medians, not
single runs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common
from common import (
    CLOCK_TICKS,
    CPU,
    POLL,
    STORESCU_OPTIONS,
    BenchError,
    Node,
    Processes,
    Sender,
    archive_files,
    http_get,
    machine_busy_ticks,
    process_ticks,
    tree_pids,
)
from corpora import CT, MR, make_corpus

CONFIG = """\
node: {{ae_title: {aet}, host: 127.0.0.1, port: {port}, spool: ./spool, workers: 0}}
http: {{host: 127.0.0.1, port: {http_port}}}
destinations:
  archive: {{type: folder, path: ./archive, layout: "{{SOPInstanceUID}}.dcm"}}
rules:
  - {{name: cpu, transcode: {{syntax: {syntax}}}, send_to: [archive]}}
"""


@dataclass
class Result:
    tree: str
    rate: float
    ack: float
    receiving_ms: float
    workers_ms: float
    busy: float
    stages: dict[str, float]  # CPU ms per instance by stage (empty: that tree has no such metric)


STAGE_METRIC = re.compile(r'^dicom_node_cpu_seconds_total\{stage="([^"]+)"\} (\S+)$', re.M)


def stage_seconds(port: int) -> dict[str, float]:
    """The node's dicom_node_cpu_seconds_total by stage (node/ops/stage_cpu.py)."""
    try:
        text = http_get(port, "/metrics").decode()
    except OSError:
        return {}
    return {m[1]: float(m[2]) for m in STAGE_METRIC.finditer(text)}


def cpu_ticks(root: int) -> tuple[int, int]:
    """(receiving process, its codec workers: live ones plus those it has reaped)."""
    own, reaped = process_ticks(root)
    return own, reaped + sum(sum(process_ticks(pid)) for pid in tree_pids(root) if pid != root)


def one_run(tree: Path, label: str, args, corpus, procs: Processes, work: Path) -> Result:
    folder = work / f"{label}-{time.monotonic_ns()}"
    (http_port,) = common.free_ports(1)
    node = Node(procs, folder, folder.with_suffix(".log"),
                lambda port: CONFIG.format(aet=common.NODE_AET, port=port, syntax=args.syntax,
                                           http_port=http_port),
                tree / ".venv" / "bin" / "dicom-node")  # fmt: skip
    node.start()
    try:
        archive = folder / "archive"

        def stored() -> int:
            return sum(1 for _ in archive_files(archive)) if archive.exists() else 0

        warm = Sender(
            procs,
            node.port,
            common.NODE_AET,
            corpus.warmups,
            folder / "warmup.log",
            STORESCU_OPTIONS,
        )
        warm.wait(120)
        wait_until(lambda: stored() >= len(corpus.warmups), 120, "the warm-up")
        time.sleep(1.0)  # workers idle again
        assert node.proc is not None
        stages_before = stage_seconds(http_port)
        before, busy_before = cpu_ticks(node.proc.pid), machine_busy_ticks()
        files, n = corpus.files, len(corpus.files)
        started = time.monotonic()
        senders = [
            Sender(procs, node.port, common.NODE_AET,
                   files[n * i // args.senders : n * (i + 1) // args.senders],
                   folder / f"storescu{i}.log", STORESCU_OPTIONS)
            for i in range(args.senders)
        ]  # fmt: skip
        ack = max(s.wait(600) for s in senders)
        wait_until(lambda: stored() >= len(corpus.warmups) + n, 600, "the archive")
        seconds = time.monotonic() - started
        after, busy_after = cpu_ticks(node.proc.pid), machine_busy_ticks()
        stages_after = stage_seconds(http_port)
    finally:
        node.stop()
    ms = 1000 / CLOCK_TICKS / n
    return Result(
        label, n / seconds, ack, (after[0] - before[0]) * ms, (after[1] - before[1]) * ms,
        (busy_after - busy_before) / (seconds * CLOCK_TICKS * CPU),
        {k: (v - stages_before.get(k, 0.0)) * 1000 / n for k, v in stages_after.items()},
    )  # fmt: skip


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} was not complete within {timeout:.0f} s")
        time.sleep(POLL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--syntax", default="HTJ2KLossless", help="the rule's target, or keep")
    parser.add_argument("--corpus", choices=("ct", "mr"), default="ct")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--other", type=Path, help="a second checkout (with .venv): run as A")
    args = parser.parse_args(argv)
    trees = [("B", common.ROOT)]
    if args.other:
        if not (args.other / ".venv" / "bin" / "dicom-node").exists():
            print(f"{args.other} has no .venv/bin/dicom-node: run its bin/setup", file=sys.stderr)
            return 2
        trees.insert(0, ("A", args.other.resolve()))
    workspace = common.start_workspace("dicom-node-cpu-")
    if workspace is None:
        return 2
    work, _logs = workspace
    kind = CT if args.corpus == "ct" else MR
    corpus = make_corpus(work / "corpus", kind, kind.count)
    procs = Processes()
    results: list[Result] = []
    print(f"{kind.label}, {kind.count} instances, rule {args.syntax}, {args.senders} sender(s)")
    print(f"{'tree':4} {'img/s':>7} {'ack s':>6} {'receiving ms/img':>17} "
          f"{'workers ms/img':>15} {'machine busy':>13}")  # fmt: skip
    try:
        for _ in range(args.runs):
            for label, tree in trees:
                r = one_run(tree, label, args, corpus, procs, work)
                results.append(r)
                print(f"{r.tree:4} {r.rate:7.1f} {r.ack:6.2f} {r.receiving_ms:17.2f} "
                      f"{r.workers_ms:15.2f} {r.busy:12.0%}", flush=True)  # fmt: skip
    except BenchError as exc:
        print(f"failed: {exc} (logs kept in {work})", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    shutil.rmtree(work, ignore_errors=True)
    for label, tree in trees:
        mine = [r for r in results if r.tree == label]
        print(
            f"median {label} ({tree}): {statistics.median(r.rate for r in mine):.1f} img/s, "
            f"receiving {statistics.median(r.receiving_ms for r in mine):.2f} ms/img, "
            f"workers {statistics.median(r.workers_ms for r in mine):.2f} ms/img"
        )
    print(stage_table(trees, results))
    return 0


def stage_table(trees: list[tuple[str, Path]], results: list[Result]) -> str:
    """Median CPU ms per instance by stage, one column per tree, the machine's beside it."""
    stages = sorted({s for r in results for s in r.stages})
    if not stages:
        return "(no tree reports dicom_node_cpu_seconds by stage)"
    labels = [label for label, _ in trees]

    def median(label: str, pick) -> str:
        values = [pick(r) for r in results if r.tree == label]
        values = [v for v in values if v is not None]
        return f"{statistics.median(values):.2f}" if values else "-"

    rows = [[stage, *(median(lb, lambda r, s=stage: r.stages.get(s)) for lb in labels)]
            for stage in stages]  # fmt: skip
    rows.append(["node (all stages)", *(median(lb, lambda r: sum(r.stages.values()) or None)
                                       for lb in labels)])  # fmt: skip
    rows.append(["whole machine", *(median(lb, lambda r: r.busy * CPU * 1000 / r.rate)
                                    for lb in labels)])  # fmt: skip
    return "CPU ms per instance by stage (median):\n" + common.table(["stage", *labels], rows)


if __name__ == "__main__":
    sys.exit(main())
