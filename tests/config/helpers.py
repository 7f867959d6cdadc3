"""Shared helpers of the configuration tests (tests/config/test_*.py).

The tests cover parse_config, load_config and `dicom-node check-config`. Every problem is
asserted as the exact `FILE:LINE: message` text the user sees. In the YAML snippets, `# <- N`
marks the line a problem is expected on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from node.config import ConfigError, Problem, parse_config

REPO = Path(__file__).resolve().parents[2]
SRC = "node.yaml"
SUPPORTED = (
    "supported: keep, ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEGLSNearLossless, "
    "JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, JPEGBaseline8Bit, "
    "JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGXLLossless, JPEGXL, "
    "JPEGXLJPEGRecompression"
)

# The README's configuration example, verbatim.
CONTRACT_EXAMPLE = """\
node:
  ae_title: DICOM-NODE
  host: 0.0.0.0
  port: 11112
  spool: ./spool
  workers: 0
accept:
  calling_aets: ["*"]
destinations:
  archive:
    type: folder
    path: ./archive
    layout: "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
  pacs:
    type: dicom
    host: 127.0.0.1
    port: 4242
    ae_title: PACS
rules:
  - name: mammo-lossless
    match: {Modality: MG}
    transcode: {syntax: JPEGLSLossless}
    send_to: [archive, pacs]
  - name: color-ultrasound
    match: {Modality: US, PhotometricInterpretation: RGB}
    transcode: {syntax: JPEG2000Lossless, mct: true}
    send_to: [pacs]
  - name: ct-from-scanner-1
    match: {Modality: [CT, PT], CallingAET: "CT1*"}
    transcode: {syntax: JPEG2000, j2k_cr: [20, 5]}
    send_to: [pacs]
  - name: everything-else
    transcode: {syntax: keep}
    send_to: [archive]
"""


def parse(text: str, base: Path = Path("/srv/node")):
    return parse_config(dedent(text), SRC, base)


def problems(text: str) -> list[str]:
    """The problems parse_config reports for `text`, as the `FILE:LINE: message` lines."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert all(isinstance(p, Problem) for p in info.value.problems)
    # the exception's own text is the same lines, so callers that print it lose nothing
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.ops.cli", "check-config", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def rule_with_transcode(transcode: str) -> str:
    """A one-rule config whose transcode (a flow mapping) is on line 6."""
    return f"""\
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules:
          - name: r
            send_to: [archive]
            transcode: {transcode}
        """


# Several problems in one file; also what check-config must print for it.
SEVERAL_PROBLEMS = """\
node:
  port: 99999                         # 2
  workers: 2
destinations:
  archive:
    type: folder
    path: ./archive
    layout: "{PatientName}/{Bogus}"   # 8
  pacs:
    type: dicom
    host: pacs
    port: 104
    ae_title: PACS
    colour: blue                      # 14
rules:
  - name: ct
    match: {Modalty: CT}              # 17
    transcode: {syntax: JPEG2000}     # 18
    send_to: [archive, nowhere]       # 19
  - name: ct                          # 20
    send_to: [pacs]
"""
SEVERAL_PROBLEMS_EXPECTED = [
    "2: node.port: expected a whole number from 0 to 65535, got int 99999",
    "8: destinations.archive.layout: '{Bogus}' is not a DICOM keyword",
    "14: destinations.pacs: unknown key 'colour'; "
    "allowed: accept_syntaxes, ae_title, calling_ae_title, commitment_timeout, host, idle_timeout, "
    "max_per_association, port, retry, storage_commitment, timeout, tls, transcode, type",
    "17: rule 'ct'.match: 'Modalty' is not a DICOM keyword (nor CallingAET / CalledAET)",
    "18: rule 'ct'.transcode: JPEG2000 needs exactly one of j2k_cr or j2k_psnr",
    "19: rule 'ct'.send_to: undefined destination 'nowhere' (known: archive, pacs)",
    # reported although the first 'ct' has a bad transcode
    "20: rule name 'ct' is used twice (first at line 16)",
]
