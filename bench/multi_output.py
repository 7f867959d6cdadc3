"""One instance to three syntaxes: one decode plus three encode+verify, not three pipelines.

For the CT and MR corpora of bench/corpora.py (Explicit VR Little Endian files, every image
different), the CPU that node.transcode.process.process_entry spends per instance, in this
process, for:

- each one-output rule alone: JPEG 2000 lossless, HTJ2K lossy (htj2k_qstep 0.004), JPEG-LS
  lossless;
- their sum: what three whole pipelines (three rules, or three nodes) would cost;
- the three-output rule (one rule, send_to three destinations, one output each), which decodes
  the input once (transcode_all with a DecodedInput) and encodes and verifies each target once;
- the decode alone (node.transcode.step.decoded_frames over the parsed dataset), and a keep
  rule (read, parse and route, nothing encoded or written), so that the reader can check
  three-output ~ Σ one-output - 2 x (decode + read/parse/route): what the three-output rule
  does not repeat.

The corpora are made uncompressed (Explicit VR Little Endian), whose "decode" is little more
than a copy of the pixel bytes, so sharing it can save little. They are run a second time made
HTJ2K lossless first (untimed; --input), an input none of the three targets is, whose decode is
a codec run: there sharing the decode is what the rule saves.

Decodes are counted by wrapping node.transcode.step.decoded_frames (every decode pass over an
instance's pixels, shared or not, goes through it): the three-output rule must show 1.

CPU time, not wall time: time.process_time() of this process (user + system, every thread)
around each call, so that another benchmark on the machine does not inflate the figures. The
cases take turns on each instance (round-robin), each pass over the corpus is timed, and the
best pass per case counts. Warm-up instances (imports, codec initialisation) run untimed first.
The C library is tuned as the node's codec workers tune it (keep_freed_memory_for_reuse).
Outputs go to a temporary folder, removed at the end.

    .venv/bin/python bench/multi_output.py [--quick] [--ct N] [--mr N] [--passes N]
                                           [--input native,HTJ2KLossless]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import common
from common import CPU, CpuWindow, factor, num, table
from corpora import CT, MR, Corpus, CorpusKind, make_corpus
from pydicom import dcmread

import node.transcode.step as step
from node.config import parse_config
from node.config.targets import TranscodeSpec, parse_target
from node.spool import SpoolEntry
from node.transcode import capability
from node.transcode.output_file import write_output
from node.transcode.process import ProcessOutcome, keep_freed_memory_for_reuse, process_entry
from node.vocabulary.syntaxes import syntax_name

WARMUP_INSTANCES = 2  # per corpus and case, untimed
NATIVE = "native"  # the corpora as made: Explicit VR Little Endian
INPUTS = (NATIVE, "HTJ2KLossless")  # the default --input
SHORT = {"JPEG2000Lossless": "J2K", "JPEGLSLossless": "JLS", "HTJ2KLossless": "HTJ2KL"}
DESTINATIONS = """\
node: {spool: ./spool}
destinations:
  archive: {type: folder, path: ./a}
  telerad: {type: folder, path: ./b}
  old: {type: folder, path: ./c}
"""
J2K = "{syntax: JPEG2000Lossless}"
HTJ2K = "{syntax: HTJ2K, htj2k_qstep: 0.004}"
JLS = "{syntax: JPEGLSLossless}"
ONE_OUTPUT = {"J2K": J2K, "HTJ2K": HTJ2K, "JLS": JLS}
THREE_OUTPUTS = f"""\
rules:
  - name: three
    transcode: {J2K}
    send_to:
      - archive
      - {{destination: telerad, transcode: {HTJ2K}}}
      - {{destination: old, transcode: {JLS}}}
