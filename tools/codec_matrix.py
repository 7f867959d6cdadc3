"""The codec matrix: what the node does with each real image for each target syntax.

    .venv/bin/python tools/codec_matrix.py          # writes docs/codec-matrix.{md,json}

Every cell comes from node.transcode.step.transcode, the very function the node's workers run;
the columns are those each registered codec declares (node/transcode/codecs).
tests/system/test_codec_matrix.py sends the same images to a running node over DICOM and checks that
what arrives is exactly what this table says (and that it is right: pixels, an independent
decoder, dciodvfy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from node.config.targets import TranscodeSpec, parse_target  # noqa: E402
from node.transcode import codecs  # noqa: E402
from node.transcode.capability import lossy_history, pixel_facts  # noqa: E402
from node.transcode.step import transcode  # noqa: E402
from node.vocabulary.syntaxes import syntax_name  # noqa: E402


def matrix_targets() -> dict[str, dict]:
    """Column label -> the rule's transcode settings (as they would be written in node.yaml):
    keep, then each registered codec's columns, in registry order."""
    columns = (col for c in codecs.REGISTERED for col in c.matrix_columns)
    return {"keep": {"syntax": "keep"}, **{label: dict(value) for label, value in columns}}


TARGETS: dict[str, dict] = matrix_targets()

# pydicom's own test files (and tests/data, made with DCMTK, libjxl's cjxl and pydicom) added to
# every file of pydicom-data: inputs pydicom-data lacks
# (deflated, native YBR_FULL_422, JPEG baseline/extended 12-bit, JPEG-LS near-lossless input,
# odd sizes, padding; JPEG XL input of every kind is in tests/data alone).
PYDICOM_FILES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_padded.dcm", "image_dfl.dcm",
    "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_jpeg_no_color_transform.dcm",
    "JPEG-lossy.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_small_odd.dcm",
    "SC_rgb_small_odd_big_endian.dcm", "examples_ybr_color.dcm", "MR_small_RLE.dcm",
]  # fmt: skip

# Not codec cases: a truncated file (hostile-input material), and a file without File Meta
# Information, which is in the matrix as tests/data/OT-PAL-8-face_part10.dcm.
EXCLUDED = {
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated file (Pixel Data cut short)",
    "OT-PAL-8-face.dcm": "no File Meta Information; in the matrix as OT-PAL-8-face_part10.dcm",
}


def spec(label: str) -> TranscodeSpec:
    return TranscodeSpec(parse_target(dict(TARGETS[label])))


def corpus() -> list[Path]:
    import data_store

    files = sorted((Path(data_store.__file__).parent / "data").glob("*.dcm"))
    files += [Path(get_testdata_file(n, download=False)) for n in PYDICOM_FILES]
    files += sorted((REPO / "tests" / "data").glob("*.dcm"))  # see tests/data/README.md
    return [f for f in files if f.name not in EXCLUDED]


@dataclass(frozen=True)
class Cell:
    file: str
    target: str
    outcome: str  # recompressed | kept | passed-through
    syntax_in: str
    syntax_out: str
    sop_instance_out: str
    ratio: float | None
    max_error: int | None
    notes: list[str]
    lossy_in: str | None  # why the input is lossy already (capability.lossy_history), or None


def compute(path: Path, label: str) -> Cell:
    warnings.filterwarnings("ignore")
    ds = dcmread(path)
    result = transcode(ds, spec(label))
    out = result.dataset if result.dataset is not None else ds
    try:
        history = lossy_history(ds, pixel_facts(ds))
    except ValueError:  # an unusable Image Pixel module: nothing to tell
        history = None
    return Cell(
        file=path.name,
        target=label,
        outcome=result.outcome,
        syntax_in=str(ds.file_meta.TransferSyntaxUID),
        syntax_out=str(out.file_meta.TransferSyntaxUID),
        sop_instance_out=str(out.SOPInstanceUID),
        ratio=round(result.ratio, 2) if result.ratio else None,
        max_error=result.max_error,
        notes=list(result.notes),
        lossy_in=history.why if history else None,
    )


def describe(path: Path) -> str:
    warnings.filterwarnings("ignore")
    ds = dcmread(path)
    try:
        f = pixel_facts(ds)
    except ValueError as exc:
        return f"unusable pixel module: {exc}"
    if f.pixel_keyword is None:
        return f"{ds.get('Modality', '?')}, no pixel data"
    sign = "signed" if f.pixel_representation else "unsigned"
    history = lossy_history(ds, f)
    return (
        f"{ds.get('Modality', '?')} {syntax_name(f.syntax)}, {f.photometric} "
        f"{f.samples}x{f.bits_allocated}/{f.bits_stored} {sign}, {f.rows}x{f.columns}"
        + (f", {f.frames} frames" if f.frames > 1 else "")
        + (f", already lossy ({history.why})" if history else "")
    )


