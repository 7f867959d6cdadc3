"""Processing one spool entry, in a worker process: read it, pick the rule, transcode, write the
output next to the spool entry, and say where each destination should get it.

Pure of network and of shared state, so it runs in a process pool and in tests alike.
"""

from __future__ import annotations

import ctypes
import os
import time
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from node.config import Config
from node.config.targets import Target, TranscodeSpec
from node.deliver.destinations import relpath_for
from node.route import Arrival, select_rule
from node.spool import SpoolEntry
from node.transcode.output_file import write_output
from node.transcode.step import transcode_all
from node.vocabulary.syntaxes import syntax_name

KEEP = TranscodeSpec(Target(None))
# Pixel Data above this stays on disk and is read frame by frame (large multi-frame instances).
LARGE_PIXEL_DATA = 64 << 20
# Instances up to this are read in one go, then parsed and spliced (output_file) from the bytes.
READ_AT_ONCE = 8 << 20
# glibc mallopt parameters, and the freed memory a worker keeps for its next instance.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_FOR_REUSE = 64 << 20


@dataclass(frozen=True)
class Output:
    """One file processing made for some of the rule's destinations."""

    path: Path  # a work file, or the spool entry itself (sent as received)
    syntax: str
    size: int
    outcome: str  # "recompressed", "kept" or "passed-through" (TranscodeResult.outcome)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delivery:
    """What one destination of the rule gets: which output, and where a folder puts it."""

    destination: str
    output: int  # an index into ProcessOutcome.outputs
    relpath: str | None = None  # for the types that lay out files (a folder)


@dataclass(frozen=True)
class ProcessOutcome:
    entry: SpoolEntry
    rule: str | None
    outputs: tuple[Output, ...] = ()
    deliveries: tuple[Delivery, ...] = ()  # in the rule's send_to order
    sop_class: str = ""
    syntax_in: str = ""
    bytes_in: int = 0
    notes: tuple[str, ...] = ()  # about the instance, beside each output's own
    calling_aet: str = ""
    milliseconds: float = 0.0
    quarantine_reason: str | None = None
    patient: str = ""  # only when node.log_patient_names allows it

    @property
    def send_to(self) -> tuple[str, ...]:
        return tuple(d.destination for d in self.deliveries)

    @property
    def outcome(self) -> str:
        """The outputs' outcome when they agree, else "mixed"."""
        kinds = {o.outcome for o in self.outputs}
        return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else ""

    def fields(self) -> dict[str, object]:
        """The per-instance log line as data (for --log-format json): the first output's
        syntax and size at the top level, and what each destination gets."""
        first = self.outputs[0] if self.outputs else None
        values: dict[str, object] = {
            "event": "instance", "outcome": self.outcome, "calling_aet": self.calling_aet,
            "sop_class": self.sop_class, "rule": self.rule, "syntax_in": self.syntax_in,
            "syntax_out": first.syntax if first else None,
            "bytes_in": self.bytes_in, "bytes_out": first.size if first else None,
            "ratio": round(self.bytes_in / first.size, 3) if first and first.size else None,
            "ms": round(self.milliseconds, 1), "destinations": list(self.send_to),
            "outputs": [
                {"destinations": [d.destination for d in self.deliveries if d.output == n],
                 "syntax": o.syntax, "bytes": o.size, "outcome": o.outcome,
                 "ratio": round(self.bytes_in / o.size, 3) if o.size else None}
                for n, o in enumerate(self.outputs)
            ],
            "notes": list(self.all_notes()),
        }  # fmt: skip
        if self.patient:
            values["patient"] = self.patient
        return values

    def all_notes(self) -> tuple[str, ...]:
        """The instance's notes, then each output's (once, however many outputs share one)."""
        return tuple(dict.fromkeys((*self.notes, *(n for o in self.outputs for n in o.notes))))

    def summary(self) -> str:
        text = (
            f"{self.outcome} from={self.calling_aet or '?'} sop={self.sop_class} rule={self.rule} "
            f"{syntax_name(self.syntax_in)} {self.bytes_in} bytes {self.milliseconds:.0f} ms "
        )
        parts = []
        for n, o in enumerate(self.outputs):
            names = ",".join(d.destination for d in self.deliveries if d.output == n)
            ratio = self.bytes_in / o.size if o.size else 0
            parts.append(f"to={names} {syntax_name(o.syntax)} {o.size} bytes ({ratio:.2f}:1)"
                         + ("" if len(self.outputs) == 1 else f" {o.outcome}"))  # fmt: skip
        text += "; ".join(parts)
        if self.patient:
            text += f" patient={self.patient}"
        if notes := self.all_notes():
            text += " | " + "; ".join(notes)
        return text


