"""`dicom-node explain` and `check-config` summaries: what the node would do, as text.

explain runs the very same route and transcode functions as the node, in memory: no network,
nothing written, so it cannot disagree with what the node does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from pydicom import dcmread

from node.config import Config, Destination, DicomWebDestination, FolderDestination, RoutingRule
from node.config.targets import TranscodeSpec
from node.deliver.destinations.folder import layout_path
from node.route import Arrival, select_rule
from node.transcode.capability import lossy_history, pixel_facts
from node.transcode.process import read_arrival
from node.transcode.step import TranscodeResult, transcode_all
from node.vocabulary.syntaxes import syntax_name


def describe_rule(rule: RoutingRule) -> str:
    """One line; a rule whose destinations get different outputs names each output's."""
    match = ", ".join(f"{k}={'|'.join(v)}" for k, v in rule.match) or "everything"
    specs = rule.distinct_specs() or (rule.transcode,)
    outputs = [
        f"{_describe_spec(spec)} -> "
        + ", ".join(d for d in rule.send_to if rule.spec_for(d) == spec)
        for spec in specs
    ]
    return f"{rule.name}: {match} -> " + "; ".join(outputs)


def _describe_spec(spec: TranscodeSpec) -> str:
    return " then ".join(t.describe() for t in spec.candidates)


def describe_destination(dest: Destination) -> str:
    if isinstance(dest, FolderDestination):
        return f"{dest.name}: folder {dest.path} layout {dest.layout}"
    if isinstance(dest, DicomWebDestination):
        return f"{dest.name}: DICOMweb STOW-RS {dest.url}/studies (batches of {dest.max_batch})"
    return (
        f"{dest.name}: DICOM {dest.ae_title}@{dest.host}:{dest.port} (as {dest.calling_ae_title})"
    )


def config_summary(config: Config) -> str:
    n = config.node
    lines = [
        f"{config.source}: OK",
        f"node: {n.ae_title} on {n.host}:{n.port}, spool {n.spool}, "
        f"workers {n.workers or 'one per core'}",
        f"accept: calling AE titles {', '.join(config.accept.calling_aets)}; "
        f"called AE titles {', '.join(config.accept.called_aets)}; "
        f"networks {', '.join(map(str, config.accept.networks))}",
        "destinations:",
        *(f"  {describe_destination(d)}" for d in config.destinations.values()),
        "rules (the first match wins):",
        *(f"  {i}. {describe_rule(r)}" for i, r in enumerate(config.rules, 1)),
    ]
    lines += [f"warning: {w}" for w in config.warnings]
    return "\n".join(lines)


def explain_file(config: Config, path: Path, arrival: Arrival | None = None) -> str:
    warnings.filterwarnings("ignore", module="pydicom")
    try:
        ds = dcmread(path)
        facts = pixel_facts(ds)
    except Exception as exc:
        return f"{path}\n  unreadable: {exc}\n  => the node would quarantine it with this reason"
    arrival = arrival or read_arrival(ds)
    lines = [
        f"{path}",
        f"  dataset: {ds.get('Modality', '?')} {getattr(ds.get('SOPClassUID'), 'name', '?')}, "
        f"received as {syntax_name(facts.syntax)}, {facts.photometric} "
        f"{facts.samples}x{facts.bits_allocated}/{facts.bits_stored} bit "
        f"{'signed' if facts.pixel_representation else 'unsigned'}, "
        f"{facts.rows}x{facts.columns}, {facts.frames} frame(s)",
        f"  association: CallingAET={arrival.calling_aet or '(none)'} "
        f"CalledAET={arrival.called_aet or '(none)'}",
    ]
    if (history := lossy_history(ds, facts)) is not None:
        lines.append(f"  input: already lossy ({history.why})")
    rule = select_rule(config.rules, ds, arrival)
    if rule is None:
        lines.append("  rule: none matches => quarantined in the spool with a reason file")
        return "\n".join(lines)
    lines.append(f"  rule: {rule.name} ({config.source}:{rule.line})")
    specs = rule.distinct_specs()
    for spec, result in zip(specs, transcode_all(ds, specs), strict=True):
        names = [d for d in rule.send_to if rule.spec_for(d) == spec]
        indent = "  "
        if len(specs) > 1:  # each output under the destinations that get it
            lines.append(f"  output for {', '.join(names)}: {_describe_spec(spec)}")
            indent = "    "
        lines += [indent + line for line in _result_lines(config, ds, facts, result, names)]
    return "\n".join(lines)


def _result_lines(
    config: Config, ds, facts, result: TranscodeResult, names: list[str]
) -> list[str]:
    lines = [f"note: {note}" for note in result.notes]
    if result.dataset is None:
        how = "as received" if result.outcome == "passed-through" else "unchanged (keep)"
        lines.append(f"result: {result.outcome}: forwarded {how} in {syntax_name(facts.syntax)}")
        out = ds
    else:
        out = result.dataset
        target = result.target
        assert target is not None
        if result.max_error is None:
            verified = "decodes (lossy: ratio recorded)"
        elif result.max_error == 0:
            verified = "bit-exact"
        else:
            verified = f"max pixel error {result.max_error}"
        lines.append(
            f"result: recompressed to {target.describe()}, ratio {result.ratio:.2f}:1, "
            f"verified {verified}"
        )
        if target.is_lossy:
            methods = out.data_element("LossyImageCompressionMethod")
            lines.append(
                f"lossy: new SOP Instance UID {out.SOPInstanceUID}, Lossy Image Compression 01, "
                f"methods {methods.value if methods.VM == 1 else list(methods.value)}"
            )
    for name in names:
        dest = config.destinations[name]
        if isinstance(dest, FolderDestination):
            where = f"{dest.path / str(layout_path(dest.layout, out))}"
        elif isinstance(dest, DicomWebDestination):
            where = f"{dest.url}/studies"
        else:
            where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        lines.append(f"deliver: {name} -> {where}")
    return lines
