"""The report of bench/throughput.py (whose docstring describes what is measured): a table per
corpus, the CPU tables, the two-senders tables, the large instance, the PASS/FAIL/N/A list of
the targets, and the same as JSON.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codec_ceiling import Ceiling
from common import (
    CPU,
    MIB,
    ORTHANC,
    POLL,
    ROOT,
    SAMPLE,
    STORESCU,
    div,
    factor,
    first_line,
    mib,
    num,
    table,
)
from corpora import HTJ2K, J2K, JLS, KEEP, RLE, SYNTAXES, Corpus
from ingest_rate import ORTHANC_DCMTK, Bench, Run
from large_instance import LARGE_SIZE

BUSY = 0.15  # other processes using more than this share of the CPUs: flagged in the notes
CEILING_FLOORS = {J2K.name: 0.8, JLS.name: 0.6, RLE.name: 0.6, HTJ2K.name: 0.6}  # node/ceiling


@dataclass
class Target:
    verdict: str  # PASS, FAIL, N/A
    text: str


def _rate_cell(run: Run | None) -> str:
    if run is None:
        return "-"
    return num(run.rate) if run.ok else run.status


def _busy(**windows: Run | Ceiling | None) -> str | None:
    """A note naming the measurements during which other processes used > BUSY of the CPUs."""
    busy = [f"{who.replace('_', ' ')} {w.other_load:.0%}"
            for who, w in windows.items()
            if w is not None and w.other_load is not None and w.other_load > BUSY]  # fmt: skip
    return f"busy machine, CPU used by others: {', '.join(busy)}" if busy else None


def _note(run: Run | None, who: str) -> str | None:
    if run is None or run.ok and not run.detail:
        return None
    if run.status == "n/a":
        return f"n/a ({run.detail})"
    return f"{who} {run.status}" + (f" ({run.detail})" if run.detail else "")


@dataclass
class OrthancResult:
    run: Run | None
    fallback: bool  # the DCMTK-codec run after a crash with GDCM
    note: str | None

    @property
    def rate(self) -> float | None:
        return self.run.rate if self.run else None

    def cell(self, value: str) -> str:
        return f"{value}*" if self.fallback and value not in ("-", "n/a") else value


def orthanc_result(bench: Bench, corpus: str, syntax: str, senders: int = 1) -> OrthancResult:
    """The Orthanc figures to compare with: Orthanc + GDCM as configured, or, when that
    crashed, the run with GDCM limited to JPEG 2000 (marked with a '*')."""
    run = bench.find("Orthanc", corpus, syntax, senders)
    if run is None or run.status != "crashed":
        return OrthancResult(run, False, _note(run, "Orthanc") if run and not run.ok else None)
    alt = bench.find(ORTHANC_DCMTK, corpus, syntax, senders)
    if alt is None:
        return OrthancResult(run, False, _note(run, "Orthanc"))
    first = f"Orthanc + GDCM crashed ({run.detail})"
    if alt.ok:
        return OrthancResult(alt, True, f"* {first}; * = GDCM limited to JPEG 2000, so "
                                        "Orthanc's own DCMTK codec encodes")  # fmt: skip
    return OrthancResult(run, False, f"{first}; with its DCMTK codec (GDCM limited to JPEG "
                                     f"2000) also {alt.status} ({alt.detail})")  # fmt: skip


def corpus_table(bench: Bench, corpus: Corpus) -> str:
    key = corpus.kind.key
    header = ["syntax", "node img/s", "MB/s", "ratio", "ack s", "peak RSS", "Orthanc img/s",
              "Orth ratio", "Orth RSS", "node/Orth", "ceiling img/s", "node/ceil",
              "enc-only img/s", "notes"]  # fmt: skip
    rows = []
    for syntax in (*SYNTAXES, KEEP):
        node = bench.find("node", key, syntax.name)
        node_rate = node.rate if node else None
        verified = bench.find_ceiling(key, syntax.name, "verified")
        encode = bench.find_ceiling(key, syntax.name, "encode-only")
        notes = [n for n in (_note(node, "node"),) if n]
        vs: str = "-"
        orth_run: Run | None = None
        if syntax.orthanc:
            orth = orthanc_result(bench, key, syntax.name)
            run = orth_run = orth.run
            orth_cells = [
                orth.cell(_rate_cell(run)),
                orth.cell(num(run.ratio if run else None, 2)),
                orth.cell(mib(run.peak_rss if run else None)),
            ]
            vs = orth.cell(factor(div(node_rate, orth.rate)))
            notes += [orth.note] if orth.note else []
        elif syntax is HTJ2K:
            orth = orthanc_result(bench, key, J2K.name)
            orth_cells = ["n/a", "n/a", "n/a"]
            vs = factor(div(node_rate, orth.rate))
            notes.append("node/Orth: vs Orthanc's JPEG 2000 lossless img/s (it cannot encode "
                         "HTJ2K)" + (f"; that run: {orth.note}" if orth.note else ""))  # fmt: skip
        else:
            orth_cells = ["-", "-", "-"]
        for c in (verified, encode):
            if c is not None and c.status != "ok" and c.detail:
                notes.append(f"{c.mode} ceiling {c.status}: {c.detail}")
        busy = _busy(node=node, Orthanc=orth_run, ceiling=verified, enc_only=encode)
        notes += [busy] if busy else []
        rows.append([
            syntax.label, _rate_cell(node), num(node.mbps if node else None),
            num(node.ratio if node else None, 2), num(node.ack if node else None, 2),
            mib(node.peak_rss if node else None), *orth_cells, vs,
            _rate_cell_ceiling(verified),
            factor(div(node_rate, verified.rate if verified else None)),
            _rate_cell_ceiling(encode), "; ".join(notes),
        ])  # fmt: skip
    return table(header, rows)


def _rate_cell_ceiling(c: Ceiling | None) -> str:
    if c is None:
        return "-"
    return num(c.rate) if c.rate else c.status


def cpu_table(bench: Bench, corpus: Corpus) -> str:
    """CPU per instance, the whole machine's (sender, peer, kernel), and about the highest
    node/ceiling the machine allows: with the codec step costing what the ceiling measured (c)
    and receiving what `keep` measured (k) on the same cores, c / (c + k)."""
    key = corpus.kind.key
    keep = bench.find("node", key, KEEP.name)
    k = keep.cpu_ms if keep else None
    header = ["syntax", "node ms/img", "Orthanc ms/img", "codec ms/img (ceiling)",
              "keep ms/img", "node/ceil", "at most c/(c+k)", "target"]  # fmt: skip
    rows = []
    for syntax in SYNTAXES:
        node = bench.find("node", key, syntax.name)
        orth = orthanc_result(bench, key, syntax.name) if syntax.orthanc else None
        ceiling = bench.find_ceiling(key, syntax.name, "verified")
        c = ceiling.cpu_ms if ceiling else None
        rows.append([
            syntax.label, num(node.cpu_ms if node else None),
            orth.cell(num(orth.run.cpu_ms if orth.run else None)) if orth else "n/a",
            num(c), num(k),
            num(div(node.rate if node else None, ceiling.rate if ceiling else None), 2),
            num(div(c, c + k) if c is not None and k is not None else None, 2),
            f">= {CEILING_FLOORS[syntax.name]}",
        ])  # fmt: skip
    return table(header, rows)


def senders_table(bench: Bench, corpus: Corpus) -> str:
    key = corpus.kind.key
    header = ["syntax", "node 1 snd", "node 2 snd", "2/1", "node ack s (2)", "Orthanc 1 snd",
              "Orthanc 2 snd", "2/1", "notes"]  # fmt: skip
    rows = []
    for syntax in SYNTAXES:
        one, two = bench.find("node", key, syntax.name, 1), bench.find("node", key, syntax.name, 2)
        if two is None:
            continue
        notes = [n for n in (_note(two, "node 2 snd"),) if n]
        o1, o2 = (
            orthanc_result(bench, key, syntax.name, 1),
            orthanc_result(bench, key, syntax.name, 2),
        )
        if syntax.orthanc:
            same = o1.fallback == o2.fallback  # both with GDCM, or both with DCMTK's codec
            orth = [o1.cell(_rate_cell(o1.run)), o2.cell(_rate_cell(o2.run)),
                    factor(div(o2.rate, o1.rate)) if same else "-"]  # fmt: skip
            notes += [f"2 senders: {o2.note}"] if o2.note else []
        else:
            orth = ["n/a", "n/a", "-"]
        busy = _busy(node_1_snd=one, node_2_snd=two, Orthanc_1_snd=o1.run, Orthanc_2_snd=o2.run)
        notes += [busy] if busy else []
        rows.append([
            syntax.label, _rate_cell(one), _rate_cell(two),
            factor(div(two.rate, one.rate if one else None)), num(two.ack, 2), *orth,
            "; ".join(notes),
        ])  # fmt: skip
    return table(header, rows) if rows else "(not measured)"


def evaluate_targets(bench: Bench, corpora: list[Corpus]) -> list[Target]:
    out: list[Target] = []

    def check(ok: bool, text: str) -> None:
        out.append(Target("PASS" if ok else "FAIL", text))

    def na(text: str) -> None:
        out.append(Target("N/A", text))

    def rate_text(run: Run | None) -> str:
        if run is None:
            return "not run"
        return f"{run.rate:.1f} img/s" if run.ok else f"{run.status} ({run.detail})"

    keys = [c.kind.key.upper() for c in corpora]
    for corpus in corpora:
        key, up = corpus.kind.key, corpus.kind.key.upper()
        for syntax in (JLS, J2K):
            node, orth = (
                bench.find("node", key, syntax.name),
                orthanc_result(bench, key, syntax.name),
            )
            what = f"{up} {syntax.short} node >= 1.7x Orthanc:"
            if node and node.ok and orth.rate:
                r = node.rate / orth.rate  # type: ignore[operator]
                via = (" (Orthanc + GDCM crashed; vs Orthanc with its DCMTK codec)"
                       if orth.fallback else "")  # fmt: skip
                check(r >= 1.7, f"{what} {node.rate:.1f} vs {orth.rate:.1f} img/s = {r:.2f}x{via}")
            elif orth.run is not None and not orth.run.ok:
                na(f"{what} {orth.note}; node {rate_text(node)}")
            else:
                na(f"{what} node {rate_text(node)}, Orthanc {rate_text(orth.run)}")
    for corpus in corpora:
        key, up = corpus.kind.key, corpus.kind.key.upper()
        for syntax in (J2K, JLS, RLE, HTJ2K):
            floor = CEILING_FLOORS[syntax.name]
            node = bench.find("node", key, syntax.name)
            ceiling = bench.find_ceiling(key, syntax.name, "verified")
            what = f"{up} {syntax.short} node/ceiling >= {floor}:"
            if node and node.ok and ceiling and ceiling.rate:
                r = node.rate / ceiling.rate  # type: ignore[operator]
                check(r >= floor, f"{what} {node.rate:.1f} vs {ceiling.rate:.1f} img/s = {r:.2f}")
            else:
                ceiling_text = num(ceiling.rate) if ceiling and ceiling.rate else "n/a"
                na(f"{what} node {rate_text(node)}, ceiling {ceiling_text}")
    for corpus in corpora:
        key, up = corpus.kind.key, corpus.kind.key.upper()
        node, orth = bench.find("node", key, HTJ2K.name), orthanc_result(bench, key, J2K.name)
        what = f"{up} HTJ2K node >= 8x Orthanc J2K lossless:"
        if node and node.ok and orth.rate:
            r = node.rate / orth.rate  # type: ignore[operator]
            check(r >= 8, f"{what} {node.rate:.1f} vs {orth.rate:.1f} img/s = {r:.2f}x")
        else:
            na(f"{what} node {rate_text(node)}, Orthanc J2K {rate_text(orth.run)}")
    for corpus in corpora:
        key, up = corpus.kind.key, corpus.kind.key.upper()
        for syntax in SYNTAXES:
            one, two = (
                bench.find("node", key, syntax.name, 1),
                bench.find("node", key, syntax.name, 2),
            )
            what = f"{up} {syntax.short} node 2 senders >= 1 sender:"
            if two is None:
                continue
            if one and one.ok and two.ok:
                r = two.rate / one.rate  # type: ignore[operator]
                check(r >= 1.0, f"{what} {two.rate:.1f} vs {one.rate:.1f} img/s = {r:.2f}x")
            else:
                na(f"{what} 1 sender {rate_text(one)}, 2 senders {rate_text(two)}")
    if "CT" in keys:
        for syntax in SYNTAXES:
            node, keep = bench.find("node", "ct", syntax.name), bench.keep_beside("ct", syntax.name)
            what = f"CT {syntax.short} ack time <= 1.5x keep:"
            if node and node.ok and node.ack and keep and keep.ok and keep.ack:
                r = node.ack / keep.ack
                turns = " (in turns with it)" if keep.beside else ""
                text = f"{what} {node.ack:.2f} s vs keep {keep.ack:.2f} s{turns} = {r:.2f}x"
                check(r <= 1.5, text)
            else:
                na(f"{what} node {rate_text(node)}, keep {rate_text(keep)}")
    large = bench.large
    if large is not None:
        what = "large instance peak RSS < 2x its size:"
        if large.peak_ratio is not None and large.status == "ok":
            check(large.peak_ratio < 2, f"{what} {mib(large.peak_total)} for "
                  f"{mib(large.file_bytes)} = {large.peak_ratio:.2f}x")  # fmt: skip
        else:
            na(f"{what} {large.status} ({large.detail})")
    return out


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gdcm = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "orthanc-gdcm"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    facts = {
        "cpus": str(CPU), "cpu_model": model, "platform": platform.platform(),
        "python": platform.python_version(), "orthanc": first_line([ORTHANC, "--version"]),
        "orthanc_gdcm": gdcm or "unknown", "storescu": first_line([STORESCU, "--version"]),
        "node_commit": git or "unknown",
    }  # fmt: skip
    for dist in ("pydicom", "pynetdicom", "numpy", "pyjpegls", "pylibjpeg-openjpeg",
                 "pylibjpeg-rle", "imagecodecs"):  # fmt: skip
        facts[dist] = _version(dist)
    return facts


def print_report(
    bench: Bench, corpora: list[Corpus], facts: dict[str, str], targets: list[Target],
    elapsed: float,
) -> None:  # fmt: skip
    print()
    print("dicom-node throughput benchmark: node vs Orthanc ingest transcoding vs codec ceiling")
    print(f"machine: {facts['cpus']} CPU(s), {facts['cpu_model']}; {facts['platform']}; "
          f"Python {facts['python']}")  # fmt: skip
    print(
        f"peers: {facts['orthanc']} + orthanc-gdcm {facts['orthanc_gdcm']}; "
        f"dicom-node {facts['node_commit']} (workers: 0 = {CPU}); {facts['storescu']}"
    )
    print(f"codecs: pydicom {facts['pydicom']}, pynetdicom {facts['pynetdicom']}, "
          f"numpy {facts['numpy']}, pyjpegls {facts['pyjpegls']}, pylibjpeg-openjpeg "
          f"{facts['pylibjpeg-openjpeg']}, pylibjpeg-rle {facts['pylibjpeg-rle']}, "
          f"imagecodecs {facts['imagecodecs']}")  # fmt: skip
    print("img/s: storescu start -> last instance durable (node: archive file fsync'd; Orthanc: "
          "CountInstances); MB/s: uncompressed pixels;")  # fmt: skip
    print("ratio: input file bytes / stored bytes; ack s: storescu had every acknowledgement; "
          "RSS: peak of the process tree (node: main + codec workers);")  # fmt: skip
    print("ceiling: the node's codec step (decode, encode, verify; not serialised) on all "
          f"{CPU} cores; enc-only: the encoder alone on decoded arrays.")  # fmt: skip
    for corpus in corpora:
        n = len(corpus.files)
        size = corpus.file_bytes / n / MIB
        print()
        print(f"{corpus.kind.key.upper()}: {n} x {corpus.kind.label}, {size:.2f} MiB each, "
              "1 sender (one association)")  # fmt: skip
        print(corpus_table(bench, corpus))
    for corpus in corpora:
        print()
        print(f"{corpus.kind.key.upper()}: CPU milliseconds per instance, the whole machine's "
              "(sender, peer, kernel; hypervisor steal excluded), 1 sender. keep: the node "
              "receiving, spooling and delivering without a codec. c/(c+k): about the "
              "highest node/ceiling these cores allow while receiving costs k and the codec "
              "step c")  # fmt: skip
        print(cpu_table(bench, corpus))
    for corpus in corpora:
        print()
        print(f"{corpus.kind.key.upper()}: two senders at once (two associations, half the "
              "corpus each) vs one; img/s until the last of all is durable")  # fmt: skip
        print(senders_table(bench, corpus))
    large = bench.large
    print()
    if large is None:
        print("large multi-frame instance: not run (--no-large / --quick)")
    else:
        print(f"large multi-frame instance: {large.frames} frames {LARGE_SIZE}x{LARGE_SIZE} "
              f"16-bit (12 stored), {mib(large.file_bytes)} ({large.file_bytes} bytes), "
              "storescu -> node, target JPEG-LS lossless")  # fmt: skip
        if large.status != "ok":
            print(f"  {large.status}: {large.detail}")
        print(f"  node tree RSS before the send {mib(large.rss_before)}; peak during receive "
              f"{mib(large.peak_receive)}; peak until the output was durable "
              f"{mib(large.peak_total)} = {factor(large.peak_ratio)} the instance size "
              f"(main process alone: {mib(large.peak_main)}; up to {large.max_processes} "
              "processes)")  # fmt: skip
        if large.other_load is not None and large.other_load > BUSY:
            print(f"  busy machine: other processes used {large.other_load:.0%} of the CPUs")
        print(f"  receive (storescu start -> acknowledged) {num(large.receive_seconds, 1)} s; "
              f"processing (acknowledged -> durable in the archive) "
              f"{num(large.process_seconds, 1)} s; stored {mib(large.stored_bytes)} "
              f"(ratio {num(div(large.file_bytes, large.stored_bytes), 2)})")  # fmt: skip
    print()
    print("targets:")
    for t in targets:
        print(f"  {t.verdict:<4}  {t.text}")
    print()
    if bench.problems:
        print("problems seen (logs in the temporary folder when kept):")
        for problem in bench.problems:
            print("  " + problem.replace("\n", "\n    "))
    else:
        print("problems seen: none (no WARNING/ERROR in the node logs, every output in its "
              "target syntax)")  # fmt: skip
    loads = [w.other_load for w in (*bench.runs, *bench.ceilings, bench.large)
             if w is not None and w.other_load is not None]  # fmt: skip
    if loads:
        print(f"other processes on the machine used {sum(loads) / len(loads):.0%} of the CPUs on "
              f"average during the timed windows (max {max(loads):.0%}); windows above "
              f"{BUSY:.0%} are named in the notes")  # fmt: skip
    print(f"bench took {elapsed / 60:.1f} min; polled every {POLL * 1000:.0f} ms, RSS sampled "
          f"every {SAMPLE * 1000:.0f} ms")  # fmt: skip


def write_json(
    path: Path, bench: Bench, corpora: list[Corpus], facts: dict[str, str],
    targets: list[Target], elapsed: float,
) -> None:  # fmt: skip
    def with_rates(obj: Any) -> dict[str, Any]:
        data = asdict(obj)
        for name in ("rate", "mbps", "ratio", "peak_ratio"):
            if hasattr(obj, name):
                data[name] = getattr(obj, name)
        return data

    doc = {
        "machine": facts,
        "elapsed_seconds": elapsed,
        "corpora": [
            {
                "key": c.kind.key,
                "label": c.kind.label,
                "images": len(c.files),
                "file_bytes": c.file_bytes,
                "pixel_bytes": c.pixel_bytes,
            }
            for c in corpora
        ],  # fmt: skip
        "runs": [with_rates(r) for r in bench.runs],
        "ceilings": [with_rates(c) for c in bench.ceilings],
        "large": with_rates(bench.large) if bench.large else None,
        "targets": [asdict(t) for t in targets],
        "problems": bench.problems,
    }
    path.write_text(json.dumps(doc, indent=2))
