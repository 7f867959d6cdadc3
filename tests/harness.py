"""What the tests and the benchmarks share to run real peers: free ports, child processes each
the leader of its own process group, polling with a deadline, and a real Orthanc.

- `free_port`, `free_ports`: ports nothing listens on, never one handed out before in this
  process (two calls in a row could otherwise get the same port from the kernel).
- `wait_for`: poll a predicate until it returns something truthy, or raise at the deadline.
- `spawn`, `stop_group`, `Processes`: a child in a new session (so in its own process group),
  its output appended to a log; stopping SIGTERMs the group, SIGKILLs it after a grace period,
  then SIGKILLs whatever is left in it (codec worker processes, should the leader have died
  without them).
- `http_get`: a local REST call, never through an http_proxy from the environment.
- `Orthanc`: the Debian package's server with a JSON config in its own folder (`extra` options
  merged in), started and polled until its REST API answers; restartable on the same ports
  and storage.

Imported as `tests.harness`: by tests/conftest.py, and by bench/common.py, which puts the
repository root on sys.path (the benchmarks run as `python bench/NAME.py`). It imports neither
pytest nor the node, and the errors it raises are the caller's choice (`error=`): the tests'
AssertionError by default, the benchmarks' BenchError.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_AET = "ORTHANC"
START_TIMEOUT = 60.0  # seconds for a server to become ready
POLL = 0.05  # seconds between polls

T = TypeVar("T")


# --- ports and polling ---------------------------------------------------------------------

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never one this process handed out before: two calls in a
    row (a DICOM and an HTTP port) could otherwise get the same one from the kernel."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (see `free_port`)."""
    return [free_port() for _ in range(count)]


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = POLL,
    error: type[Exception] = AssertionError,
) -> T:
    """Poll `predicate` until it returns something truthy, and return that; raise `error`
    naming `what` at the deadline. Whatever `predicate` raises goes through."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- processes, each the leader of its own group -------------------------------------------


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def spawn(
    argv: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `argv` in a new session (its own process group), stdin from /dev/null, stdout
    and stderr appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the group, SIGKILL it after `grace` s; then SIGKILL whatever is left in the
    group (the node's codec worker processes, should the node have died without them)."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10)
    signal_group(proc.pid, signal.SIGKILL)


class Processes:
    """Every long-running child, each the leader of its own process group; `stop_all` is
    what a `finally` calls."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def start(
        self, argv: list[str], log: Path, cwd: Path | None = None, env: dict | None = None
    ) -> subprocess.Popen:
        proc = spawn(argv, log, cwd, env)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 15.0) -> None:
        """`stop_group`, and forget it."""
        stop_group(proc, grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc, grace=5.0)
            except Exception as exc:  # keep going: the others must still be stopped
                print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log, indented."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"    {line}" for line in text[-lines:])


# --- Orthanc -------------------------------------------------------------------------------