"""


def one_output_rule(name: str, transcode: str) -> str:
    return f"rules:\n  - name: {name}\n    transcode: {transcode}\n    send_to: [archive]\n"


# --- counting decodes ------------------------------------------------------------------------

_original_decoded_frames = step.decoded_frames
_decodes = [0]


def _counted_decoded_frames(*args, **kwargs):
    _decodes[0] += 1
    return _original_decoded_frames(*args, **kwargs)


step.decoded_frames = _counted_decoded_frames  # step's own callers look the global up


# --- the cases -------------------------------------------------------------------------------


@dataclass
class Case:
    key: str
    label: str
    run: Callable[[Path, Path], ProcessOutcome | None]  # (instance, work file) -> outcome
    passes: list[float] = field(default_factory=list)  # CPU seconds of each timed pass
    decodes: int = 0  # over all timed passes
    calls: int = 0
    outputs: dict[str, list[int]] = field(default_factory=dict)  # syntax -> sizes (one pass)
    trouble: set[str] = field(default_factory=set)

    def ms(self, count: int) -> float | None:
        return min(self.passes) * 1000 / count if self.passes else None

    def decodes_per_instance(self) -> float | None:
        return self.decodes / self.calls if self.calls else None


def rule_case(key: str, label: str, yaml: str, base: Path) -> Case:
    config = parse_config(DESTINATIONS + yaml, "node.yaml", base)

    def run(path: Path, work: Path) -> ProcessOutcome:
        return process_entry(SpoolEntry(path), config, work)

    return Case(key, label, run)


def decode_case() -> Case:
    """The decode alone: only the decoded_frames pass is timed (`timed_decode`)."""
    return Case("decode", "decode alone (decoded_frames)", lambda path, work: None)


def timed_decode(path: Path) -> float:
    """CPU seconds of one decoded_frames pass over the instance, the file read and parsed
    before the clock starts (as process_entry does: from bytes)."""
    ds = dcmread(BytesIO(path.read_bytes()))
    facts = capability.pixel_facts(ds)
    started = time.process_time()
    for _frame in _original_decoded_frames(ds, facts, None):
        pass
    return time.process_time() - started


def clean(outcome: ProcessOutcome | None, entry: Path) -> None:
    if outcome is None:
        return
    for output in outcome.outputs:
        if output.path != entry:
            output.path.unlink(missing_ok=True)


def check(case: Case, outcome: ProcessOutcome | None, expected: int) -> None:
    if outcome is None:
        return
    if outcome.quarantine_reason:
        case.trouble.add(f"quarantined: {outcome.quarantine_reason}")
        return
    for output in outcome.outputs:
        if output.outcome != "recompressed" and case.key != "keep":
            case.trouble.add(f"{output.outcome}: {'; '.join(output.notes)}")
    if case.key != "keep" and len(outcome.outputs) != expected:
        case.trouble.add(f"{len(outcome.outputs)} outputs, expected {expected}")


# --- one corpus ------------------------------------------------------------------------------


@dataclass
class Result:
    kind: CorpusKind
    input: str  # NATIVE or the syntax the corpus was made first
    count: int
    cases: dict[str, Case]

    @property
    def block(self) -> str:
        return f"{self.kind.key.upper()} {'raw' if self.input == NATIVE else SHORT[self.input]}-in"


def recompress(corpus: Corpus, name: str) -> None:
    """Make every file of `corpus` (warm-ups too) `name` in place, with the node's codec step."""
    spec = TranscodeSpec(parse_target(name))
    for path in (*corpus.files, *corpus.warmups):
        ds = dcmread(path)
        result = step.transcode(ds, spec)
        if result.dataset is None or result.outcome != "recompressed":
            raise common.BenchError(f"{path.name}: could not be made {name}: {result.notes}")
        write_output(path.with_suffix(".part"), result.dataset, ds, path)
        path.with_suffix(".part").replace(path)
    corpus.file_bytes = sum(f.stat().st_size for f in corpus.files)