def _short(cell: Cell, footnotes: dict[str, int]) -> str:
    if cell.outcome == "recompressed" and cell.syntax_out != spec(cell.target).target.syntax:
        reasons = "; ".join(n.split(": ", 1)[-1] for n in cell.notes[:-1])  # last: what it did
        return f"EVRLE [{footnotes.setdefault(reasons, len(footnotes) + 1)}]"
    if cell.outcome == "recompressed":
        if cell.max_error is None:
            return f"lossy {cell.ratio}:1"
        exact = "exact" if cell.max_error == 0 else f"err≤{cell.max_error}"
        return f"{exact} {cell.ratio}:1"
    reason = cell.notes[-1] if cell.notes else ""
    if cell.outcome == "kept" and len(cell.notes) <= 1:
        return "as sent" if "keep" in reason else "already"
    reasons = "; ".join(n.split(": ", 1)[-1] for n in cell.notes if "rule says keep" not in n)
    number = footnotes.setdefault(reasons, len(footnotes) + 1)
    return f"as received [{number}]"


def render(cells: list[Cell], descriptions: dict[str, str]) -> str:
    files = list(dict.fromkeys(c.file for c in cells))
    by = {(c.file, c.target): c for c in cells}
    footnotes: dict[str, int] = {}
    lines = [
        "# Codec matrix",
        "",
        "What the node does with each real image (all of `pydicom-data`, some of pydicom's own",
        "test files, and inputs neither has, see `tests/data/README.md`: two JPEG files made",
        "with DCMTK, three JPEG XL files made with libjxl's `cjxl`, a palette image given File",
        "Meta Information) for each target syntax. Generated by `tools/codec_matrix.py` from the",
        "node's own transcoder; `tests/system/test_codec_matrix.py` checks over DICOM that the",
        "node produces exactly these results, compares the pixels with the originals, decodes",
        "each output again with a decoder the node does not use (DCMTK for JPEG, JPEG-LS and",
        "RLE, GDCM for JPEG 2000, OpenJPH for lossless HTJ2K, libjxl's `djxl` for JPEG XL)",
        "and runs `dciodvfy` on it.",
        "",
        "- `exact 2.31:1`: recompressed, verified bit-exact, compression ratio of the pixel data",
        "  (uncompressed size over encoded size). In `JXL-JPEG` the received JPEG codestream,",
        "  repacked and verified to come back byte for byte: no pixel changes, the image stays as",
        "  lossy as its JPEG was.",
        "- `err≤2`: JPEG-LS near-lossless, verified within the allowed error.",
        "- `lossy`: a lossy target (JPEG 2000 irreversible, HTJ2K with a quantisation step, JPEG",
        "  baseline or extended, JPEG XL with a distance): new SOP Instance UID, Lossy Image",
        "  Compression 01, no error bound. For the JPEG and JPEG XL ones the test checks the PSNR",
        "  is within 0.5 dB of what libjpeg-turbo or libjxl give for the same image and setting.",
        "  A lossy output with a sample half of the Bits Stored range or more from the original",
        "  is refused (e.g. `RG3_*` in `JPEG12-q90`: 10-bit pixels of 1023 decode as 1024, which",
        "  Bits Stored would wrap to 0).",
        "- `already`: the image is already in the target syntax and is forwarded untouched.",
        "- `as sent`: the rule says keep.",
        "- `as received [n]`: the target cannot take this image; it is forwarded exactly as",
        "  received, for the reason in note n (each refused target is listed in order).",
        "- `EVRLE [n]`: big endian input the target cannot take (note n) leaves in Explicit VR",
        "  Little Endian all the same: its byte order changed, bit-exact, no codec involved.",
        "- `already lossy (why)` after an image: lossy before it arrived, by its codestream or",
        "  its header; every output keeps Lossy Image Compression 01, and lossy targets need",
        "  `allow_lossy: [already-lossy]`.",
        "",
        "Targets: " + "; ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in TARGETS.items()),
        "",
        "| image | " + " | ".join(TARGETS) + " |",
        "|---|" + "---|" * len(TARGETS),
    ]
    for f in files:
        row = [_short(by[(f, t)], footnotes) for t in TARGETS]
        lines.append(f"| `{f}` {descriptions[f]} | " + " | ".join(row) + " |")
    lines += ["", "## Notes", ""]
    lines += [f"{n}. {text}" for text, n in footnotes.items()]
    lines += ["", "## Not in the matrix", ""]
    lines += [f"- `{name}`: {why}" for name, why in EXCLUDED.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "codec-matrix"),
                        help="path without extension for the .md and .json")  # fmt: skip
    args = parser.parse_args()
    started = time.monotonic()
    files = corpus()
    jobs = [(f, t) for f in files for t in TARGETS]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        cells = list(pool.map(compute, *zip(*jobs, strict=True), chunksize=4))
    descriptions = {f.name: describe(f) for f in files}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps([asdict(c) for c in cells], indent=1) + "\n")
    out.with_suffix(".md").write_text(render(cells, descriptions))
    print(f"{len(files)} images x {len(TARGETS)} targets in {time.monotonic() - started:.0f} s "
          f"-> {out}.md, {out}.json")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
