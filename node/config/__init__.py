"""Configuration: node.yaml parsed and validated once (every problem with its file and line) into
typed, immutable objects; every stage is handed a `Config` and never reads YAML itself."""

from node.config.parse import (
    DEFAULT_LAYOUT,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
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

__all__ = [
    "DEFAULT_CONFIG_PATH", "DEFAULT_LAYOUT", "AcceptPolicy", "Config", "ConfigError",
    "Destination", "DicomDestination", "DicomWebDestination", "FolderDestination",
    "HttpSettings", "Limits", "NodeSettings", "Problem", "RetryPolicy", "RoutingRule",
    "TlsSettings", "WebAuth", "load_config", "parse_config", "parse_duration", "parse_size",
]  # fmt: skip
