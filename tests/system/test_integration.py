"""End to end over real sockets: DCMTK storescu -> the node (a subprocess) -> archive folder or
DCMTK storescp; outputs decoded again by independent decoders (DCMTK, GDCM)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.pixels import pixel_array

from tests.conftest import (
    data_file,
    echo,
    expected_pixels,
    free_port,
    require,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.integration


def raw(path_or_ds) -> np.ndarray:
    ds = dcmread(path_or_ds) if isinstance(path_or_ds, Path) else path_or_ds
    return pixel_array(ds, raw=True)


def folder_rule(called: str, transcode: str) -> str:
    return f"""
  - name: {called.lower()}
    match: {{CalledAET: {called}}}
    transcode: {transcode}
    send_to: [{called.lower()}]"""


def folder_dest(called: str) -> str:
    return f"""
  {called.lower()}: {{type: folder, path: ./out/{called}, layout: "{{SOPInstanceUID}}.dcm"}}"""


def config_by_called_aet(targets: dict[str, str]) -> str:
    """One rule and one folder per called AE title, so one node tries many targets."""
    return (
        "node: {host: 127.0.0.1, port: {port}, spool: ./spool, workers: 2}\n"
        "destinations:" + "".join(folder_dest(c) for c in targets) + "\n"
        "rules:" + "".join(folder_rule(c, t) for c, t in targets.items()) + "\n"
    )


# The encapsulated Pixel Data sizes of pydicom's encoding guides, here produced over the network.
REFERENCE = {
    "CT_small.dcm": {
        "CT-JLS": ("{syntax: JPEGLSLossless}", 14180),
        "CT-JLS-NEAR3": ("{syntax: JPEGLSNearLossless, jls_error: 3}", 8508),
        "CT-J2K": ("{syntax: JPEG2000Lossless}", 13656),
        "CT-J2K-CR20": ("{syntax: JPEG2000, j2k_cr: [20]}", 1582),
    },
    "US1_UNCR.dcm": {
        "US-JLS": ("{syntax: JPEGLSLossless}", 261792),
        "US-JLS-NEAR2": ("{syntax: JPEGLSNearLossless, jls_error: 2}", 149188),
        "US-J2K": ("{syntax: JPEG2000Lossless, mct: false}", 334412),
        "US-J2K-MCT": ("{syntax: JPEG2000Lossless, mct: true}", 152342),
        "US-J2K-CR20": ("{syntax: JPEG2000, j2k_cr: [20], mct: false}", 46100),
        "US-J2K-ICT": ("{syntax: JPEG2000, j2k_cr: [20], mct: true}", 46076),
    },
}


def test_reference_sizes_come_out_of_the_node_over_the_network(node_factory):
    targets = {c: t for rules in REFERENCE.values() for c, (t, _) in rules.items()}
    node = node_factory(config_by_called_aet(targets))
    for name, rules in REFERENCE.items():
        for called in rules:
            storescu(node.port, [data_file(name)], called=called)
    node.wait_archived(len(targets))
    node.wait_spool_empty()
    for name, rules in REFERENCE.items():
        original = dcmread(data_file(name))
        for called, (_, size) in rules.items():
            (out,) = (node.root / "out" / called).glob("*.dcm")
            ds = dcmread(out)
            assert len(ds.PixelData) == size, called
            lossy = "CR20" in called or "NEAR" in called or "ICT" in called
            assert (ds.SOPInstanceUID != original.SOPInstanceUID) == lossy, called
            assert ds.get("LossyImageCompression") == ("01" if lossy else None), called


# Real files covering the inputs a modality sends: signed, big endian, deflated, multi-frame,
# colour (RGB, YBR_FULL, palette), 1-bit, compressed inputs (RLE, JPEG-LS, JPEG lossless,
# JPEG baseline), MONOCHROME1 CR.
INPUTS = [
    "CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "US1_UNCR.dcm",
    "SC_rgb_16bit_2frame.dcm", "SC_ybr_full_uncompressed.dcm", "OBXXXX1A_rle_2frame.dcm",
    "gdcm-US-ALOKA-16.dcm", "emri_small_jpeg_ls_lossless.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "liver.dcm", "RG3_UNCR.dcm", "mlut_18.dcm",
]  # fmt: skip

TARGETS = {
    "JLS": "{syntax: JPEGLSLossless, fallback: [JPEG2000Lossless, RLELossless]}",
    "J2K": "{syntax: JPEG2000Lossless, mct: true}",
    "RLE": "{syntax: RLELossless}",
}

# An independent decoder for each output syntax. DCMTK writes a decompressed DICOM file; GDCM's
# gdcmraw writes the decoded pixel bytes (gdcmconv refuses to re-write some real inputs, e.g.
# multi-frame Secondary Capture, for IOD reasons unrelated to the codec).
INDEPENDENT = {
    uid.JPEGLSLossless: ["dcmdjpls"],
    uid.RLELossless: ["dcmdrle"],
    uid.JPEG2000Lossless: ["gdcmraw", "-P", "-i"],
}


def independent_decode(path: Path, tmp: Path, like: np.ndarray) -> np.ndarray:
    """Decode `path` with DCMTK or GDCM; the pixels as an array shaped like `like`."""
    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    cmd = INDEPENDENT[syntax]
    require(cmd[0])
    out = tmp / f"{path.stem}.{cmd[0]}.out"
    args = [*cmd, str(path), "-o", str(out)] if cmd[0] == "gdcmraw" else [*cmd, str(path), str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{cmd[0]} could not decode {path}: {done.stderr}"
    if cmd[0] == "gdcmraw":
        return np.frombuffer(out.read_bytes(), like.dtype.newbyteorder("<")).reshape(like.shape)
    return raw(out)


def test_archive_matches_the_originals_pixel_for_pixel_and_decodes_independently(
    node_factory, tmp_path
):
    node = node_factory(config_by_called_aet(TARGETS))
    files = [data_file(n) for n in INPUTS]
    for called in TARGETS:
        storescu(node.port, files, called=called)
    node.wait_archived(len(files) * len(TARGETS), timeout=300)
    node.wait_spool_empty()

    originals = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    outcomes: dict[tuple[str, str], str] = {}
    for called in TARGETS:
        for out in sorted((node.root / "out" / called).glob("*.dcm")):
            ds = dcmread(out)
            source = originals[ds.SOPInstanceUID]  # lossless: the UID is kept
            syntax = ds.file_meta.TransferSyntaxUID
            outcomes[(called, source.name)] = syntax.keyword
            original = dcmread(source)
            expected = expected_pixels(original)
            np.testing.assert_array_equal(raw(ds), expected, err_msg=f"{called} {source.name}")
            for keyword in ("PatientID", "StudyInstanceUID", "Rows", "Columns", "BitsStored",
                            "PixelRepresentation", "NumberOfFrames"):  # fmt: skip
                assert ds.get(keyword) == original.get(keyword), (called, source.name, keyword)
            if syntax in INDEPENDENT and syntax != original.file_meta.TransferSyntaxUID:
                np.testing.assert_array_equal(
                    independent_decode(out, tmp_path, expected),
                    expected,
                    err_msg=f"independent {called} {source.name}",
                )
    assert len(outcomes) == len(files) * len(TARGETS)
    # What each kind of image became, where it matters:
    assert outcomes[("JLS", "CT_small.dcm")] == "JPEGLSLossless"
    assert outcomes[("JLS", "MR_small_bigendian.dcm")] == "JPEGLSLossless"
    assert outcomes[("JLS", "SC_rgb_16bit_2frame.dcm")] == "JPEGLSLossless"
    assert outcomes[("J2K", "US1_UNCR.dcm")] == "JPEG2000Lossless"
    assert outcomes[("RLE", "OBXXXX1A_rle_2frame.dcm")] == "RLELossless"  # already RLE: kept
    assert outcomes[("JLS", "liver.dcm")] == "ExplicitVRLittleEndian"  # 1-bit: as received
    assert outcomes[("JLS", "SC_rgb_jpeg_dcmtk.dcm")] == "JPEGLSLossless"
    assert "passed-through" in node.log_text() and "Bits Allocated 1" in node.log_text()


def test_a_compressed_sender_is_not_asked_to_decompress(node_factory):
    """storescu offers JPEG-LS and uncompressed syntaxes in one context (+C): the node must
    pick JPEG-LS, so the archive holds the sender's own bytes."""
    node = node_factory(config_by_called_aet({"KEEP": "{syntax: keep}"}))
    source = data_file("emri_small_jpeg_ls_lossless.dcm")
    storescu(node.port, [source], called="KEEP", extra=("+C",))
    (out,) = node.wait_archived(1)
    assert dcmread(out).file_meta.TransferSyntaxUID == uid.JPEGLSLossless
    assert dcmread(out).PixelData == dcmread(source).PixelData


