"""Delivery settings (spool sizes, retry, accept_syntaxes), accept:, limits: and tls:."""

from __future__ import annotations

from pydicom import uid

from node.config import RetryPolicy
from tests.config.helpers import parse, problems

# --- delivery settings -------------------------------------------------------------------------


def test_delivery_settings_parse_durations_sizes_and_syntaxes():
    config = parse(
        """\
        node: {spool_max_size: 20GiB, spool_min_free: 500 MB}
        destinations:
          pacs:
            type: dicom
            host: 10.0.0.5
            port: 104
            ae_title: PACS
            accept_syntaxes: [JPEGLSLossless, 1.2.840.10008.1.2.1]
            idle_timeout: 30s
            max_per_association: 500
            retry: {initial_delay: 1.5, max_delay: 10m, give_up_after: 2d, max_failures: 3}
        rules:
          - {name: r, send_to: [pacs]}
        """
    )
    assert (config.node.spool_max_size, config.node.spool_min_free) == (20 << 30, 500_000_000)
    pacs = config.destinations["pacs"]
    assert pacs.accept_syntaxes == (uid.JPEGLSLossless, uid.ExplicitVRLittleEndian)
    assert (pacs.idle_timeout, pacs.max_per_association) == (30.0, 500)
    assert pacs.retry == RetryPolicy(1.5, 600.0, 2 * 86400.0, 3)


def test_bad_delivery_settings_name_their_lines():
    assert problems(
        """\
        node: {spool_min_free: lots}      # <- 1
        destinations:
          pacs:
            type: dicom
            host: h
            port: 104
            ae_title: PACS
            accept_syntaxes: [JPEGLS]     # <- 8
            retry:
              initial_delay: 10m
              max_delay: 1m               # 9: initial above max
              give_up_after: soon         # <- 12
        rules:
          - {name: r, send_to: [pacs]}
        """
    ) == [
        "node.yaml:1: node.spool_min_free: expected a size (bytes, or e.g. 500MB, 20GiB), "
        "got 'lots'",
        "node.yaml:8: destinations.pacs.accept_syntaxes: unknown transfer syntax 'JPEGLS'",
        "node.yaml:10: destinations.pacs.retry: initial_delay is longer than max_delay",
        "node.yaml:12: destinations.pacs.retry.give_up_after: expected a duration (seconds, "
        "or e.g. 30s, 5m, 2h, 7d), got 'soon'",
    ]


def test_log_patient_names_must_be_a_boolean():
    assert problems("node: {log_patient_names: sometimes}\nrules: []\n") == [
        "node.yaml:1: node.log_patient_names: expected true or false, got str 'sometimes'",
        "node.yaml:2: rules: expected a non-empty list of rules",
    ]


def test_accept_networks_and_called_aets_parse_and_report_bad_entries_by_line():
    config = parse(
        "node: {ae_title: ARCHIVE}\n"
        "accept:\n"
        "  networks: [10.1.2.0/24, 192.168.1.5, 'fd00::/8']\n"
        "destinations: {a: {type: folder, path: ./a}}\n"
        "rules:\n"
        "  - {name: r, match: {CalledAET: [ROUTE*]}, send_to: [a]}\n"
    )
    assert config.accept.called_aets == ("ARCHIVE", "ROUTE*")  # its own, and what rules route on
    assert config.accept.allows_address("10.1.2.77")
    assert config.accept.allows_address("::ffff:192.168.1.5")  # IPv4 through a dual-stack socket
    assert not config.accept.allows_address("10.1.3.1")
    assert not config.accept.allows_address("not an address")
    assert problems(
        "accept:\n  networks:\n    - 10.0.0.0/8\n    - 10.0.0.300/32\n"
        "  called_aets: 5\nrules: []\n"
    ) == [
        "node.yaml:4: accept.networks: '10.0.0.300/32' is not an address or network "
        "(e.g. 10.1.2.0/24, 192.168.1.5, fd00::/8)",
        "node.yaml:5: accept.called_aets: expected a list of patterns",
        "node.yaml:6: rules: expected a non-empty list of rules",
    ]


def test_limits_parse_and_their_problems_have_lines():
    config = parse(
        "limits: {max_associations: 4, association_timeout: 5s, max_pdu_size: 64KiB,"
        " max_instance_size: 2GB}\n"
        "destinations: {a: {type: folder, path: ./a}}\nrules: [{name: r, send_to: [a]}]\n"
    )
    limits = config.limits
    assert (limits.max_associations, limits.association_timeout, limits.max_pdu_size) == (
        4, 5.0, 65536
    )  # fmt: skip
    assert limits.max_instance_size == 2 * 10**9 and limits.dimse_timeout == 60.0
    assert problems(
        "limits:\n  max_associations: 0\n  idle_timeout: 0\n  max_pdu: 1\nrules: []\n"
    ) == [
        "node.yaml:2: limits.max_associations: expected a whole number from 1 to 1000, got int 0",
        "node.yaml:3: limits.idle_timeout: must be above 0",
        "node.yaml:4: limits: unknown key 'max_pdu' (did you mean 'max_pdu_size'?); allowed: "
        "association_timeout, dimse_timeout, idle_timeout, max_associations, max_connections, "
        "max_connections_per_address, max_instance_size, max_pdu_size",
        "node.yaml:5: rules: expected a non-empty list of rules",
    ]


def test_tls_settings_are_checked_with_lines():
    assert problems(
        "node:\n  tls:\n    cert: /nonexistent/server.pem\n    require_client_cert: true\n"
        "rules: []\n"
    ) == [
        "node.yaml:3: node.tls: missing required key 'key'",
        "node.yaml:3: node.tls.cert: no such file: /nonexistent/server.pem",
        "node.yaml:3: node.tls: 'cert' and 'key' go together",
        "node.yaml:4: node.tls.require_client_cert: needs 'ca' to verify client certificates",
        "node.yaml:5: rules: expected a non-empty list of rules",
    ]