# The local REST API must not go through an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(
    port: int, path: str, timeout: float = 5.0, auth: tuple[str, str] | None = None
) -> bytes:
    """GET http://127.0.0.1:PORT/PATH (with basic `auth`: user, password); OSError
    (ConnectionError included) when it fails."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth is not None:
        pair = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with _HTTP.open(request, timeout=timeout) as response:
            return response.read()
    except http.client.HTTPException as exc:  # e.g. the server died in mid-answer
        raise ConnectionError(f"http://127.0.0.1:{port}{path}: {exc!r}") from exc


class Orthanc:
    """Orthanc (the Debian package) with its own storage below `root`, on the given ports;
    `extra` is merged into its JSON config (plugins, IngestTranscoding, ...). `start` may be
    called again after `stop`: same ports, same storage. `procs`, when given, is where the
    process is registered (a benchmark's `Processes`, stopped in its `finally`)."""

    error: type[Exception] = AssertionError  # what `start` raises
    stop_grace = 30.0  # seconds between SIGTERM and SIGKILL

    def __init__(
        self,
        root: Path,
        dicom_port: int,
        http_port: int,
        *,
        log: Path | None = None,
        name: str = "test",
        extra: dict[str, Any] | None = None,
        procs: Processes | None = None,
    ):
        self.root = root
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.log = log or root / "orthanc.log"
        self.procs = procs or Processes()
        self.process: subprocess.Popen | None = None
        storage = str(root / "storage")
        self.settings: dict[str, Any] = {
            "Name": name, "StorageDirectory": storage, "IndexDirectory": storage,
            "DicomAet": ORTHANC_AET, "DicomPort": dicom_port, "HttpPort": http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "Plugins": [],
        }  # fmt: skip
        self.settings.update(extra or {})
        users = self.settings.get("RegisteredUsers") or {}
        # the REST API's credentials when authentication is on: the first registered user's
        self.auth = next(iter(users.items())) if self.settings["AuthenticationEnabled"] else None
        self.storage = Path(self.settings["StorageDirectory"])
        self.config = root / "orthanc.json"

    def declare_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        """Add a DICOM modality to its `DicomModalities` (before `start`): Orthanc opens
        associations to it, e.g. to send the Storage Commitment report of what it asked for."""
        self.settings.setdefault("DicomModalities", {})[name] = [ae_title, host, port]

    def start(self) -> float:
        """Start Orthanc and wait until its REST API answers; the time (monotonic) it did."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(self.settings, indent=2))
        self.process = self.procs.start([ORTHANC, str(self.config)], self.log, cwd=self.root)

        def ready() -> float | None:
            if not self.alive():
                assert self.process is not None
                raise self.error(
                    f"Orthanc exited with status {self.process.returncode}:\n{tail(self.log)}"
                )
            try:
                self.get("/system", timeout=2)
            except OSError:
                return None
            return time.monotonic()

        return wait_for(ready, START_TIMEOUT, "Orthanc", error=self.error)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            self.procs.stop(self.process, grace=self.stop_grace)
            self.process = None

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        return http_get(self.http_port, path, timeout, self.auth)

    def count(self) -> int:
        """Instances stored (/statistics); OSError when Orthanc does not answer."""
        return int(json.loads(self.get("/statistics"))["CountInstances"])


# --- HAProxy -------------------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_CFG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY_SERVERS = 3  # server lines in deploy/haproxy/haproxy.cfg (node1..node3)


class HAProxy:
    """HAProxy (the Debian package) running deploy/haproxy/haproxy.cfg as shipped, its
    addresses from the environment: the frontend on `port`, the nodes at (DICOM port, HTTP
    port) on 127.0.0.1. Fewer nodes than the file's servers: the others point at a port
    nothing listens on, and stay DOWN."""

    error: type[Exception] = AssertionError

    def __init__(
        self, root: Path, port: int, nodes: list[tuple[int, int]], procs: Processes | None = None
    ):
        if not 1 <= len(nodes) <= HAPROXY_SERVERS:
            raise ValueError(f"1 to {HAPROXY_SERVERS} nodes, not {len(nodes)}")
        self.root, self.port, self.nodes = root, port, nodes
        self.procs = procs or Processes()
        self.socket = root / "haproxy.sock"
        self.log = root / "haproxy.log"
        self.process: subprocess.Popen | None = None
        dead = free_port()  # for the servers this run has no node for
        self.env = {**os.environ, "DICOM_BIND": f"127.0.0.1:{port}",
                    "STATS_SOCKET": str(self.socket)}  # fmt: skip
        for i in range(HAPROXY_SERVERS):
            dicom, http = nodes[i] if i < len(nodes) else (dead, dead)
            self.env[f"NODE{i + 1}"] = f"127.0.0.1:{dicom}"
            self.env[f"NODE{i + 1}_HTTP"] = str(http)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it and wait until every node it has is UP."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = self.procs.start([HAPROXY, "-db", "-f", str(HAPROXY_CFG)], self.log,
                                        cwd=self.root, env=self.env)  # fmt: skip
        for i in range(len(self.nodes)):
            self.wait_status(f"node{i + 1}", "UP", timeout)

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` on the admin socket: the backend's servers, by name."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r.get("pxname") == "nodes"}

    def status(self, server: str) -> str:
        """UP, DOWN, ... (a server going down or up shows e.g. 'UP 1/2')."""
        try:
            return self.stats()[server]["status"]
        except (OSError, KeyError, IndexError):
            return ""

    def wait_status(self, server: str, status: str, timeout: float = START_TIMEOUT) -> None:
        def reached() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise self.error(f"haproxy exited with {self.process.returncode}:\n"
                                 f"{tail(self.log)}")  # fmt: skip
            return self.status(server) == status

        wait_for(reached, timeout, f"haproxy to see {server} {status}", error=self.error)

    def sessions(self, server: str) -> int:
        """Connections in progress to `server` (scur)."""
        return int(self.stats()[server]["scur"] or 0)

    def stop(self) -> None:
        if self.process is not None:
            self.procs.stop(self.process, grace=5.0)
            self.process = None
