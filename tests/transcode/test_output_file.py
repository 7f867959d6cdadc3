"""The processed instance's file: spliced from the received bytes when only Pixel Data and the
File Meta change, else written by pydicom, and in both cases the same file pydicom would write."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset, write_file_meta_info
from pydicom.pixels import pixel_array

from node.config.targets import Target, TranscodeSpec
from node.receive import received_file
from node.spool import SpoolEntry
from node.transcode import output_file, process
from node.transcode.output_file import write_output
from node.transcode.step import transcode
from tests.conftest import data_file, one_rule_config

LOSSLESS = [uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.RLELossless, uid.HTJ2KLossless,
            uid.HTJ2KLosslessRPCL]  # fmt: skip


def received(tmp_path: Path, name: str, syntax=uid.ExplicitVRLittleEndian) -> Path:
    """`name` as the spool holds it: a Part 10 file in `syntax`, uncompressed."""
    ds = dcmread(data_file(name))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / f"received-{name}"
    ds.save_as(path, enforce_file_format=True)
    return path


def both_ways(
    tmp_path: Path, source: Path, target: Target, in_memory: bool = False
) -> tuple[bool, bytes, bytes, Dataset]:
    """(spliced?, write_output's bytes, dcmwrite's bytes, the output dataset). `in_memory`:
    parsed and spliced from the file's bytes, as the worker does with a small instance."""
    data = source.read_bytes() if in_memory else None
    ds = dcmread(BytesIO(data)) if data else dcmread(source, defer_size=process.LARGE_PIXEL_DATA)
    result = transcode(ds, TranscodeSpec(target))
    assert result.outcome == "recompressed", result.notes
    spliced = write_output(tmp_path / "node.dcm", result.dataset, ds, source, data)
    dcmwrite(tmp_path / "pydicom.dcm", result.dataset, enforce_file_format=True)
    node_bytes = (tmp_path / "node.dcm").read_bytes()
    return spliced, node_bytes, (tmp_path / "pydicom.dcm").read_bytes(), result.dataset


@pytest.mark.parametrize("in_memory", [False, True], ids=["from-file", "from-bytes"])
@pytest.mark.parametrize("syntax", LOSSLESS)
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR2_UNCR.dcm", "emri_small.dcm",
                                  "OBXXXX1A.dcm"])  # fmt: skip
def test_a_lossless_recompression_is_spliced_and_byte_identical_to_pydicom(
    tmp_path, name, syntax, in_memory
):
    source = received(tmp_path, name)
    spliced, node_bytes, pydicom_bytes, _ = both_ways(tmp_path, source, Target(syntax), in_memory)
    assert spliced
    assert node_bytes == pydicom_bytes
    np.testing.assert_array_equal(
        pixel_array(dcmread(tmp_path / "node.dcm"), raw=True),
        pixel_array(dcmread(source), raw=True),
    )


def test_elements_after_pixel_data_are_kept(tmp_path):
    source = received(tmp_path, "CT_small.dcm")
    ds = dcmread(source)
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)  # Data Set Trailing Padding
    ds.save_as(source, enforce_file_format=True)
    spliced, node_bytes, pydicom_bytes, _ = both_ways(tmp_path, source, Target(uid.RLELossless))
    assert spliced and node_bytes == pydicom_bytes
    assert 0xFFFCFFFC in dcmread(tmp_path / "node.dcm")


@pytest.mark.parametrize(
    ("why", "name", "syntax", "target"),
    [
        ("implicit VR input", "CT_small.dcm", uid.ImplicitVRLittleEndian,
         Target(uid.JPEGLSLossless)),
        ("big endian input", "MR_small_bigendian.dcm", None, Target(uid.JPEGLSLossless)),
        ("lossy: new UID, Lossy Image Compression", "CT_small.dcm", uid.ExplicitVRLittleEndian,
         Target(uid.JPEGLSNearLossless, jls_error=2)),
        ("encapsulated input", "emri_small_RLE.dcm", None, Target(uid.JPEGLSLossless)),
    ],
)  # fmt: skip
def test_anything_else_is_written_by_pydicom(tmp_path, why, name, syntax, target):
    source = received(tmp_path, name, syntax) if syntax else data_file(name)
    spliced, node_bytes, pydicom_bytes, _ = both_ways(tmp_path, source, target)
    assert not spliced, why
    assert node_bytes == pydicom_bytes


def test_a_changed_photometric_interpretation_is_not_spliced(tmp_path):
    source = received(tmp_path, "US1_UNCR.dcm")  # RGB into JPEG 2000 with MCT: YBR_RCT
    spliced, node_bytes, pydicom_bytes, out = both_ways(
        tmp_path, source, Target(uid.JPEG2000Lossless, mct=True)
    )
    assert out.PhotometricInterpretation == "YBR_RCT"
    assert not spliced and node_bytes == pydicom_bytes


def test_a_pixel_data_group_length_is_not_spliced(tmp_path):
    """(7FE0,0000) would have to change with Pixel Data's length: pydicom writes the file
    (and, as it always does, leaves group lengths out)."""
    source = received(tmp_path, "CT_small.dcm")
    data = source.read_bytes()
    at = data.rindex(b"\xe0\x7f\x10\x00OW")
    length = int.from_bytes(data[at + 8 : at + 12], "little") + 12
    source.write_bytes(data[:at] + b"\xe0\x7f\x00\x00UL\x04\x00" + length.to_bytes(4, "little")
                       + data[at:])  # fmt: skip
    assert 0x7FE00000 in dcmread(source)
    spliced, node_bytes, pydicom_bytes, _ = both_ways(tmp_path, source, Target(uid.RLELossless))
    assert not spliced and node_bytes == pydicom_bytes


