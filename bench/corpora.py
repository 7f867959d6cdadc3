"""The corpora and target syntaxes of the throughput benchmarks (bench/throughput.py, whose
docstring describes them, and bench/node_cpu.py).

Made in a temporary folder, fresh UIDs, one study and series each, Explicit VR Little Endian;
every image differs: a per-instance offset of -100..299 and an np.roll shift of the source
image, clipped to the valid range (no random noise, which would make the images unrealistically
incompressible). Warm-up instances (their own study) come with each corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from common import CPU
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

WARMUPS = 2 * CPU  # warm-up instances: enough for every codec worker process to be started
HTJ2K_UID = "1.2.840.10008.1.2.4.201"


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
