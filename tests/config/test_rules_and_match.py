"""match: keys and values, duplicate rule names, and several problems reported in line order."""

from __future__ import annotations

import pytest

from tests.config.helpers import SEVERAL_PROBLEMS, SEVERAL_PROBLEMS_EXPECTED, problems

# --- match -------------------------------------------------------------------------------------


def test_match_on_a_misspelled_keyword_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: ct
            match:
              Modalty: CT      # <- 6
            send_to: [archive]
        """
    ) == [
        "node.yaml:6: rule 'ct'.match: 'Modalty' is not a DICOM keyword "
        "(nor CallingAET / CalledAET)"
    ]


def test_match_on_a_sequence_keyword_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            match:
              Modality: CT
              ReferencedImageSequence: "*"    # <- 7
            send_to: [archive]
        """
    ) == [
        "node.yaml:7: rule 'r'.match: 'ReferencedImageSequence' is a sequence; "
        "rules match on plain attributes only"
    ]


@pytest.mark.parametrize("value", ["{a: b}", "[]", "", "[CT, [MR]]", "[CT, null]"])
def test_match_value_must_be_a_value_or_a_list_of_values(value):
    assert problems(
        f"""\
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules:
          - name: r
            match:
              Modality: {value}      # <- 6
            send_to: [archive]
        """
    ) == ["node.yaml:6: rule 'r'.match.Modality: expected a value or a list of values"]


def test_match_that_is_not_a_mapping_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            match: [Modality, CT]      # <- 5
            send_to: [archive]
        """
    ) == ["node.yaml:5: rule 'r'.match: expected a mapping (key: value), got a list"]


# --- rules as a whole --------------------------------------------------------------------------


def test_duplicate_rule_names_point_to_the_first_use():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: ct           # first at 4
            match: {Modality: CT}
            send_to: [archive]
          - name: ct           # <- 7
            match: {Modality: PT}
            send_to: [archive]
          - name: ct           # <- 10
            send_to: [archive]
        """
    ) == [
        "node.yaml:7: rule name 'ct' is used twice (first at line 4)",
        "node.yaml:10: rule name 'ct' is used twice (first at line 4)",
    ]


def test_several_problems_are_all_reported_sorted_by_line():
    found = problems(SEVERAL_PROBLEMS)
    assert found == [f"node.yaml:{p}" for p in SEVERAL_PROBLEMS_EXPECTED]


def test_problems_found_in_a_later_section_are_sorted_among_earlier_ones():
    # the duplicate key (found by the YAML loader) and the rule problem come before node's
    assert problems(
        """\
        rules:
          - name: r
            send_to: [archive]     # <- 3
        node:
          port: 1
          port: 70000              # <- 6
        """
    ) == [
        "node.yaml:3: rule 'r'.send_to: undefined destination 'archive' (known: none defined)",
        "node.yaml:6: duplicate key 'port' (the later one would silently win)",
        "node.yaml:6: node.port: expected a whole number from 0 to 65535, got int 70000",
    ]
