"""Three nodes behind a real HAProxy (deploy/haproxy/haproxy.cfg as shipped), Orthanc as the
archive, DCMTK storescu as the modalities: a node killed with -9 mid-stream loses nothing that
it acknowledged, and a node drained mid-stream keeps the association it has and gets no new one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.conftest import REPO, Orthanc, data_file, free_port, require, wait_for
from tests.harness import HAProxy, http_get

pytestmark = pytest.mark.integration

RETRY = "retry: {initial_delay: 0.2, max_delay: 1, give_up_after: 1h, max_failures: 5}"


def node_config(name: str, http_port: int, orthanc_port: int) -> str:
    return f"""\
node: {{name: {name}, host: 127.0.0.1, port: {{port}}, spool: ./spool, workers: 1}}
http: {{host: 127.0.0.1, port: {http_port}}}
destinations:
  pacs: {{type: dicom, host: 127.0.0.1, port: {orthanc_port}, ae_title: ORTHANC, timeout: 10,
         {RETRY}}}
rules: [{{name: all, send_to: [pacs]}}]
"""


def study(folder: Path, count: int) -> dict[str, Path]:
    """`count` CT slices (512x512, 0.5 MB each) with fresh UIDs: SOP Instance UID -> file."""
    folder.mkdir(parents=True)
    template = dcmread(data_file("693_UNCR.dcm"))
    template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
    made = {}
    for i in range(count):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.InstanceNumber = i + 1
        path = folder / f"{i:03d}.dcm"
        template.save_as(path)
        made[str(template.SOPInstanceUID)] = path
    return made


def sender(port: int, calling: str, files: list[Path], log: Path) -> subprocess.Popen:
    """A modality: one association for all its files, through the balancer."""
    return subprocess.Popen(
        ["storescu", "-aet", calling, "-aec", "DICOM-NODE", "127.0.0.1", str(port),
         *map(str, files)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "node.ops.cli", *args], capture_output=True,
                          text=True, timeout=30, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def queue_pending(node) -> int:
    """What `dicom-node queue` shows pending for the node's destinations."""
    lines = cli("queue", "-c", str(node.config)).stdout.splitlines()[1:]
    return sum(int(line.split()[1]) for line in lines)


def serving(balancer: HAProxy) -> int | None:
    """The number of a node that has a connection from the balancer now, or None."""
    return next((i + 1 for i in range(3) if balancer.sessions(f"node{i + 1}")), None)


@pytest.fixture
def cluster(node_factory, orthanc: Orthanc, tmp_path: Path):
    """Orthanc, three nodes forwarding to it, HAProxy in front of them."""
    require("haproxy")
    require("storescu")
    orthanc.start()
    nodes, configs = [], []
    for i in range(3):
        http = free_port()
        config = node_config(f"n{i + 1}", http, orthanc.dicom_port)
        node = node_factory(config, name=f"n{i + 1}")
        node.http_port = http
        nodes.append(node)
        configs.append(config)
    balancer = HAProxy(tmp_path / "haproxy", free_port(), [(n.port, n.http_port) for n in nodes])
    balancer.start()
    yield balancer, nodes, configs
    balancer.stop()


def test_kill_9_of_one_node_mid_stream_loses_nothing_acknowledged(
    cluster, node_factory, orthanc: Orthanc, tmp_path: Path
):
    balancer, nodes, configs = cluster
    studies = [study(tmp_path / f"modality{i}", 100) for i in range(3)]
    logs = [tmp_path / f"modality{i}.log" for i in range(3)]
    senders = [sender(balancer.port, f"MODALITY{i}", list(s.values()), log)
               for i, (s, log) in enumerate(zip(studies, logs, strict=True))]  # fmt: skip

    # mid-stream: a node that is receiving an association right now
    def busy_node():
        for i, node in enumerate(nodes):
            received = len(list((node.spool / "incoming").glob("*.dcm")))
            if balancer.sessions(f"node{i + 1}") and (received or orthanc.count() >= 30):
                return i + 1
        return None

    victim = wait_for(busy_node, 120, "a node in the middle of an association", interval=0.02)
    nodes[victim - 1].kill9()
    for i, proc in enumerate(senders):
        proc.wait(timeout=300)
        if proc.returncode != 0:  # its association broke: the modality sends again
            resent = sender(balancer.port, f"MODALITY{i}", list(studies[i].values()), logs[i])
            assert resent.wait(timeout=300) == 0, logs[i].read_text()[-2000:]
    assert any(proc.returncode for proc in senders), "no association was cut by the kill"

    # the killed node comes back with its spool: what it acknowledged is delivered too
    back = node_factory(configs[victim - 1], name=f"n{victim}", port=nodes[victim - 1].port)
    everything = {uid for s in studies for uid in s}
    wait_for(lambda: orthanc.count() >= len(everything), 240, "every instance in Orthanc")
    assert {str(ds.SOPInstanceUID) for ds in orthanc.datasets()} == everything
    for node in [*nodes[: victim - 1], back, *nodes[victim:]]:
        node.wait_spool_empty(timeout=120)
        assert queue_pending(node) == 0


def test_a_drained_node_keeps_its_association_and_gets_no_new_one(cluster, orthanc, tmp_path):
    """A modality keeps one association open across the drain (pynetdicom, so that the test
    decides when it sends): it goes on being served; new associations go to the others."""
    balancer, nodes, _ = cluster
    first = list(study(tmp_path / "first", 40).items())
    ae = AE(ae_title="FIRST")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", balancer.port, ae_title="DICOM-NODE")
    assert assoc.is_established
    try:
        for _, path in first[:20]:
            assert assoc.send_c_store(path).Status == 0
        busy = wait_for(lambda: serving(balancer), 30, "the association on a node")
        drained = nodes[busy - 1]
        assert "drains" in cli("drain", "-c", str(drained.config)).stdout
        with pytest.raises(OSError) as answer:  # 503 at once
            http_get(drained.http_port, "/healthz")
        assert "503" in str(answer.value)
        balancer.wait_status(f"node{busy}", "DOWN", 30)

        later = [study(tmp_path / f"later{i}", 20) for i in range(2)]
        for i, s in enumerate(later):
            proc = sender(balancer.port, f"LATER{i}", list(s.values()), tmp_path / f"l{i}.log")
            assert proc.wait(timeout=120) == 0
        for _, path in first[20:]:  # the drained node still serves the association it has
            assert assoc.send_c_store(path).Status == 0
    finally:
        assoc.release()

    everything = {uid for uid, _ in first} | {uid for s in later for uid in s}
    wait_for(lambda: orthanc.count() >= len(everything), 240, "every instance in Orthanc")
    assert {str(ds.SOPInstanceUID) for ds in orthanc.datasets()} == everything
    text = drained.log_text()
    assert "draining: /healthz answers 503 draining" in text
    assert text.count("from=FIRST") == 40
    assert "from=LATER" not in text  # no new association reached the drained node
    assert f" n{busy} INFO " in text  # its log lines carry its name
