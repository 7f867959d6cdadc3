"""Kill -9 right after the sender got its acknowledgements: every instance still arrives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000Lossless, generate_uid

from tests.conftest import data_file, storescu

pytestmark = pytest.mark.integration

CONFIG = """
node: {host: 127.0.0.1, port: {port}, spool: ./spool, workers: 2}
destinations:
  archive: {type: folder, path: ./archive, layout: "{SeriesInstanceUID}/{SOPInstanceUID}.dcm"}
rules:
  - {name: mr, transcode: {syntax: JPEG2000Lossless}, send_to: [archive]}
"""


def make_series(folder: Path, count: int) -> dict[str, np.ndarray]:
    """`count` MR slices 1024x1024 12-bit with distinct pixels and fresh UIDs."""
    folder.mkdir()
    template = dcmread(data_file("MR2_UNCR.dcm"))
    base = pixel_array(template).astype(np.uint16)
    series = generate_uid()
    pixels = {}
    for i in range(count):
        arr = ((base.astype(np.uint32) + i * 37) & 0x0FFF).astype(np.uint16)
        template.PixelData = arr.tobytes()
        template.SeriesInstanceUID = series
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.InstanceNumber = i + 1
        template.save_as(folder / f"{i:03d}.dcm")
        pixels[template.SOPInstanceUID] = arr
    return pixels


def test_kill_9_after_the_acks_loses_nothing(node_factory, tmp_path):
    count = 40
    pixels = make_series(tmp_path / "series", count)
    node = node_factory(CONFIG)
    storescu(node.port, sorted((tmp_path / "series").glob("*.dcm")))  # every one acked
    node.kill9()
    delivered_before_kill = len(node.archived())
    acked_in_spool = len(list((node.spool / "incoming").glob("*.dcm")))
    assert delivered_before_kill + acked_in_spool >= count  # all acked work is somewhere durable
    print(f"at kill -9: {delivered_before_kill} delivered, {acked_in_spool} in the spool")

    restarted = node_factory(CONFIG, port=node.port)
    files = restarted.wait_archived(count, timeout=180)
    restarted.wait_spool_empty()
    assert len(files) == count
    assert not [p for p in restarted.archive.rglob("*") if p.name.endswith(".tmp")]
    for path in files:
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
        np.testing.assert_array_equal(pixel_array(ds), pixels[ds.SOPInstanceUID])
    assert "resumed from the spool" in restarted.log_text()
