"""Throughput benchmark: how fast dicom-node recompresses what it receives, beside Orthanc doing
the same job (ingest transcoding), beside what the codecs alone manage on all cores.

Run from the repository root:

    .venv/bin/python bench/throughput.py [--quick] [--only ct|mr] [--no-large] [--keep]
                                         [--json PATH]

It first runs `bin/apt-ensure orthanc orthanc-gdcm dcmtk` (installs what is missing), then
prints one report. A full run takes about 10-15 minutes on 2 cores; --quick about 3.

Corpora (made in a temporary folder, fresh UIDs, one study and series each, Explicit VR Little
Endian; every image differs: a per-instance offset of -100..299 and an np.roll shift of the
source image, clipped to the valid range, no random noise, which would make the images
unrealistically incompressible):
  CT  300 slices (--quick: 60) 512x512, signed, 16 bits allocated, 14 stored, from
      pydicom-data's 693_UNCR.dcm (0.5 MiB of pixels each).
  MR  60 slices (--quick: 12) 1024x1024, unsigned, 16 allocated, 12 stored, from MR2_UNCR.dcm
      (2 MiB of pixels each).

Target syntaxes, each for each corpus: JPEG-LS lossless (.4.80, node `JPEGLSLossless`), JPEG 2000
lossless (.4.90, `JPEG2000Lossless`), RLE lossless (.5, `RLELossless`), HTJ2K lossless (.4.201,
`HTJ2KLossless`; when `dicom-node check-config` rejects it the row says "n/a (node lacks
HTJ2KLossless)"). Plus `keep` (no transcoding) for the node, the reference for the ack time.

Peers, each run with fresh storage and its own process:
  node     `dicom-node serve` with workers: 0 (one codec process per core), its spool in the
           temporary folder, one folder destination `archive` (written under a hidden temporary
           name, fsync'd, renamed) and one rule `transcode: {syntax: NAME}` (no fallbacks)
           `send_to: [archive]`.
  Orthanc  the Debian package (`orthanc` + `orthanc-gdcm`, plugin libOrthancGdcm.so enabled)
           with `IngestTranscoding` set to the same UID (SyncStorageArea on, its default).
           Orthanc cannot encode HTJ2K: its HTJ2K cells say n/a, and the node's HTJ2K row is
           compared with Orthanc's JPEG 2000 lossless images/s (the notes say so).
           When Orthanc + GDCM crashes on a syntax other than JPEG 2000 (GDCM transcodes first
           and segfaults on JPEG-LS here), that run is repeated once with GDCM limited to JPEG
           2000 ("RestrictTransferSyntaxes"), so Orthanc's built-in DCMTK codec encodes; such
           Orthanc cells carry a '*' and the notes say so, and the crash is reported as well.
The sender is DCMTK storescu (`-R -xe`: only the presentation contexts the files need,
Explicit VR LE first; TCP_NODELAY=1 in its environment), one association for all its files.
Before the clock runs, 2 x cores warm-up instances (their own study) go the same way, so the
node's codec worker processes (started on demand) and Orthanc are up; counts start after them.

Measured per (corpus, syntax, peer) run:
  img/s      instances / seconds from the start of storescu until the LAST instance is durable:
             node: number of files in the archive folder (hidden temporary files ignored);
             Orthanc: /statistics CountInstances (REST). Both polled every 50 ms (+-0.05 s).
             An Orthanc that dies (its JPEG-LS transcoder is known to abort on signed CT, taking
             the server down) says "crashed"; no progress for 30 s says "stalled"; the bench
             carries on either way.
  MB/s       uncompressed input pixel data (10^6 bytes) per second, same clock.
  ratio      total input file bytes / total stored bytes (node: archive files; Orthanc: its
             storage folder, index kept elsewhere), warm-up instances excluded.
  ack s      from the start of storescu until it exited, i.e. had every acknowledgement (the
             last of them with two senders).
  peak RSS   sum of VmRSS over the peer's whole process tree (node: main process plus its codec
             worker processes), sampled every 100 ms from /proc during the run.
  node/Orth  node img/s / Orthanc img/s (1 sender).
Every stored output is checked afterwards: its transfer syntax must be the target (file meta
for the node, the TransferSyntax metadata over REST for Orthanc); a mismatch is reported.

Codec-only ceilings, measured in the same run on the same images, held in memory by
os.cpu_count() worker processes (ProcessPoolExecutor, spawn; warmed up before the clock; the
C library set to keep freed buffers, as in the node's workers: node/transcode/process.py):
  verified     per image the node's own codec step: pydicom.dcmread(BytesIO(bytes)),
               node.transcode.step.transcode(ds, TranscodeSpec(parse_target(NAME))), which decodes,
               encodes every frame and decodes it again to compare (bit-exact); the output
               is not serialised (the node's worker splices it into a file: the node's cost,
               not the codec step's). node/ceiling compares with this.
  encode only  pydicom's get_encoder(uid).encode(arr, encoding_plugin=..., **as_pixel_options)
               on pre-decoded arrays, the same plugins as the node (pyjpegls, pylibjpeg-openjpeg,
               pylibjpeg-rle); HTJ2K: imagecodecs.htj2k_encode(arr, level=0) (OpenJPH). The gap
               between the two ceilings is what parsing, verification and writing cost.
Each ceiling is the faster of 2 timed passes over the corpus, and every run of a peer (node or
Orthanc, one or two senders) the faster of 2 runs: this VM's speed drifts by 15% over minutes,
and the same rule for all keeps the ratios fair. A crashed run is not repeated. The node's runs
that are compared with each other are taken in turns: one sender, two senders and (CT) `keep`,
then again, so drift falls on all of them alike; the ack time target compares a syntax's run
with the `keep` runs taken in turns with it.

CPU per instance: the whole machine's busy CPU time in each timed window (/proc/stat: user,
nice, system, irq, softirq; hypervisor steal and idle excluded) divided by the instances: what
the sender, the peer and the kernel cost together. For the ceiling, in its best pass. A table
per corpus sets them side by side, with c/(c+k): with the codec step costing c (the ceiling)
and receiving, spooling and delivering k (the node with `keep`) on the same cores, node/ceiling
cannot go much above it.

Concurrency: the same runs with two storescu processes started together, one with the first
half of the corpus, one with the second (two associations), for the node (all syntaxes) and
Orthanc; total images/s from their start until the last instance of both is durable.

A row's measurements (ceilings, node, Orthanc) run one after the other, so they see similar
conditions. The machine may be shared: for every timed window the bench computes the share of
all CPUs used by processes outside its own process tree (/proc/stat busy time minus the CPU
time of the bench and its descendants); windows above 15% are named in the notes, and the
average is printed at the end. Read such cells with care.

Large multi-frame (skipped with --no-large or --quick): one instance of 512 frames 1024x1024
(Multi-frame Grayscale Word Secondary Capture, MONOCHROME2, 16 allocated, 12 stored, 1 GiB of
pixels), written frame by frame so the bench never holds it in memory, sent by storescu to a
node with target JPEGLSLossless. Reported: the node tree's RSS before the send (after warm-up),
its peak during receive (until storescu had the acknowledgement) and until the output is
durable in the archive, peak / instance size, and how long receive and processing took.

Targets (PASS/FAIL/N/A lines at the end): JPEG-LS and JPEG 2000 lossless >= 1.7x Orthanc on
both corpora (when Orthanc + GDCM crashed, against the '*' run, and the line says so; when that
crashed too, N/A with the reason); node/ceiling >= 0.8 for JPEG 2000 and >= 0.6 for JPEG-LS,
RLE and HTJ2K; HTJ2K >= 8x Orthanc's JPEG 2000 lossless; two senders >= one sender (node); CT
ack time with transcoding within 1.5x of keep; large instance peak RSS < 2x its size.

Every process started here (Orthanc, the node, storescu, the ceiling's worker processes) runs in
its own process group and is stopped in a `finally`, also on Ctrl-C and SIGTERM (the one
exception is multiprocessing's resource tracker, which exits with the bench). The temporary
folder is removed at the end (--keep keeps it; after a failure its logs are kept).
The machine is usually shared and has few cores: absolute numbers are noisy, ratios less so.

The parts: bench/corpora.py (corpora, target syntaxes), bench/ingest_rate.py (node and Orthanc
runs), bench/codec_ceiling.py (ceilings), bench/large_instance.py (the large instance),
bench/throughput_report.py (tables, targets, JSON); the plumbing is bench/common.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from codec_ceiling import measure_ceiling
from common import ROOT, BenchError, Processes, end_workspace, start_workspace
from corpora import CT, KEEP, MR, SYNTAXES, make_corpus
from ingest_rate import Bench, gdcm_plugin
from large_instance import measure_large
from throughput_report import evaluate_targets, machine_facts, print_report, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{CT.quick_count} CT / {MR.quick_count} MR, no large instance",
    )
    parser.add_argument("--only", choices=["ct", "mr"], help="one corpus only")
    parser.add_argument("--no-large", action="store_true", help="skip the 1 GiB instance")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)  # fmt: skip

    ensure = subprocess.run([str(ROOT / "bin" / "apt-ensure"), "orthanc", "orthanc-gdcm", "dcmtk"])
    if ensure.returncode != 0:
        print("bin/apt-ensure orthanc orthanc-gdcm dcmtk failed", file=sys.stderr)
        return 2
    workspace = start_workspace("dicom-node-throughput-")
    if workspace is None:
        return 2
    work, logs = workspace
    started = time.monotonic()
    procs = Processes()
    ok = False
    try:
        bench = Bench(procs, work, logs, args.keep, gdcm_plugin())
        kinds = [k for k in (CT, MR) if args.only in (None, k.key)]
        corpora = []
        for kind in kinds:
            count = kind.quick_count if args.quick else kind.count
            print(f"making {count} {kind.key.upper()} images in {work} ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            corpora.append(make_corpus(work / f"corpus-{kind.key}", kind, count))
        facts = machine_facts()
        bench.check_node_syntaxes()
        for corpus in corpora:
            bench.node_runs(corpus, KEEP, (1,))
            for syntax in SYNTAXES:  # a row's measurements close together in time
                for mode in ("verified", "encode-only"):
                    measure_ceiling(bench, corpus, syntax, mode)
                bench.node_runs(corpus, syntax, (1, 2), with_keep=corpus.kind is CT)
                if syntax.orthanc:
                    for senders in (1, 2):
                        bench.orthanc_run(corpus, syntax, senders)
        if not (args.quick or args.no_large):
            measure_large(bench, corpora[0].warmups)
        targets = evaluate_targets(bench, corpora)
        elapsed = time.monotonic() - started
        print_report(bench, corpora, facts, targets, elapsed)
        if args.json:
            write_json(args.json, bench, corpora, facts, targets, elapsed)
            print(f"results written to {args.json}")
        sys.stdout.flush()
        ok = True
        return 0
    except BenchError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping what was started", file=sys.stderr)
        return 130
    finally:
        end_workspace(procs, work, logs, ok, "folder" if args.keep else None)


if __name__ == "__main__":
    sys.exit(main())
