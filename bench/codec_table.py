"""Codec table: size and speed of each transcoding target beside JPEG-LS, JPEG 2000 and HTJ2K
lossless, on the CT and MR corpora of bench/throughput.py; one table.

Run from the repository root:

    .venv/bin/python bench/codec_table.py [--quick] [--keep]

--quick takes a few minutes on 2 cores; the default (larger counts, each node run the faster
of two) about 10-15.

Corpora (bench/corpora.py's make_corpus, so the same images as bench/throughput.py; the
derived ones are written from them image by image):
  CT-s    CT 512x512, signed, 16 allocated, 14 stored (693_UNCR.dcm), as bench/throughput.py.
  CT-u    the same images stored unsigned, as many scanners store CT: Pixel Representation 0,
          Bits Stored 12, Rescale Intercept -1024 (the source's already); the only negative
          values, the padding outside the field of view (-2000, shifted by the corpus's
          per-image offset), become 0 (Pixel Padding Value 0), i.e. clip(value, 0, 4095).
          The lossy JPEG and JPEG XL targets refuse signed data: this is where they meet CT.
  MR      MR 1024x1024, unsigned, 16 allocated, 12 stored (MR2_UNCR.dcm), as bench/throughput.py.
  MR-8    the MR images scaled to 8 bits (value * 255 / 900, rounded; the corpus's values reach
          894), Bits Allocated 8: the one corpus JPEG baseline (8-bit only) can take.
  MR-8JPG MR-8 encoded by the node's own codec step to JPEG baseline q90 (.50): the input JPEG
          XL JPEG Recompression (.111) needs, as it repacks a JPEG codestream without decoding.

Targets (as a rule writes them): JPEGLSLossless, JPEG2000Lossless, HTJ2KLossless (the peers),
JPEGLosslessSV1, JPEGLossless predictor 7, JPEGBaseline8Bit and JPEGExtended12Bit at
jpeg_quality 90, JPEGXLLossless at libjxl's default effort (7) and at effort 3, JPEGXL at
distance 1.0, and JPEGXLJPEGRecompression. CT-s, CT-u and MR get every target; MR-8 the JPEG
baseline one, MR-8JPG the JPEG Recompression one. A target the node's codec step does not take
for a corpus (capability.refusal, or transcode() giving no output for its first image) shows
"refused: <reason>" in place of numbers; its node run is skipped.

Columns:
  ratio       uncompressed pixel bytes / encoded pixel bytes (the frames as the codec wrote
              them, before encapsulation), over the images timed.
  encode ms   per image (single frame), the mean over the images timed, in this process, one
  verify ms   core: the codec's own frame pair, codec.build(FrameJob) -> (encode, decode),
              the FrameJob built as node/transcode/step.py's _encapsulated_pixels builds it,
              on the frame as step.decoded_frames gives it. encode ms times encode(frame);
              verify ms times decode(encoded) plus, for lossless targets, the comparison with
              the input (lossy ones are not compared by the node; their notes give the max
              error and PSNR, computed off the clock). JPEG Recompression has no frame pair but
              a repacker (codec.repack) that encodes and checks in one call: encode ms times
              imagecodecs.jpegxl_encode_jpeg of the received codestream, verify ms
              imagecodecs.jpegxl_decode_jpeg plus the byte comparison, the two calls the
              repacker makes (and the repacker itself is run on each frame, off the clock,
              to check it gives the same bytes). Before the clock, transcode() runs once on
              the first image (warming up imports and libraries, and deciding refusals).
              Not included: reading and parsing the file, decoding the received pixels, the
              header copy, and writing: what the node's codec step costs beyond the codec.
  bound img/s cores x 1000 / (encode ms + verify ms): the codec step's ceiling on this machine,
              every core encoding and verifying and doing nothing else.
  node img/s  a running node (`dicom-node serve`, workers: 0 = one codec process per core,
              one rule `transcode: {TARGET}` with no fallback, one folder destination),
              via bench/ingest_rate.py's Bench.measure: a fresh node, 2 x cores warm-up
              instances, then storescu (-R -xe; MR-8JPG -R -xy, which proposes JPEG baseline;
              one association) sends the corpus; instances /
              seconds from storescu's start until the last output file is durable in the
              folder. Every output's transfer syntax is checked to be the target's.
              Default run: the faster of two runs; --quick: one.
  node/bound  node img/s / bound img/s: how much of the ceiling is left once receiving,
              parsing, spooling, decoding, writing and fsync share the same cores.

Every process started here runs in its own process group and is stopped in a `finally`, also
on Ctrl-C and SIGTERM; the temporary folder is removed at the end (--keep keeps it; after a
failure its logs are kept). The machine may be shared: a node run during which processes
outside this bench used more than 15% of the CPUs is named in its notes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ingest_rate
import numpy as np
import pydicom
from common import (
    CPU,
    NODE,
    ROOT,
    STORESCU,
    STORESCU_OPTIONS,
    BenchError,
    Processes,
    end_workspace,
    fmt_exc,
    install_signal_handlers,
    num,
    table,
)
from corpora import CT, MR, Corpus, CorpusKind, Syntax, make_corpus
from ingest_rate import Bench, NodePeer, Run, node_config
from pydicom.dataset import Dataset

from node.config.targets import TranscodeSpec, parse_target
from node.transcode import capability, codecs
from node.transcode.codecs.base import FrameJob
from node.transcode.step import decoded_frames, received_codestreams, transcode

BUSY = 0.15  # other processes using more than this share of the CPUs: named in the notes
JPEG_Q90 = {"syntax": "JPEGBaseline8Bit", "jpeg_quality": 90}
RECOMPRESSION = {"syntax": "JPEGXLJPEGRecompression"}
TARGETS: tuple[dict[str, Any], ...] = (
    {"syntax": "JPEGLSLossless"},
    {"syntax": "JPEG2000Lossless"},
    {"syntax": "HTJ2KLossless"},
    {"syntax": "JPEGLosslessSV1"},
    {"syntax": "JPEGLossless", "predictor": 7},
    JPEG_Q90,
    {"syntax": "JPEGExtended12Bit", "jpeg_quality": 90},
    {"syntax": "JPEGXLLossless"},
    {"syntax": "JPEGXLLossless", "jxl_effort": 3},
    {"syntax": "JPEGXL", "jxl_distance": 1.0},
    RECOMPRESSION,
)
MR8_SCALE = 255 / 900  # the MR corpus's values reach 595 + 299 (its per-image offset)


@dataclass(frozen=True)
class Count:
    nodes: int  # images sent to the node
    timed: int  # of them, images timed in this process


# (--quick, default) per corpus: sent as many as bench/throughput.py sends
COUNTS = {
    "ct": (Count(CT.quick_count, 20), Count(CT.count, 60)),
    "mr": (Count(MR.quick_count, 6), Count(MR.count, 16)),
}


def label(raw: dict[str, Any]) -> str:
    """A target as a rule writes it, e.g. "JPEGLossless predictor=7"."""
    return " ".join([raw["syntax"], *(f"{k}={v}" for k, v in raw.items() if k != "syntax")])


def inline(raw: dict[str, Any]) -> str:
    """The target inside the rule's `transcode: {syntax: ...}` mapping of NODE_CONFIG."""
    return ", ".join([raw["syntax"], *(f"{k}: {v}" for k, v in raw.items() if k != "syntax")])


