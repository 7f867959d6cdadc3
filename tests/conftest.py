"""Shared test helpers: real images, free ports, a node in a subprocess, DCMTK senders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import data_store
import numpy as np  # noqa: F401 (annotations)
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from node.config import Config, parse_config
from tests import harness
from tests.harness import free_port, wait_for

warnings.filterwarnings("ignore", module="pydicom")

DATA = Path(data_store.__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent


def data_file(name: str) -> Path:
    """A file from pydicom-data, or from pydicom's own test files."""
    path = DATA / name
    if path.exists():
        return path
    found = get_testdata_file(name, download=False)
    if found is None:
        raise FileNotFoundError(name)
    return Path(found)


def one_rule_config(folder: Path, syntax: str) -> Config:
    """A configuration whose one rule transcodes to `syntax` into a folder under `folder`."""
    return parse_config(
        "destinations: {a: {type: folder, path: ./a}}\n"
        f"rules: [{{name: r, transcode: {{syntax: {syntax}}}, send_to: [a]}}]\n",
        "node.yaml",
        folder,
    )


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; bin/test installs it (Debian packages)")
    return path


# storescu proposes uncompressed syntaxes unless told otherwise, and would then decompress
# on its side; one flag per received syntax makes it send each file as it is.
_STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu(
    port: int,
    files: list[Path],
    calling: str = "STORESCU",
    called: str = "DICOM-NODE",
    extra: tuple[str, ...] = (),
) -> None:
    """Send `files` with DCMTK storescu, each in its own transfer syntax; all must succeed."""
    require("storescu")
    groups: dict[str, list[Path]] = {}
    for f in files:
        ts = str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_STORESCU_PROPOSAL[ts], []).append(f)
    env = {**os.environ, "TCP_NODELAY": "1"}
    for flag, group in groups.items():
        cmd = ["storescu", "-R", flag, "-aet", calling, "-aec", called, "127.0.0.1", str(port),
               *extra, *map(str, group)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"storescu failed: {done.stderr[-2000:]}"
        assert "Store Failed" not in done.stderr, done.stderr[-2000:]


def echo(port: int, calling: str = "ECHOSCU", called: str = "DICOM-NODE") -> bool:
    require("echoscu")
    done = subprocess.run(
        ["echoscu", "-to", "5", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.returncode == 0


@dataclass
class RunningNode:
    process: subprocess.Popen
    port: int
    root: Path
    config: Path
    log: Path

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def archived(self) -> list[Path]:
        """Every delivered file: below the node's folder, outside its spool."""
        return sorted(p for p in self.root.rglob("*.dcm") if not p.is_relative_to(self.spool))

    def wait_archived(self, count: int, timeout: float = 120) -> list[Path]:
        def enough():
            self.assert_alive()
            files = self.archived()
            return files if len(files) >= count else None

        try:
            return wait_for(enough, timeout, f"{count} archived instances")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; node log:\n{self.log_text()[-3000:]}") from None

    def wait_spool_empty(self, timeout: float = 120) -> None:
        wait_for(lambda: not list((self.spool / "incoming").glob("*.dcm")), timeout, "empty spool")

    def assert_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self) -> None:
        """SIGKILL the node and its codec workers at once, as systemd or a power cut would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_node(
    root: Path,
    config_text: str,
    port: int | None = None,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> RunningNode:
    """Write `config_text` (with {port} filled in) to root/node.yaml and serve it."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "node.yaml"
    config.write_text(config_text.replace("{port}", str(port)))
    log = root / "node.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "node.ops.cli", "serve", "-c", str(config), *args],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=root,
        start_new_session=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    node = RunningNode(process, port, root, config, log)

    def ready():
        node.assert_alive()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        wait_for(ready, 60, "the node to listen", interval=0.1)
    except BaseException:
        if process.poll() is None:  # never leave a node behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise
    return node


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    started: list[RunningNode] = []

    def factory(
        config_text: str,
        name: str = "node",
        port: int | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> RunningNode:
        node = start_node(tmp_path / name, config_text, port, args, env)
        started.append(node)
        return node

    yield factory
    for node in started:
        if node.process.poll() is None:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()


# --- downstream peers -------------------------------------------------------------------------


class Orthanc(harness.Orthanc):
    """A real Orthanc (Debian package) on free ports, with its own storage folder; launched
    and stopped by tests/harness.py (shared with bench/)."""

    def start(self) -> Orthanc:
        require("Orthanc")
        super().start()
        return self

    def _get(self, path: str):
        try:
            data = self.get(path, timeout=10)
        except OSError:
            return None
        return data if path.endswith("/file") else json.loads(data)

    def count(self) -> int:
        stats = self._get("/statistics")
        return int(stats["CountInstances"]) if stats else 0

    def wait_count(self, count: int, timeout: float = 120) -> None:
        wait_for(lambda: self.count() >= count, timeout, f"{count} instances in Orthanc")

    def datasets(self) -> list:
        from io import BytesIO

        return [
            dcmread(BytesIO(self._get(f"/instances/{i}/file"))) for i in self._get("/instances")
        ]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", free_port(), free_port())
    yield server
    server.stop()


class ScriptedPeer:
    """A pynetdicom Storage SCP answering C-STOREs with a scripted sequence of statuses
    (then Success), counting associations; accepts uncompressed and JPEG-LS."""

    def __init__(self, statuses: list[int] | None = None):
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.presentation import StoragePresentationContexts  # noqa: F401

        self.statuses = list(statuses or [])
        self.received: list = []
        self.associations = 0
        self.port = free_port()
        ae = AE(ae_title="PEER")
        syntaxes = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.80"]
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._established)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        self.ae = ae

    def _established(self, event) -> None:
        self.associations += 1

    def _store(self, event) -> int:
        if self.statuses:
            return self.statuses.pop(0)
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def expected_pixels(original) -> np.ndarray:
    """The pixels a lossless output of `original` must hold: raw, except YBR from a lossy JPEG,
    which the node makes RGB with pydicom's own conversion."""
    from pydicom.pixels import pixel_array

    lossy_jpeg = original.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.4.50",
                                                          "1.2.840.10008.1.2.4.51")  # fmt: skip
    ybr = str(original.PhotometricInterpretation).startswith("YBR_FULL")
    return pixel_array(original, raw=not (lossy_jpeg and ybr))
