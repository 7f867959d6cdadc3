"""YAML-level problems: syntax errors and their lines, tabs, unclosed brackets, duplicate keys."""

from __future__ import annotations

import pytest

from tests.config.helpers import problems

# --- YAML-level problems -----------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line_of_the_error():
    assert problems(
        """\
        node:
          port: 11112
          host: 0.0.0.0: 1   # <- 3
        rules: []
        """
    ) == ["node.yaml:3: YAML syntax error: mapping values are not allowed here"]


def test_tab_indentation_is_a_yaml_syntax_error_on_its_line():
    assert problems(
        "node:\n  port: 11112\n\thost: x\nrules: []\n"  # tab on line 3
    ) == ["node.yaml:3: YAML syntax error: found character '\\t' that cannot start any token"]


# PyYAML stops where it notices the mistake, often a line later; the report leads with the line
# where the unclosed bracket, quote or block opened, which is the one to fix.


def test_unclosed_brace_names_the_line_where_it_opened():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: mr
            match: {Modality: MR
            send_to: [archive]
        """
    ) == ["node.yaml:5: '{' opened here is not closed (found ':' at line 6 col 12)"]


def test_unclosed_brace_found_on_its_own_line_gives_both_columns():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: mr
            match: {Modality: MR]
            send_to: [archive]
        """
    ) == ["node.yaml:5: '{' opened here (col 12) is not closed (found ']' at line 5 col 25)"]


def test_unclosed_bracket_names_the_line_where_it_opened():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive
            transcode: keep
        """
    ) == ["node.yaml:5: '[' opened here is not closed (found ':' at line 6 col 14)"]


def test_bracket_still_open_at_the_end_of_the_file_names_where_it_opened():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive,
                      archive
        """
    ) == ["node.yaml:5: '[' opened here is not closed (the file ends at line 6)"]


@pytest.mark.parametrize(
    ("quote", "shown"), [('"', "'\"'"), ("'", '"\'"')], ids=["double", "single"]
)
def test_unclosed_quote_names_the_line_where_it_opened(quote, shown):
    assert problems(
        f"""\
        node:
          ae_title: {quote}DICOM-NODE
          port: 11112
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [f"node.yaml:2: {shown} opened here is not closed (the file ends at line 6)"]


def test_badly_indented_key_in_a_list_item_names_the_line_where_the_list_starts():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
           send_to: [archive]
        """
    ) == [
        "node.yaml:4: the list that starts here (col 3) is broken at line 5 col 4: found a new "
        "mapping where its next item or its end was expected; check the indentation of line 5"
    ]


def test_badly_indented_key_in_a_mapping_names_the_line_where_the_mapping_starts():
    assert problems(
        """\
        node:
          ae_title: DICOM-NODE
          port: 11112
         spool: ./spool
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        "node.yaml:1: the mapping that starts here (col 1) is broken at line 4 col 2: found a new "
        "mapping where its next key or its end was expected; check the indentation of line 4"
    ]


def test_key_without_a_colon_names_its_own_line_not_the_next():
    assert problems(
        """\
        node:
          ae_title: DICOM-NODE
          port 11112
          spool: ./spool
        rules: []
        """
    ) == [
        "node.yaml:3: the key that starts here (col 3) is missing its ':' "
        "(the parser stopped at line 4 col 3)"
    ]


def test_control_character_is_a_yaml_syntax_error_on_its_line():
    assert problems("node:\n  ae_title: DICOM\x01NODE\nrules: []\n") == [
        "node.yaml:2: YAML syntax error: unacceptable character #x0001: "
        "special characters are not allowed"
    ]


def test_duplicate_key_names_the_line_of_the_second_occurrence():
    assert problems(
        """\
        node:
          port: 11112
          ae_title: A
          port: 104      # <- 4
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:4: duplicate key 'port' (the later one would silently win)"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text\n"])
def test_a_file_that_is_not_a_mapping_is_rejected(text):
    assert problems(text) == ["node.yaml:1: the file must be a mapping with node:, rules: ..."]
