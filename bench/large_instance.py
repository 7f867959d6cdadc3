"""The large multi-frame instance, a part of bench/throughput.py (whose docstring describes the
method): one instance of 512 frames 1024x1024 16-bit (1 GiB of pixels), written frame by frame
so the bench never holds it in memory, sent by storescu to a node with target JPEGLSLossless;
the node tree's RSS before, during receive and until the output is durable.
"""

from __future__ import annotations

import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from common import (
    STORESCU_OPTIONS,
    BenchError,
    CpuWindow,
    RssSampler,
    Sender,
    archive_files,
    fmt_exc,
    mib,
    num,
    tail,
)
from corpora import JLS, MR, source_file, varied
from ingest_rate import Bench, NodePeer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

LARGE_TIMEOUT = 900.0  # seconds for the large instance to be durable
LARGE_FRAMES = 512
LARGE_SIZE = 1024  # rows and columns of each frame
SC_MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC Image Storage


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


def measure_large(bench: Bench, warmups: list[Path]) -> Large:
    """Send the large instance to a node (after `warmups`); recorded in `bench.large`."""
    result = Large()
    bench.large = result
    folder = bench.work / "large"
    folder.mkdir()
    path = folder / "large.dcm"
    bench.say(f"writing a {LARGE_FRAMES}-frame {LARGE_SIZE}x{LARGE_SIZE} instance ...")
    t = time.monotonic()
    result.file_bytes = make_large(path)
    result.make_seconds = time.monotonic() - t
    if JLS.name in bench.node_lacks:
        result.status, result.detail = "n/a", f"node lacks {JLS.name}"
        return result
    peer = NodePeer(bench.procs, folder / "node", bench.logs / "large-node.log", JLS.name)
    sampler: RssSampler | None = None
    sender: Sender | None = None
    try:
        peer.start()
        warm = Sender(bench.procs, peer.port, peer.aet, warmups,
                      bench.logs / "large-warmup.log", STORESCU_OPTIONS)  # fmt: skip
        status, got, _ = bench.wait_durable(peer, 0, len(warmups), [warm])
        if status != "ok":
            result.status, result.detail = status, f"during warm-up ({got} stored)"
            return result
        bench.wait_exit([warm], 30)
        time.sleep(1.0)  # let the tree settle before the baseline
        base = peer.count()
        sampler = RssSampler(peer.pid)
        result.rss_before = min(sampler.sample()[1] for _ in range(5))
        sampler.start()
        window = CpuWindow()
        started = time.monotonic()
        sender = Sender(bench.procs, peer.port, peer.aet, [path],
                        bench.logs / "large-storescu.log", STORESCU_OPTIONS)  # fmt: skip
        status, got, durable = bench.wait_durable(
            peer, base, 1, [sender], stall=LARGE_TIMEOUT, limit=LARGE_TIMEOUT
        )
        sampler.stop()
        _, result.other_load = window.close()
        acked = sender.done_at
        if acked is not None and not sender.failed:
            result.receive_seconds = acked - started
            result.peak_receive = sampler.peak(end=acked)
        elif sender.failed:
            bench.problems.append(f"large: storescu exited {sender.proc.returncode}:\n"
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
                bench.problems.append(f"large: stored as {result.stored_syntax}, not JPEG-LS")
        for record in peer.problems()[:5]:
            bench.problems.append(f"large: {record}")
    except BenchError as exc:
        result.status, result.detail = "failed", fmt_exc(exc)
        bench.problems.append(f"large: {exc}")
    finally:
        if sampler is not None:
            sampler.stop()
        if sender is not None:
            bench.procs.stop(sender.proc, grace=2)
        peer.stop()
        if not bench.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if result.peak_total:
        bench.say(f"large: peak RSS {mib(result.peak_total)} for "
                 f"{mib(result.file_bytes)} ({num(result.peak_ratio, 2)}x)")  # fmt: skip
    else:
        bench.say(f"large: {result.status} {result.detail}")
    return result