def measure(corpus: Corpus, input_: str, base: Path, passes: int) -> Result:
    cases = {
        "J2K": rule_case("J2K", "one output: JPEG 2000 lossless", one_output_rule("j2k", J2K),
                         base),
        "HTJ2K": rule_case("HTJ2K", "one output: HTJ2K qstep 0.004",
                           one_output_rule("htj2k", HTJ2K), base),
        "JLS": rule_case("JLS", "one output: JPEG-LS lossless", one_output_rule("jls", JLS),
                         base),
        "three": rule_case("three", "three-output rule (J2K + HTJ2K + JLS)", THREE_OUTPUTS,
                           base),
        "keep": rule_case("keep", "keep rule (read, parse, route)",
                          one_output_rule("keep", "{syntax: keep}"), base),
        "decode": decode_case(),
    }  # fmt: skip
    expected = {"three": 3}
    work = base / "work.dcm"

    def once(case: Case, path: Path, record: bool) -> tuple[float, int]:
        """CPU seconds and decodes of one call; `record`: note its outputs' sizes."""
        if case.key == "decode":
            return timed_decode(path), 1
        _decodes[0] = 0
        started = time.process_time()
        outcome = case.run(path, work)
        cpu = time.process_time() - started
        check(case, outcome, expected.get(case.key, 1))
        if record and outcome is not None and case.key != "keep":
            for output in outcome.outputs:
                case.outputs.setdefault(output.syntax, []).append(output.size)
        clean(outcome, path)
        return cpu, _decodes[0]

    for path in corpus.warmups[:WARMUP_INSTANCES]:
        for case in cases.values():
            once(case, path, record=False)

    for n in range(passes):
        totals = dict.fromkeys(cases, 0.0)
        for path in corpus.files:  # round-robin: the cases share whatever the machine does
            for case in cases.values():
                cpu, decodes = once(case, path, record=n == 0)
                totals[case.key] += cpu
                case.decodes += decodes
                case.calls += 1
        for key, cpu in totals.items():
            cases[key].passes.append(cpu)
    return Result(corpus.kind, input_, len(corpus.files), cases)


# --- the report ------------------------------------------------------------------------------


def ratios(case: Case, pixel_bytes: int) -> str:
    """Each output's compression ratio (uncompressed pixels / output file)."""
    parts = []
    for syntax, sizes in case.outputs.items():
        if sizes:
            short = SHORT.get(syntax_name(syntax), syntax_name(syntax))
            parts.append(f"{short} {pixel_bytes * len(sizes) / sum(sizes):.1f}:1")
    return ", ".join(parts)


def rows_for(result: Result, pixel_bytes: int) -> tuple[list[list[str]], dict[str, float]]:
    c, count = result.cases, result.count
    ms = {key: case.ms(count) or 0.0 for key, case in c.items()}
    ms["sum"] = ms["J2K"] + ms["HTJ2K"] + ms["JLS"]
    ms["predicted"] = ms["sum"] - 2 * (ms["decode"] + ms["keep"])
    j2k = ms["J2K"]
    name = result.block

    def decodes(key: str) -> str:
        value = c[key].decodes_per_instance()
        return num(value, 2)

    def note(key: str, extra: str = "") -> str:
        trouble = "; ".join(sorted(c[key].trouble))
        text = ", ".join(x for x in (extra, ratios(c[key], pixel_bytes)) if x)
        return f"{text} | TROUBLE: {trouble}" if trouble else text

    sum_decodes = sum(c[k].decodes_per_instance() or 0 for k in ("J2K", "HTJ2K", "JLS"))
    rows = [
        [f"{name} {c['J2K'].label}", num(j2k), factor(1.0), decodes("J2K"), note("J2K")],
        [f"{name} {c['HTJ2K'].label}", num(ms["HTJ2K"]), factor(ms["HTJ2K"] / j2k),
         decodes("HTJ2K"), note("HTJ2K")],
        [f"{name} {c['JLS'].label}", num(ms["JLS"]), factor(ms["JLS"] / j2k), decodes("JLS"),
         note("JLS")],
        [f"{name} three whole pipelines (sum of the 3)", num(ms["sum"]),
         factor(ms["sum"] / j2k), num(sum_decodes, 2), "three rules, each on its own"],
        [f"{name} {c['three'].label}", num(ms["three"]), factor(ms["three"] / j2k),
         decodes("three"), note("three", f"{ms['three'] / ms['sum']:.0%} of the sum")],
        [f"{name} {c['decode'].label}", num(ms["decode"], 2), factor(ms["decode"] / j2k),
         "1.00", "only the pixels of the parsed dataset"],
        [f"{name} {c['keep'].label}", num(ms["keep"], 2), factor(ms["keep"] / j2k),
         decodes("keep"), "nothing encoded or written"],
        [f"{name} predicted: sum - 2 x (decode + keep)", num(ms["predicted"]),
         factor(ms["predicted"] / j2k), "",
         f"three-output measured {ms['three'] - ms['predicted']:+.1f} ms from this"],
    ]  # fmt: skip
    return rows, ms


