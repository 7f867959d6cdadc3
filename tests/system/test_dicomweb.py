"""DICOMweb destinations against a real DICOMweb server: Orthanc (Debian package) with its
DICOMweb plugin (orthanc-dicomweb) and HTTP basic authentication on. STOW-RS in batches; one
instance the archive refuses fails alone; a wrong password ends in the dead letters with the
reason; an archive outage across a kill -9 of the node loses nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.pixels import pixel_array
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.conftest import Orthanc, data_file, free_port, require, storescu, wait_for

pytestmark = pytest.mark.integration

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "node", "s3cret-Pa55"
FAST_RETRY = "retry: {initial_delay: 0.2, max_delay: 1, give_up_after: 1h, max_failures: 2}"


@pytest.fixture
def archive(tmp_path: Path):
    """Orthanc serving DICOMweb at /dicom-web/, basic authentication on; not started yet."""
    require("Orthanc")
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} is missing: bin/test installs orthanc-dicomweb")
    server = Orthanc(tmp_path / "orthanc", free_port(), free_port(), extra={
        "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
    })  # fmt: skip
    yield server
    server.stop()


def node_config(tmp_path: Path, http_port: int, password: str = PASSWORD, rule: str = "") -> str:
    secret = tmp_path / "cloud.password"
    secret.write_text(password + "\n")
    return f"""\
node: {{host: 127.0.0.1, port: {{port}}, spool: ./spool, workers: 2}}
destinations:
  cloud:
    type: dicomweb
    url: http://127.0.0.1:{http_port}/dicom-web
    auth: {{username: {USER}, password_file: {secret}}}
    max_batch: 3
    timeout: 10s
    {FAST_RETRY}
rules:
  - {{name: all, transcode: {rule or "{syntax: JPEGLSLossless}"}, send_to: [cloud]}}
"""


def series(folder: Path, count: int, source: str = "CT_small.dcm") -> dict[str, Path]:
    """`count` copies of a real image with fresh UIDs, one study; SOP Instance UID -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    study, made = generate_uid(), {}
    for i in range(count):
        ds = dcmread(data_file(source))
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path)
        made[str(ds.SOPInstanceUID)] = path
    return made


def stored(orthanc: Orthanc) -> dict[str, object]:
    return {str(ds.SOPInstanceUID): ds for ds in orthanc.datasets()}


def test_stow_rs_delivers_batches_with_basic_auth(node_factory, archive, tmp_path):
    archive.start()
    sent = series(tmp_path / "in", 7)
    node = node_factory(node_config(tmp_path, archive.http_port))
    storescu(node.port, list(sent.values()))
    archive.wait_count(7)
    node.wait_spool_empty()
    got = stored(archive)
    assert set(got) == set(sent)
    for sop, path in sent.items():
        ds = got[sop]
        assert ds.file_meta.TransferSyntaxUID == uid.JPEGLSLossless
        np.testing.assert_array_equal(pixel_array(ds), pixel_array(dcmread(path)))
    assert "authentication" not in node.log_text()


def test_an_instance_the_archive_refuses_fails_alone(node_factory, archive, tmp_path):
    """Orthanc refuses an instance without Series Instance UID (a modality's bug): only that
    one is refused, twice (max_failures), then dead-lettered; the rest of its batch is stored.
    The archive is down until all three are queued, so the first request carries all three."""
    sent = series(tmp_path / "in", 3)
    broken_uid, broken = list(sent.items())[1]
    ds = dcmread(broken)
    del ds.SeriesInstanceUID
    ds.save_as(broken)
    node = node_factory(node_config(tmp_path, archive.http_port, rule="{syntax: keep}"))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, [uid.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM-NODE")
    assert assoc.is_established
    try:
        for path in sent.values():  # one association, so one batch at the archive
            assert assoc.send_c_store(path).Status == 0
    finally:
        assoc.release()
    wait_for(lambda: node.log_text().count("rule=all") == 3, 60, "all three queued")
    archive.start()
    archive.wait_count(2)
    reason_files = wait_for(
        lambda: list((node.spool / "dead-letter" / "cloud").glob("*.reason.txt")), 60,
        "the refused instance in the dead letters",
    )  # fmt: skip
    assert len(reason_files) == 1
    reason = reason_files[0].read_text()
    assert "instance refused, Failure Reason C000H" in reason and "refused 2 times" in reason
    kept = reason_files[0].with_name(reason_files[0].name.replace(".reason.txt", ".dcm"))
    assert str(dcmread(kept).SOPInstanceUID) == broken_uid
    assert set(stored(archive)) == set(sent) - {broken_uid}
    node.wait_spool_empty()


def test_a_wrong_password_ends_in_the_dead_letters_with_the_reason(node_factory, archive, tmp_path):
    archive.start()
    sent = series(tmp_path / "in", 2)
    node = node_factory(node_config(tmp_path, archive.http_port, password="not-it"))
    storescu(node.port, list(sent.values()))
    dead = node.spool / "dead-letter" / "cloud"
    reasons = wait_for(lambda: (r := list(dead.glob("*.reason.txt"))) and len(r) == 2 and r,
                       60, "2 dead letters")  # fmt: skip
    for reason in reasons:
        text = reason.read_text()
        assert "HTTP 401" in text and "authentication refused" in text
    assert node.log_text().count("authentication problem (HTTP 401)") == 1
    assert archive.count() == 0
    node.wait_spool_empty()


def test_an_archive_outage_across_a_kill_9_loses_nothing(node_factory, archive, tmp_path):
    sent = series(tmp_path / "in", 5)
    config = node_config(tmp_path, archive.http_port)
    node = node_factory(config)  # the archive is down
    storescu(node.port, list(sent.values()))  # every one acked
    wait_for(lambda: "ConnectError" in node.log_text(), 60, "a failed STOW-RS attempt")
    node.kill9()
    archive.start()
    restarted = node_factory(config, port=node.port)
    archive.wait_count(5)
    restarted.wait_spool_empty()
    assert set(stored(archive)) == set(sent)
    assert not (restarted.spool / "dead-letter").exists() or not any(
        (restarted.spool / "dead-letter").rglob("*.dcm")
    )
    shutil.rmtree(tmp_path / "in")
