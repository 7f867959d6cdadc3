"""Throughput benchmark: how fast dicom-node recompresses what it receives, beside Orthanc doing
the same job (ingest transcoding), beside what the codecs alone manage on all cores.

Run from the repository root:

    .venv/bin/python bench/throughput.py [--quick] [--only ct|mr] [--no-large] [--keep]
                                         [--json PATH]

It first runs `bin/apt-ensure orthanc orthanc-gdcm dcmtk` (installs what is missing), then
prints one report. A full run takes about 10-15 minutes on 2 cores; --quick about 3.

Corpora (made in a temporary folder, fresh UIDs, one study and series each, Explicit VR Little
Endian; every image differs: a per-instance offset of -100..299 and an np.roll shift of the
source image, clipped to the valid range, no random noise, which would make the images
unrealistically incompressible):
  CT  300 slices (--quick: 60) 512x512, signed, 16 bits allocated, 14 stored, from
      pydicom-data's 693_UNCR.dcm (0.5 MiB of pixels each).
  MR  60 slices (--quick: 12) 1024x1024, unsigned, 16 allocated, 12 stored, from MR2_UNCR.dcm
      (2 MiB of pixels each).

Target syntaxes, each for each corpus: JPEG-LS lossless (.4.80, node `JPEGLSLossless`), JPEG 2000
lossless (.4.90, `JPEG2000Lossless`), RLE lossless (.5, `RLELossless`), HTJ2K lossless (.4.201,
`HTJ2KLossless`; when `dicom-node check-config` rejects it the row says "n/a (node lacks
HTJ2KLossless)"). Plus `keep` (no transcoding) for the node, the reference for the ack time.

Peers, each run with fresh storage and its own process:
  node     `dicom-node serve` with workers: 0 (one codec process per core), its spool in the
           temporary folder, one folder destination `archive` (written under a hidden temporary
           name, fsync'd, renamed) and one rule `transcode: {syntax: NAME}` (no fallbacks)
           `send_to: [archive]`.
  Orthanc  the Debian package (`orthanc` + `orthanc-gdcm`, plugin libOrthancGdcm.so enabled)
           with `IngestTranscoding` set to the same UID (SyncStorageArea on, its default).
           Orthanc cannot encode HTJ2K: its HTJ2K cells say n/a, and the node's HTJ2K row is
           compared with Orthanc's JPEG 2000 lossless images/s (the notes say so).
           When Orthanc + GDCM crashes on a syntax other than JPEG 2000 (GDCM transcodes first
           and segfaults on JPEG-LS here), that run is repeated once with GDCM limited to JPEG
           2000 ("RestrictTransferSyntaxes"), so Orthanc's built-in DCMTK codec encodes; such
           Orthanc cells carry a '*' and the notes say so, and the crash is reported as well.
The sender is DCMTK storescu (`-R -xe`: only the presentation contexts the files need,
Explicit VR LE first; TCP_NODELAY=1 in its environment), one association for all its files.
Before the clock runs, 2 x cores warm-up instances (their own study) go the same way, so the
node's codec worker processes (started on demand) and Orthanc are up; counts start after them.

Measured per (corpus, syntax, peer) run:
  img/s      instances / seconds from the start of storescu until the LAST instance is durable:
             node: number of files in the archive folder (hidden temporary files ignored);
             Orthanc: /statistics CountInstances (REST). Both polled every 50 ms (+-0.05 s).
             An Orthanc that dies (its JPEG-LS transcoder is known to abort on signed CT, taking
             the server down) says "crashed"; no progress for 30 s says "stalled"; the bench
             carries on either way.
  MB/s       uncompressed input pixel data (10^6 bytes) per second, same clock.
  ratio      total input file bytes / total stored bytes (node: archive files; Orthanc: its
             storage folder, index kept elsewhere), warm-up instances excluded.
  ack s      from the start of storescu until it exited, i.e. had every acknowledgement (the
             last of them with two senders).
  peak RSS   sum of VmRSS over the peer's whole process tree (node: main process plus its codec
             worker processes), sampled every 100 ms from /proc during the run.
  node/Orth  node img/s / Orthanc img/s (1 sender).
Every stored output is checked afterwards: its transfer syntax must be the target (file meta
for the node, the TransferSyntax metadata over REST for Orthanc); a mismatch is reported.

Codec-only ceilings, measured in the same run on the same images, held in memory by
os.cpu_count() worker processes (ProcessPoolExecutor, spawn; warmed up before the clock; the
C library set to keep freed buffers, as in the node's workers: node/process.py):
  verified     per image the node's own codec step: pydicom.dcmread(BytesIO(bytes)),
               node.transcode.transcode(ds, TranscodeSpec(parse_target(NAME))), which decodes,
               encodes every frame and decodes it again to compare (bit-exact); the output
               is not serialised (the node's worker splices it into a file: the node's cost,
               not the codec step's). node/ceiling compares with this.
  encode only  pydicom's get_encoder(uid).encode(arr, encoding_plugin=..., **as_pixel_options)
               on pre-decoded arrays, the same plugins as the node (pyjpegls, pylibjpeg-openjpeg,
               pylibjpeg-rle); HTJ2K: imagecodecs.htj2k_encode(arr, level=0) (OpenJPH). The gap
               between the two ceilings is what parsing, verification and writing cost.
Each ceiling is the faster of 2 timed passes over the corpus, and every run of a peer (node or
Orthanc, one or two senders) the faster of 2 runs: this VM's speed drifts by 15% over minutes,
and the same rule for all keeps the ratios fair. A crashed run is not repeated. The node's runs
that are compared with each other are taken in turns: one sender, two senders and (CT) `keep`,
then again, so drift falls on all of them alike; the ack time target compares a syntax's run
with the `keep` runs taken in turns with it.

CPU per instance: the whole machine's busy CPU time in each timed window (/proc/stat: user,
nice, system, irq, softirq; hypervisor steal and idle excluded) divided by the instances: what
the sender, the peer and the kernel cost together. For the ceiling, in its best pass. A table
per corpus sets them side by side, with c/(c+k): with the codec step costing c (the ceiling)
and receiving, spooling and delivering k (the node with `keep`) on the same cores, node/ceiling
cannot go much above it.

Concurrency: the same runs with two storescu processes started together, one with the first
half of the corpus, one with the second (two associations), for the node (all syntaxes) and
Orthanc; total images/s from their start until the last instance of both is durable.

A row's measurements (ceilings, node, Orthanc) run one after the other, so they see similar
conditions. The machine may be shared: for every timed window the bench computes the share of
all CPUs used by processes outside its own process tree (/proc/stat busy time minus the CPU
time of the bench and its descendants); windows above 15% are named in the notes, and the
average is printed at the end. Read such cells with care.

Large multi-frame (skipped with --no-large or --quick): one instance of 512 frames 1024x1024
(Multi-frame Grayscale Word Secondary Capture, MONOCHROME2, 16 allocated, 12 stored, 1 GiB of
pixels), written frame by frame so the bench never holds it in memory, sent by storescu to a
node with target JPEGLSLossless. Reported: the node tree's RSS before the send (after warm-up),
its peak during receive (until storescu had the acknowledgement) and until the output is
durable in the archive, peak / instance size, and how long receive and processing took.

Targets (PASS/FAIL/N/A lines at the end): JPEG-LS and JPEG 2000 lossless >= 1.7x Orthanc on
both corpora (when Orthanc + GDCM crashed, against the '*' run, and the line says so; when that
crashed too, N/A with the reason); node/ceiling >= 0.8 for JPEG 2000 and >= 0.6 for JPEG-LS,
RLE and HTJ2K; HTJ2K >= 8x Orthanc's JPEG 2000 lossless; two senders >= one sender (node); CT
ack time with transcoding within 1.5x of keep; large instance peak RSS < 2x its size.

Every process started here (Orthanc, the node, storescu, the ceiling's worker processes) runs in
its own process group and is stopped in a `finally`, also on Ctrl-C and SIGTERM (the one
exception is multiprocessing's resource tracker, which exits with the bench). The temporary
folder is removed at the end (--keep keeps it; after a failure its logs are kept).
The machine is usually shared and has few cores: absolute numbers are noisy, ratios less so.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import io
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from common import (
    LOG_TROUBLE,
    NODE,
    NODE_AET,
    ORTHANC,
    ORTHANC_AET,
    POLL,
    ROOT,
    STORESCU,
    BenchError,
    Node,
    Orthanc,
    Processes,
    Sender,
    first_line,
    http_get,
    ignore_signals_for_cleanup,
    start_workspace,
    tail,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CPU = os.cpu_count() or 1
WARMUPS = 2 * CPU  # warm-up instances: enough for every codec worker process to be started
STALL = 30.0  # seconds without progress before a run is called stalled
CEILING_PASSES = 2  # timed passes over the corpus per ceiling; the fastest counts
RUNS = 2  # runs per peer measurement (fresh peer each); the fastest counts
BUSY = 0.15  # other processes using more than this share of the CPUs: flagged in the notes
SAMPLE = 0.1  # seconds between RSS samples
LARGE_TIMEOUT = 900.0  # seconds for the large instance to be durable
STORESCU_OPTIONS = ("-R", "-xe")
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
MB = 1e6
MIB = 1 << 20
# The encoding plugins the node names (node/transcode.py), for the encode-only ceiling.
ENCODE_PLUGIN = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.90": "pylibjpeg",
                 "1.2.840.10008.1.2.5": "pylibjpeg"}  # fmt: skip
HTJ2K_UID = "1.2.840.10008.1.2.4.201"
J2K_FAMILY_UIDS = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                   "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93")  # fmt: skip
ORTHANC_DCMTK = "Orthanc-DCMTK"  # Orthanc with GDCM limited to JPEG 2000 (the crash fallback)
LARGE_FRAMES = 512
LARGE_SIZE = 1024  # rows and columns of each frame
SC_MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC Image Storage


@dataclass(frozen=True)
class Syntax:
    name: str  # as a node rule names it
    label: str  # row label
    short: str
    uid: str | None  # None: keep
    orthanc: bool  # Orthanc's IngestTranscoding can produce it


JLS = Syntax("JPEGLSLossless", "JPEG-LS lossless", "JLS", "1.2.840.10008.1.2.4.80", True)
J2K = Syntax("JPEG2000Lossless", "JPEG 2000 lossless", "J2K", "1.2.840.10008.1.2.4.90", True)
RLE = Syntax("RLELossless", "RLE lossless", "RLE", "1.2.840.10008.1.2.5", True)
HTJ2K = Syntax("HTJ2KLossless", "HTJ2K lossless", "HTJ2K", HTJ2K_UID, False)
KEEP = Syntax("keep", "keep (as received)", "keep", None, False)
SYNTAXES = (JLS, J2K, RLE, HTJ2K)
CEILING_FLOORS = {J2K.name: 0.8, JLS.name: 0.6, RLE.name: 0.6, HTJ2K.name: 0.6}  # node/ceiling
BY_NAME = {s.name: s for s in (*SYNTAXES, KEEP)}


@dataclass(frozen=True)
class CorpusKind:
    key: str
    label: str
    source: str  # file in pydicom-data
    count: int
    quick_count: int


CT = CorpusKind("ct", "CT 512x512 signed 16-bit (14 stored)", "693_UNCR.dcm", 300, 60)
MR = CorpusKind("mr", "MR 1024x1024 unsigned 16-bit (12 stored)", "MR2_UNCR.dcm", 60, 12)


# --- /proc: process trees and their memory -------------------------------------------------


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


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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


# --- corpora -------------------------------------------------------------------------------


@dataclass
class Corpus:
    kind: CorpusKind
    files: list[Path]
    warmups: list[Path]
    file_bytes: int  # the measured files, as sent
    pixel_bytes: int  # their uncompressed pixel data
    frame_shape: tuple[int, int]


def source_file(name: str) -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data" / name


def _pixel_range(ds: Dataset) -> tuple[int, int, np.dtype]:
    if ds.PixelRepresentation:
        return -(1 << (ds.BitsStored - 1)), (1 << (ds.BitsStored - 1)) - 1, np.dtype("<i2")
    return 0, (1 << ds.BitsStored) - 1, np.dtype("<u2")


def varied(base: np.ndarray, i: int, lo: int, hi: int, dtype: np.dtype) -> np.ndarray:
    """Image number i: the source shifted (np.roll) and offset by -100..299, clipped."""
    rows, cols = base.shape
    shifted = np.roll(base, ((7 * i) % rows, (3 * i) % cols), axis=(0, 1))
    return np.clip(shifted + ((37 * i) % 400 - 100), lo, hi).astype(dtype)


def make_corpus(folder: Path, kind: CorpusKind, count: int) -> Corpus:
    ds = pydicom.dcmread(source_file(kind.source))
    base = ds.pixel_array.astype(np.int32)
    lo, hi, dtype = _pixel_range(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    study, series = generate_uid(), generate_uid()
    warm_study, warm_series = generate_uid(), generate_uid()

    def write(path: Path, i: int, study_uid: str, series_uid: str) -> None:
        ds.PixelData = varied(base, i, lo, hi, dtype).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.save_as(path, enforce_file_format=True)

    (folder / "warmup").mkdir(parents=True)
    files = []
    for i in range(count):
        path = folder / f"{kind.key}{i:05d}.dcm"
        write(path, i, study, series)
        files.append(path)
    warmups = []
    for k in range(WARMUPS):
        path = folder / "warmup" / f"warmup{k:02d}.dcm"
        write(path, 5000 + k, warm_study, warm_series)
        warmups.append(path)
    return Corpus(
        kind, files, warmups, sum(f.stat().st_size for f in files),
        count * base.size * dtype.itemsize, base.shape,
    )  # fmt: skip


def make_large(path: Path, frames: int = LARGE_FRAMES, size: int = LARGE_SIZE) -> int:
    """One multi-frame instance written frame by frame (never whole in memory); its file size."""
    src = pydicom.dcmread(source_file(MR.source))
    base = src.pixel_array.astype(np.int32)
    if base.shape != (size, size):
        base = np.resize(base, (size, size))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC_MULTIFRAME_WORD
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SC_MULTIFRAME_WORD, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "BENCH^LARGE", "BENCH-LARGE"
    ds.Modality, ds.ConversionType = "MR", "WSD"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240101", "120000", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 40.0
    length = frames * size * size * 2
    with open(path, "wb") as f:
        pydicom.dcmwrite(f, ds, enforce_file_format=True)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        for k in range(frames):
            f.write(varied(base, k, 0, 4095, np.dtype("<u2")).tobytes())
    return path.stat().st_size


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
        assert self.orthanc.proc is not None
        return self.orthanc.proc.pid

    def start(self) -> None:
        self.orthanc.start()

    def alive(self) -> bool:
        return self.orthanc.alive()

    def exit_status(self) -> int | None:
        return self.orthanc.proc.returncode if self.orthanc.proc else None

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
        return [f"Orthanc {_exit_text(self.exit_status())}; last log line: {last}"]

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


@dataclass
class Large:
    status: str = "ok"
    detail: str = ""
    file_bytes: int = 0
    frames: int = LARGE_FRAMES
    make_seconds: float = 0.0
    rss_before: int | None = None
    peak_receive: int | None = None
    peak_total: int | None = None
    peak_main: int | None = None  # the node's main process alone
    max_processes: int | None = None
    receive_seconds: float | None = None
    process_seconds: float | None = None
    stored_bytes: int | None = None
    stored_syntax: str = ""
    other_load: float | None = None

    @property
    def peak_ratio(self) -> float | None:
        return self.peak_total / self.file_bytes if self.peak_total and self.file_bytes else None


@dataclass
class Target:
    verdict: str  # PASS, FAIL, N/A
    text: str


# --- codec-only ceiling (worker processes) -------------------------------------------------

_W: dict[str, Any] = {}  # per worker process: the images and the codec step


def _ceiling_init(paths: list[str], mode: str, name: str, barrier: Any) -> None:
    os.setpgid(0, 0)  # its own process group, like every process this bench starts
    warnings.filterwarnings("ignore")
    from node.process import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # as the node's codec workers do: the codec at its best
    _W["mode"], _W["barrier"] = mode, barrier
    blobs = [Path(p).read_bytes() for p in paths]
    if mode == "verified":
        from node.syntaxes import TranscodeSpec, parse_target
        from node.transcode import transcode

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
        # (node/output_file.py), so that is the node's cost, not the codec step's.
        return "ok", len(result.dataset.PixelData)
    arr, opts = _W["items"][index]
    return "ok", len(_W["encode"](arr, opts))


def _stop_pool(pool: ProcessPoolExecutor, graceful: bool) -> None:
    if not graceful:  # interrupted or broken: do not wait for tasks; kill the workers
        for proc in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                proc.kill()
    pool.shutdown(wait=graceful, cancel_futures=True)


# --- the benchmark -------------------------------------------------------------------------


def _exit_text(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def _fmt_exc(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class Bench:
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
            status, got, _ = self._wait_durable(peer, 0, len(corpus.warmups), [warm])
            if status != "ok":
                run.status = status
                run.detail = f"in warm-up, {got} of {len(corpus.warmups)} stored"
                if not peer.alive():
                    run.detail += f"; {_exit_text(peer.exit_status())}"
                for record in peer.problems()[:5]:
                    self.problems.append(f"{tag}: {record}")
                return run
            self._wait_exit([warm], 30)
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
            status, run.got, durable = self._wait_durable(peer, base, run.images, sends)
            run.cpu_seconds, run.other_load = window.close()
            run.status = status
            if status == "ok":
                assert durable is not None
                run.seconds = durable - started
                if self._wait_exit(sends, 60):
                    run.ack = max(s.done_at or 0.0 for s in sends) - started
            else:
                run.detail = f"after {run.got} of {run.images}"
                if not peer.alive():
                    run.detail += f"; {_exit_text(peer.exit_status())}"
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
            run.status, run.detail = "failed", _fmt_exc(exc)
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

    def _wait_durable(
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
    def _wait_exit(senders: list[Sender], timeout: float) -> bool:
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
            self.say(f"{what} {run.rate:.1f} img/s{tries}, ack {_num(run.ack, 2)} s, "
                     f"ratio {_num(run.ratio, 2)}, peak RSS {_mib(run.peak_rss)}, "
                     f"others used {run.other_load or 0:.0%} CPU")  # fmt: skip
        else:
            self.say(f"{what} {run.status} {run.detail}")

    def find(self, peer: str, corpus: str, syntax: str, senders: int = 1) -> Run | None:
        for run in self.runs:
            if (run.peer, run.corpus, run.syntax, run.senders) == (peer, corpus, syntax, senders) \
                    and not run.beside:
                return run
        return None

    def keep_beside(self, corpus: str, syntax: str) -> Run | None:
        """The keep run taken in turns with `syntax`'s, else the corpus's keep run."""
        for run in self.runs:
            if (run.corpus, run.syntax, run.beside) == (corpus, KEEP.name, syntax):
                return run
        return self.find("node", corpus, KEEP.name)

    # --- ceilings ----------------------------------------------------------------------

    def ceiling(self, corpus: Corpus, syntax: Syntax, mode: str) -> Ceiling:
        result = Ceiling(corpus.kind.key, syntax.name, mode, len(corpus.files))
        self.ceilings.append(result)
        if mode == "verified" and syntax.name in self.node_lacks:
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
            result.status, result.detail = "failed", _fmt_exc(exc)
            self.problems.append(f"ceiling {corpus.kind.key} {syntax.name} {mode}: {exc}")
        finally:
            _stop_pool(pool, graceful)
        what = f"{corpus.kind.key} {syntax.name} ceiling ({mode}):"
        if result.rate:
            self.say(f"{what} {result.rate:.1f} img/s (best of {len(result.passes)}; others "
                     f"used {result.other_load or 0:.0%} CPU)")  # fmt: skip
        else:
            self.say(f"{what} {result.status} {result.detail}")
        return result

    def find_ceiling(self, corpus: str, syntax: str, mode: str) -> Ceiling | None:
        for c in self.ceilings:
            if (c.corpus, c.syntax, c.mode) == (corpus, syntax, mode):
                return c
        return None

    # --- the large instance ----------------------------------------------------------------

    def large_instance(self, warmups: list[Path]) -> Large:
        result = Large()
        self.large = result
        folder = self.work / "large"
        folder.mkdir()
        path = folder / "large.dcm"
        self.say(f"writing a {LARGE_FRAMES}-frame {LARGE_SIZE}x{LARGE_SIZE} instance ...")
        t = time.monotonic()
        result.file_bytes = make_large(path)
        result.make_seconds = time.monotonic() - t
        if JLS.name in self.node_lacks:
            result.status, result.detail = "n/a", f"node lacks {JLS.name}"
            return result
        peer = NodePeer(self.procs, folder / "node", self.logs / "large-node.log", JLS.name)
        sampler: RssSampler | None = None
        sender: Sender | None = None
        try:
            peer.start()
            warm = Sender(self.procs, peer.port, peer.aet, warmups,
                          self.logs / "large-warmup.log", STORESCU_OPTIONS)  # fmt: skip
            status, got, _ = self._wait_durable(peer, 0, len(warmups), [warm])
            if status != "ok":
                result.status, result.detail = status, f"during warm-up ({got} stored)"
                return result
            self._wait_exit([warm], 30)
            time.sleep(1.0)  # let the tree settle before the baseline
            base = peer.count()
            sampler = RssSampler(peer.pid)
            result.rss_before = min(sampler.sample()[1] for _ in range(5))
            sampler.start()
            window = CpuWindow()
            started = time.monotonic()
            sender = Sender(self.procs, peer.port, peer.aet, [path],
                            self.logs / "large-storescu.log", STORESCU_OPTIONS)  # fmt: skip
            status, got, durable = self._wait_durable(
                peer, base, 1, [sender], stall=LARGE_TIMEOUT, limit=LARGE_TIMEOUT
            )
            sampler.stop()
            _, result.other_load = window.close()
            acked = sender.done_at
            if acked is not None and not sender.failed:
                result.receive_seconds = acked - started
                result.peak_receive = sampler.peak(end=acked)
            elif sender.failed:
                self.problems.append(f"large: storescu exited {sender.proc.returncode}:\n"
                                     f"{tail(sender.log, 4)}")  # fmt: skip
            result.peak_total = sampler.peak()
            result.peak_main = sampler.peak(what=2)
            result.max_processes = sampler.peak(what=3)
            if status != "ok":
                result.status, result.detail = status, f"{got} of 1 stored"
            else:
                assert durable is not None
                if acked is not None:
                    result.process_seconds = durable - acked
                output = max(archive_files(peer.archive), key=lambda e: e.stat().st_size)
                result.stored_bytes = output.stat().st_size  # the warm-ups are far smaller
                result.stored_syntax = str(read_file_meta_info(output.path).TransferSyntaxUID)
                if result.stored_syntax != JLS.uid:
                    self.problems.append(f"large: stored as {result.stored_syntax}, not JPEG-LS")
            for record in peer.problems()[:5]:
                self.problems.append(f"large: {record}")
        except BenchError as exc:
            result.status, result.detail = "failed", _fmt_exc(exc)
            self.problems.append(f"large: {exc}")
        finally:
            if sampler is not None:
                sampler.stop()
            if sender is not None:
                self.procs.stop(sender.proc, grace=2)
            peer.stop()
            if not self.keep:
                shutil.rmtree(folder, ignore_errors=True)
        if result.peak_total:
            self.say(f"large: peak RSS {_mib(result.peak_total)} for "
                     f"{_mib(result.file_bytes)} ({_num(result.peak_ratio, 2)}x)")  # fmt: skip
        else:
            self.say(f"large: {result.status} {result.detail}")
        return result


# --- report --------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mib(value: int | None) -> str:
    if not value:
        return "-"
    return f"{value / MIB / 1024:.2f} GiB" if value >= 10 * 1024 * MIB else f"{value / MIB:.0f} MiB"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _rate_cell(run: Run | None) -> str:
    if run is None:
        return "-"
    return _num(run.rate) if run.ok else run.status


def _div(a: float | None, b: float | None) -> float | None:
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
                orth.cell(_num(run.ratio if run else None, 2)),
                orth.cell(_mib(run.peak_rss if run else None)),
            ]
            vs = orth.cell(_x(_div(node_rate, orth.rate)))
            notes += [orth.note] if orth.note else []
        elif syntax is HTJ2K:
            orth = orthanc_result(bench, key, J2K.name)
            orth_cells = ["n/a", "n/a", "n/a"]
            vs = _x(_div(node_rate, orth.rate))
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
            syntax.label, _rate_cell(node), _num(node.mbps if node else None),
            _num(node.ratio if node else None, 2), _num(node.ack if node else None, 2),
            _mib(node.peak_rss if node else None), *orth_cells, vs,
            _rate_cell_ceiling(verified), _x(_div(node_rate, verified.rate if verified else None)),
            _rate_cell_ceiling(encode), "; ".join(notes),
        ])  # fmt: skip
    return table(header, rows)


def _rate_cell_ceiling(c: Ceiling | None) -> str:
    if c is None:
        return "-"
    return _num(c.rate) if c.rate else c.status


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
            syntax.label, _num(node.cpu_ms if node else None),
            orth.cell(_num(orth.run.cpu_ms if orth.run else None)) if orth else "n/a",
            _num(c), _num(k),
            _num(_div(node.rate if node else None, ceiling.rate if ceiling else None), 2),
            _num(_div(c, c + k) if c is not None and k is not None else None, 2),
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
            orth = [o1.cell(_rate_cell(o1.run)), o2.cell(_rate_cell(o2.run)),
                    _x(_div(o2.rate, o1.rate)) if o1.fallback == o2.fallback else "-"]  # fmt: skip
            notes += [f"2 senders: {o2.note}"] if o2.note else []
        else:
            orth = ["n/a", "n/a", "-"]
        busy = _busy(node_1_snd=one, node_2_snd=two, Orthanc_1_snd=o1.run, Orthanc_2_snd=o2.run)
        notes += [busy] if busy else []
        rows.append([
            syntax.label, _rate_cell(one), _rate_cell(two),
            _x(_div(two.rate, one.rate if one else None)), _num(two.ack, 2), *orth,
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
                ceiling_text = _num(ceiling.rate) if ceiling and ceiling.rate else "n/a"
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
                check(r <= 1.5,
                      f"{what} {node.ack:.2f} s vs keep {keep.ack:.2f} s{turns} = {r:.2f}x")
            else:
                na(f"{what} node {rate_text(node)}, keep {rate_text(keep)}")
    large = bench.large
    if large is not None:
        what = "large instance peak RSS < 2x its size:"
        if large.peak_ratio is not None and large.status == "ok":
            check(large.peak_ratio < 2, f"{what} {_mib(large.peak_total)} for "
                  f"{_mib(large.file_bytes)} = {large.peak_ratio:.2f}x")  # fmt: skip
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
              f"16-bit (12 stored), {_mib(large.file_bytes)} ({large.file_bytes} bytes), "
              "storescu -> node, target JPEG-LS lossless")  # fmt: skip
        if large.status != "ok":
            print(f"  {large.status}: {large.detail}")
        print(f"  node tree RSS before the send {_mib(large.rss_before)}; peak during receive "
              f"{_mib(large.peak_receive)}; peak until the output was durable "
              f"{_mib(large.peak_total)} = {_x(large.peak_ratio)} the instance size "
              f"(main process alone: {_mib(large.peak_main)}; up to {large.max_processes} "
              "processes)")  # fmt: skip
        if large.other_load is not None and large.other_load > BUSY:
            print(f"  busy machine: other processes used {large.other_load:.0%} of the CPUs")
        print(f"  receive (storescu start -> acknowledged) {_num(large.receive_seconds, 1)} s; "
              f"processing (acknowledged -> durable in the archive) "
              f"{_num(large.process_seconds, 1)} s; stored {_mib(large.stored_bytes)} "
              f"(ratio {_num(_div(large.file_bytes, large.stored_bytes), 2)})")  # fmt: skip
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


# --- main ----------------------------------------------------------------------------------


def gdcm_plugin() -> Path:
    found = sorted(PLUGIN_DIR.glob("*Gdcm*.so"))
    if not found:
        raise BenchError(f"no GDCM plugin in {PLUGIN_DIR} (Debian package orthanc-gdcm)")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{CT.quick_count} CT / {MR.quick_count} MR, no large instance",
    )
    parser.add_argument("--only", choices=["ct", "mr"], help="one corpus only")
    parser.add_argument("--no-large", action="store_true", help="skip the 1 GiB instance")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)  # fmt: skip

    ensure = subprocess.run([str(ROOT / "bin" / "apt-ensure"), "orthanc", "orthanc-gdcm", "dcmtk"])
    if ensure.returncode != 0:
        print("bin/apt-ensure orthanc orthanc-gdcm dcmtk failed", file=sys.stderr)
        return 2
    workspace = start_workspace("dicom-node-throughput-")
    if workspace is None:
        return 2
    work, logs = workspace
    started = time.monotonic()
    procs = Processes()
    ok = False
    try:
        bench = Bench(procs, work, logs, args.keep, gdcm_plugin())
        kinds = [k for k in (CT, MR) if args.only in (None, k.key)]
        corpora = []
        for kind in kinds:
            count = kind.quick_count if args.quick else kind.count
            print(f"making {count} {kind.key.upper()} images in {work} ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            corpora.append(make_corpus(work / f"corpus-{kind.key}", kind, count))
        facts = machine_facts()
        bench.check_node_syntaxes()
        for corpus in corpora:
            bench.node_runs(corpus, KEEP, (1,))
            for syntax in SYNTAXES:  # a row's measurements close together in time
                for mode in ("verified", "encode-only"):
                    bench.ceiling(corpus, syntax, mode)
                bench.node_runs(corpus, syntax, (1, 2), with_keep=corpus.kind is CT)
                if syntax.orthanc:
                    for senders in (1, 2):
                        bench.orthanc_run(corpus, syntax, senders)
        if not (args.quick or args.no_large):
            bench.large_instance(corpora[0].warmups)
        targets = evaluate_targets(bench, corpora)
        elapsed = time.monotonic() - started
        print_report(bench, corpora, facts, targets, elapsed)
        if args.json:
            write_json(args.json, bench, corpora, facts, targets, elapsed)
            print(f"results written to {args.json}")
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
        ignore_signals_for_cleanup()
        procs.stop_all()
        if args.keep:
            print(f"temporary folder kept: {work}", file=sys.stderr)
        elif not ok:  # keep the logs only: the corpora and stores can be large
            for child in work.iterdir():
                if child != logs:
                    shutil.rmtree(child, ignore_errors=True)
            print(f"logs kept in {logs}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
