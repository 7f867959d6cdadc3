"""The plain validators the schema applies to values other stages interpret: a folder
layout template and a rule's match keyword. Stages use the same functions, so the grammar is
stated once."""

from __future__ import annotations

import string
from pathlib import PurePosixPath

from pydicom.datadict import dictionary_VR, tag_for_keyword

# Keys a rule's match may name besides DICOM keywords: facts of the association.
ASSOCIATION_KEYS = ("CallingAET", "CalledAET")


def layout_problem(layout: str) -> str | None:
    """Why `layout` is not a usable template, or None."""
    try:
        fields = list(string.Formatter().parse(layout))
    except ValueError as exc:
        return f"bad template {layout!r}: {exc}"
    for literal, name, spec, conversion in fields:
        if "\\" in literal or "\0" in literal:
            return "use '/' to separate folders"
        if name is None:
            continue
        if spec or conversion:
            return f"'{{{name}}}': format specs and conversions are not supported"
        if not name or tag_for_keyword(name) is None:
            return f"'{{{name}}}' is not a DICOM keyword"
    parts = PurePosixPath(layout).parts
    if layout.startswith("/") or any(p in ("..", ".") for p in parts):
        return "the layout must be a relative path without '.' or '..' components"
    if not parts or layout.endswith("/"):
        return "the layout must end with a file name"
    return None


def match_keyword_problem(keyword: str) -> str | None:
    """Why `keyword` cannot be used in a rule's match, or None."""
    if keyword in ASSOCIATION_KEYS:
        return None
    tag = tag_for_keyword(keyword) if keyword else None
    if tag is None:
        return f"'{keyword}' is not a DICOM keyword (nor CallingAET / CalledAET)"
    if dictionary_VR(tag) == "SQ":
        return f"'{keyword}' is a sequence; rules match on plain attributes only"
    return None