def test_pixel_data_not_where_pydicom_read_it_is_never_guessed(tmp_path, monkeypatch):
    source = received(tmp_path, "CT_small.dcm")
    monkeypatch.setattr(output_file, "_value_offset", lambda elem: 1000)  # a wrong offset
    spliced, node_bytes, pydicom_bytes, _ = both_ways(tmp_path, source, Target(uid.RLELossless))
    assert not spliced and node_bytes == pydicom_bytes


def test_the_worker_splices_a_ct_slice(tmp_path, monkeypatch):
    """process_entry, as a worker runs it, takes the spliced path and its file reads back."""
    source = received(tmp_path, "CT_small.dcm")
    config = one_rule_config(tmp_path, "JPEGLSLossless")
    calls = []
    real = output_file._splice
    monkeypatch.setattr(output_file, "_splice", lambda *a: calls.append(real(*a)) or calls[-1])
    outcome = process.process_entry(SpoolEntry(source), config, tmp_path / "out.dcm")
    assert outcome.outcome == "recompressed", outcome.notes
    assert calls == [True]
    out = dcmread(tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == uid.JPEGLSLossless
    assert out.SOPInstanceUID == dcmread(source).SOPInstanceUID
    np.testing.assert_array_equal(
        pixel_array(out, raw=True), pixel_array(dcmread(source), raw=True)
    )


def spool_file(tmp_path: Path, name: str) -> Path:
    """`name` as c_store writes it into the spool: its File Meta (with the AE titles) in front
    of the dataset's explicit VR little endian bytes."""
    ds = dcmread(data_file(name))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)  # the dataset alone
    meta = received_file.file_meta(ds.SOPClassUID, ds.SOPInstanceUID, uid.ExplicitVRLittleEndian,
                                   ("DICOM-NODE", "CT1", "ROUTE-ME"))  # fmt: skip
    path = tmp_path / f"spool-{name}"
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + body.getvalue())
    return path


def test_the_worker_splices_a_spooled_instance_as_pydicom_would_write_it(tmp_path):
    """A file as the spool holds it (c_store's File Meta): process_entry reads it once, splices,
    and writes the File Meta by hand, byte for byte what dcmwrite writes for the same output."""
    source = spool_file(tmp_path, "CT_small.dcm")
    config = one_rule_config(tmp_path, "HTJ2KLossless")
    outcome = process.process_entry(SpoolEntry(source), config, tmp_path / "out.dcm")
    assert outcome.outcome == "recompressed", outcome.notes
    out = dcmread(tmp_path / "out.dcm")
    assert out.file_meta.SendingApplicationEntityTitle == "CT1"
    dcmwrite(tmp_path / "pydicom.dcm", out, enforce_file_format=True)
    assert (tmp_path / "out.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()


def pydicom_meta(meta: FileMetaDataset) -> bytes:
    written = DicomBytesIO()
    write_file_meta_info(written, meta, enforce_standard=True)
    return written.getvalue()


def meta_with(**values) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.45"
    meta.TransferSyntaxUID = uid.JPEGLSLossless
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "DICOM_NODE_01"
    for keyword, value in values.items():
        if value is None:
            delattr(meta, keyword)
        else:
            setattr(meta, keyword, value)
    return meta


@pytest.mark.parametrize(
    ("values", "by_hand"),
    [
        ({}, True),
        ({"SourceApplicationEntityTitle": "DICOM-NODE", "SendingApplicationEntityTitle": "CT1",
          "ReceivingApplicationEntityTitle": "ROUTE-ME"}, True),
        ({"SendingApplicationEntityTitle": ""}, True),  # present and empty
        ({"MediaStorageSOPInstanceUID": "1.2.3.4"}, True),  # odd length: padded
        ({"FileMetaInformationVersion": b"\x00\x01"}, True),
        ({"ImplementationVersionName": "ODD"}, True),
        ({"SendingApplicationEntityTitle": "ÄRZTEHAUS"}, False),  # not ASCII
        ({"SendingApplicationEntityTitle": "A" * 17}, False),  # longer than an AE title
        ({"ImplementationVersionName": None}, False),  # pydicom adds its own
        ({"ImplementationClassUID": None}, False),
        ({"MediaStorageSOPInstanceUID": "1." * 40}, False),  # longer than a UID
        ({"FileMetaInformationVersion": b"\x00\x02"}, False),
        ({"PrivateInformationCreatorUID": "1.2.3"}, False),
    ],
)  # fmt: skip
def test_the_file_meta_is_written_byte_for_byte_as_pydicom_writes_it(values, by_hand):
    meta = meta_with(**values)
    assert (output_file._meta_values(meta) is not None) == by_hand
    assert output_file.file_meta_bytes(meta) == pydicom_meta(meta_with(**values))


def test_file_meta_pydicom_refuses_is_refused_still():
    with pytest.raises(AttributeError, match="Transfer Syntax UID"):
        output_file.file_meta_bytes(meta_with(TransferSyntaxUID=None))
