"""Parsing node.yaml: the YAML file parsed and validated once into the typed objects of
node.config.schema.

Every problem is reported as `FILE:LINE: message`; the rest of the node never sees raw YAML.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
from collections.abc import Mapping
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import yaml

from node.config.checks import layout_problem, match_keyword_problem
from node.config.schema import (
    DEFAULT_CONFIG_PATH,
    AcceptPolicy,
    Config,
    ConfigError,
    Destination,
    DicomDestination,
    DicomWebDestination,
    FolderDestination,
    HttpSettings,
    Limits,
    NodeSettings,
    Problem,
    RetryPolicy,
    RoutingRule,
    TlsSettings,
    WebAuth,
)
from node.config.targets import LOSSY_GUARDED, SyntaxError_, Target, TranscodeSpec, parse_target
from node.vocabulary.syntaxes import lookup_syntax

# --- YAML with line numbers -------------------------------------------------------------------


class _LineDict(dict):
    line: int = 0
    key_lines: dict[str, int]


class _LineList(list):
    line: int = 0
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    duplicate_keys: list[tuple[int, str]]


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    result = _LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        key_line = key_node.start_mark.line + 1
        if key in result:
            loader.duplicate_keys.append((key_line, str(key)))
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_line
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _LineList:
    result = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


# --- validation ------------------------------------------------------------------------------


class _Checker:
    """Walks the loaded YAML, collecting problems instead of stopping at the first."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []

    def error(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.source, line, message))

    def keys(self, mapping: _LineDict, where: str, allowed: set[str], required: set[str]) -> None:
        for key in mapping:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                self.error(
                    mapping.key_lines[key],
                    f"{where}: unknown key '{key}'{suggestion}; "
                    f"allowed: {', '.join(sorted(allowed))}",
                )
        for key in sorted(required - set(mapping)):
            self.error(mapping.line, f"{where}: missing required key '{key}'")

    def mapping(self, value: Any, line: int, where: str) -> _LineDict | None:
        if isinstance(value, _LineDict):
            return value
        self.error(line, f"{where}: expected a mapping (key: value), got {_describe(value)}")
        return None

    def string(self, m: _LineDict, key: str, where: str, default: str | None = None) -> str:
        if key not in m:
            return default or ""
        value = m[key]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        self.error(m.key_lines[key], f"{where}.{key}: expected a string, got {_describe(value)}")
        return default or ""

    def integer(self, m: _LineDict, key: str, where: str, default: int, lo: int, hi: int) -> int:
        if key not in m:
            return default
        value = m[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.error(
                m.key_lines[key],
                f"{where}.{key}: expected a whole number from {lo} to {hi}, got {_describe(value)}",
            )
            return default
        return value

    def converted(self, m: _LineDict, key: str, where: str, convert, default):
        """m[key] through `convert` (which raises ValueError with the message), or default."""
        if key not in m:
            return default
        try:
            return convert(m[key])
        except (ValueError, TypeError) as exc:
            self.error(m.key_lines[key], f"{where}.{key}: {exc}")
            return default

    def boolean(self, m: _LineDict, key: str, where: str, default: bool) -> bool:
        if key not in m:
            return default
        value = m[key]
        if isinstance(value, bool):
            return value
        self.error(
            m.key_lines[key], f"{where}.{key}: expected true or false, got {_describe(value)}"
        )
        return default

    def ae_title(self, m: _LineDict, key: str, where: str, default: str) -> str:
        title = self.string(m, key, where, default)
        if key not in m:  # a default (e.g. the node's own AE title) is checked where it is written
            return title
        if not title.strip() or len(title) > 16 or "\\" in title or not title.isascii():
            self.error(
                m.key_lines[key],
                f"{where}.{key}: '{title}' is not a valid AE title "
                "(1-16 ASCII characters, no '\\')",
            )
        return title


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


_NODE_KEYS = {"ae_title", "host", "port", "spool", "workers", "spool_max_size", "spool_min_free",
              "log_patient_names", "tls", "name", "draining"}  # fmt: skip
_FOLDER_KEYS = {"type", "path", "layout", "retry", "transcode"}
_DICOM_KEYS = {"type", "host", "port", "ae_title", "calling_ae_title", "timeout", "retry",
               "accept_syntaxes", "idle_timeout", "max_per_association", "tls",
               "transcode", "storage_commitment", "commitment_timeout"}  # fmt: skip
_SEND_TO_KEYS = {"destination", "transcode"}
_DICOMWEB_KEYS = {"type", "url", "auth", "max_batch", "max_batch_bytes", "timeout", "tls",
                  "retry", "transcode"}  # fmt: skip
_RETRY_KEYS = {"initial_delay", "max_delay", "give_up_after", "max_failures"}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}  # fmt: skip


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like '30s', '5m', '2h', '7d'; ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and value[-1:] in _DURATION_UNITS:
        with contextlib.suppress(ValueError):
            number = float(value[:-1].strip())
            if number >= 0:
                return number * _DURATION_UNITS[value[-1]]
    raise ValueError(f"expected a duration (seconds, or e.g. 30s, 5m, 2h, 7d), got {value!r}")