def test_retired_ultrasound_sop_class_is_accepted(node_factory, tmp_path):
    ds = dcmread(data_file("US1_UNCR.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6"
    old = tmp_path / "old-us.dcm"
    ds.save_as(old)
    node = node_factory(config_by_called_aet({"OLD": "{syntax: JPEGLSLossless}"}))
    storescu(node.port, [old], called="OLD")
    (out,) = node.wait_archived(1)
    assert dcmread(out).SOPClassUID == "1.2.840.10008.5.1.4.1.1.6"


def test_echo_and_calling_aet_globs(node_factory):
    node = node_factory(
        "node: {host: 127.0.0.1, port: {port}, spool: ./spool}\n"
        'accept: {calling_aets: ["CT?", "MR*"], echo_any_aet: false}\n'
        "destinations: {archive: {type: folder, path: ./archive}}\n"
        "rules: [{name: all, send_to: [archive]}]\n"
    )
    assert echo(node.port, calling="CT1")
    assert echo(node.port, calling="MR_SCANNER_7")
    assert not echo(node.port, calling="CT12")
    assert not echo(node.port, calling="WORKSTATION")
    assert "rejected association from WORKSTATION" in node.log_text()


def test_an_instance_no_rule_matches_is_quarantined_with_a_reason(node_factory):
    node = node_factory(
        "node: {host: 127.0.0.1, port: {port}, spool: ./spool}\n"
        "destinations: {archive: {type: folder, path: ./archive}}\n"
        "rules: [{name: mr-only, match: {Modality: MR}, send_to: [archive]}]\n"
    )
    storescu(node.port, [data_file("CT_small.dcm")])
    quarantine = node.spool / "quarantine"
    reason = wait_for(lambda: list(quarantine.glob("*.reason.txt")), 60, "a quarantine reason")
    assert "no rule matched (Modality=CT" in reason[0].read_text()
    (kept,) = quarantine.glob("*.dcm")
    assert dcmread(kept).SOPInstanceUID == dcmread(data_file("CT_small.dcm")).SOPInstanceUID
    assert node.archived() == []


def test_forwarding_to_a_dicom_peer_and_a_folder(node_factory, tmp_path):
    require("storescp")
    pacs_port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "+xa", "-od", str(received), str(pacs_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    try:
        wait_for(lambda: echo(pacs_port, called="PACS"), 30, "storescp")
        node = node_factory(
            "node: {host: 127.0.0.1, port: {port}, spool: ./spool}\n"
            "destinations:\n"
            "  archive: {type: folder, path: ./archive}\n"
            f"  pacs: {{type: dicom, host: 127.0.0.1, port: {pacs_port}, ae_title: PACS}}\n"
            "rules:\n"
            "  - {name: ct, transcode: {syntax: JPEGLSLossless}, send_to: [pacs, archive]}\n"
        )
        sources = [data_file("CT_small.dcm"), data_file("MR_small.dcm")]
        storescu(node.port, sources)
        node.wait_archived(2)
        node.wait_spool_empty()
        got = wait_for(lambda: sorted(received.iterdir()) if len(list(received.iterdir())) == 2
                       else None, 30, "2 instances at storescp")  # fmt: skip
        by_uid = {dcmread(s).SOPInstanceUID: s for s in sources}
        for path in got:
            ds = dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == uid.JPEGLSLossless
            np.testing.assert_array_equal(raw(ds), raw(by_uid[ds.SOPInstanceUID]))
    finally:
        os.killpg(pacs.pid, signal.SIGTERM)
        pacs.wait(timeout=10)


def test_the_shipped_default_config_archives_losslessly(node_factory):
    """config/node.yaml as shipped (only the port changed): lossless JPEG-LS to ./archive,
    lossy input kept as received."""
    shipped = (Path(__file__).resolve().parents[2] / "config" / "node.yaml").read_text()
    assert "port: 11112" in shipped and "host: 0.0.0.0" in shipped
    node = node_factory(
        shipped.replace("port: 11112", "port: {port}").replace("0.0.0.0", "127.0.0.1")
    )
    sources = [data_file("CT_small.dcm"), data_file("SC_rgb_jpeg_dcmtk.dcm")]
    storescu(node.port, sources)
    files = node.wait_archived(2)
    assert all(f.is_relative_to(node.archive) for f in files)
    by_uid = {dcmread(f).SOPInstanceUID: dcmread(f) for f in files}
    ct, jpeg = (dcmread(s) for s in sources)
    assert by_uid[ct.SOPInstanceUID].file_meta.TransferSyntaxUID == uid.JPEGLSLossless
    np.testing.assert_array_equal(raw(by_uid[ct.SOPInstanceUID]), raw(ct))
    assert by_uid[jpeg.SOPInstanceUID].PixelData == jpeg.PixelData  # lossy input: as received
