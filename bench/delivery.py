"""Delivery benchmark: how fast instances get from a sender to a PACS (Orthanc), with and
without dicom-node in between, and how the node drains its backlog after a PACS outage.

Run from the repository root:

    .venv/bin/python bench/delivery.py [--count N] [--keep] [--only SCENARIO,...]

Corpus: N CT slices (512x512, signed 16-bit, Explicit VR Little Endian) made from pydicom-data's
693_UNCR.dcm, each with different pixel values and fresh UIDs (one study and one series per run).
The node forwards them unchanged (`transcode: {syntax: keep}`), so this measures delivery, not
codecs. The sender is DCMTK storescu (one association for all files, TCP_NODELAY=1).

Scenarios, each with its own Orthanc (fresh storage) and its own node (fresh spool); --only
takes their names (comma-separated), the default runs them all:
  1.  direct      storescu -> Orthanc, no node: images/s until Orthanc's CountInstances has all N.
  1b. direct-stow a plain STOW-RS client (Python, httpx, in this process) -> Orthanc's DICOMweb
                  plugin, no node: the corpus POSTed to /dicom-web/studies in batches of 50
                  (multipart/related, each request built in memory from the files), one request
                  after the other over one connection, basic auth; time from the client's start
                  until Orthanc has all N; also when the last response came.
  2.  reuse       storescu -> node -> Orthanc with max_per_association 0 (one association reused):
                  time from the start of storescu until Orthanc has all N; also when storescu had
                  all its acknowledgements. Ends with a check that an instance fetched back from
                  Orthanc is one that was sent, with byte-identical pixel data.
  2b. stow        storescu -> node -> Orthanc over STOW-RS, measured as 2 (with the same check):
                  the node's `dicomweb` destination (max_batch 50, timeout 60 s, basic auth with
                  a password file) posting to Orthanc's DICOMweb plugin, which has
                  AuthenticationEnabled and the node as its registered user (rows 1b and 2b share
                  that Orthanc setup; the DIMSE rows' Orthanc has neither plugin nor auth).
  3.  no-reuse    the same as 2 with max_per_association 1 (a new association per instance).
  4.  drain       for both settings (rows 4 and 5): Orthanc stopped, N sent to the node (all
                  acknowledged and queued), Orthanc kept down until the node has failed 3 tries
                  (its backoff is then at max_delay, as after any long outage), then started
                  again on the same ports and storage; delivery rate from the first to the last
                  arrival, and recovery time from "Orthanc answers HTTP" to the first and to the
                  last arrival (the node retries with backoff: initial_delay 1 s, doubling,
                  max_delay 4 s, times a jitter of 0.5-1).

MB/s is the corpus's bytes (the N files as sent, 10^6 bytes per MB) over a row's seconds. The
machine may be shared: the "others" column is the share of all cores that processes outside
this bench's process tree used during the row's measurement (/proc/stat less this tree's CPU);
a figure above 15% is marked "busy".

Before each measurement one warm-up instance (its own study) goes the same way, so the node's
codec worker processes and Orthanc are started before the clock runs; counts are relative to it.
Orthanc is polled every 50 ms (with its basic auth when it has auth on), so arrival times are
+-0.05 s. Each node's log is read after it stopped: a WARNING/ERROR record not expected is a
problem (the outage's retries are counted instead); in 2b its STOW-RS requests are counted
from httpx's log lines (all must be 200).

Every process started here (Orthanc, the node, storescu) runs in its own process group and is
stopped in a `finally`, also on Ctrl-C and SIGTERM. The temporary folder is removed at the end
(with --keep, or after a failure, the logs are kept and their folder is printed).
The process, Orthanc, node and storescu helpers live in bench/common.py (on tests/harness.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pynetdicom
from common import (
    LOG_TROUBLE,
    MB,
    NODE,
    NODE_AET,
    ORTHANC,
    ORTHANC_AET,
    POLL,
    START_TIMEOUT,
    STORESCU,
    BenchError,
    CpuWindow,
    Orthanc,
    Processes,
    Sender,
    end_workspace,
    first_line,
    start_workspace,
    table,
)
from common import Node as BaseNode
from pydicom.uid import generate_uid

# What the node is expected to log while Orthanc is down: its own retry warning, and pynetdicom
# reporting the dropped association and the refused connections.
RETRY_WARNING = re.compile(r"WARNING dicom_node\.deliver: orthanc: .*; next try in ")
OUTAGE_NOISE = re.compile(
    r"ERROR pynetdicom\.(dul: Connection closed before the entire PDU was received"
    r"|dul: \[Errno 104\] Connection reset by peer"
    r"|transport: Association request failed: unable to connect to remote"
    r"|transport: TCP Initialisation Error: \[Errno 111\] Connection refused)"
)
# What a node logs at WARNING when it is stopped (SIGTERM): it drains first. Expected here, as
# every scenario ends with a stop; counted, not a problem.
# httpx logs each request the node's dicomweb destination makes (at INFO)
STOW_POST = re.compile(r"INFO httpx: HTTP Request: POST \S+/studies \"HTTP/[\d.]+ (\d+)")
OUTAGE_MIN_RETRIES = 3  # failed tries before Orthanc comes back: the backoff is at max_delay
BUSY = 0.15  # others using more than this share of all cores: the row is marked busy

# Orthanc for the STOW-RS rows: its DICOMweb plugin, and basic auth on as an operator runs it
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
STOW_USER = "node"
STOW_BATCH = 50  # instances per STOW-RS request, the node's max_batch and the direct client's
SCENARIOS = ("direct", "direct-stow", "reuse", "stow", "no-reuse", "drain")


def stow_orthanc_settings(password: str) -> dict:
    return {
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True,
        "RegisteredUsers": {STOW_USER: password},
    }


# --- corpus --------------------------------------------------------------------------------


@dataclass
class Corpus:
    files: list[Path]
    warmups: list[Path]
    sop_uids: dict[str, Path]  # SOPInstanceUID -> file, for the measured instances
    bytes_total: int


def make_corpus(folder: Path, count: int, warmups: int) -> Corpus:
    import data_store

    source = Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"
    ds = pydicom.dcmread(source)
    base = ds.pixel_array.astype(np.int32)
    lo = -(1 << (ds.BitsStored - 1)) if ds.PixelRepresentation else 0
    hi = (1 << (ds.BitsStored - 1)) - 1 if ds.PixelRepresentation else (1 << ds.BitsStored) - 1
    dtype = np.dtype("<i2") if ds.PixelRepresentation else np.dtype("<u2")
    study, series = generate_uid(), generate_uid()

    def write(path: Path, i: int, study_uid: str, series_uid: str) -> str:
        pixels = np.clip(base + (i % 1000), lo, hi).astype(dtype)
        uid = generate_uid()
        ds.PixelData = pixels.tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.save_as(path, enforce_file_format=True)
        return uid

    folder.mkdir(parents=True)
    (folder / "warmup").mkdir()
    files, uids = [], {}
    for i in range(count):
        path = folder / f"ct{i:05d}.dcm"
        uids[write(path, i, study, series)] = path
        files.append(path)
    warm = []
    for k in range(warmups):  # each its own study, so it is easy to tell apart
        path = folder / "warmup" / f"warmup{k}.dcm"
        write(path, 999 - k, generate_uid(), generate_uid())
        warm.append(path)
    return Corpus(files, warm, uids, sum(f.stat().st_size for f in files))


# --- the node ------------------------------------------------------------------------------

NODE_CONFIG = """\
node: {{ae_title: {aet}, host: 127.0.0.1, port: {port}, spool: ./spool, workers: 2}}
destinations:
  orthanc:
{destination}\
    retry: {{initial_delay: 1, max_delay: 4, give_up_after: 1h, max_failures: 5}}
