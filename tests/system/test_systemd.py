"""The systemd unit passes `systemd-analyze verify`, and the node speaks sd_notify: READY=1
once it listens, WATCHDOG=1 while alive, RELOADING=1/READY=1 around a reload, STOPPING=1."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, require

UNIT = REPO / "systemd" / "dicom-node.service"


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_and_its_port_104_drop_in_pass_systemd_analyze_verify(tmp_path):
    require("systemd-analyze")
    unit = tmp_path / "dicom-node.service"  # ExecStart must exist for verify: use this checkout
    unit.write_text(UNIT.read_text().replace("/opt/dicom-node/", f"{REPO}/"))
    dropin = tmp_path / "dicom-node.service.d"
    dropin.mkdir()
    (dropin / "port-104.conf").write_text((REPO / "systemd" / "port-104.conf").read_text())
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "dicom-node.service" not in done.stderr, done.stderr  # no warnings about the unit


def test_the_unit_is_notify_with_watchdog_reload_a_dedicated_user_and_hardening():
    s = unit_settings(UNIT)
    assert s["Type"] == ["notify"] and s["WatchdogSec"] == ["30s"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["User"] == s["Group"] == ["dicom-node"]
    assert s["StateDirectory"] == ["dicom-node"] and s["ConfigurationDirectory"] == ["dicom-node"]
    assert "-c /etc/dicom-node/node.yaml" in s["ExecStart"][0]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                "RestrictSUIDSGID", "LockPersonality"):  # fmt: skip
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"] and s["ReadWritePaths"] == ["/var/lib/dicom-node"]
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    dropin = unit_settings(REPO / "systemd" / "port-104.conf")
    assert dropin["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]


class NotifySocket:
    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []

    def wait_for(self, state: str, timeout: float = 30) -> float:
        """Collect datagrams until one holds `state`; when it arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, message in self.received:
                if state in message.split("\n"):
                    self.received.remove((when, message))
                    return when
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))
        raise AssertionError(f"no {state} within {timeout} s; got {self.received}")


@pytest.mark.integration
def test_the_node_tells_systemd_ready_watchdog_reloading_and_stopping(node_factory, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    config = (
        f"node: {{host: 127.0.0.1, port: {port}, spool: ./spool}}\n"
        "destinations: {archive: {type: folder, path: ./archive}}\n"
        "rules: [{name: r, transcode: {syntax: keep}, send_to: [archive]}]\n"
    )
    node = node_factory(config, port=port, env={
        "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})  # fmt: skip
    notify.wait_for("READY=1")
    socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it was listening
    first = notify.wait_for("WATCHDOG=1")
    assert notify.wait_for("WATCHDOG=1") - first < 1.5  # every half period (0.5 s)

    node.process.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1")
    notify.wait_for("READY=1")
    node.process.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert node.process.wait(timeout=60) == 0


def test_the_readme_install_steps_turn_the_default_config_into_the_service_config(tmp_path):
    """README: sed rewrites the spool and archive paths of config/node.yaml for /etc."""
    from node.config import parse_config

    text = (REPO / "config" / "node.yaml").read_text()
    assert "spool: ./spool" in text and "path: ./archive" in text
    text = text.replace("spool: ./spool", "spool: /var/lib/dicom-node/spool")
    text = text.replace("path: ./archive", "path: /var/lib/dicom-node/archive")
    config = parse_config(text, "/etc/dicom-node/node.yaml", Path("/etc/dicom-node"))
    assert config.node.spool == Path("/var/lib/dicom-node/spool")
    assert config.destinations["archive"].path == Path("/var/lib/dicom-node/archive")
    readme = (REPO / "README.md").read_text()
    assert "-e 's#spool: ./spool#spool: /var/lib/dicom-node/spool#'" in readme
    assert "-e 's#path: ./archive#path: /var/lib/dicom-node/archive#'" in readme