def tag(raw: dict[str, Any]) -> str:
    """A name for folders and logs."""
    return "-".join([raw["syntax"], *(f"{k}{v}" for k, v in raw.items() if k != "syntax")])


# --- corpora -------------------------------------------------------------------------------


@dataclass
class Group:
    corpus: Corpus
    short: str
    targets: tuple[dict[str, Any], ...]
    storescu: tuple[str, ...] = STORESCU_OPTIONS  # what storescu proposes for these files


def derive(
    source: Corpus, folder: Path, kind: CorpusKind, convert: Callable[[Dataset], Dataset]
) -> Corpus:
    """`source`'s images (and warm-ups) as `convert` makes them, one file each."""
    (folder / "warmup").mkdir(parents=True)
    written: list[list[Path]] = [[], []]
    pixel_bytes = 0
    for out, paths, sub in ((written[0], source.files, ""), (written[1], source.warmups, "warmup")):
        for path in paths:
            ds = convert(pydicom.dcmread(path))
            target = folder / sub / f"{kind.key}-{path.name}"
            ds.save_as(target, enforce_file_format=True)
            out.append(target)
            if sub == "":
                pixel_bytes += ds.Rows * ds.Columns * ds.BitsAllocated // 8
    files, warmups = written
    return Corpus(kind, files, warmups, sum(f.stat().st_size for f in files), pixel_bytes,
                  source.frame_shape)  # fmt: skip


