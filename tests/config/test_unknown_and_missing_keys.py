"""Unknown keys (with their suggestions) and missing required keys, rules and send_to."""

from __future__ import annotations

import pytest

from tests.config.helpers import problems, rule_with_transcode

# --- unknown and missing keys ------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rule:            # <- 3
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:1: top level: missing required key 'rules'",
        "node.yaml:3: top level: unknown key 'rule' (did you mean 'rules'?); "
        "allowed: accept, destinations, http, limits, node, rules",
    ]


def test_unknown_key_without_a_close_match_gives_no_hint():
    assert problems(
        """\
        logging: debug   # <- 1
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:1: top level: unknown key 'logging'; "
        "allowed: accept, destinations, http, limits, node, rules"
    ]


def test_unknown_key_in_node_suggests_the_close_one():
    assert problems(
        """\
        node:
          ae_title: DICOM-NODE
          prot: 104      # <- 3
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:3: node: unknown key 'prot' (did you mean 'port'?); "
        "allowed: ae_title, draining, host, log_patient_names, name, port, spool, spool_max_size, "
        "spool_min_free, tls, workers"
    ]


def test_unknown_key_in_accept_is_reported():
    assert problems(
        """\
        accept:
          calling_aet: ["*"]   # <- 2
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:2: accept: unknown key 'calling_aet' (did you mean 'calling_aets'?); "
        "allowed: called_aets, calling_aets, echo_any_aet, networks"
    ]


def test_unknown_key_in_a_folder_destination_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          archive:
            type: folder
            path: ./archive
            layuot: "{SOPInstanceUID}.dcm"   # <- 5
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:5: destinations.archive: unknown key 'layuot' (did you mean 'layout'?); "
        "allowed: layout, path, retry, transcode, type"
    ]


def test_unknown_key_in_a_dicom_destination_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          pacs:
            type: dicom
            host: 127.0.0.1
            port: 104
            ae_title: PACS
            calling_aet: ME     # <- 7
        rules:
          - name: r
            send_to: [pacs]
        """
    ) == [
        "node.yaml:7: destinations.pacs: unknown key 'calling_aet' "
        "(did you mean 'calling_ae_title'?); "
        "allowed: accept_syntaxes, ae_title, calling_ae_title, commitment_timeout, host, "
        "idle_timeout, max_per_association, port, retry, storage_commitment, timeout, tls, "
        "transcode, type"
    ]


def test_missing_keys_of_a_dicom_destination_are_reported_at_the_destination():
    assert problems(
        """\
        destinations:
          pacs:
            type: dicom     # <- 3
            host: 127.0.0.1
        rules:
          - name: r
            send_to: [pacs]
        """
    ) == [
        "node.yaml:3: destinations.pacs: missing required key 'ae_title'",
        "node.yaml:3: destinations.pacs: missing required key 'port'",
    ]


def test_unknown_key_in_a_rule_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            macth: {Modality: CT}   # <- 5
            send_to: [archive]
        """
    ) == [
        "node.yaml:5: rules[0]: unknown key 'macth' (did you mean 'match'?); "
        "allowed: match, name, send_to, transcode"
    ]


def test_unknown_key_in_transcode_suggests_the_close_one():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            transcode:
              syntax: JPEG2000
              j2k_ratio: [10]      # <- 7
            send_to: [archive]
        """
    ) == ["node.yaml:7: rule 'r'.transcode: unknown key 'j2k_ratio' (did you mean 'j2k_cr'?)"]


def test_misspelled_fallback_key_suggests_fallback():
    assert problems(rule_with_transcode("{syntax: JPEGLSLossless, falback: [RLELossless]}")) == [
        "node.yaml:6: rule 'r'.transcode: unknown key 'falback' (did you mean 'fallback'?)"
    ]


def test_missing_rules_is_reported():
    assert problems(
        """\
        node:            # <- 1 (the top-level mapping starts here)
          port: 11112
        destinations:
          archive: {type: folder, path: ./archive}
        """
    ) == ["node.yaml:1: top level: missing required key 'rules'"]


@pytest.mark.parametrize("value", ["[]", "", "archive"])
def test_rules_must_be_a_non_empty_list(value):
    assert problems(
        f"""\
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules: {value}   # <- 3
        """
    ) == ["node.yaml:3: rules: expected a non-empty list of rules"]


def test_rule_without_send_to_is_reported_at_the_rule():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: ct
            match: {Modality: CT}
            send_to: [archive]
          - name: forgotten      # <- 7
            match: {Modality: MR}
        """
    ) == ["node.yaml:7: rules[1]: missing required key 'send_to'"]


def test_rule_with_an_empty_send_to_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: []    # <- 5
        """
    ) == ["node.yaml:5: rule 'r'.send_to: name at least one destination"]


def test_rule_sending_to_undefined_destination_names_its_line():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
          pacs: {type: dicom, host: h, port: 104, ae_title: PACS}
        rules:
          - name: r
            send_to:
              - archive
              - pcas       # <- 8
              - pacs
        """
    ) == ["node.yaml:8: rule 'r'.send_to: undefined destination 'pcas' (known: archive, pacs)"]


def test_rule_sending_to_a_single_undefined_destination_without_a_list():
    assert problems(
        """\
        rules:
          - name: r
            send_to: archive    # <- 3
        """
    ) == ["node.yaml:3: rule 'r'.send_to: undefined destination 'archive' (known: none defined)"]


def test_rule_that_is_not_a_mapping_is_reported_at_its_item():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
          - archive      # <- 6
        """
    ) == ["node.yaml:6: rules[1]: expected a mapping (key: value), got str 'archive'"]
