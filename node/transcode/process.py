"""Processing one spool entry, in a worker process: read it, pick the rule, transcode, write the
output next to the spool entry, and say where each destination should get it.

Pure of network and of shared state, so it runs in a process pool and in tests alike.
"""

from __future__ import annotations

import ctypes
import os
import time
import warnings
from dataclasses import dataclass, field
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
from node.transcode.step import TranscodeResult, transcode
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
class ProcessOutcome:
    entry: SpoolEntry
    rule: str | None
    output: Path | None  # the file to deliver: a work file, or the spool entry itself
    # destination -> where it puts the output, for the types that lay out files (a folder)
    folder_paths: dict[str, str] = field(default_factory=dict)
    send_to: tuple[str, ...] = ()
    sop_class: str = ""
    syntax_in: str = ""
    syntax_out: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    outcome: str = ""
    notes: tuple[str, ...] = ()
    calling_aet: str = ""
    milliseconds: float = 0.0
    quarantine_reason: str | None = None
    patient: str = ""  # only when node.log_patient_names allows it

    def fields(self) -> dict[str, object]:
        """The per-instance log line as data (for --log-format json)."""
        values: dict[str, object] = {
            "event": "instance", "outcome": self.outcome, "calling_aet": self.calling_aet,
            "sop_class": self.sop_class, "rule": self.rule, "syntax_in": self.syntax_in,
            "syntax_out": self.syntax_out, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "ratio": round(self.bytes_in / self.bytes_out, 3) if self.bytes_out else None,
            "ms": round(self.milliseconds, 1), "destinations": list(self.send_to),
            "notes": list(self.notes),
        }  # fmt: skip
        if self.patient:
            values["patient"] = self.patient
        return values

    def summary(self) -> str:
        ratio = self.bytes_in / self.bytes_out if self.bytes_out else 0
        text = (
            f"{self.outcome} from={self.calling_aet or '?'} sop={self.sop_class} rule={self.rule} "
            f"{syntax_name(self.syntax_in)}->{syntax_name(self.syntax_out)} "
            f"{self.bytes_in}->{self.bytes_out} bytes ({ratio:.2f}:1) {self.milliseconds:.0f} ms "
            f"to={','.join(self.send_to)}"
        )
        if self.patient:
            text += f" patient={self.patient}"
        if self.notes:
            text += " | " + "; ".join(self.notes)
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
        return ProcessOutcome(entry, None, None, quarantine_reason=reason)
    arrival = read_arrival(ds)
    try:
        rule = select_rule(config.rules, ds, arrival)
    except Exception as exc:  # a dataset so broken its attributes cannot be read
        return ProcessOutcome(entry, None, None, quarantine_reason=f"cannot evaluate rules: {exc}")
    if rule is None:
        return ProcessOutcome(
            entry, None, None,
            calling_aet=arrival.calling_aet,
            quarantine_reason=(
                f"no rule matched (Modality={ds.get('Modality', '')!s}, "
                f"SOPClassUID={ds.get('SOPClassUID', '')!s}, CallingAET={arrival.calling_aet})"
            ),
        )  # fmt: skip
    pixels = ds.get_item(0x7FE00010, keep_deferred=True) if "PixelData" in ds else None
    on_disk = pixels is not None and pixels.value is None and pixels.length  # deferred
    result: TranscodeResult = transcode(
        ds, KEEP if as_received else rule.transcode, entry.path if on_disk else None
    )
    notes = result.notes + (("worker crashed on this instance before; sent as received",)
                            if as_received else ())  # fmt: skip
    out_ds, output = ds, entry.path
    if result.dataset is not None:
        tmp = work_path.with_suffix(".part")
        try:
            write_output(tmp, result.dataset, ds, entry.path, received)
        except Exception as exc:  # e.g. hostile elements pydicom refuses to write: as received
            tmp.unlink(missing_ok=True)
            notes += (f"the output could not be written ({type(exc).__name__}: {exc}); "
                      "sent as received",)  # fmt: skip
            result = TranscodeResult(None, "passed-through", None)
        else:
            os.replace(tmp, work_path)  # not fsync'd: after a crash the entry is processed again
            out_ds, output = result.dataset, work_path
    folder_paths = {
        name: relpath
        for name in rule.send_to
        if (relpath := relpath_for(config.destinations[name], out_ds)) is not None
    }
    return ProcessOutcome(
        entry=entry,
        rule=rule.name,
        output=output,
        folder_paths=folder_paths,
        send_to=rule.send_to,
        sop_class=str(ds.get("SOPClassUID", "")),
        syntax_in=syntax_in,
        syntax_out=str(out_ds.file_meta.TransferSyntaxUID),
        bytes_in=size,
        bytes_out=output.stat().st_size,
        outcome=result.outcome,
        notes=notes,
        calling_aet=arrival.calling_aet,
        milliseconds=(time.perf_counter() - started) * 1000,
        patient=(
            f"{ds.get('PatientName', '')}/{ds.get('PatientID', '')}"
            if config.node.log_patient_names
            else ""
        ),
    )