rules:
  - {{name: all, transcode: {{syntax: keep}}, send_to: [orthanc]}}
"""
DIMSE_DESTINATION = """\
    type: dicom
    host: 127.0.0.1
    port: {orthanc_port}
    ae_title: {orthanc_aet}
    max_per_association: {per_association}
    idle_timeout: 5
"""
STOW_DESTINATION = """\
    type: dicomweb
    url: http://127.0.0.1:{http_port}/dicom-web
    auth: {{username: {user}, password_file: {password_file}}}
    max_batch: {batch}
    timeout: 60s
"""


@dataclass
class QueueState:
    pending: int
    retries: int
    dead: int
    last_error: str


class Node(BaseNode):
    """The node forwarding everything to its destination "orthanc": DIMSE C-STORE with
    `per_association`, or, when `stow_password` is given, STOW-RS to Orthanc's DICOMweb root
    with basic auth (the password in a file beside the config, mode 0600)."""

    def __init__(
        self,
        procs: Processes,
        folder: Path,
        log: Path,
        orthanc: Orthanc,
        per_association: int,
        stow_password: str | None = None,
    ):
        password_file = folder / "orthanc-password"

        def render(port: int) -> str:
            if stow_password is None:
                destination = DIMSE_DESTINATION.format(
                    orthanc_port=orthanc.dicom_port, orthanc_aet=ORTHANC_AET,
                    per_association=per_association,
                )  # fmt: skip
            else:
                destination = STOW_DESTINATION.format(
                    http_port=orthanc.http_port, user=STOW_USER, password_file=password_file,
                    batch=STOW_BATCH,
                )  # fmt: skip
            return NODE_CONFIG.format(aet=NODE_AET, port=port, destination=destination)

        super().__init__(procs, folder, log, render)  # makes the folder; the file is read later
        if stow_password is not None:
            password_file.touch(mode=0o600)
            password_file.write_text(stow_password + "\n")

    def queue(self) -> QueueState:
        """`dicom-node queue` for the orthanc destination."""
        done = subprocess.run(
            [str(NODE), "queue", "-c", str(self.config)],
            cwd=self.folder, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        for line in done.stdout.splitlines():
            fields = line.split(None, 5)
            if fields and fields[0] == "orthanc" and len(fields) >= 5:
                return QueueState(int(fields[1]), int(fields[3]), int(fields[4]),
                                  fields[5] if len(fields) > 5 else "")  # fmt: skip
        if "no queue yet" in done.stdout:
            return QueueState(0, 0, 0, "")
        raise BenchError(f"cannot read `dicom-node queue`:\n{done.stdout}{done.stderr}")


# --- sending and watching ------------------------------------------------------------------


@dataclass
class Arrivals:
    first: float  # monotonic time the first new instance was seen in Orthanc
    last: float  # ... and the last
    extra: int = 0  # instances beyond the expected count (should be 0)


class StowClient:
    """A plain STOW-RS client in a thread: `files` POSTed to `url`/studies, `batch` instances per
    multipart/related request (built in memory from the files), one request after the other over
    one httpx connection with basic `auth`. `done_at` is when it ended (Orthanc answers a
    request after it stored its instances); `check` raises what went wrong."""

    def __init__(self, url: str, auth: tuple[str, str], files: list[Path], batch: int):
        self.url = url
        self.done_at: float | None = None
        self.requests = 0
        self._error: BaseException | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(auth, files, batch),
                                        name="stow-client", daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self, auth: tuple[str, str], files: list[Path], batch: int) -> None:
        try:
            with httpx.Client(auth=auth, timeout=60, trust_env=False) as client:
                for i in range(0, len(files), batch):
                    self._post(client, files[i : i + batch])
                    self.requests += 1
        except BaseException as exc:  # reported by check()
            self._error = exc
        finally:
            self.done_at = time.monotonic()

    def _post(self, client: httpx.Client, files: list[Path]) -> None:
        boundary = uuid.uuid4().hex
        parts = []
        for path in files:
            parts += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                      path.read_bytes(), b"\r\n"]  # fmt: skip
        parts.append(f"--{boundary}--\r\n".encode())
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        response = client.post(f"{self.url}/studies", content=b"".join(parts), headers=headers)
        text = response.text.strip().replace("\n", " ")[:300]
        if response.status_code != 200:
            raise BenchError(f"STOW-RS: HTTP {response.status_code} from {self.url}: {text}")
        failed = (response.json().get("00081198") or {}).get("Value")
        if failed:
            raise BenchError(f"STOW-RS: {len(failed)} instance(s) failed: {text}")

    def check(self) -> None:
        if self._error is not None:
            raise BenchError(f"the STOW-RS client failed: {self._error!r}")


def _finish(sender: Sender | StowClient) -> None:
    if isinstance(sender, Sender):
        sender.procs.stop(sender.proc)


def watch(
    orthanc: Orthanc,
    base: int,
    expected: int,
    timeout: float,
    sender: Sender | StowClient | None = None,
) -> Arrivals:
    """Poll Orthanc until it has `expected` instances more than `base` (and `sender`, if any,
    has finished). Raises BenchError at the deadline, saying how many arrived."""
    deadline = time.monotonic() + timeout
    first = last = None
    got = 0
    while True:
        got = orthanc.count() - base
        now = time.monotonic()
        if got > 0 and first is None:
            first = now
        if got >= expected and last is None:
            last = now
        if sender is not None:
            sender.check()
        if last is not None and (sender is None or sender.done_at is not None):
            if sender is not None:
                _finish(sender)
            return Arrivals(first, last, got - expected)
        if now > deadline:
            who = "storescu" if isinstance(sender, Sender) else "the STOW-RS client"
            state = "" if sender is None else (
                f"; {who} finished" if sender.done_at else f"; {who} still running"
            )  # fmt: skip
            raise BenchError(f"after {timeout:.0f} s Orthanc has {got} of {expected}{state}")
        time.sleep(POLL)


# --- scenarios -----------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    images: int
    seconds: float
    notes: str = ""
    others: float | None = None  # share of all cores used outside this bench meanwhile

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Recovery:
    label: str
    first: float  # seconds from Orthanc ready to the first arrival (<0: before ready)
    last: float


@dataclass
class Bench:
    procs: Processes
    work: Path
    logs: Path
    corpus: Corpus
    count: int
    timeout: float
    rows: list[Row] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    stow_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    dicomweb_version: str = ""
    _warmup: int = 0

    def warmup_file(self) -> list[Path]:
        path = self.corpus.warmups[self._warmup]
        self._warmup += 1
        return [path]

    def log(self, message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    def _orthanc(self, tag: str, stow: bool = False) -> Orthanc:
        extra = stow_orthanc_settings(self.stow_password) if stow else None
        return Orthanc(self.procs, self.work / f"{tag}-orthanc", self.logs / f"{tag}-orthanc.log",
                       extra)  # fmt: skip

    def _node(self, tag: str, orthanc: Orthanc, per_association: int, stow: bool) -> Node:
        return Node(self.procs, self.work / f"{tag}-node", self.logs / f"{tag}-node.log",
                    orthanc, per_association,
                    self.stow_password if stow else None)  # fmt: skip

    def warm_up(self, orthanc: Orthanc, port: int, aet: str, tag: str) -> int:
        """One instance the same way as the measurement; returns Orthanc's count after it."""
        base = orthanc.count()
        sender = Sender(self.procs, port, aet, self.warmup_file(), self.logs / f"{tag}-warmup.log")
        watch(orthanc, base, 1, START_TIMEOUT, sender)
        return base + 1

    def direct(self) -> None:
        self.log("direct: storescu -> Orthanc")
        orthanc = self._orthanc("direct")
        try:
            orthanc.start()
            base = self.warm_up(orthanc, orthanc.dicom_port, ORTHANC_AET, "direct")
            cpu = CpuWindow()
            sender = Sender(self.procs, orthanc.dicom_port, ORTHANC_AET, self.corpus.files,
                            self.logs / "direct-storescu.log")  # fmt: skip
            got = watch(orthanc, base, self.count, self.timeout, sender)
            others = cpu.close()[1]
            acked = sender.done_at - sender.started
            self.rows.append(Row("1 direct: storescu -> Orthanc (no node)", self.count,
                                 got.last - sender.started,
                                 f"storescu done after {acked:.2f} s", others))  # fmt: skip
            self._extra(got, "direct")
        finally:
            orthanc.stop()
            shutil.rmtree(orthanc.folder, ignore_errors=True)

    def direct_stow(self) -> None:
        self.log(f"direct: STOW-RS client -> Orthanc, {STOW_BATCH} per request")
        orthanc = self._orthanc("direct-stow", stow=True)
        try:
            orthanc.start()
            self._plugin_version(orthanc)
            url = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
            auth = (STOW_USER, self.stow_password)
            base = orthanc.count()
            watch(orthanc, base, 1, START_TIMEOUT,
                  StowClient(url, auth, self.warmup_file(), STOW_BATCH))  # fmt: skip
            base += 1
            cpu = CpuWindow()
            client = StowClient(url, auth, self.corpus.files, STOW_BATCH)
            got = watch(orthanc, base, self.count, self.timeout, client)
            others = cpu.close()[1]
            client.check()
            done = client.done_at - client.started
            self.rows.append(Row(
                f"1b direct: STOW-RS client -> Orthanc (no node, {STOW_BATCH}/request)",
                self.count, got.last - client.started,
                f"{client.requests} POSTs, last answer after {done:.2f} s; "
                f"first arrival after {got.first - client.started:.2f} s",
                others,
            ))  # fmt: skip
            self._extra(got, "direct-stow")
            self.checks.append(self._verify(orthanc, "direct-stow"))
        finally:
            orthanc.stop()
            shutil.rmtree(orthanc.folder, ignore_errors=True)

    def through_node(self, per_association: int, verify: bool, stow: bool = False) -> None:
        tag = "live-stow" if stow else f"live-{per_association}"
        label = STOW_LABEL if stow else _label(per_association)
        self.log(f"through the node, {label}")
        live = self._orthanc_and_node(tag, per_association, outage=False, stow=stow)
        with live as (orthanc, node):
            base = self.warm_up(orthanc, node.port, NODE_AET, tag)
            posts_before = _posts(node)
            cpu = CpuWindow()
            sender = Sender(self.procs, node.port, NODE_AET, self.corpus.files,
                            self.logs / f"{tag}-storescu.log")  # fmt: skip
            got = watch(orthanc, base, self.count, self.timeout, sender)
            others = cpu.close()[1]
            acked = sender.done_at - sender.started
            number = "2b" if stow else 2 if per_association == 0 else 3
            posts = ""
            if stow:
                statuses = _posts(node)[len(posts_before) :]
                posts = f"; {len(statuses)} POSTs"
                if any(code != "200" for code in statuses):
                    self.problems.append(f"{tag}: STOW-RS answers {statuses}")
            self.rows.append(Row(
                f"{number} via node, {label}", self.count, got.last - sender.started,
                f"storescu had all acks after {acked:.2f} s ({self.count / acked:.1f} img/s); "
                f"first arrival after {got.first - sender.started:.2f} s{posts}",
                others,
            ))  # fmt: skip
            self._extra(got, tag)
            if verify:
                self.checks.append(self._verify(orthanc, tag))
            self._after(node, tag, outage=False)

    def drain(self, per_association: int) -> None:
        tag = f"drain-{per_association}"
        label = _label(per_association)
        self.log(f"drain after an outage, {label}")
        with self._orthanc_and_node(tag, per_association, outage=True) as (orthanc, node):
            base = self.warm_up(orthanc, node.port, NODE_AET, tag)
            cpu = CpuWindow()
            orthanc.stop()  # the outage begins
            outage = time.monotonic()
            sender = Sender(self.procs, node.port, NODE_AET, self.corpus.files,
                            self.logs / f"{tag}-storescu.log")  # fmt: skip
            acked = sender.wait(self.timeout)
            self._wait_queued(node)
            down = time.monotonic() - outage
            ready = orthanc.start()  # the outage ends
            at_ready = orthanc.count() - base
            got = watch(orthanc, base, self.count, self.timeout)
            others = cpu.close()[1]
            self.rows.append(Row(
                f"{4 if per_association == 0 else 5} drain after outage, {label}", self.count,
                got.last - got.first,
                f"first->last arrival; Orthanc ready->all {got.last - ready:.2f} s "
                f"({self.count / (got.last - ready):.1f} img/s); node acked {self.count} in "
                f"{acked:.2f} s ({self.count / acked:.1f} img/s) while Orthanc was down "
                f"({down:.1f} s)",
                others,
            ))  # fmt: skip
            first = 0.0 if at_ready > 0 else got.first - ready
            self.recoveries.append(Recovery(label, first, got.last - ready))
            if at_ready > 0:
                self.problems.append(f"{tag}: {at_ready} instance(s) were already in Orthanc "
                                     "when its REST API first answered")  # fmt: skip
            self._extra(got, tag)
            self._after(node, tag, outage=True)

    @contextlib.contextmanager
    def _orthanc_and_node(self, tag: str, per_association: int, outage: bool, stow: bool = False):
        """A fresh Orthanc and a node forwarding to it (over STOW-RS with `stow`), both running;
        stopped and removed after."""
        orthanc = self._orthanc(tag, stow)
        node = self._node(tag, orthanc, per_association, stow)
        try:
            orthanc.start()
            if stow:
                self._plugin_version(orthanc)
            node.start()
            yield orthanc, node
        finally:
            node.stop()
            orthanc.stop()
            self._node_log(node, tag, outage=outage)
            shutil.rmtree(orthanc.folder, ignore_errors=True)
            shutil.rmtree(node.folder, ignore_errors=True)

    def _plugin_version(self, orthanc: Orthanc) -> None:
        """The DICOMweb plugin's version as Orthanc reports it (also: the plugin is loaded)."""
        try:
            info = json.loads(orthanc.get("/plugins/dicom-web"))
        except OSError as exc:
            raise BenchError(f"Orthanc's DICOMweb plugin is not loaded: {exc}") from None
        self.dicomweb_version = str(info.get("Version", "?"))

    def _wait_queued(self, node: Node) -> None:
        """Until every acknowledged instance waits in the delivery queue and the node has failed
        OUTAGE_MIN_RETRIES times (so the backoff has reached max_delay, as in a long outage)."""
        deadline = time.monotonic() + self.timeout
        while True:
            state = node.queue()
            if state.dead:
                raise BenchError(f"{state.dead} instance(s) dead-lettered during the outage: "
                                 f"{state.last_error}")  # fmt: skip
            if state.pending >= self.count and state.retries >= OUTAGE_MIN_RETRIES:
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{state.pending} of {self.count} queued for delivery and "
                    f"{state.retries} failed tries after {self.timeout:.0f} s"
                )
            time.sleep(0.2)

    def _after(self, node: Node, tag: str, outage: bool) -> None:
        state = node.queue()
        if state.pending or state.dead:
            self.problems.append(
                f"{tag}: after delivery `dicom-node queue` shows "
                f"pending={state.pending} dead={state.dead} {state.last_error}"
            )
        incoming = node.folder / "spool" / "incoming"
        left = list(incoming.glob("*.dcm")) if incoming.exists() else []
        if left:  # deletion happens right after delivery; give it a moment with a deadline
            deadline = time.monotonic() + 10
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = list(incoming.glob("*.dcm"))
            if left:
                self.problems.append(f"{tag}: {len(left)} file(s) left in spool/incoming "
                                     "although everything was delivered")  # fmt: skip

    def _node_log(self, node: Node, tag: str, outage: bool) -> None:
        """Unexpected WARNING/ERROR records become problems; the outage's are counted."""
        retries = noise = 0
        problems = []
        for record in node.log_records():
            if outage and RETRY_WARNING.search(record):
                retries += 1
            elif outage and OUTAGE_NOISE.search(record):
                noise += 1
            elif LOG_TROUBLE.search(record):
                problems.append(record)
        for record in problems[:10]:
            self.problems.append(f"{tag} node log: {record}")
        if len(problems) > 10:
            self.problems.append(f"{tag} node log: ... {len(problems) - 10} more such records")
        if outage:
            self.checks.append(
                f"{tag}: during the outage the node logged {retries} retry warning(s) and "
                f"{noise} pynetdicom ERROR record(s) about the lost/refused connection (expected)"
            )

    def _extra(self, got: Arrivals, tag: str) -> None:
        if got.extra:
            self.problems.append(f"{tag}: Orthanc has {got.extra} more instance(s) than sent")

    def _verify(self, orthanc: Orthanc, tag: str) -> str:
        """Fetch one measured instance back from Orthanc; same SOPInstanceUID, same pixels."""
        ids = json.loads(orthanc.get("/instances"))
        random.shuffle(ids)
        for orthanc_id in ids[:5]:
            data = orthanc.get(f"/instances/{orthanc_id}/file", timeout=30)
            ds = pydicom.dcmread(io.BytesIO(data))
            sent = self.corpus.sop_uids.get(str(ds.SOPInstanceUID))
            if sent is None:
                if any(str(ds.SOPInstanceUID) == str(pydicom.dcmread(w).SOPInstanceUID)
                       for w in self.corpus.warmups):  # fmt: skip
                    continue  # the warm-up instance: try another
                raise BenchError(f"Orthanc holds SOPInstanceUID {ds.SOPInstanceUID}, not sent")
            original = pydicom.dcmread(sent)
            if ds.PixelData != original.PixelData:
                raise BenchError(f"pixel data of {ds.SOPInstanceUID} differs from {sent.name}")
            return (
                f"{tag}: Orthanc instance {orthanc_id} is {sent.name} "
                f"(SOPInstanceUID {ds.SOPInstanceUID}), pixel data byte-identical"
            )
        raise BenchError("could not find a measured instance in Orthanc to verify")