def unsigned_ct(ds: Dataset) -> Dataset:
    pixels = np.clip(ds.pixel_array, 0, 4095).astype("<u2")
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    if "PixelPaddingValue" in ds:
        del ds.PixelPaddingValue
    ds.add_new(0x00280120, "US", 0)  # Pixel Padding Value
    ds.PixelData = pixels.tobytes()
    return ds


def mr_8bit(ds: Dataset) -> Dataset:
    pixels = np.clip(np.rint(ds.pixel_array * MR8_SCALE), 0, 255).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.WindowCenter, ds.WindowWidth = "283", "567"  # the source's 1000 / 2000, scaled
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def jpeg_baseline(ds: Dataset) -> Dataset:
    result = transcode(ds, TranscodeSpec(parse_target(JPEG_Q90)))
    if result.dataset is None:
        raise BenchError(f"JPEG baseline corpus: {result.outcome}: {'; '.join(result.notes)}")
    return result.dataset


def make_groups(work: Path, quick: bool) -> list[Group]:
    ct_count, mr_count = (COUNTS[k][0 if quick else 1].nodes for k in ("ct", "mr"))
    say(f"making {ct_count} CT and {mr_count} MR images (and their variants) in {work} ...")
    ct = make_corpus(work / "corpus-ct", CT, ct_count)
    ctu_kind = CorpusKind("ctu", "CT 512x512 unsigned 16-bit (12 stored, intercept -1024)",
                          CT.source, ct_count, ct_count)  # fmt: skip
    ctu = derive(ct, work / "corpus-ctu", ctu_kind, unsigned_ct)
    mr = make_corpus(work / "corpus-mr", MR, mr_count)
    mr8_kind = CorpusKind("mr8", "MR 1024x1024 8-bit", MR.source, mr_count, mr_count)
    mr8 = derive(mr, work / "corpus-mr8", mr8_kind, mr_8bit)
    jpg_kind = CorpusKind("mr8jpg", "MR-8 as JPEG baseline q90", MR.source, mr_count, mr_count)
    jpg = derive(mr8, work / "corpus-mr8jpg", jpg_kind, jpeg_baseline)
    jpg.pixel_bytes = mr8.pixel_bytes  # uncompressed: what the JPEG decodes to
    return [
        Group(ct, "CT-s", TARGETS),
        Group(ctu, "CT-u", TARGETS),
        Group(mr, "MR", TARGETS),
        Group(mr8, "MR-8", (JPEG_Q90,)),
        # storescu proposes JPEG baseline (and uncompressed) for these: with -xe it would
        # offer uncompressed syntaxes only, and cannot convert a JPEG to them
        Group(jpg, "MR-8JPG", (RECOMPRESSION,), ("-R", "-xy")),
    ]


# --- the codec, timed in this process ------------------------------------------------------


@dataclass
class Row:
    group: Group
    raw: dict[str, Any]
    refused: str | None = None
    images: int = 0
    uncompressed: int = 0
    encoded: int = 0
    encode_s: list[float] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    max_error: int = 0
    squared_error: float = 0.0
    samples: int = 0
    wrong: str | None = None  # a lossless target that did not give the input back
    input_bytes: int = 0  # the received pixel data (JPEG Recompression: the JPEG frames)
    node: Run | None = None
    quality: str | None = None  # lossy: max error and PSNR
    node_note: str | None = None  # why there is no node run

    @property
    def ratio(self) -> float | None:
        return self.uncompressed / self.encoded if self.encoded else None

    @property
    def encode_ms(self) -> float | None:
        return 1000 * sum(self.encode_s) / len(self.encode_s) if self.encode_s else None

    @property
    def verify_ms(self) -> float | None:
        return 1000 * sum(self.verify_s) / len(self.verify_s) if self.verify_s else None

    @property
    def bound(self) -> float | None:
        if self.encode_ms is None or self.verify_ms is None:
            return None
        return CPU * 1000 / (self.encode_ms + self.verify_ms)


def short_reason(reason: str) -> str:
    """A refusal in a few words: its first clause, without UIDs; a profile mismatch as the
    attributes that miss it."""
    found = re.search(r"cannot encode (\S+), .*Bits Allocated (\d+), Bits Stored (\d+), (\w+)",
                      reason)  # fmt: skip
    if found:
        pi, allocated, stored, sign = found.groups()
        return f"not in its profile: {allocated}/{stored}-bit {sign} {pi.rstrip(',')}"
    first = re.split(r"[:;]", reason, maxsplit=1)[0]
    return re.sub(r" \([\d.]+\)", "", first).strip()


