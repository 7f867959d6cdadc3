"""The configuration's types: typed, immutable objects a parsed node.yaml becomes. They depend
on nothing of the node but its DICOM vocabulary."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path

from node.config.targets import TranscodeSpec

DEFAULT_CONFIG_PATH = Path("config/node.yaml")


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (PS3.15 BCP 195: TLS 1.2 or later). For the listener: `cert` and `key` are
    the node's, `ca` verifies client certificates (required when `require_client_cert`). For
    a destination: `ca` verifies the peer, `cert`/`key` are the node's client certificate."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False
    server_name: str | None = None  # a destination's expected certificate name (default host)


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str
    host: str
    port: int
    spool: Path
    workers: int  # 0 = one per CPU core
    spool_max_size: int = 0  # bytes; 0 = no limit
    spool_min_free: int = 1 << 30  # bytes of free disk below which C-STOREs get 0xA700
    log_patient_names: bool = False  # PatientName/PatientID in the per-instance log line
    tls: TlsSettings | None = None  # None: plain TCP
    name: str = ""  # this node in logs and metrics (default: the host name)
    # /healthz answers 503 "draining" (a balancer sends new associations elsewhere) while the
    # node serves the associations it has and keeps delivering; also `dicom-node drain`
    draining: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; after `give_up_after` an instance is dead-lettered."""

    initial_delay: float = 2.0  # seconds
    max_delay: float = 300.0
    give_up_after: float = 7 * 86400.0
    max_failures: int = 5  # refusals that are not transient (e.g. 0xC000) before dead-letter


@dataclass(frozen=True)
class AcceptPolicy:
    """Who may open an association. Anything else gets A-ASSOCIATE-RJ with the reason."""

    calling_aets: tuple[str, ...]  # glob patterns
    # C-ECHO from any calling AE title (what an administrator tries first); storage never
    echo_any_aet: bool = True
    # glob patterns; not configured: the node's AE title and every CalledAET a rule matches
    called_aets: tuple[str, ...] = ()
    networks: tuple[IPv4Network | IPv6Network, ...] = (
        ip_network("0.0.0.0/0"),
        ip_network("::/0"),
    )

    def allows_address(self, address: str) -> bool:
        try:
            ip = ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.networks)


@dataclass(frozen=True)
class FolderDestination:
    name: str
    path: Path
    layout: str
    retry: RetryPolicy = RetryPolicy()
    transcode: TranscodeSpec | None = None  # its own default output (see RoutingRule.outputs)


@dataclass(frozen=True)
class DicomDestination:
    name: str
    host: str
    port: int
    ae_title: str
    calling_ae_title: str
    timeout: float  # seconds, for association, DIMSE and network
    retry: RetryPolicy = RetryPolicy()
    accept_syntaxes: tuple[str, ...] | None = None  # UIDs the node may propose; None = any
    idle_timeout: float = 5.0  # seconds an association stays open without work
    max_per_association: int = 0  # instances before a new association; 0 = no limit
    tls: TlsSettings | None = None
    transcode: TranscodeSpec | None = None  # its own default output (see RoutingRule.outputs)
    # Storage Commitment (Push Model): N-ACTION after the C-STOREs; an instance is delivered
    # only once an N-EVENT-REPORT commits it. No report within commitment_timeout: asked again.
    storage_commitment: bool = False
    commitment_timeout: float = 3600.0  # seconds


@dataclass(frozen=True)
class WebAuth:
    """HTTP credentials, each read from a file (and read again when the file changes): a bearer
    token, or a user name and a password (basic authentication)."""

    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class DicomWebDestination:
    """A DICOMweb archive: STOW-RS (PS3.18 10.5) POSTs to {url}/studies."""

    name: str
    url: str  # the DICOMweb root, without a trailing slash
    auth: WebAuth | None = None
    max_batch: int = 50  # instances per request
    max_batch_bytes: int = 256 << 20  # bytes of instances per request (one larger goes alone)
    timeout: float = 60.0  # seconds to connect, and between bytes sent or received
    tls: TlsSettings | None = None  # `ca` to verify the server (default: the system's CAs)
    retry: RetryPolicy = RetryPolicy()
    transcode: TranscodeSpec | None = None  # its own default output (see RoutingRule.outputs)


Destination = FolderDestination | DicomDestination | DicomWebDestination


@dataclass(frozen=True)
class RoutingRule:
    name: str
    # keyword -> accepted patterns; every keyword must match (AND), any pattern may (OR)
    match: tuple[tuple[str, tuple[str, ...]], ...]
    transcode: TranscodeSpec  # the rule's default output
    send_to: tuple[str, ...]
    line: int = 0
    # What each destination of send_to gets, in its order, resolved at load: the rule's entry
    # for that destination, else the destination's own `transcode`, else the rule's. Empty
    # (a rule made in code): every destination gets `transcode`.
    outputs: tuple[tuple[str, TranscodeSpec], ...] = ()

    def spec_for(self, destination: str) -> TranscodeSpec:
        return dict(self.outputs).get(destination, self.transcode)

    def distinct_specs(self) -> tuple[TranscodeSpec, ...]:
        """Each distinct output the rule makes, in the order its destinations first need it."""
        return tuple(dict.fromkeys(self.spec_for(name) for name in self.send_to))


@dataclass(frozen=True)
class Limits:
    """What one peer may cost the node (PS3.8 timers, PDU and instance sizes)."""

    max_associations: int = 32  # established at once; more get A-ASSOCIATE-RJ (transient)
    max_connections: int = 64  # open sockets, associated or not; more are closed at once
    max_connections_per_address: int = 16  # so that one host cannot take every socket
    association_timeout: float = 30.0  # seconds to send A-ASSOCIATE-RQ (ARTIM) / to answer
    dimse_timeout: float = 60.0  # seconds between the messages of one exchange
    idle_timeout: float = 120.0  # seconds an association may stay silent
    max_pdu_size: int = 1 << 20  # what a peer may put in one PDU
    max_instance_size: int = 4 << 30  # larger instances are refused with 0xA700


@dataclass(frozen=True)
class HttpSettings:
    """Where /metrics and /healthz are served."""

    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class Config:
    node: NodeSettings
    accept: AcceptPolicy
    destinations: Mapping[str, Destination]
    rules: tuple[RoutingRule, ...]
    source: str = "<embedded default>"
    warnings: tuple[str, ...] = field(default=())
    http: HttpSettings | None = None
    limits: Limits = field(default_factory=Limits)
    text: str = field(default="", compare=False, repr=False)  # the YAML it was parsed from
    base: Path | None = field(default=None, compare=False, repr=False)  # relative paths' base

    @functools.cached_property
    def key(self) -> str:
        """Names this exact configuration: spool entries carry it, so each is processed under
        the rules it was received with, also after a reload or a restart."""
        digest = hashlib.sha256(f"{self.source}\0{self.base}\0{self.text}".encode())
        return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Problem:
    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every one found, with its line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
