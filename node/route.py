"""The rule engine, a pure function: (rules, dataset, association facts) -> the first matching
RoutingRule, or None."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.config import RoutingRule


@dataclass(frozen=True)
class Arrival:
    """What the network told us about an instance, beyond the dataset itself."""

    calling_aet: str = ""
    called_aet: str = ""


def attribute_texts(ds: Dataset, keyword: str, arrival: Arrival) -> list[str] | None:
    """The values of `keyword` as text (one per value of a multi-valued attribute), or None."""
    if keyword == "CallingAET":
        return [arrival.calling_aet]
    if keyword == "CalledAET":
        return [arrival.called_aet]
    source = ds
    if keyword not in ds and keyword.startswith(("TransferSyntax", "MediaStorage")):
        source = getattr(ds, "file_meta", Dataset())
    elem = source[keyword] if keyword in source else None  # noqa: SIM401 (.get gives the value)
    if elem is None or elem.value is None or elem.value == "":
        return None
    if isinstance(elem.value, (bytes, bytearray)):
        return None
    values = elem.value if elem.VM > 1 else [elem.value]
    texts = [str(v).strip() for v in values]
    if elem.VR == "UI":  # UIDs match by dotted value or by name: CTImageStorage, JPEGBaseline8Bit
        texts += [UID(t).keyword for t in texts if UID(t).keyword]
    return texts


def _matches(rule: RoutingRule, ds: Dataset, arrival: Arrival) -> bool:
    for keyword, patterns in rule.match:
        texts = attribute_texts(ds, keyword, arrival)
        if texts is None:  # a missing attribute never matches
            return False
        if not any(fnmatchcase(t, p) for t in texts for p in patterns):
            return False
    return True


def select_rule(rules: Iterable[RoutingRule], ds: Dataset, arrival: Arrival) -> RoutingRule | None:
    """The first rule whose every match key holds; a rule without `match` matches everything."""
    return next((rule for rule in rules if _matches(rule, ds, arrival)), None)
