"""One rule, three consumers, three syntaxes, over DICOM: a folder archive (JPEG 2000 lossless),
Orthanc as the teleradiology reader (JPEG-LS near-lossless, lossy), and a DCMTK storescp that
accepts nothing but JPEG-LS lossless (the destination's own default). Each output is checked
pixel by pixel, for its UID and for its lossy attributes; then kill -9 while outputs are half
written loses nothing and duplicates nothing."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.pixels import pixel_array
from pydicom.uid import generate_uid

from tests.conftest import Orthanc, data_file, echo, free_port, require, storescu, wait_for
from tests.system.test_crash import make_series

pytestmark = pytest.mark.integration

SOURCES = ("CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm")  # signed CT, signed MR, RGB US

# storescp's own configuration format (DCMTK's storescp.cfg): JPEG-LS lossless only, and
# uncompressed for C-ECHO alone
ONLY_JPEG_LS = """\
[[TransferSyntaxes]]
[JLS]
TransferSyntax1 = JPEGLSLossless
[Plain]
TransferSyntax1 = LittleEndianImplicit
[[PresentationContexts]]
[OnlyJLS]
PresentationContext1 = VerificationSOPClass\\Plain
PresentationContext2 = CTImageStorage\\JLS
PresentationContext3 = MRImageStorage\\JLS
PresentationContext4 = UltrasoundImageStorage\\JLS
[[Profiles]]
[OnlyJLS]
PresentationContexts = OnlyJLS
"""

RETRY = "retry: {initial_delay: 0.2, max_delay: 1, give_up_after: 1h, max_failures: 2}"


@pytest.fixture
def only_jpeg_ls(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A DCMTK storescp on a free port that accepts JPEG-LS lossless and nothing else."""
    require("storescp")
    port, received = free_port(), tmp_path / "old-pacs"
    received.mkdir()
    cfg = tmp_path / "only-jls.cfg"
    cfg.write_text(ONLY_JPEG_LS)
    scp = subprocess.Popen(
        ["storescp", "-aet", "OLDPACS", "-xf", str(cfg), "OnlyJLS", "-od", str(received),
         str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: echo(port, called="OLDPACS"), 30, "storescp")
        yield port, received
    finally:
        os.killpg(scp.pid, signal.SIGTERM)
        scp.wait(timeout=10)


def three_consumers(orthanc_port: int, scp_port: int) -> str:
    return f"""\
node: {{host: 127.0.0.1, port: {{port}}, spool: ./spool, workers: 2}}
destinations:
  archive: {{type: folder, path: ./archive, layout: "{{SOPInstanceUID}}.dcm"}}
  telerad: {{type: dicom, host: 127.0.0.1, port: {orthanc_port}, ae_title: ORTHANC,
            timeout: 10, {RETRY}}}
  old-pacs: {{type: dicom, host: 127.0.0.1, port: {scp_port}, ae_title: OLDPACS, timeout: 10,
             {RETRY}, transcode: {{syntax: JPEGLSLossless}}}}
rules:
  - name: everything
    transcode: {{syntax: JPEG2000Lossless}}
    send_to:
      - archive
      - {{destination: telerad, transcode: {{syntax: JPEGLSNearLossless, jls_error: 2}}}}
      - old-pacs
"""


def test_each_consumer_gets_its_own_syntax(node_factory, orthanc: Orthanc, only_jpeg_ls):
    scp_port, scp_folder = only_jpeg_ls
    orthanc.start()
    node = node_factory(three_consumers(orthanc.dicom_port, scp_port))
    storescu(node.port, [data_file(n) for n in SOURCES])
    archived = node.wait_archived(len(SOURCES))
    orthanc.wait_count(len(SOURCES))
    at_scp = wait_for(lambda: (f := sorted(scp_folder.iterdir())) and len(f) == 3 and f, 60,
                      "3 instances at storescp")  # fmt: skip
    node.wait_spool_empty()

    sources = {str(s.SOPInstanceUID): s for s in map(dcmread, map(data_file, SOURCES))}

    def lossless(paths_or_datasets, syntax: str) -> None:
        for item in paths_or_datasets:
            ds = dcmread(item) if isinstance(item, Path) else item
            source = sources[str(ds.SOPInstanceUID)]  # the UID is kept
            assert ds.file_meta.TransferSyntaxUID == syntax
            assert ds.get("LossyImageCompression") == source.get("LossyImageCompression")
            np.testing.assert_array_equal(pixel_array(ds, raw=True), pixel_array(source, raw=True))

    lossless(archived, uid.JPEG2000Lossless)
    lossless(at_scp, uid.JPEGLSLossless)

    # lossy: a new UID each, derived from the original and the target (a restart makes the same)
    lossy_uid = {generate_uid(entropy_srcs=[original, "JPEGLSNearLossless jls_error=2"]): source
                 for original, source in sources.items()}  # fmt: skip
    telerad = {str(ds.SOPInstanceUID): ds for ds in orthanc.datasets()}
    assert set(telerad) == set(lossy_uid)
    for new_uid, ds in telerad.items():
        source = lossy_uid[new_uid]
        assert ds.file_meta.TransferSyntaxUID == uid.JPEGLSNearLossless
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == "ISO_14495_1"
        assert ds.ImageType[0] == "DERIVED"
        error = np.abs(pixel_array(ds).astype(int) - pixel_array(source).astype(int)).max()
        assert 0 < error <= 2


CRASH_CONFIG = """\
node: {host: 127.0.0.1, port: {port}, spool: ./spool, workers: 2}
destinations:
  archive: {type: folder, path: ./archive, layout: "{SOPInstanceUID}.dcm"}
  telerad: {type: folder, path: ./telerad, layout: "{SOPInstanceUID}.dcm"}
  viewer: {type: folder, path: ./viewer, layout: "{SOPInstanceUID}.dcm"}
rules:
  - name: mr
    transcode: {syntax: JPEG2000Lossless}
    send_to:
      - archive
      - {destination: telerad, transcode: {syntax: HTJ2K, htj2k_qstep: 0.001}}
      - {destination: viewer, transcode: {syntax: JPEGLSNearLossless, jls_error: 2}}
"""


def second_output_written(spool: Path) -> bool:
    """An instance whose second output is in work/ (its third may not be yet): uncommitted."""
    work = spool / "work"
    return work.is_dir() and any(".0.1." in p.name for p in work.iterdir())


def test_kill_9_between_outputs_loses_nothing_and_duplicates_nothing(node_factory, tmp_path):
    count = 16
    pixels = make_series(tmp_path / "series", count)
    node = node_factory(CRASH_CONFIG)
    storescu(node.port, sorted((tmp_path / "series").glob("*.dcm")))  # every one acked
    wait_for(lambda: second_output_written(node.spool), 120, "a half-written instance",
             interval=0.005)  # fmt: skip
    node.kill9()
    assert len(node.archived()) < 3 * count, "everything was delivered before the kill"

    restarted = node_factory(CRASH_CONFIG, port=node.port)
    restarted.wait_archived(3 * count, timeout=240)
    restarted.wait_spool_empty(timeout=120)

    folders = {name: sorted((restarted.root / name).glob("*.dcm"))
               for name in ("archive", "telerad", "viewer")}  # fmt: skip
    assert {name: len(files) for name, files in folders.items()} == dict.fromkeys(folders, count)
    seen_uids: set[str] = set()
    for name, files in folders.items():
        for path in files:
            ds = dcmread(path)
            uid_ = str(ds.SOPInstanceUID)
            assert path.name == f"{uid_}.dcm"
            assert uid_ not in seen_uids, f"{name}: {uid_} produced twice"
            seen_uids.add(uid_)
            if name == "archive":
                np.testing.assert_array_equal(pixel_array(ds), pixels[uid_])
    assert len(seen_uids) == 3 * count  # no output under two UIDs, none missing
    assert set(pixels) == {str(dcmread(p).SOPInstanceUID) for p in folders["archive"]}