def keep_freed_memory_for_reuse() -> bool:
    """Have this process's C library keep freed buffers for the next instance.

    By default glibc hands a large freed block back to the kernel at once (blocks from 128 KiB
    are mmapped, and the heap top is trimmed), so every frame's buffers were page-faulted and
    zeroed again: 3.5-5 ms of a CT slice's ~20 ms of codec step went to the kernel (getrusage).
    Blocks up to 32 MiB now come from the heap, and up to KEPT_FOR_REUSE of free heap is kept.
    Larger frames (a big multi-frame instance) are still mapped and unmapped one by one. False
    where the C library has no mallopt (musl, macOS): nothing is tuned there.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, KEPT_FOR_REUSE)
    )


def read_arrival(ds) -> Arrival:
    meta = getattr(ds, "file_meta", None)
    return Arrival(
        calling_aet=str((meta or {}).get("SendingApplicationEntityTitle", "") or "").strip(),
        called_aet=str((meta or {}).get("ReceivingApplicationEntityTitle", "") or "").strip(),
    )


def process_entry(
    entry: SpoolEntry, config: Config, work_path: Path, as_received: bool = False
) -> ProcessOutcome:
    """Route and transcode one entry. `as_received` skips the codec (used after a worker crash)."""
    started = time.perf_counter()
    warnings.filterwarnings("ignore", module="pydicom")
    try:
        size = entry.path.stat().st_size
        # never read whole an instance whose Pixel Data stays on disk (LARGE_PIXEL_DATA)
        whole = size <= min(READ_AT_ONCE, LARGE_PIXEL_DATA)
        received = entry.path.read_bytes() if whole else None
        ds = dcmread(BytesIO(received) if received is not None else entry.path,
                     defer_size=LARGE_PIXEL_DATA)  # fmt: skip
        syntax_in = str(ds.file_meta.TransferSyntaxUID)
        if received is None and syntax_in == DeflatedExplicitVRLittleEndian:
            ds = dcmread(entry.path)  # deferred values cannot be re-read from a deflated file
    except Exception as exc:  # any way a file can fail to parse (struct.error, ...): kept aside
        reason = f"unreadable dataset: {type(exc).__name__}: {exc}"
        return ProcessOutcome(entry, None, quarantine_reason=reason)
    arrival = read_arrival(ds)
    try:
        rule = select_rule(config.rules, ds, arrival)
    except Exception as exc:  # a dataset so broken its attributes cannot be read
        return ProcessOutcome(entry, None, quarantine_reason=f"cannot evaluate rules: {exc}")
    if rule is None:
        return ProcessOutcome(
            entry, None,
            calling_aet=arrival.calling_aet,
            quarantine_reason=(
                f"no rule matched (Modality={ds.get('Modality', '')!s}, "
                f"SOPClassUID={ds.get('SOPClassUID', '')!s}, CallingAET={arrival.calling_aet})"
            ),
        )  # fmt: skip
    pixels = ds.get_item(0x7FE00010, keep_deferred=True) if "PixelData" in ds else None
    on_disk = pixels is not None and pixels.value is None and pixels.length  # deferred
    specs = (KEEP,) if as_received else rule.distinct_specs()
    results = transcode_all(ds, specs, entry.path if on_disk else None)
    outputs: list[Output] = []
    datasets: list = []  # each output's dataset, for the folder layouts
    made: dict[object, int] = {}  # what an output is (a target, or "as received") -> its index
    spec_output: dict[TranscodeSpec, int] = {}
    for spec, result in zip(specs, results, strict=True):
        notes = result.notes
        key: object = result.target if result.dataset is not None else "as received"
        if key not in made and result.dataset is not None:
            work = _work_file(work_path, len(outputs))
            problem = _write(work, result.dataset, ds, entry.path, received)
            if problem is None:
                made[key] = len(outputs)
                outputs.append(Output(work, str(result.dataset.file_meta.TransferSyntaxUID),
                                      work.stat().st_size, result.outcome, notes))  # fmt: skip
                datasets.append(result.dataset)
            else:  # e.g. hostile elements pydicom refuses to write: sent as received
                key, notes = "as received", (*notes, problem)
        if key not in made:
            made[key] = len(outputs)
            outcome = result.outcome if result.dataset is None else "passed-through"
            outputs.append(Output(entry.path, syntax_in, size, outcome, notes))
            datasets.append(ds)
        spec_output[spec] = made[key]
    deliveries = []
    for name in rule.send_to:
        index = spec_output[KEEP if as_received else rule.spec_for(name)]
        relpath = relpath_for(config.destinations[name], datasets[index])
        deliveries.append(Delivery(name, index, relpath))
    return ProcessOutcome(
        entry=entry,
        rule=rule.name,
        outputs=tuple(outputs),
        deliveries=tuple(deliveries),
        sop_class=str(ds.get("SOPClassUID", "")),
        syntax_in=syntax_in,
        bytes_in=size,
        notes=("worker crashed on this instance before; sent as received",) if as_received else (),
        calling_aet=arrival.calling_aet,
        milliseconds=(time.perf_counter() - started) * 1000,
        patient=(
            f"{ds.get('PatientName', '')}/{ds.get('PatientID', '')}"
            if config.node.log_patient_names
            else ""
        ),
    )


def _work_file(first: Path, index: int) -> Path:
    """Where output `index` is written: `first` for output 0, beside it for the others (the
    pipeline renames each into the spool's out/ under its number)."""
    return first if index == 0 else first.with_suffix(f".{index}.dcm")


def _write(path: Path, out, ds, source: Path, received: bytes | None) -> str | None:
    """Write an output (not fsync'd: after a crash the entry is processed again); why it could
    not be, or None."""
    tmp = path.with_suffix(".part")
    try:
        write_output(tmp, out, ds, source, received)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        return f"the output could not be written ({type(exc).__name__}: {exc}); sent as received"
    os.replace(tmp, path)
    return None