def _posts(node: Node) -> list[str]:
    """The HTTP status of each STOW-RS request in the node's log so far."""
    return [m.group(1) for r in node.log_records() if (m := STOW_POST.search(r))]


STOW_LABEL = f"STOW-RS (dicomweb, max_batch {STOW_BATCH}, basic auth)"


def _label(per_association: int) -> str:
    return ("reuse association (max_per_association 0)" if per_association == 0
            else "new association per instance (max_per_association 1)")  # fmt: skip


# --- report --------------------------------------------------------------------------------


def _others(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{share:.0%}" + (" busy" if share > BUSY else "")


def print_report(bench: Bench, elapsed: float, corpus_seconds: float, busy: float) -> None:
    header = ["scenario", "images", "seconds", "images/s", "MB/s", "others", "notes"]
    body = [
        [r.scenario, str(r.images), f"{r.seconds:.2f}", f"{r.rate:.1f}",
         f"{bench.corpus.bytes_total / MB / r.seconds:.1f}" if r.seconds > 0 else "-",
         _others(r.others), r.notes]
        for r in bench.rows  # in the order run: 1, 1b, 2, 2b, 3, 4, 5
    ]  # fmt: skip
    size = bench.corpus.bytes_total / len(bench.corpus.files) / 1024
    print()
    print(f"dicom-node delivery benchmark: {bench.count} CT images, 512x512 16-bit, "
          f"{size:.0f} KiB each, Explicit VR LE, forwarded as received")  # fmt: skip
    print(f"machine: {os.cpu_count()} CPU core(s), {platform.platform()}, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(
        f"versions: {first_line([ORTHANC, '--version'])}; pydicom {pydicom.__version__}; "
        f"pynetdicom {pynetdicom.__version__}; {first_line([STORESCU, '--version'])}"
        + (f"; Orthanc DICOMweb plugin {bench.dicomweb_version}, httpx {httpx.__version__}"
           if bench.dicomweb_version else "")
    )  # fmt: skip
    print()
    print(table(header, body))
    print()
    print(
        "rows 1-3: from the start of the sender (storescu; in 1b the STOW-RS client) until "
        "Orthanc has all images (node: workers 2, spool fsync);"
    )
    print(
        "rows 4-5: delivery alone, from the first to the last arrival in Orthanc after it came "
        "back."
    )
    print(
        f"MB/s: the corpus's {bench.corpus.bytes_total / MB:.1f} MB (files as sent) over the "
        "row's seconds; others: the share of all cores that processes outside this bench used "
        f"meanwhile (busy: over {BUSY:.0%}; the whole bench: {busy:.0%})."
    )
    for r in bench.recoveries:
        print(
            f"recovery after outage, {r.label}: first instance {r.first:.2f} s after "
            f"Orthanc was ready, all {bench.count} after {r.last:.2f} s "
            "(retry initial_delay 1 s, max_delay 4 s, jitter)"
        )
    print()
    for check in bench.checks:
        print(f"check: {check}")
    if bench.problems:
        print("NODE PROBLEMS:")
        for problem in bench.problems:
            print(f"  {problem}")
    else:
        print(
            "node problems: none (no unexpected WARNING/ERROR in its logs, queues empty, "
            "spools emptied)"
        )
    print(f"bench took {elapsed:.0f} s (corpus {corpus_seconds:.1f} s); Orthanc polled every "
          f"{POLL * 1000:.0f} ms")  # fmt: skip


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="images per scenario (300)")
    parser.add_argument("--keep", action="store_true", help="keep the logs (and print where)")
    parser.add_argument("--only", metavar="SCENARIO,...",
                        help=f"run only these ({', '.join(SCENARIOS)}; default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    only = set(SCENARIOS)
    if args.only:
        only = {name.strip() for name in args.only.split(",") if name.strip()}
        if not only or only - set(SCENARIOS):
            parser.error(f"--only: unknown {sorted(only - set(SCENARIOS))}; "
                         f"choose from {', '.join(SCENARIOS)}")  # fmt: skip
    workspace = start_workspace("dicom-node-bench-")
    if workspace is None:
        return 2
    work, logs = workspace
    started = time.monotonic()
    procs = Processes()
    ok = False
    try:
        print(f"making {args.count} images in {work} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        corpus = make_corpus(work / "corpus", args.count, warmups=7)  # one per scenario
        corpus_seconds = time.monotonic() - t
        timeout = 60 + args.count * 0.5  # per wait; a healthy run needs a fraction of it
        bench = Bench(procs, work, logs, corpus, args.count, timeout)
        cpu = CpuWindow()
        if "direct" in only:
            bench.direct()
        if "direct-stow" in only:
            bench.direct_stow()
        if "reuse" in only:
            bench.through_node(0, verify=True)
        if "stow" in only:  # right after 2: the machine's speed drifts within minutes
            bench.through_node(0, verify=True, stow=True)
        if "no-reuse" in only:
            bench.through_node(1, verify=False)
        if "drain" in only:
            bench.drain(0)
            bench.drain(1)
        print_report(bench, time.monotonic() - started, corpus_seconds, cpu.close()[1])
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
        end_workspace(procs, work, logs, ok, "logs" if args.keep else None)


if __name__ == "__main__":
    sys.exit(main())
