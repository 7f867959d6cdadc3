"""CPU time by stage, for /metrics (dicom_node_cpu_seconds_total{stage=...}).

Which stage burns the CPU is the first question when a node falls behind, and the answer
`top` gives (one process) does not say. Each live thread of the receiving process is put in
its stage by what it is; threads that have ended (an association's, once it is released) are
the process's total less the live ones, nearly all receiving; codec worker processes are the
live children plus those the process has reaped. Read from /proc at scrape time: Linux only,
and nothing is reported where /proc is missing.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
ENDED = "ended threads (associations)"
WORKERS = "codec workers"

# the thread's Python class or name prefix -> its stage
_BY_CLASS = {
    "DULServiceProvider": "receive",
    "Association": "receive",
    "AssociationServer": "receive",
    "_ExecutorManagerThread": "hand-off",
}
_BY_NAME = {
    "AcceptorServer": "receive",
    "AcceptorThread": "receive",
    "dispatch": "dispatch",  # routes and hands off; processes keep-only entries itself
    "QueueFeederThread": "hand-off",
    "commit": "queue",
    "deliver-": "delivery",
    "http": "observe",
}


def stage_of(thread: threading.Thread) -> str:
    for cls in type(thread).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    for prefix, stage in _BY_NAME.items():
        if thread.name.startswith(prefix):
            return stage
    return "other"


def _ticks(stat: Path, reaped: bool = False) -> int:
    """utime + stime of a /proc stat file (+ cutime + cstime: reaped children's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])
    return own + (int(fields[13]) + int(fields[14]) if reaped else 0)


def _children(pid: int) -> Iterator[int]:
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            yield from (int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue


def stage_seconds(pid: int | None = None) -> dict[str, float]:
    """CPU seconds so far of each stage of this process (and its codec workers)."""
    pid = pid or os.getpid()
    by_stage: Counter[str] = Counter()
    live = 0
    for thread in threading.enumerate():
        if thread.native_id is None:
            continue
        try:
            ticks = _ticks(Path(f"/proc/{pid}/task/{thread.native_id}/stat"))
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile: counted among the ended ones
        by_stage[stage_of(thread)] += ticks
        live += ticks
    stat = Path(f"/proc/{pid}/stat")
    own = _ticks(stat)
    by_stage[ENDED] += max(own - live, 0)
    workers = _ticks(stat, reaped=True) - own
    for child in _children(pid):
        try:
            workers += _ticks(Path(f"/proc/{child}/stat"))
        except (OSError, IndexError, ValueError):
            continue
    by_stage[WORKERS] += workers
    return {stage: ticks / TICKS for stage, ticks in by_stage.items()}


class StageCpuCollector:
    def collect(self):
        family = CounterMetricFamily(
            "dicom_node_cpu_seconds",
            "CPU time of the node by stage (receive, hand-off to the codec workers, codec "
            "workers, queue, delivery, ...), from /proc",
            labels=["stage"],
        )
        try:
            seconds = stage_seconds()
        except OSError:  # no /proc
            seconds = {}
        for stage, value in sorted(seconds.items()):
            family.add_metric([stage], value)
        yield family
