"""One instance, several outputs (process_entry): one decode, one encode+verify per distinct target,
one file per output, each destination told which; lossless keeps the UID, each lossy output gets
its own, the same on every run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.pixels import pixel_array

from node.config import parse_config
from node.spool import SpoolEntry
from node.transcode import process, step
from tests.conftest import data_file

CONFIG = """\
node: {spool: ./spool}
destinations:
  archive: {type: folder, path: ./archive, layout: "{SOPInstanceUID}.dcm"}
  telerad: {type: folder, path: ./telerad, layout: "{SOPInstanceUID}.dcm"}
  viewer: {type: folder, path: ./viewer, layout: "{SOPInstanceUID}.dcm"}
  old-pacs: {type: dicom, host: 127.0.0.1, port: 104, ae_title: OLD,
             transcode: {syntax: JPEGLSNearLossless, jls_error: 2}}
  mirror: {type: folder, path: ./mirror, layout: "{SOPInstanceUID}.dcm"}
rules:
  - name: r
    transcode: {syntax: JPEG2000Lossless}
    send_to:
      - archive
      - {destination: telerad, transcode: {syntax: HTJ2K, htj2k_qstep: 0.004}}
      - old-pacs
      - {destination: viewer, transcode: {syntax: keep}}
      - mirror
"""


@pytest.fixture
def spooled(tmp_path: Path) -> SpoolEntry:
    path = tmp_path / "incoming.dcm"
    shutil.copy(data_file("MR2_UNCR.dcm"), path)
    return SpoolEntry(path)


def run(entry: SpoolEntry, tmp_path: Path, **kwargs) -> process.ProcessOutcome:
    config = parse_config(CONFIG, "node.yaml", tmp_path)
    return process.process_entry(entry, config, tmp_path / "work.0.dcm", **kwargs)


def test_each_destination_gets_its_output_from_one_decode(spooled, tmp_path, monkeypatch):
    decodes = []
    real = step.decoded_frames
    monkeypatch.setattr(step, "decoded_frames", lambda *a: decodes.append(1) or real(*a))
    outcome = run(spooled, tmp_path)

    assert len(decodes) == 1  # three targets encoded and verified, one decode
    by_destination = {d.destination: outcome.outputs[d.output] for d in outcome.deliveries}
    assert [d.destination for d in outcome.deliveries] == [
        "archive", "telerad", "old-pacs", "viewer", "mirror",
    ]  # fmt: skip
    assert by_destination["archive"] is by_destination["mirror"]  # one output, shared
    assert by_destination["viewer"].path == spooled.path  # keep: the received file itself
    assert by_destination["viewer"].outcome == "kept"
    assert len(outcome.outputs) == 4
    assert len({o.path for o in outcome.outputs}) == 4

    source = dcmread(spooled.path)
    expected = pixel_array(source)
    read = {name: dcmread(o.path) for name, o in by_destination.items()}
    assert {name: str(ds.file_meta.TransferSyntaxUID) for name, ds in read.items()} == {
        "archive": uid.JPEG2000Lossless, "telerad": uid.HTJ2K,
        "old-pacs": uid.JPEGLSNearLossless, "viewer": uid.ExplicitVRLittleEndian,
        "mirror": uid.JPEG2000Lossless,
    }  # fmt: skip
    np.testing.assert_array_equal(pixel_array(read["archive"]), expected)
    near = np.abs(pixel_array(read["old-pacs"]).astype(int) - expected.astype(int)).max()
    assert 0 < near <= 2
    telerad_error = pixel_array(read["telerad"]).astype(float) - expected
    peak = 2 ** int(source.BitsStored) - 1  # lossy, unbounded: PSNR over the stored range
    assert 40 < 10 * np.log10(peak**2 / np.mean(telerad_error**2)) < 100

    uids = {name: str(ds.SOPInstanceUID) for name, ds in read.items()}
    assert uids["archive"] == uids["viewer"] == str(source.SOPInstanceUID)
    assert len({uids["telerad"], uids["old-pacs"], uids["archive"]}) == 3  # lossy: one each
    for name in ("telerad", "old-pacs"):
        assert read[name].LossyImageCompression == "01"
        assert read[name].ImageType[0] == "DERIVED"
    assert read["telerad"].LossyImageCompressionMethod == "ISO_15444_15"
    assert read["old-pacs"].LossyImageCompressionMethod == "ISO_14495_1"

    # a folder destination is told where its own output goes: under that output's UID
    assert dict((d.destination, d.relpath) for d in outcome.deliveries)["telerad"] == (
        f"{uids['telerad']}.dcm"
    )

    (tmp_path / "again").mkdir()  # processed again (after a crash): the same UIDs
    again = run(spooled, tmp_path / "again")
    assert {d.destination: str(dcmread(again.outputs[d.output].path).SOPInstanceUID)
            for d in again.deliveries} == uids  # fmt: skip


def test_one_output_per_destination_in_the_log_line(spooled, tmp_path):
    outcome = run(spooled, tmp_path)
    line = outcome.summary()
    assert "to=archive,mirror JPEG2000Lossless" in line
    assert "to=telerad HTJ2K" in line and "to=old-pacs JPEGLSNearLossless" in line
    assert "to=viewer ExplicitVRLittleEndian" in line and " kept" in line
    fields = outcome.fields()
    assert [o["destinations"] for o in fields["outputs"]] == [
        ["archive", "mirror"], ["telerad"], ["old-pacs"], ["viewer"],
    ]  # fmt: skip
    assert fields["outcome"] == "mixed"


def test_after_a_worker_crash_every_destination_gets_the_received_file(spooled, tmp_path):
    outcome = run(spooled, tmp_path, as_received=True)
    assert [o.path for o in outcome.outputs] == [spooled.path]
    assert {d.output for d in outcome.deliveries} == {0}


def test_a_large_instance_is_decoded_again_for_each_target_not_kept(
    spooled, tmp_path, monkeypatch
):
    monkeypatch.setattr(step, "KEEP_DECODED", 1024)  # below this image's decoded size
    decodes = []
    real = step.decoded_frames
    monkeypatch.setattr(step, "decoded_frames", lambda *a: decodes.append(1) or real(*a))
    outcome = run(spooled, tmp_path)
    assert len(decodes) == 3  # one per encoded target, frame by frame
    assert len(outcome.outputs) == 4