def frame_job(ds: Dataset, facts: capability.PixelFacts, target) -> FrameJob:
    """The FrameJob of node/transcode/step.py's _encapsulated_pixels, for `ds`."""
    from pydicom.pixels import as_pixel_options, get_encoder
    from pydicom.uid import UID

    extra: dict[str, Any] = {"planar_configuration": 0} if facts.samples > 1 else {}
    options = as_pixel_options(
        ds, photometric_interpretation=capability.output_photometric(facts, target), **extra
    )
    options["number_of_frames"] = 1
    return FrameJob(UID(target.syntax), target, facts, options,
                    capability.needs_mct(facts, target), get_encoder)  # fmt: skip


def time_codec(row: Row, count: int) -> None:
    target = parse_target(row.raw)
    spec = TranscodeSpec(target)
    codec = codecs.codec_for(target.syntax)
    files = row.group.corpus.files[:count]
    first = pydicom.dcmread(files[0])
    facts = capability.pixel_facts(first)
    reason = capability.refusal(facts, target)
    if reason is None:  # the whole codec step, once: warm-up, and the refusals found on pixels
        result = transcode(first, spec)
        if result.dataset is None:
            prefix = f"{target.describe()}: "
            notes = [n.removeprefix(prefix) for n in result.notes] or [result.outcome]
            reason = notes[0]
    if reason is not None or codec is None:
        row.refused = short_reason(reason or "no codec")
        return
    repacks = target.syntax in codec.repacks
    bound = None if repacks else codec.error_bound(target)
    peak = (1 << facts.bits_stored) - 1
    for path in files:
        ds = pydicom.dcmread(path)
        facts = capability.pixel_facts(ds)
        job = frame_job(ds, facts, target)
        if repacks:
            _time_repack(row, ds, facts, job, codec)
            continue
        assert codec.build is not None
        encode, decode = codec.build(job)
        for frame in decoded_frames(ds, facts):
            t0 = time.perf_counter()
            encoded = encode(frame)
            t1 = time.perf_counter()
            decoded = decode(encoded)
            same = np.array_equal(decoded, frame) if bound is not None else True
            t2 = time.perf_counter()
            row.encode_s.append(t1 - t0)
            row.verify_s.append(t2 - t1)
            row.images += 1
            row.uncompressed += facts.frame_bytes
            row.encoded += len(encoded)
            diff = decoded.astype(np.int64) - frame.astype(np.int64)
            error = int(np.abs(diff).max())
            row.max_error = max(row.max_error, error)
            row.squared_error += float(np.square(diff, dtype=np.float64).sum())
            row.samples += diff.size
            if bound is not None and (not same or error > bound) and row.wrong is None:
                row.wrong = f"{path.name}: max error {error}, allowed {bound}"
    if bound is None and row.samples and row.squared_error:
        rmse = math.sqrt(row.squared_error / row.samples)
        row.quality = f"max err {row.max_error}, PSNR {20 * math.log10(peak / rmse):.1f} dB"


def _time_repack(row: Row, ds: Dataset, facts, job: FrameJob, codec) -> None:
    import imagecodecs

    repacked = codec.repack(job)
    for codestream in received_codestreams(ds, facts):
        end = codestream.rfind(b"\xff\xd9")  # as the repacker does: the JPEG up to its EOI
        jpeg = codestream[: end + 2] if end >= 0 else codestream
        t0 = time.perf_counter()
        jxl = bytes(imagecodecs.jpegxl_encode_jpeg(jpeg))
        t1 = time.perf_counter()
        same = bytes(imagecodecs.jpegxl_decode_jpeg(jxl)) == jpeg
        t2 = time.perf_counter()
        row.encode_s.append(t1 - t0)
        row.verify_s.append(t2 - t1)
        row.images += 1
        row.uncompressed += facts.frame_bytes
        row.encoded += len(jxl)
        row.input_bytes += len(codestream)
        if (not same or repacked(codestream) != jxl) and row.wrong is None:
            row.wrong = "the repacked JPEG did not come back byte for byte"


# --- the node ------------------------------------------------------------------------------


