"""JPEG XL input files for the codec matrix, which pydicom-data has none of.

    .venv/bin/python tools/make_jxl_inputs.py       # writes tests/data/*_jxl_cjxl.dcm

Each frame of a real image is encoded by libjxl's own command line tools (`cjxl`, Debian's
libjxl-tools 0.7), not by the node nor imagecodecs, and wrapped as encapsulated Pixel Data
with pydicom. Every file keeps its source's attributes and UIDs but gets a new SOP Instance
UID (derived from the source's and the file's name, so a re-run writes the same bytes), so
it never collides with its source in one round of tests/system/test_codec_matrix.py.

- lossless (1.2.840.10008.1.2.4.110): `cjxl -d 0` of each frame written as PNM, or as PNG
  with an sBIT chunk when Bits Stored is neither 8 nor 16: cjxl 0.7 reads a PGM whose maxval
  is 4095 as 16-bit samples and rescales them to 12 bits, losing the low bits (a 12-bit PNG
  carried as 16 bits with sBIT 12 is read right, and coded as 12-bit samples);
- JPEG recompression (1.2.840.10008.1.2.4.111): `cjxl` of each JPEG baseline frame (its
  codestream up to EOI), which repacks a JPEG by default; the Photometric Interpretation stays
  the JPEG's, and the image stays as lossy as the JPEG was (Lossy Image Compression 01).

The script checks that `djxl` gives each frame back (the pixels, or the JPEG byte for byte)
before it writes a file.
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.encaps import encapsulate, generate_frames  # noqa: E402
from pydicom.pixels import pixel_array  # noqa: E402
from pydicom.uid import UID  # noqa: E402

from node.vocabulary.syntaxes import JPEGXLJPEGRecompression, JPEGXLLossless  # noqa: E402
from tests.conftest import data_file  # noqa: E402

OUT = REPO / "tests" / "data"
LIMIT = 300_000  # bytes: tests/data holds small files only

# output name -> (source, how)
FILES = {
    "emri_small_jxl_cjxl.dcm": ("emri_small.dcm", "lossless"),  # 10 frames, 12 of 16 bits
    "US1_UNCR_jxl_cjxl.dcm": ("US1_UNCR.dcm", "lossless"),  # RGB 8 bits, 640x480
    "examples_ybr_color_jxl_cjxl.dcm": ("examples_ybr_color.dcm", "jpeg"),  # 30 JPEG frames
}


def run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr}")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_sbit(frame: np.ndarray, bits: int) -> bytes:
    """A 16-bit PNG of `frame`, samples scaled from `bits` to 16 bits as PNG requires, with an
    sBIT chunk saying `bits` are significant (PNG spec 12.5)."""
    import imagecodecs  # only as a PNG writer here

    scaled = np.round(frame.astype(np.float64) * 65535 / ((1 << bits) - 1)).astype(np.uint16)
    png = bytes(imagecodecs.png_encode(scaled))
    samples = 1 if frame.ndim == 2 else frame.shape[-1]
    after_ihdr = 8 + 4 + 4 + 13 + 4  # signature, then IHDR's length, type, data and CRC
    return png[:after_ihdr] + _chunk(b"sBIT", bytes([bits] * samples)) + png[after_ihdr:]


def pnm(frame: np.ndarray, bits: int) -> bytes:
    """PGM or PPM (binary, big endian above 8 bits) of `frame`, maxval 2**bits - 1."""
    magic = b"P5" if frame.ndim == 2 else b"P6"
    rows, columns = frame.shape[:2]
    header = b"%s\n%d %d\n%d\n" % (magic, columns, rows, (1 << bits) - 1)
    return header + frame.astype(">u2" if bits > 8 else "u1").tobytes()


def read_pnm(data: bytes) -> np.ndarray:
    m = re.match(rb"P([56])\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
    assert m, "not a binary PGM/PPM"
    columns, rows, maxval = map(int, m.groups()[1:])
    shape = (rows, columns) if m[1] == b"5" else (rows, columns, 3)
    return np.frombuffer(data[m.end() :], ">u2" if maxval > 255 else "u1").reshape(shape)


def lossless_frames(ds, tmp: Path) -> list[bytes]:
    bits = int(ds.BitsStored)
    pixels = pixel_array(ds, raw=True)
    frames = pixels.reshape(-1, *pixels.shape[-3 if ds.SamplesPerPixel > 1 else -2 :])
    out = []
    for i, frame in enumerate(frames):
        if bits in (8, 16):
            src = tmp / f"{i}.{'pgm' if frame.ndim == 2 else 'ppm'}"
            src.write_bytes(pnm(frame, bits))
        else:
            src = tmp / f"{i}.png"
            src.write_bytes(png_with_sbit(frame, bits))
        jxl = tmp / f"{i}.jxl"
        run("cjxl", "-d", "0", "--quiet", str(src), str(jxl))
        back = tmp / f"{i}-back.{'pgm' if frame.ndim == 2 else 'ppm'}"
        # djxl 0.7 writes samples of other depths than 8 and 16 scaled to 16 bits (under a
        # maxval of their own depth): ask for 16 bits then, and scale back
        depth = () if bits in (8, 16) else ("--bits_per_sample=16",)
        run("djxl", "--quiet", *depth, str(jxl), str(back))
        decoded = read_pnm(back.read_bytes()).astype(np.float64)
        if depth:
            decoded = np.round(decoded * ((1 << bits) - 1) / 65535)
        decoded = decoded.astype(np.int64)
        if not np.array_equal(decoded, frame.astype(np.int64)):
            raise SystemExit(f"djxl does not give frame {i} back")
        out.append(jxl.read_bytes())
    return out


def recompressed_frames(ds, tmp: Path) -> list[bytes]:
    out = []
    frames = generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1)))
    for i, frame in enumerate(frames):
        jpeg = frame[: frame.rfind(b"\xff\xd9") + 2]
        src, jxl, back = tmp / f"{i}.jpg", tmp / f"{i}.jxl", tmp / f"{i}-back.jpg"
        src.write_bytes(jpeg)
        run("cjxl", "--quiet", str(src), str(jxl))  # lossless JPEG transcoding by default
        run("djxl", "--quiet", str(jxl), str(back))
        if back.read_bytes() != jpeg:
            raise SystemExit(f"djxl does not give JPEG frame {i} back")
        out.append(jxl.read_bytes())
    return out


def new_uid(source_uid: str, name: str) -> UID:
    """A UID under 2.25 (PS3.5 B.2), the same on every run for one source and output name."""
    digest = hashlib.sha256(f"{source_uid} {name}".encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def make(name: str, source: str, how: str) -> Path:
    ds = dcmread(data_file(source))
    with tempfile.TemporaryDirectory() as tmp:
        if how == "lossless":
            frames, syntax = lossless_frames(ds, Path(tmp)), JPEGXLLossless
        else:
            frames, syntax = recompressed_frames(ds, Path(tmp)), JPEGXLJPEGRecompression
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if how == "lossless" and "PlanarConfiguration" in ds:
        ds.PlanarConfiguration = 0  # JPEG XL codes colour by pixel
    ds.SOPInstanceUID = new_uid(ds.SOPInstanceUID, name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    path = OUT / name
    ds.save_as(path, enforce_file_format=True)
    size = path.stat().st_size
    if size > LIMIT:
        path.unlink()
        raise SystemExit(f"{name}: {size} bytes, above the {LIMIT} tests/data takes")
    return path


def check(path: Path, source: str) -> None:
    """The node's decoder (pydicom with node.transcode.codecs.jpegxl) gives the source's
    pixels: raw, as the source holds them."""
    import node.transcode.codecs  # noqa: F401 (teaches pydicom to decode JPEG XL)

    made, original = dcmread(path), dcmread(data_file(source))
    if not np.array_equal(pixel_array(made, raw=True), pixel_array(original, raw=True)):
        raise SystemExit(f"{path.name}: the node does not decode the source's pixels")


def main() -> int:
    warnings.filterwarnings("ignore")
    for name, (source, how) in FILES.items():
        path = make(name, source, how)
        check(path, source)
        print(f"{path.relative_to(REPO)}: {path.stat().st_size} bytes, from {source} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