def parse_size(value: Any) -> int:
    """Bytes from a number or a string like '500 MB', '20GiB'; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().upper()
        digits = text.rstrip("KMGTIB").strip()
        unit = text[len(text.rstrip("KMGTIB")) :].strip()
        if unit in _SIZE_UNITS and digits:
            with contextlib.suppress(ValueError):
                number = float(digits)
                if number >= 0:
                    return int(number * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size (bytes, or e.g. 500MB, 20GiB), got {value!r}")


def _positive_duration(c: _Checker, m: _LineDict, key: str, where: str, default: float) -> float:
    """m[key] as a duration above 0 seconds, or `default` (with the problem recorded)."""
    value = c.converted(m, key, where, parse_duration, default)
    if value <= 0:
        c.error(m.key_lines[key], f"{where}.{key}: must be above 0")
        return default
    return value


_RULE_KEYS = {"name", "match", "transcode", "send_to"}
DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


def _parse_node(c: _Checker, raw: _LineDict, base: Path) -> NodeSettings:
    c.keys(raw, "node", _NODE_KEYS, set())
    spool = c.string(raw, "spool", "node", "./spool")
    return NodeSettings(
        ae_title=c.ae_title(raw, "ae_title", "node", "DICOM-NODE"),
        host=c.string(raw, "host", "node", "0.0.0.0"),
        port=c.integer(raw, "port", "node", 11112, 0, 65535),
        spool=(base / spool).resolve(),
        workers=c.integer(raw, "workers", "node", 0, 0, 256),
        spool_max_size=c.converted(raw, "spool_max_size", "node", parse_size, 0),
        spool_min_free=c.converted(raw, "spool_min_free", "node", parse_size, 1 << 30),
        log_patient_names=c.boolean(raw, "log_patient_names", "node", False),
        tls=_parse_tls(c, raw, "node", base, server=True),
        name=c.string(raw, "name", "node", "") or socket.gethostname(),
        draining=c.boolean(raw, "draining", "node", False),
    )


def _parse_retry(c: _Checker, m: _LineDict, where: str) -> RetryPolicy:
    if "retry" not in m:
        return RetryPolicy()
    raw = c.mapping(m["retry"], m.key_lines["retry"], f"{where}.retry")
    if raw is None:
        return RetryPolicy()
    where = f"{where}.retry"
    c.keys(raw, where, _RETRY_KEYS, set())
    default = RetryPolicy()
    policy = RetryPolicy(
        initial_delay=c.converted(
            raw, "initial_delay", where, parse_duration, default.initial_delay
        ),
        max_delay=c.converted(raw, "max_delay", where, parse_duration, default.max_delay),
        give_up_after=c.converted(
            raw, "give_up_after", where, parse_duration, default.give_up_after
        ),  # fmt: skip
        max_failures=c.integer(raw, "max_failures", where, default.max_failures, 1, 1000),
    )
    if policy.initial_delay > policy.max_delay:
        c.error(raw.line, f"{where}: initial_delay is longer than max_delay")
    return policy


def _parse_accept_syntaxes(c: _Checker, m: _LineDict, where: str) -> tuple[str, ...] | None:
    if "accept_syntaxes" not in m:
        return None
    raw = m["accept_syntaxes"]
    items = raw if isinstance(raw, list) else [raw]
    lines = getattr(raw, "item_lines", [m.key_lines["accept_syntaxes"]] * len(items))
    result = []
    for item, line in zip(items, lines, strict=True):
        found = lookup_syntax(item)
        if found is None:
            c.error(line, f"{where}.accept_syntaxes: unknown transfer syntax {item!r}")
        else:
            result.append(str(found))
    if not items:
        c.error(m.key_lines["accept_syntaxes"], f"{where}.accept_syntaxes: name at least one")
    return tuple(result)


def _file(c: _Checker, m: _LineDict, key: str, where: str, base: Path) -> Path | None:
    """m[key]: a file that must exist (relative to the config's folder), or None if absent."""
    if key not in m:
        return None
    found = (base / c.string(m, key, where)).resolve()
    if not found.is_file():
        c.error(m.key_lines[key], f"{where}.{key}: no such file: {found}")
    return found


def _parse_tls(
    c: _Checker, parent: _LineDict, where: str, base: Path, server: bool
) -> TlsSettings | None:
    if "tls" not in parent:
        return None
    where = f"{where}.tls"
    m = c.mapping(parent["tls"], parent.key_lines["tls"], where)
    if m is None:
        return None
    keys = {"cert", "key", "ca"} | ({"require_client_cert"} if server else {"server_name"})
    c.keys(m, where, keys, {"cert", "key"} if server else set())
    tls = TlsSettings(
        cert=_file(c, m, "cert", where, base),
        key=_file(c, m, "key", where, base),
        ca=_file(c, m, "ca", where, base),
        require_client_cert=c.boolean(m, "require_client_cert", where, False),
        server_name=c.string(m, "server_name", where) or None,
    )
    if tls.require_client_cert and tls.ca is None:
        line = m.key_lines["require_client_cert"]
        c.error(line, f"{where}.require_client_cert: needs 'ca' to verify client certificates")
    if (tls.cert is None) != (tls.key is None):
        c.error(m.line, f"{where}: 'cert' and 'key' go together")
    return tls


def _parse_limits(c: _Checker, raw: _LineDict) -> Limits:
    d = Limits()
    c.keys(raw, "limits", set(Limits.__dataclass_fields__), set())

    def positive(key: str, convert, default):
        value = c.converted(raw, key, "limits", convert, default)
        if value <= 0:
            c.error(raw.key_lines[key], f"limits.{key}: must be above 0")
            return default
        return value

    return Limits(
        max_associations=c.integer(raw, "max_associations", "limits", d.max_associations, 1, 1000),
        max_connections=c.integer(raw, "max_connections", "limits", d.max_connections, 1, 5000),
        max_connections_per_address=c.integer(raw, "max_connections_per_address", "limits",
                                              d.max_connections_per_address, 1, 5000),
        association_timeout=positive("association_timeout", parse_duration,
                                     d.association_timeout),
        dimse_timeout=positive("dimse_timeout", parse_duration, d.dimse_timeout),
        idle_timeout=positive("idle_timeout", parse_duration, d.idle_timeout),
        max_pdu_size=positive("max_pdu_size", parse_size, d.max_pdu_size),
        max_instance_size=positive("max_instance_size", parse_size, d.max_instance_size),
    )  # fmt: skip


def _parse_accept(c: _Checker, raw: _LineDict) -> AcceptPolicy:
    c.keys(raw, "accept", {"calling_aets", "called_aets", "networks", "echo_any_aet"}, set())

    def patterns(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if key not in raw:
            return default
        value = raw[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            c.error(raw.key_lines[key], f"accept.{key}: expected a list of patterns")
            return default
        return tuple(value)

    networks = AcceptPolicy.networks
    if "networks" in raw:
        value = raw["networks"]
        items = value if isinstance(value, list) else [value]
        lines = getattr(value, "item_lines", [raw.key_lines["networks"]] * len(items))
        parsed = []
        for item, line in zip(items, lines, strict=True):
            try:
                parsed.append(ip_network(str(item), strict=False))
            except ValueError:
                c.error(line, f"accept.networks: {item!r} is not an address or network "
                              "(e.g. 10.1.2.0/24, 192.168.1.5, fd00::/8)")  # fmt: skip
        if not items:
            c.error(raw.key_lines["networks"], "accept.networks: name at least one network")
        networks = tuple(parsed)
    return AcceptPolicy(
        calling_aets=patterns("calling_aets", ("*",)),
        called_aets=patterns("called_aets", ()),
        networks=networks,
        echo_any_aet=c.boolean(raw, "echo_any_aet", "accept", True),
    )


def _parse_destination(
    c: _Checker, name: str, raw: Any, line: int, base: Path, node_ae: str
) -> Destination | None:
    where = f"destinations.{name}"
    m = c.mapping(raw, line, where)
    if m is None:
        return None
    kind = m.get("type")
    own = None  # the destination's own default output, when it names one
    if m.get("transcode") is not None:
        own = _parse_transcode(c, m["transcode"], m.key_lines["transcode"], f"{where}.transcode")
    if kind == "folder":
        c.keys(m, where, _FOLDER_KEYS, {"type", "path"})
        layout = c.string(m, "layout", where, DEFAULT_LAYOUT)

        problem = layout_problem(layout)
        if problem:
            c.error(m.key_lines.get("layout", m.line), f"{where}.layout: {problem}")
        path = (base / c.string(m, "path", where, ".")).resolve()
        return FolderDestination(name, path, layout, _parse_retry(c, m, where), own)
    if kind == "dicom":
        c.keys(m, where, _DICOM_KEYS, {"type", "host", "port", "ae_title"})
        timeout = m.get("timeout", 30)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            c.error(m.key_lines.get("timeout", m.line), f"{where}.timeout: expected seconds > 0")
            timeout = 30
        return DicomDestination(
            name=name,
            host=c.string(m, "host", where),
            port=c.integer(m, "port", where, 104, 1, 65535),
            ae_title=c.ae_title(m, "ae_title", where, "ANY-SCP"),
            calling_ae_title=c.ae_title(m, "calling_ae_title", where, node_ae),
            timeout=float(timeout),
            retry=_parse_retry(c, m, where),
            accept_syntaxes=_parse_accept_syntaxes(c, m, where),
            idle_timeout=c.converted(m, "idle_timeout", where, parse_duration, 5.0),
            max_per_association=c.integer(m, "max_per_association", where, 0, 0, 1_000_000),
            tls=_parse_tls(c, m, where, base, server=False),
            transcode=own,
            storage_commitment=c.boolean(m, "storage_commitment", where, False),
            commitment_timeout=_positive_duration(c, m, "commitment_timeout", where, 3600.0),
        )
    if kind == "dicomweb":
        return _parse_dicomweb(c, name, m, base, own)
    c.error(
        m.key_lines.get("type", m.line),
        f"{where}.type: expected 'folder', 'dicom' or 'dicomweb', got {_describe(kind)}",
    )
    return None


def _parse_dicomweb(
    c: _Checker, name: str, m: _LineDict, base: Path, own: TranscodeSpec | None
) -> DicomWebDestination:
    where = f"destinations.{name}"
    c.keys(m, where, _DICOMWEB_KEYS, {"type", "url"})
    url = c.string(m, "url", where, "").rstrip("/")
    if "url" in m and not url.startswith(("http://", "https://")):
        c.error(m.key_lines["url"], f"{where}.url: expected an http:// or https:// URL "
                f"(the DICOMweb root; STOW-RS posts to URL/studies), got {url!r}")  # fmt: skip
    return DicomWebDestination(
        name=name,
        url=url,
        auth=_parse_web_auth(c, m, where, base),
        max_batch=c.integer(m, "max_batch", where, 50, 1, 10_000),
        max_batch_bytes=c.converted(m, "max_batch_bytes", where, parse_size, 256 << 20),
        timeout=c.converted(m, "timeout", where, parse_duration, 60.0) or 60.0,
        tls=_parse_tls(c, m, where, base, server=False),
        retry=_parse_retry(c, m, where),
        transcode=own,
    )


def _parse_web_auth(c: _Checker, parent: _LineDict, where: str, base: Path) -> WebAuth | None:
    """{bearer_token_file: F} or {username: U, password_file: F}; the files must exist now."""
    if "auth" not in parent:
        return None
    where = f"{where}.auth"
    m = c.mapping(parent["auth"], parent.key_lines["auth"], where)
    if m is None:
        return None
    c.keys(m, where, {"bearer_token_file", "username", "password_file"}, set())
    auth = WebAuth(_file(c, m, "bearer_token_file", where, base),
                   c.string(m, "username", where) or None,
                   _file(c, m, "password_file", where, base))  # fmt: skip
    basic = auth.username is not None or auth.password_file is not None
    if auth.bearer_token_file is not None and basic:
        c.error(m.line, f"{where}: either bearer_token_file, or username and password_file")
    elif basic and (auth.username is None or auth.password_file is None):
        c.error(m.line, f"{where}: username and password_file go together")
    elif not basic and auth.bearer_token_file is None:
        c.error(m.line, f"{where}: name bearer_token_file, or username and password_file")
    return auth


def _parse_target(c: _Checker, raw: Any, line: int, where: str) -> Target | None:
    try:
        return parse_target(raw)
    except SyntaxError_ as exc:
        key_line = line
        if isinstance(raw, _LineDict) and exc.key in raw.key_lines:
            key_line = raw.key_lines[exc.key]
        c.error(key_line, f"{where}: {exc}")
        return None


def _parse_transcode(c: _Checker, raw: Any, line: int, where: str) -> TranscodeSpec | None:
    if raw is None:
        return TranscodeSpec(Target(None))
    m = c.mapping(raw, line, where)
    if m is None:
        return None
    fallback_raw = m.pop("fallback", None)
    fallback_line = m.key_lines.pop("fallback", m.line)
    allow_raw = m.pop("allow_lossy", None)
    allow_line = m.key_lines.pop("allow_lossy", m.line)
    allow: set[str] = set()
    for item in allow_raw if isinstance(allow_raw, list) else [allow_raw] if allow_raw else []:
        if item in LOSSY_GUARDED:
            allow.add(item)
        else:
            c.error(allow_line, f"{where}.allow_lossy: unknown kind {item!r}; "
                    f"allowed: {', '.join(LOSSY_GUARDED)}")  # fmt: skip
    target = _parse_target(c, m, m.line, where)
    fallbacks: list[Target] = []
    if fallback_raw is not None:
        items = fallback_raw if isinstance(fallback_raw, list) else [fallback_raw]
        lines = getattr(fallback_raw, "item_lines", [fallback_line] * len(items))
        for i, (item, item_line) in enumerate(zip(items, lines, strict=True)):
            fb = _parse_target(c, item, item_line, f"{where}.fallback[{i}]")
            if fb is not None:
                fallbacks.append(fb)
    if target is None:
        return None
    return TranscodeSpec(target, tuple(fallbacks), frozenset(allow))


def _parse_match(c: _Checker, raw: Any, line: int, where: str):
    if raw is None:
        return ()
    m = c.mapping(raw, line, where)
    if m is None:
        return ()
    result = []
    for key, value in m.items():
        problem = match_keyword_problem(str(key))
        if problem:
            c.error(m.key_lines[key], f"{where}: {problem}")
            continue
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, (dict, list)) or v is None for v in values):
            c.error(m.key_lines[key], f"{where}.{key}: expected a value or a list of values")
            continue
        result.append((str(key), tuple(_scalar_text(v) for v in values)))
    return tuple(result)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "YES" if value else "NO"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _parse_rule(
    c: _Checker, raw: Any, line: int, index: int, destinations: Mapping[str, Any]
) -> RoutingRule | None:
    where = f"rules[{index}]"
    m = c.mapping(raw, line, where)
    if m is None:
        return None
    c.keys(m, where, _RULE_KEYS, {"name", "send_to"})
    name = c.string(m, "name", where, f"rule-{index + 1}")
    where = f"rule '{name}'"
    match = _parse_match(c, m.get("match"), m.key_lines.get("match", m.line), f"{where}.match")
    spec = _parse_transcode(
        c, m.get("transcode"), m.key_lines.get("transcode", m.line), f"{where}.transcode"
    )
    send_to: list[str] = []
    own: dict[str, TranscodeSpec] = {}  # the rule's entries for single destinations
    raw_send = m.get("send_to")
    if raw_send is not None:
        items = raw_send if isinstance(raw_send, list) else [raw_send]
        lines = getattr(raw_send, "item_lines", [m.key_lines["send_to"]] * len(items))
        if not items:
            c.error(m.key_lines["send_to"], f"{where}.send_to: name at least one destination")
        for item, item_line in zip(items, lines, strict=True):
            dest, dest_spec = _send_to_item(c, item, item_line, f"{where}.send_to")
            if dest is None:
                continue
            if dest not in destinations:
                known = ", ".join(sorted(destinations)) or "none defined"
                c.error(
                    item_line, f"{where}.send_to: undefined destination {dest!r} (known: {known})"
                )
            elif dest in send_to:
                c.error(item_line, f"{where}.send_to: {dest!r} is named twice")
            else:
                send_to.append(dest)
                if dest_spec is not None:
                    own[dest] = dest_spec
    # a bad transcode is already reported; the rule is kept so that its name is still checked
    spec = spec or TranscodeSpec(Target(None))
    outputs = tuple(
        (dest, own.get(dest) or getattr(destinations[dest], "transcode", None) or spec)
        for dest in send_to
    )  # precedence: the rule's entry for it, the destination's default, the rule's transcode
    return RoutingRule(name, match, spec, tuple(send_to), m.line, outputs)


def _send_to_item(
    c: _Checker, item: Any, line: int, where: str
) -> tuple[str | None, TranscodeSpec | None]:
    """A send_to entry: a destination name, or {destination: NAME, transcode: {...}}."""
    if isinstance(item, str):
        return item, None
    if not isinstance(item, dict):
        c.error(line, f"{where}: expected a destination name or a mapping with 'destination' "
                      f"(and 'transcode'), got {_describe(item)}")  # fmt: skip
        return None, None
    m = c.mapping(item, line, where)
    if m is None:
        return None, None
    c.keys(m, where, _SEND_TO_KEYS, {"destination"})
    name = m.get("destination")
    if not isinstance(name, str):
        if "destination" in m:
            c.error(m.key_lines["destination"], f"{where}.destination: expected a destination "
                                                f"name, got {_describe(name)}")  # fmt: skip
        return None, None
    spec = None
    if "transcode" in m:
        spec = _parse_transcode(
            c, m["transcode"], m.key_lines["transcode"], f"{where}[{name}].transcode"
        )
    return name, spec


# PyYAML token ids (as they appear in its messages) in the words an operator knows
_TOKEN_WORDS = {
    "<block mapping start>": "a new mapping",
    "<block sequence start>": "a new list",
    "<block end>": "the end of a block",
    "<stream end>": "the end of the file",
    "<scalar>": "a value",
    "<alias>": "an alias",
    "<anchor>": "an anchor",
    "<tag>": "a tag",
    "<directive>": "a directive",
    "<document start>": "'---'",
    "<document end>": "'...'",
    "?": "a key",
    "-": "a list item",
}
# PyYAML's context for a broken block: what the operator calls it, and what comes next in it
_BLOCKS = {
    "while parsing a block collection": ("list", "item"),
    "while parsing a block mapping": ("mapping", "key"),
}


def _where(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1} col {mark.column + 1}"


def _file_end(mark: yaml.Mark) -> int:
    """The last line of the file, given the end-of-stream mark (after a final newline the mark
    is at col 1 of a line that an editor does not show)."""
    return mark.line + 1 if mark.column else max(mark.line, 1)


def _not_closed(opener: str, start: yaml.Mark, stop: yaml.Mark, found: str | None) -> str:
    """`found` is None when the file ended first."""
    if found is None:
        stop_line = _file_end(stop)
        end = f"the file ends at line {stop_line}"
    else:
        stop_line = stop.line + 1
        end = f"found {found} at {_where(stop)}"
    # with both on one line, the line alone does not say which opener is meant
    col = f" (col {start.column + 1})" if stop_line == start.line + 1 else ""
    return f"{opener!r} opened here{col} is not closed ({end})"


def _syntax_message(exc: yaml.MarkedYAMLError, text: str) -> tuple[int, str]:
    """The line and message for a YAML syntax error.

    PyYAML reports where it gave up (problem_mark), which for an unclosed bracket, quote or
    block is a line after the mistake; the line to fix is where the construct opened
    (context_mark), so that line comes first and the give-up position second.
    """
    start, stop = exc.context_mark, exc.problem_mark
    context, problem = exc.context or "", exc.problem or ""
    if start is not None and stop is not None:
        # "expected ',' or '}', but got ':'": the token id is the quoted tail
        tail = problem.rpartition(" but ")[2].partition(" ")[2]
        got = len(tail) > 2 and tail[0] == tail[-1] == "'"
        token = tail[1:-1] if got else ""
        found = _TOKEN_WORDS.get(token, f"'{token}'")
        opener = text[start.index] if start.index < len(text) else ""
        if context in ("while parsing a flow mapping", "while parsing a flow sequence") and got:
            found_or_end = None if token == "<stream end>" else found
            return start.line + 1, _not_closed(opener, start, stop, found_or_end)
        if context == "while scanning a quoted scalar" and opener in ("'", '"'):
            # the other problem: a document separator ('---' or '...') at the start of a line
            separator = text[stop.index : stop.index + 3]
            found_or_end = None if problem == "found unexpected end of stream" else repr(separator)
            return start.line + 1, _not_closed(opener, start, stop, found_or_end)
        block = _BLOCKS.get(context)
        if block and got:
            what, entry = block
            return start.line + 1, (
                f"the {what} that starts here (col {start.column + 1}) is broken at "
                f"{_where(stop)}: found {found} where its next {entry} or its end was expected; "
                f"check the indentation of line {stop.line + 1}"
            )
        if context == "while scanning a simple key":
            return start.line + 1, (
                f"the key that starts here (col {start.column + 1}) is missing its ':' "
                f"(the parser stopped at {_where(stop)})"
            )
    mark = stop or start
    return (mark.line + 1 if mark else 1), f"YAML syntax error: {problem or exc}"


def parse_config(text: str, source: str, base: Path) -> Config:
    """Parse and validate YAML text; raise ConfigError listing every problem with its line."""
    c = _Checker(source)
    try:
        # the reader rejects control characters already here, before any parsing
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        message = f"YAML syntax error: unacceptable character #x{exc.character:04x}: {exc.reason}"
        raise ConfigError([Problem(source, line, message)]) from None
    loader.duplicate_keys = []
    try:
        raw = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        line, message = _syntax_message(exc, text)
        raise ConfigError([Problem(source, line, message)]) from None
    finally:
        loader.dispose()
    for line, key in loader.duplicate_keys:
        c.error(line, f"duplicate key '{key}' (the later one would silently win)")
    if not isinstance(raw, _LineDict):
        raise ConfigError([Problem(source, 1, "the file must be a mapping with node:, rules: ...")])
    c.keys(
        raw, "top level", {"node", "accept", "limits", "destinations", "rules", "http"}, {"rules"}
    )
    http = None
    if "http" in raw:
        http_raw = c.mapping(raw["http"], raw.key_lines["http"], "http")
        if http_raw is not None:
            c.keys(http_raw, "http", {"host", "port"}, set())
            http = HttpSettings(
                host=c.string(http_raw, "host", "http", "127.0.0.1"),
                port=c.integer(http_raw, "port", "http", 8080, 0, 65535),
            )

    node_raw = c.mapping(raw.get("node", _LineDict()), raw.key_lines.get("node", 1), "node")
    node = _parse_node(c, node_raw if node_raw is not None else _empty(), base)
    accept_raw = c.mapping(raw.get("accept", _LineDict()), raw.key_lines.get("accept", 1), "accept")
    accept = _parse_accept(c, accept_raw if accept_raw is not None else _empty())
    limits_raw = c.mapping(raw.get("limits", _LineDict()), raw.key_lines.get("limits", 1), "limits")
    limits = _parse_limits(c, limits_raw if limits_raw is not None else _empty())

    destinations: dict[str, Destination] = {}
    dest_raw = raw.get("destinations") or _empty()
    if c.mapping(dest_raw, raw.key_lines.get("destinations", 1), "destinations") is not None:
        for name, value in dest_raw.items():
            dest = _parse_destination(
                c, str(name), value, dest_raw.key_lines[name], base, node.ae_title
            )
            if dest is not None:
                destinations[str(name)] = dest

    rules: list[RoutingRule] = []
    rules_raw = raw.get("rules")
    rules_line = raw.key_lines.get("rules", 1)
    if not isinstance(rules_raw, list) or not rules_raw:
        if "rules" in raw:
            c.error(rules_line, "rules: expected a non-empty list of rules")
    else:
        seen: dict[str, int] = {}
        for i, (item, line) in enumerate(zip(rules_raw, rules_raw.item_lines, strict=True)):
            rule = _parse_rule(c, item, line, i, destinations)
            if rule is None:
                continue
            if rule.name in seen:
                c.error(
                    line, f"rule name '{rule.name}' is used twice (first at line {seen[rule.name]})"
                )
            seen.setdefault(rule.name, line)
            rules.append(rule)

    warnings = []
    for i, rule in enumerate(rules[:-1]):
        if not rule.match:
            later = ", ".join(r.name for r in rules[i + 1 :])
            warnings.append(
                f"{source}:{rule.line}: rule '{rule.name}' matches everything; "
                f"later rules never apply: {later}"
            )
    if c.problems:
        raise ConfigError(sorted(c.problems, key=lambda p: p.line))
    if not accept.called_aets:  # the node's title, and every one a rule routes on
        routed = [p for r in rules for key, ps in r.match if key == "CalledAET" for p in ps]
        accept = replace(accept, called_aets=tuple(dict.fromkeys([node.ae_title, *routed])))
    return Config(
        node, accept, destinations, tuple(rules), source, tuple(warnings), http, limits, text, base
    )


def _empty() -> _LineDict:
    d = _LineDict()
    d.line = 1
    d.key_lines = {}
    return d


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load the config file; `None` means config/node.yaml if present, else the embedded default.

    Relative paths in the file are relative to the file; in the embedded default, to the
    current directory.
    """
    if path is None:
        if DEFAULT_CONFIG_PATH.is_file():
            path = DEFAULT_CONFIG_PATH
        else:
            # read beside this module: importlib.resources.files() on an editable install
            # of Python 3.11 failed here once
            text = Path(__file__).with_name("default.yaml").read_text(encoding="utf-8")
            return parse_config(text, "<embedded default>", Path.cwd())
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), 0, f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), 1, f"not UTF-8 text: {exc.reason}")]) from None
    return parse_config(text, str(path), path.resolve().parent)