def reading(results: list[tuple[Result, dict[str, float]]]) -> str:
    parts = []
    for result, ms in results:
        three, total, predicted = ms["three"], ms["sum"], ms["predicted"]
        decodes = result.cases["three"].decodes_per_instance()
        parts.append(
            f"{result.block} {num(three)} ms against {num(total)} ms ({three / total:.0%}, "
            f"{total - three:.1f} ms saved, {num(decodes, 2)} decode/instance; predicted "
            f"{num(predicted)}, off by {(three - predicted) / predicted:+.1%})"
        )
    return (
        "Reading: per instance, the three-output rule costs, against three whole pipelines: "
        + "; ".join(parts)
        + ". So 3-output ~ one read + one decode + the three encode+verify (+ three writes), as "
        "predicted by the sum less two decodes and two reads/parses/routes. The encoders are "
        "what costs (J2K the most: the three-output rule is a one-output J2K rule plus the two "
        "cheaper encoders), and each is paid once per distinct output either way; what sharing "
        "saves is the repeated decode and read, small on uncompressed input (its decode is a "
        "copy) and larger the costlier the input's codec. Figures are the best of the passes; a"
        " few per cent either way is noise (CPU time still varies with cache and memory "
        "contention)."
    )


def wrap(text: str, width: int = 96) -> str:
    return textwrap.fill(text, width)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 CT + 3 MR instances, 1 pass")
    parser.add_argument("--ct", type=int, help="CT instances (default 20, --quick 6)")
    parser.add_argument("--mr", type=int, help="MR instances (default 8, --quick 3)")
    parser.add_argument("--passes", type=int, help="timed passes, the best counts (default 2)")
    parser.add_argument("--input", default=",".join(INPUTS),
                        help=f"the inputs, comma-separated: {NATIVE} (the corpora as made, "
                        "Explicit VR Little Endian) and/or a syntax they are first made "
                        f"(untimed); default {','.join(INPUTS)}")  # fmt: skip
    args = parser.parse_args()
    inputs = [x.strip() for x in args.input.split(",") if x.strip()]
    counts = {"ct": args.ct or (6 if args.quick else 20), "mr": args.mr or (3 if args.quick else 8)}
    passes = args.passes or (1 if args.quick else 2)
    warnings.filterwarnings("ignore")
    common.install_signal_handlers()
    tuned = keep_freed_memory_for_reuse()

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"cores: {CPU}; figures are CPU time of this one process (time.process_time: user + "
          f"system, all threads), not wall time; best of {passes} pass(es) per case; "
          f"mallopt tuned as in the node's workers: {tuned}")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-multi-output-"))
    results: list[tuple[Result, dict[str, float]]] = []
    all_rows: list[list[str]] = []
    try:
        window = CpuWindow()
        for input_ in inputs:
            for kind in (CT, MR):
                folder = work / f"{kind.key}-{input_}"
                corpus = make_corpus(folder / "corpus", kind, counts[kind.key])
                if input_ != NATIVE:
                    recompress(corpus, input_)
                pixel_bytes = corpus.pixel_bytes // len(corpus.files)
                size = corpus.file_bytes / len(corpus.files) / 1e6
                print(f"{kind.label}, {input_}: {len(corpus.files)} instances, {size:.2f} MB "
                      "each", flush=True)  # fmt: skip
                result = measure(corpus, input_, folder, passes)
                rows, ms = rows_for(result, pixel_bytes)
                results.append((result, ms))
                if all_rows:
                    all_rows.append(["", "", "", "", ""])
                all_rows.extend(rows)
                shutil.rmtree(folder, ignore_errors=True)
        _busy, others = window.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"other processes used {others:.0%} of the machine's cores meanwhile "
          "(CPU time is what this process used, whatever they did)")  # fmt: skip
    print()
    header = ["corpus x case", "CPU ms/instance", "vs one-output J2K", "decodes/instance",
              "notes (output compression: uncompressed pixels / file)"]  # fmt: skip
    print(
        "raw-in: the corpus as made (Explicit VR Little Endian); HTJ2KL-in: made HTJ2K "
        "lossless first. predicted = three pipelines - 2 x (decode alone + keep rule)."
    )
    print(table(header, all_rows))
    print()
    print(wrap(reading(results)))
    bad = [r for r, _ in results if (r.cases["three"].decodes_per_instance() or 0) != 1]
    trouble = [t for r, _ in results for c in r.cases.values() for t in c.trouble]
    if bad or trouble:
        print("\nWARNING: " + "; ".join(
            [f"{r.block} three-output decoded "
             f"{r.cases['three'].decodes_per_instance()} times per instance" for r in bad]
            + sorted(set(trouble))))  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
