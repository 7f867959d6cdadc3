"""JPEG XL from a sender: the node accepts the three JPEG XL transfer syntaxes in association
negotiation, and routes what it receives to another syntax with the pixels unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import pixel_array
from pynetdicom import AE

from node.config.targets import TranscodeSpec, parse_target
from node.transcode.step import transcode
from node.vocabulary.syntaxes import JPEGXL, JPEGXLJPEGRecompression, JPEGXLLossless
from tests.conftest import data_file

pytestmark = pytest.mark.integration

CONFIG = """\
node: {host: 127.0.0.1, port: {port}, spool: ./spool, workers: 1}
destinations: {archive: {type: folder, path: ./archive, layout: "{SOPInstanceUID}.dcm"}}
rules: [{name: to-jpeg-ls, transcode: {syntax: JPEGLSLossless}, send_to: [archive]}]
"""


def jpeg_xl_file(tmp: Path, source: str, settings: dict | str) -> Path:
    result = transcode(dcmread(data_file(source)), TranscodeSpec(parse_target(settings)))
    assert result.dataset is not None, result.notes
    path = tmp / f"{source}.jxl.dcm"
    result.dataset.save_as(path, enforce_file_format=True)
    return path


def test_jpeg_xl_input_is_accepted_and_decoded_for_its_rule(node_factory, tmp_path):
    sent = [
        jpeg_xl_file(tmp_path, "MR2_UNCR.dcm", "JPEGXLLossless"),
        jpeg_xl_file(tmp_path, "US1_UNCR.dcm", "JPEGXLLossless"),
        jpeg_xl_file(tmp_path, "SC_rgb_jpeg_dcmtk.dcm", "JPEGXLJPEGRecompression"),
    ]
    node = node_factory(CONFIG)
    ae = AE(ae_title="JXLSCU")
    for path in sent:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", [JPEGXL])  # MR, lossy JPEG XL
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM-NODE")
    assert assoc.is_established
    try:
        accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        assert {JPEGXLLossless, JPEGXLJPEGRecompression, JPEGXL} <= accepted
        for path in sent:
            assert assoc.send_c_store(path).Status == 0, path.name
    finally:
        assoc.release()
    outputs = {dcmread(p).SOPInstanceUID: p for p in node.wait_archived(len(sent))}
    for path in sent:
        received = dcmread(path)
        out = dcmread(outputs[received.SOPInstanceUID])
        assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80", path.name
        assert np.array_equal(pixel_array(out), pixel_array(received)), path.name
