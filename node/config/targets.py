"""The transcode settings of a rule: a `Target` (syntax plus quality parameters) and its
fallbacks, parsed and validated once at config load."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydicom import uid as _uid
from pydicom.uid import UID, UID_dictionary

from node.vocabulary.syntaxes import (
    ENCODABLE,
    J2K_FAMILY,
    JPEGXL,
    LOSSLESS,
    JPEGXLLossless,
    syntax_name,
)


class SyntaxError_(ValueError):
    """A target that cannot be used; `key` names the offending config key, if any."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Target:
    """One transfer syntax a rule may produce, with its quality parameters. syntax None = keep."""

    syntax: UID | None
    jls_error: int | None = None
    j2k_cr: tuple[float, ...] | None = None
    j2k_psnr: tuple[float, ...] | None = None
    mct: bool | None = None  # None: only where the IOD requires it (ultrasound)
    htj2k_qstep: float | None = None  # HTJ2K (.203) lossy: OpenJPH quantisation step
    jpeg_quality: int | None = None  # JPEG baseline / extended: libjpeg quality 1-100
    predictor: int | None = None  # JPEG Lossless (.57): selection value 1-7 (None: 1)
    jxl_effort: int | None = None  # JPEG XL: encoder effort 1-9 (None: libjxl's 7)
    jxl_distance: float | None = None  # JPEG XL (.112) lossy: butteraugli distance

    @property
    def is_lossy(self) -> bool:
        if self.syntax is None or self.syntax in LOSSLESS:
            return False
        if self.syntax == _uid.JPEGLSNearLossless:
            return bool(self.jls_error)
        if self.syntax == _uid.HTJ2K:  # "lossy or lossless": reversible unless a step is given
            return self.htj2k_qstep is not None
        return True

    def describe(self) -> str:
        parts = [syntax_name(self.syntax)]
        if self.jls_error is not None:
            parts.append(f"jls_error={self.jls_error}")
        if self.j2k_cr is not None:
            parts.append(f"j2k_cr={list(self.j2k_cr)}")
        if self.j2k_psnr is not None:
            parts.append(f"j2k_psnr={list(self.j2k_psnr)}")
        if self.htj2k_qstep is not None:
            parts.append(f"htj2k_qstep={self.htj2k_qstep:g}")
        if self.jpeg_quality is not None:
            parts.append(f"jpeg_quality={self.jpeg_quality}")
        if self.predictor is not None:
            parts.append(f"predictor={self.predictor}")
        if self.jxl_effort is not None:
            parts.append(f"jxl_effort={self.jxl_effort}")
        if self.jxl_distance is not None:
            parts.append(f"jxl_distance={self.jxl_distance:g}")
        if self.mct is not None:
            parts.append("mct" if self.mct else "no-mct")
        return " ".join(parts)


@dataclass(frozen=True)
class TranscodeSpec:
    """The target of a rule and the fallbacks tried, in order, when it cannot encode an image."""

    target: Target
    fallback: tuple[Target, ...] = ()
    # Kinds of image a lossy target may touch only when the rule names them (safety default).
    allow_lossy: frozenset[str] = frozenset()

    @property
    def candidates(self) -> tuple[Target, ...]:
        return (self.target, *self.fallback)


# What `allow_lossy` may name: images that must not be lossy-compressed by default.
LOSSY_GUARDED = ("already-lossy", "mammography", "for-processing")


_TARGET_KEYS = {
    "syntax", "jls_error", "j2k_cr", "j2k_psnr", "mct", "htj2k_qstep", "jpeg_quality",
    "predictor", "jxl_effort", "jxl_distance",
}  # fmt: skip
_JPEG_LOSSY = (_uid.JPEGBaseline8Bit, _uid.JPEGExtended12Bit)
_JPEG_XL_PIXELS = (JPEGXLLossless, JPEGXL)  # encoded from pixels (not .111)


