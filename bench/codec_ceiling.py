"""Codec-only ceilings, a part of bench/throughput.py (whose docstring describes the method):
what the codecs alone manage on all cores, on the same images held in memory by
os.cpu_count() worker processes (spawned, warmed up before the clock). `verified` runs the
node's own codec step (decode, encode, verify; not serialised), `encode-only` the encoder
alone on pre-decoded arrays.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from common import CPU, BenchError, CpuWindow, fmt_exc
from corpora import BY_NAME, HTJ2K_UID, Corpus, Syntax
from ingest_rate import Bench

CEILING_PASSES = 2  # timed passes over the corpus per ceiling; the fastest counts
# The encoding plugins the node names (node/transcode/step.py), for the encode-only ceiling.
ENCODE_PLUGIN = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.90": "pylibjpeg",
                 "1.2.840.10008.1.2.5": "pylibjpeg"}  # fmt: skip


@dataclass
class Ceiling:
    corpus: str
    syntax: str
    mode: str  # verified / encode-only
    images: int
    status: str = "ok"
    detail: str = ""
    seconds: float | None = None
    output_bytes: int | None = None
    other_load: float | None = None
    cpu_seconds: float | None = None  # the machine's busy CPU in the best pass
    passes: list[float] = field(default_factory=list)  # seconds of each timed pass

    @property
    def rate(self) -> float | None:
        return self.images / self.seconds if self.status == "ok" and self.seconds else None

    @property
    def cpu_ms(self) -> float | None:
        ok = self.status == "ok"
        return self.cpu_seconds * 1000 / self.images if ok and self.cpu_seconds else None


# --- codec-only ceiling (worker processes) -------------------------------------------------

_W: dict[str, Any] = {}  # per worker process: the images and the codec step


def _ceiling_init(paths: list[str], mode: str, name: str, barrier: Any) -> None:
    os.setpgid(0, 0)  # its own process group, like every process this bench starts
    warnings.filterwarnings("ignore")
    from node.transcode.process import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # as the node's codec workers do: the codec at its best
    _W["mode"], _W["barrier"] = mode, barrier
    blobs = [Path(p).read_bytes() for p in paths]
    if mode == "verified":
        from node.config.targets import TranscodeSpec, parse_target
        from node.transcode.step import transcode

        _W["blobs"] = blobs
        _W["spec"] = TranscodeSpec(parse_target(name), fallback=(), allow_lossy=frozenset())
        _W["transcode"] = transcode
    else:
        from pydicom.pixels import as_pixel_options, get_encoder

        uid = BY_NAME[name].uid
        items = []
        for blob in blobs:
            ds = pydicom.dcmread(io.BytesIO(blob))
            items.append((ds.pixel_array, as_pixel_options(ds)))
        _W["items"] = items
        if uid == HTJ2K_UID:
            import imagecodecs

            _W["encode"] = lambda arr, _opts: imagecodecs.htj2k_encode(arr, level=0)
        else:
            encoder, plugin = get_encoder(uid), ENCODE_PLUGIN[uid]
            _W["encode"] = lambda arr, opts: encoder.encode(arr, encoding_plugin=plugin, **opts)
    _ceiling_task(0)  # imports and codec set-up happen here, not on the clock


def _ceiling_ready(_index: int) -> int:
    _W["barrier"].wait(timeout=600)  # returns only when every worker has initialised
    return os.getpid()


def _ceiling_task(index: int) -> tuple[str, int]:
    if _W["mode"] == "verified":
        ds = pydicom.dcmread(io.BytesIO(_W["blobs"][index]))
        result = _W["transcode"](ds, _W["spec"])
        if result.dataset is None:
            return f"{result.outcome}: {'; '.join(result.notes)}", 0
        # Not serialised: the node's worker writes by splicing the received bytes
        # (node/transcode/output_file.py), so that is the node's cost, not the codec step's.
        return "ok", len(result.dataset.PixelData)
    arr, opts = _W["items"][index]
    return "ok", len(_W["encode"](arr, opts))


def _stop_pool(pool: ProcessPoolExecutor, graceful: bool) -> None:
    if not graceful:  # interrupted or broken: do not wait for tasks; kill the workers
        for proc in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                proc.kill()
    pool.shutdown(wait=graceful, cancel_futures=True)


# --- the measurement -----------------------------------------------------------------------


def measure_ceiling(bench: Bench, corpus: Corpus, syntax: Syntax, mode: str) -> Ceiling:
    """One ceiling, the fastest of CEILING_PASSES passes over the corpus on all cores;
    recorded in `bench.ceilings`."""
    result = Ceiling(corpus.kind.key, syntax.name, mode, len(corpus.files))
    bench.ceilings.append(result)
    if mode == "verified" and syntax.name in bench.node_lacks:
        result.status, result.detail = "n/a", f"node lacks {syntax.name}"
        return result
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(CPU)
    pool = ProcessPoolExecutor(
        CPU, mp_context=ctx, initializer=_ceiling_init,
        initargs=([str(p) for p in corpus.files], mode, syntax.name, barrier),
    )  # fmt: skip
    graceful = False
    try:
        pids = set(pool.map(_ceiling_ready, range(CPU)))  # every worker is up and warm
        if len(pids) != CPU:
            raise BenchError(f"only {len(pids)} of {CPU} ceiling workers started")
        best = None
        for _ in range(CEILING_PASSES):  # the best pass: a ceiling, on a shared machine
            window = CpuWindow()
            started = time.perf_counter()
            outcomes = list(pool.map(_ceiling_task, range(len(corpus.files))))
            seconds = time.perf_counter() - started
            result.passes.append(seconds)
            cpu_seconds, others = window.close()
            if best is None or seconds < best:
                best, result.cpu_seconds, result.other_load = seconds, cpu_seconds, others
        result.seconds = best
        graceful = True
        bad = [text for text, _ in outcomes if text != "ok"]
        if bad:
            result.status = "failed"
            result.detail = f"{len(bad)} image(s) not encoded: {bad[0]}"
        result.output_bytes = sum(size for _, size in outcomes)
    except Exception as exc:  # BrokenProcessPool, an import error in the worker, ...
        result.status, result.detail = "failed", fmt_exc(exc)
        bench.problems.append(f"ceiling {corpus.kind.key} {syntax.name} {mode}: {exc}")
    finally:
        _stop_pool(pool, graceful)
    what = f"{corpus.kind.key} {syntax.name} ceiling ({mode}):"
    if result.rate:
        bench.say(f"{what} {result.rate:.1f} img/s (best of {len(result.passes)}; others "
                 f"used {result.other_load or 0:.0%} CPU)")  # fmt: skip
    else:
        bench.say(f"{what} {result.status} {result.detail}")
    return result