def node_rejects(work: Path, raw: dict[str, Any]) -> str | None:
    """What `dicom-node check-config` says against a one-rule config for `raw`, if anything."""
    folder = work / "check-config"
    folder.mkdir(exist_ok=True)
    path = folder / f"{tag(raw)}.yaml"
    path.write_text(node_config(11112, inline(raw)))
    done = subprocess.run([str(NODE), "check-config", str(path)], cwd=folder,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[0] if lines else f"exit status {done.returncode}"


def node_run(bench: Bench, row: Row, runs: int) -> None:
    target = parse_target(row.raw)
    corpus = row.group.corpus
    syntax = Syntax(inline(row.raw), label(row.raw), tag(row.raw), str(target.syntax), False)

    def make(name: str) -> NodePeer:
        return NodePeer(bench.procs, bench.work / name, bench.logs / f"{name}.log", syntax.name)

    def measure() -> Run:
        # Bench.measure sends with ingest_rate.STORESCU_OPTIONS: the group's, for this run
        saved = ingest_rate.STORESCU_OPTIONS
        ingest_rate.STORESCU_OPTIONS = row.group.storescu
        try:
            return bench.measure(corpus, syntax, 1, "node", make)
        finally:
            ingest_rate.STORESCU_OPTIONS = saved

    run = _fastest_of(measure, runs)
    row.node = run
    bench.runs.append(run)
    what = f"{row.group.short} {label(row.raw)} node:"
    if run.ok:
        tries = ", ".join(f"{r:.1f}" for r in run.tries)
        say(f"  {what} {run.rate:.1f} img/s (runs: {tries}), others used "
            f"{run.other_load or 0:.0%} CPU")  # fmt: skip
    else:
        say(f"  {what} {run.status} {run.detail}")
        bench.problems.append(f"{what} {run.status} {run.detail}")


def _fastest_of(measure: Callable[[], Run], runs: int) -> Run:
    """The fastest of `runs` runs; a run that fails is reported, and not repeated."""
    best: Run | None = None
    rates: list[float] = []
    for _ in range(runs):
        run = measure()
        if not run.ok:
            if best is None:
                return run
            break
        rates.append(run.rate or 0.0)
        if best is None or (run.rate or 0.0) > (best.rate or 0.0):
            best = run
    assert best is not None
    best.tries = rates
    return best


# --- the report ----------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def print_table(rows: list[Row], args: argparse.Namespace, argv: list[str], elapsed: float):
    import imagecodecs

    libs = imagecodecs.version(dict)
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    print()
    print("dicom-node codec table: each target's size and speed beside JPEG-LS, J2K and HTJ2K")
    print(f"command: {' '.join(shlex.quote(a) for a in argv)}")
    print(f"machine: {CPU} core(s), {model}; {platform.platform()}; Python "
          f"{platform.python_version()}; dicom-node {git or 'unknown'}")  # fmt: skip
    print(f"codecs: imagecodecs {imagecodecs.__version__} (libjpeg-turbo "
          f"{libs.get('libjpeg_turbo', '?')}, libjxl {libs.get('libjxl', '?')}, OpenJPH "
          f"{libs.get('openjph', '?')}); pyjpegls {_version('pyjpegls')}; pylibjpeg-openjpeg "
          f"{_version('pylibjpeg-openjpeg')}; pylibjpeg-libjpeg {_version('pylibjpeg-libjpeg')} "
          f"(verifies JPEG); pydicom {_version('pydicom')}")  # fmt: skip
    print(
        "corpora: CT-s signed 512x512 14-bit (693_UNCR); CT-u the same unsigned, 12-bit, "
        "intercept -1024; MR 1024x1024 12-bit (MR2_UNCR);"
    )
    print(
        "         MR-8 the MR scaled to 8 bits; MR-8JPG MR-8 as JPEG baseline q90 "
        "(the input JPEG XL JPEG Recompression needs)"
    )
    counts = ", ".join(f"{g.short} {len(g.corpus.files)}" for g in _groups(rows))
    timed = ", ".join(f"{g.short} {max((r.images for r in rows if r.group is g), default=0)}"
                      for g in _groups(rows))  # fmt: skip
    print(f"images sent to the node: {counts}; timed in-process: {timed}; node runs: "
          f"{'1 each' if args.quick else 'the faster of 2'}")  # fmt: skip
    header = ["corpus  target", "ratio", "encode ms", "verify ms", "bound img/s", "node img/s",
              "node/bound", "notes"]  # fmt: skip
    cells: list[list[str]] = []
    previous = None
    for row in rows:
        if previous is not None and previous is not row.group:
            cells.append(["", "", "", "", "", "", "", ""])
        previous = row.group
        first = f"{row.group.short:<8}{label(row.raw)}"
        if row.refused:
            cells.append([first, "", "", "", "", "", "", f"refused: {row.refused}"])
            continue
        notes = [n for n in (row.wrong and f"WRONG: {row.wrong}", row.quality, row.node_note) if n]
        if row.input_bytes:
            notes.append(f"{row.input_bytes / row.encoded:.2f}x smaller than the JPEG input")
        node = row.node
        rate = node.rate if node is not None and node.ok else None
        if node is not None and not node.ok:
            notes.append(f"node {node.status}" + (f" ({node.detail})" if node.detail else ""))
        if node is not None and node.other_load is not None and node.other_load > BUSY:
            notes.append(f"busy machine: others used {node.other_load:.0%} CPU")
        cells.append([
            first, num(row.ratio, 2), num(row.encode_ms), num(row.verify_ms),
            num(row.bound), num(rate), num(rate / row.bound if rate and row.bound else None, 2),
            "; ".join(notes),
        ])  # fmt: skip
    print(table(header, cells))
    print()
    print(
        f"physics: {CPU} cores here, so a node with workers: 0 runs {CPU} codec processes and "
        f"node img/s <= bound = {CPU} x 1000 / (encode ms + verify ms);"
    )
    print(
        "         receiving, parsing, decoding the received pixels, spooling, writing and "
        "fsync take the same cores, so node/bound < 1,"
    )
    print(
        "         and the closer the codec is to free, the further below its bound the node stays."
    )
    print(
        "ratio: uncompressed / encoded pixel bytes; encode/verify ms: the codec's own frame "
        "pair (codec.build(FrameJob)), one core, mean per image;"
    )
    print(
        "verify: decode + (lossless) comparison; node img/s: storescu start -> last output "
        "file durable in the folder destination."
    )
    print(f"took {elapsed / 60:.1f} min")


def _groups(rows: list[Row]) -> list[Group]:
    seen: list[Group] = []
    for row in rows:
        if row.group not in seen:
            seen.append(row.group)
    return seen


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one node run each")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    command = [".venv/bin/python", "bench/codec_table.py", *sys.argv[1:]]
    for path in (NODE, Path(STORESCU)):
        if not path.exists():
            print(f"missing {path}", file=sys.stderr)
            return 2
    warnings.filterwarnings("ignore")  # pydicom's HTJ2K precision warning, for one
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="dicom-node-codec-table-"))
    logs = work / "logs"
    logs.mkdir()
    started = time.monotonic()
    procs = Processes()
    ok = False
    try:
        bench = Bench(procs, work, logs, args.keep, Path("/nonexistent"))  # no Orthanc here
        groups = make_groups(work, args.quick)
        rows: list[Row] = []
        rejected: dict[str, str | None] = {}
        for group in groups:
            key = "mr" if group.corpus.kind.key.startswith("mr") else "ct"
            count = COUNTS[key][0 if args.quick else 1]
            for raw in group.targets:  # a row's measurements close together in time
                row = Row(group, raw)
                rows.append(row)
                try:
                    time_codec(row, count.timed)
                except Exception as exc:
                    row.refused = f"bench error: {fmt_exc(exc)}"
                    bench.problems.append(f"{group.short} {label(raw)}: {fmt_exc(exc)}")
                if row.refused:
                    say(f"{group.short} {label(raw)}: refused: {row.refused}")
                    continue
                say(f"{group.short} {label(raw)}: ratio {num(row.ratio, 2)}, encode "
                    f"{num(row.encode_ms)} ms, verify {num(row.verify_ms)} ms")  # fmt: skip
                name = label(raw)
                if name not in rejected:
                    rejected[name] = node_rejects(work, raw)
                if rejected[name]:
                    row.node_note = f"node rejects the rule: {rejected[name]}"
                    continue
                node_run(bench, row, 1 if args.quick else 2)
        print_table(rows, args, command, time.monotonic() - started)
        if bench.problems:
            print("\nproblems:")
            for problem in bench.problems:
                print(f"  {problem}")
        sys.stdout.flush()
        ok = not bench.problems
        return 0 if ok else 1
    except BenchError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping what was started", file=sys.stderr)
        return 130
    finally:
        end_workspace(procs, work, logs, ok, "folder" if args.keep else None)


if __name__ == "__main__":
    sys.exit(main())
