"""The node: section and destinations: ports, AE titles, timeouts, types, folder layouts."""

from __future__ import annotations

import pytest

from node.config import AcceptPolicy
from tests.config.helpers import parse, problems

# --- node and destinations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "port, shown", [("70000", "int 70000"), ("-1", "int -1"), ("http", "str 'http'")]
)
def test_node_port_out_of_range_is_reported(port, shown):
    assert problems(
        f"""\
        node:
          port: {port}    # <- 2
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [f"node.yaml:2: node.port: expected a whole number from 0 to 65535, got {shown}"]


def test_destination_port_out_of_range_is_reported():
    assert problems(
        """\
        destinations:
          pacs:
            type: dicom
            host: h
            port: 0           # <- 5
            ae_title: PACS
        rules:
          - name: r
            send_to: [pacs]
        """
    ) == ["node.yaml:5: destinations.pacs.port: expected a whole number from 1 to 65535, got int 0"]


def test_workers_out_of_range_is_reported():
    assert problems(
        """\
        node: {workers: 1000}   # <- 1
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:1: node.workers: expected a whole number from 0 to 256, got int 1000"]


@pytest.mark.parametrize(
    "title, shown",
    [
        ("THIS-TITLE-IS-TOO-LONG", "THIS-TITLE-IS-TOO-LONG"),
        ("'A\\B'", "A\\B"),
        ("''", ""),
        ("'   '", "   "),
        ("NÖDE", "NÖDE"),
    ],
)
def test_bad_node_ae_title_is_reported(title, shown):
    assert problems(
        f"""\
        node:
          ae_title: {title}    # <- 2
        destinations:
          archive: {{type: folder, path: ./archive}}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        f"node.yaml:2: node.ae_title: '{shown}' is not a valid AE title "
        "(1-16 ASCII characters, no '\\')"
    ]


def test_sixteen_character_ae_title_is_accepted():
    config = parse(
        """\
        node: {ae_title: SIXTEEN-CHARS-OK}
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    )
    assert config.node.ae_title == "SIXTEEN-CHARS-OK"


def test_bad_destination_ae_titles_are_reported_on_their_lines():
    assert problems(
        """\
        destinations:
          pacs:
            type: dicom
            host: h
            port: 104
            ae_title: A-PACS-WITH-A-LONG-NAME       # <- 6
            calling_ae_title: ""                    # <- 7
        rules:
          - name: r
            send_to: [pacs]
        """
    ) == [
        "node.yaml:6: destinations.pacs.ae_title: 'A-PACS-WITH-A-LONG-NAME' is not a valid AE "
        "title (1-16 ASCII characters, no '\\')",
        "node.yaml:7: destinations.pacs.calling_ae_title: '' is not a valid AE title "
        "(1-16 ASCII characters, no '\\')",
    ]


def test_bad_node_ae_title_is_reported_once_not_again_for_each_dicom_destination():
    # the destinations inherit it as their calling AE title; the mistake is on line 2 only
    assert problems(
        """\
        node:
          ae_title: THIS-TITLE-IS-TOO-LONG     # <- 2
        destinations:
          pacs: {type: dicom, host: h, port: 104, ae_title: PACS}
          mirror: {type: dicom, host: h, port: 105, ae_title: MIRROR}
        rules:
          - name: r
            send_to: [pacs, mirror]
        """
    ) == [
        "node.yaml:2: node.ae_title: 'THIS-TITLE-IS-TOO-LONG' is not a valid AE title "
        "(1-16 ASCII characters, no '\\')"
    ]


@pytest.mark.parametrize(
    "timeout, ok", [("0", False), ("-5", False), ("soon", False), ("0.5", True)]
)
def test_destination_timeout_must_be_positive_seconds(timeout, ok):
    text = f"""\
        destinations:
          pacs:
            type: dicom
            host: h
            port: 104
            ae_title: PACS
            timeout: {timeout}     # <- 7
        rules:
          - name: r
            send_to: [pacs]
        """
    if ok:
        assert parse(text).destinations["pacs"].timeout == float(timeout)
    else:
        assert problems(text) == ["node.yaml:7: destinations.pacs.timeout: expected seconds > 0"]


@pytest.mark.parametrize(
    "kind, shown", [("smb", "str 'smb'"), ("Folder", "str 'Folder'"), (None, "nothing")]
)
def test_unknown_destination_type_is_reported(kind, shown):
    type_line = f"type: {kind}" if kind else "kind: folder"
    assert problems(
        f"""\
        destinations:
          archive: {{type: folder, path: ./archive}}
          nas:
            {type_line}     # <- 4 (the type, or where the destination starts)
            path: /mnt/nas
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [
        f"node.yaml:4: destinations.nas.type: expected 'folder', 'dicom' or 'dicomweb', "
        f"got {shown}"
    ]


def test_destination_that_is_not_a_mapping_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive}
          nas: /mnt/nas       # <- 3
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:3: destinations.nas: expected a mapping (key: value), got str '/mnt/nas'"]


@pytest.mark.parametrize(
    "layout, message",
    [
        ("/data/{SOPInstanceUID}.dcm",
         "the layout must be a relative path without '.' or '..' components"),
        ("../{SOPInstanceUID}.dcm",
         "the layout must be a relative path without '.' or '..' components"),
        ("{StudyInstanceUID}/../../{SOPInstanceUID}.dcm",
         "the layout must be a relative path without '.' or '..' components"),
        ("{StudyUID}/{SOPInstanceUID}.dcm", "'{StudyUID}' is not a DICOM keyword"),
        ("{InstanceNumber:05d}.dcm",
         "'{InstanceNumber}': format specs and conversions are not supported"),
        ("{SOPInstanceUID!r}.dcm",
         "'{SOPInstanceUID}': format specs and conversions are not supported"),
        ("{StudyInstanceUID}/", "the layout must end with a file name"),
        ("{SOPInstanceUID.dcm",
         "bad template '{SOPInstanceUID.dcm': expected '}' before end of string"),
    ],
)  # fmt: skip
def test_folder_layout_errors_are_reported_on_the_layout_line(layout, message):
    assert problems(
        f"""\
        destinations:
          archive:
            type: folder
            path: ./archive
            layout: "{layout}"      # <- 5
        rules:
          - name: r
            send_to: [archive]
        """
    ) == [f"node.yaml:5: destinations.archive.layout: {message}"]


def test_folder_layout_with_an_empty_placeholder_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder, path: ./archive, layout: "{}.dcm"}    # <- 2
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:2: destinations.archive.layout: '{}' is not a DICOM keyword"]


def test_folder_layout_with_backslashes_is_reported():
    assert problems(
        """\
        destinations:
          archive:
            type: folder
            path: ./archive
            layout: '{StudyInstanceUID}\\{SOPInstanceUID}.dcm'     # <- 5
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:5: destinations.archive.layout: use '/' to separate folders"]


def test_folder_destination_without_path_is_reported():
    assert problems(
        """\
        destinations:
          archive: {type: folder}    # <- 2
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:2: destinations.archive: missing required key 'path'"]


def test_calling_aets_must_be_patterns():
    assert problems(
        """\
        accept:
          calling_aets: {CT1: yes}     # <- 2
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    ) == ["node.yaml:2: accept.calling_aets: expected a list of patterns"]


def test_a_single_calling_aet_pattern_is_a_one_item_list():
    config = parse(
        """\
        accept: {calling_aets: "CT*"}
        destinations:
          archive: {type: folder, path: ./archive}
        rules:
          - name: r
            send_to: [archive]
        """
    )
    assert config.accept == AcceptPolicy(calling_aets=("CT*",), called_aets=("DICOM-NODE",))