def resolve_syntax(name: Any) -> UID | None:
    """'keep', a pydicom UID keyword or a dotted UID -> the UID (None for keep)."""
    if not isinstance(name, str) or not name.strip():
        raise SyntaxError_(f"syntax: expected a transfer syntax name, got {name!r}", "syntax")
    name = name.strip()
    if name == "keep":
        return None
    supported = ["keep"] + [syntax_name(ts) for ts in ENCODABLE]
    if name[0].isdigit():
        found = UID(name)
    else:
        found = next(
            (
                UID(k)
                for k, v in UID_dictionary.items()
                if v[4] == name and v[1] == "Transfer Syntax"
            ),
            None,
        )
        if found is None:
            hint = difflib.get_close_matches(name, supported, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise SyntaxError_(
                f"unknown transfer syntax '{name}'{suggestion}; supported: {', '.join(supported)}",
                "syntax",
            )
    if found not in ENCODABLE:
        raise SyntaxError_(
            f"the node cannot encode {syntax_name(found)} ({found}); "
            f"supported: {', '.join(supported)}",
            "syntax",
        )
    return found


def _numbers(value: Any, key: str) -> tuple[float, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise SyntaxError_(f"{key}: expected a number or a list of numbers, got {value!r}", key)
    return tuple(float(v) for v in items)


def parse_target(raw: Any) -> Target:
    """A target from config: a syntax name, or a mapping with `syntax` and parameters."""
    if isinstance(raw, str):
        raw = {"syntax": raw}
    if not isinstance(raw, dict):
        raise SyntaxError_(f"expected a syntax name or a mapping with 'syntax', got {raw!r}")
    for key in raw:
        if key not in _TARGET_KEYS:
            hint = difflib.get_close_matches(str(key), sorted(_TARGET_KEYS | {"fallback"}), n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise SyntaxError_(f"unknown key '{key}'{suggestion}", str(key))
    if "syntax" not in raw:
        raise SyntaxError_("missing 'syntax' (a transfer syntax name, or keep)")
    syntax = resolve_syntax(raw["syntax"])
    name = syntax_name(syntax)

    jls_error = raw.get("jls_error")
    if jls_error is not None:
        if syntax != _uid.JPEGLSNearLossless:
            raise SyntaxError_(
                f"jls_error applies to JPEGLSNearLossless only, not {name}", "jls_error"
            )
        if (
            isinstance(jls_error, bool)
            or not isinstance(jls_error, int)
            or not 1 <= jls_error <= 255
        ):
            raise SyntaxError_(
                "jls_error: expected a whole number 1-255 (0 is lossless: use JPEGLSLossless), "
                f"got {jls_error!r}",
                "jls_error",
            )
    elif syntax == _uid.JPEGLSNearLossless:
        raise SyntaxError_("JPEGLSNearLossless needs jls_error (the maximum pixel error, 1-255)")

    j2k_cr = j2k_psnr = None
    for key in ("j2k_cr", "j2k_psnr"):
        if key in raw and syntax != _uid.JPEG2000:
            raise SyntaxError_(f"{key} applies to JPEG2000 (lossy) only, not {name}", key)
    if syntax == _uid.JPEG2000:
        if ("j2k_cr" in raw) == ("j2k_psnr" in raw):
            raise SyntaxError_("JPEG2000 needs exactly one of j2k_cr or j2k_psnr")
        if "j2k_cr" in raw:
            j2k_cr = _numbers(raw["j2k_cr"], "j2k_cr")
            if any(v <= 1 for v in j2k_cr):
                raise SyntaxError_(
                    "j2k_cr: every ratio must be above 1 (a ratio of 1 silently becomes "
                    "reversible; use JPEG2000Lossless for lossless)",
                    "j2k_cr",
                )
            if list(j2k_cr) != sorted(j2k_cr, reverse=True) or len(set(j2k_cr)) != len(j2k_cr):
                raise SyntaxError_("j2k_cr: quality layers must be in decreasing order", "j2k_cr")
        else:
            j2k_psnr = _numbers(raw["j2k_psnr"], "j2k_psnr")
            if any(v <= 0 for v in j2k_psnr):
                raise SyntaxError_("j2k_psnr: every value must be above 0 dB", "j2k_psnr")
            if list(j2k_psnr) != sorted(j2k_psnr) or len(set(j2k_psnr)) != len(j2k_psnr):
                raise SyntaxError_(
                    "j2k_psnr: quality layers must be in increasing order", "j2k_psnr"
                )

    htj2k_qstep = raw.get("htj2k_qstep")
    if htj2k_qstep is not None:
        if syntax != _uid.HTJ2K:
            raise SyntaxError_(
                f"htj2k_qstep applies to HTJ2K (lossy) only, not {name}", "htj2k_qstep"
            )
        if (
            isinstance(htj2k_qstep, bool)
            or not isinstance(htj2k_qstep, (int, float))
            or not 0 < htj2k_qstep < 1
        ):
            raise SyntaxError_(
                "htj2k_qstep: expected a quantisation step between 0 and 1 (e.g. 0.005; "
                f"smaller is closer to the original), got {htj2k_qstep!r}",
                "htj2k_qstep",
            )
        htj2k_qstep = float(htj2k_qstep)

    jpeg_quality = _whole(
        raw,
        "jpeg_quality",
        syntax,
        _JPEG_LOSSY,
        1,
        100,
        "JPEGBaseline8Bit and JPEGExtended12Bit",
        "higher keeps more",
    )
    if syntax in _JPEG_LOSSY and jpeg_quality is None:
        raise SyntaxError_(f"{name} needs jpeg_quality (libjpeg's quality, 1-100)")
    predictor = _whole(raw, "predictor", syntax, (_uid.JPEGLossless,), 1, 7, "JPEGLossless",
                       "the selection value; JPEGLosslessSV1 is predictor 1")  # fmt: skip
    jxl_effort = _whole(raw, "jxl_effort", syntax, _JPEG_XL_PIXELS, 1, 9,
                        "JPEGXLLossless and JPEGXL", "higher is smaller and slower")  # fmt: skip
    jxl_distance = raw.get("jxl_distance")
    if jxl_distance is not None:
        if syntax != JPEGXL:
            raise SyntaxError_(
                f"jxl_distance applies to JPEGXL (lossy) only, not {name}", "jxl_distance"
            )
        if (
            isinstance(jxl_distance, bool)
            or not isinstance(jxl_distance, (int, float))
            or not 0 < jxl_distance <= 25
        ):
            raise SyntaxError_(
                "jxl_distance: expected a butteraugli distance above 0 and at most 25 (1 is "
                f"visually lossless; for lossless use JPEGXLLossless), got {jxl_distance!r}",
                "jxl_distance",
            )
        jxl_distance = float(jxl_distance)
    elif syntax == JPEGXL:
        raise SyntaxError_("JPEGXL needs jxl_distance (butteraugli distance; 1 is visually "
                           "lossless, for lossless use JPEGXLLossless)")  # fmt: skip

    mct = raw.get("mct")
    if mct is not None and not isinstance(mct, bool):
        raise SyntaxError_(f"mct: expected true or false, got {mct!r}", "mct")
    if syntax not in J2K_FAMILY:
        if mct:
            raise SyntaxError_(
                f"mct applies to JPEG 2000 and HTJ2K syntaxes only, not {name}", "mct"
            )
        mct = None  # `mct: false` elsewhere says nothing
    return Target(syntax, jls_error, j2k_cr, j2k_psnr, mct, htj2k_qstep, jpeg_quality, predictor,
                  jxl_effort, jxl_distance)  # fmt: skip


def _whole(
    raw: dict, key: str, syntax: UID | None, applies: tuple[UID, ...], low: int, high: int,
    where: str, meaning: str,
) -> int | None:  # fmt: skip
    """A whole-number parameter in [low, high] that applies to `applies` only, or None."""
    value = raw.get(key)
    if value is None:
        return None
    if syntax not in applies:
        raise SyntaxError_(f"{key} applies to {where} only, not {syntax_name(syntax)}", key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SyntaxError_(
            f"{key}: expected a whole number {low}-{high} ({meaning}), got {value!r}", key
        )
    return value
