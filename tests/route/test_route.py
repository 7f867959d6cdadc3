"""Unit tests of the rule engine: select_rule(rules, dataset, Arrival), rules parsed from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from node.config import RoutingRule, parse_config
from node.route import Arrival, select_rule

NO_ARRIVAL = Arrival()


def rules(**matches: str | None) -> tuple[RoutingRule, ...]:
    """Rules named after the keyword arguments, in order; each value is the rule's `match`
    as a YAML flow mapping, or None for a rule without match. All send to one folder."""
    lines = ["destinations:", "  archive: {type: folder, path: ./archive}", "rules:"]
    for name, match in matches.items():
        lines.append(f"  - name: {name}")
        if match is not None:
            lines.append(f"    match: {match}")
        lines.append("    send_to: [archive]")
    config = parse_config("\n".join(lines) + "\n", "route.yaml", Path("/srv/node"))
    assert [r.name for r in config.rules] == list(matches)
    return config.rules


def dataset(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def chosen(
    rule_set: tuple[RoutingRule, ...], ds: Dataset, arrival: Arrival = NO_ARRIVAL
) -> str | None:
    """The name of the rule select_rule picks, or None."""
    rule = select_rule(rule_set, ds, arrival)
    if rule is not None:
        assert rule in rule_set  # the very object, not a copy
    return None if rule is None else rule.name


def test_first_matching_rule_wins():
    ct = dataset(Modality="CT")
    assert chosen(rules(first="{Modality: CT}", second="{Modality: CT}"), ct) == "first"
    assert chosen(rules(second="{Modality: CT}", first="{Modality: CT}"), ct) == "second"
    # an earlier rule that does not match is skipped
    assert chosen(rules(mr="{Modality: MR}", ct="{Modality: CT}", rest=None), ct) == "ct"


def test_scalar_value_matches_only_the_equal_value():
    rule_set = rules(ct="{Modality: CT}")
    assert chosen(rule_set, dataset(Modality="CT")) == "ct"
    assert chosen(rule_set, dataset(Modality="MR")) is None
    assert chosen(rule_set, dataset(Modality="CTX")) is None  # equality, not prefix


def test_a_list_of_values_matches_any_of_them():
    rule_set = rules(ct_or_pt="{Modality: [CT, PT]}")
    assert chosen(rule_set, dataset(Modality="CT")) == "ct_or_pt"
    assert chosen(rule_set, dataset(Modality="PT")) == "ct_or_pt"
    assert chosen(rule_set, dataset(Modality="MR")) is None


def test_every_key_of_a_match_must_hold():
    rule_set = rules(color_us="{Modality: US, PhotometricInterpretation: RGB}", rest=None)
    assert chosen(rule_set, dataset(Modality="US", PhotometricInterpretation="RGB")) == "color_us"
    ybr_us = dataset(Modality="US", PhotometricInterpretation="MONOCHROME2")
    assert chosen(rule_set, ybr_us) == "rest"
    assert chosen(rule_set, dataset(Modality="CT", PhotometricInterpretation="RGB")) == "rest"


def test_star_glob_matches_any_run_of_characters():
    rule_set = rules(chest='{StudyDescription: "CHEST*"}')
    assert chosen(rule_set, dataset(StudyDescription="CHEST")) == "chest"
    assert chosen(rule_set, dataset(StudyDescription="CHEST PA AND LATERAL")) == "chest"
    assert chosen(rule_set, dataset(StudyDescription="XR CHEST")) is None


def test_question_mark_glob_matches_exactly_one_character():
    rule_set = rules(station='{StationName: "CT?"}')
    assert chosen(rule_set, dataset(StationName="CT1")) == "station"
    assert chosen(rule_set, dataset(StationName="CT")) is None
    assert chosen(rule_set, dataset(StationName="CT12")) is None


def test_globs_and_values_are_case_sensitive():
    rule_set = rules(chest="{StudyDescription: CHEST}", scanner='{StationName: "Scanner*"}')
    assert chosen(rule_set, dataset(StudyDescription="CHEST")) == "chest"
    assert chosen(rule_set, dataset(StudyDescription="Chest")) is None
    assert chosen(rule_set, dataset(StationName="Scanner 2")) == "scanner"
    assert chosen(rule_set, dataset(StationName="SCANNER 2")) is None


def test_a_missing_attribute_never_matches_not_even_star():
    rule_set = rules(any_station='{StationName: "*"}', ct="{Modality: CT}")
    assert chosen(rule_set, dataset(Modality="CT")) == "ct"
    assert chosen(rule_set, dataset(StationName="CT1", Modality="CT")) == "any_station"


def test_an_empty_attribute_counts_as_missing():
    rule_set = rules(any_station='{StationName: "*"}')
    assert chosen(rule_set, dataset(StationName="")) is None
    assert chosen(rule_set, dataset(StationName=None)) is None


def test_a_rule_without_match_matches_everything():
    rule_set = rules(ct="{Modality: CT}", everything=None)
    assert chosen(rule_set, Dataset()) == "everything"
    assert chosen(rule_set, dataset(Modality="MR"), Arrival("ANY", "NODE")) == "everything"
    assert chosen(rule_set, dataset(Modality="CT")) == "ct"


def test_no_matching_rule_gives_none():
    rule_set = rules(ct="{Modality: CT}", mr="{Modality: MR}")
    assert select_rule(rule_set, dataset(Modality="US"), NO_ARRIVAL) is None
    assert select_rule((), dataset(Modality="CT"), NO_ARRIVAL) is None


def test_calling_aet_matches_the_sender_of_the_association():
    rule_set = rules(scanner_1='{Modality: [CT, PT], CallingAET: "CT1*"}', rest=None)
    ct = dataset(Modality="CT")
    assert chosen(rule_set, ct, Arrival(calling_aet="CT1_EAST", called_aet="NODE")) == "scanner_1"
    assert chosen(rule_set, ct, Arrival(calling_aet="CT1", called_aet="NODE")) == "scanner_1"
    assert chosen(rule_set, ct, Arrival(calling_aet="CT2", called_aet="NODE")) == "rest"
    assert chosen(rule_set, ct, Arrival(calling_aet="ct1", called_aet="NODE")) == "rest"
    # the dataset's own attributes still count: an MR from CT1 is not a CT/PT
    assert chosen(rule_set, dataset(Modality="MR"), Arrival("CT1", "NODE")) == "rest"


def test_called_aet_matches_the_title_the_sender_addressed():
    rule_set = rules(to_research="{CalledAET: RESEARCH}", rest=None)
    ds = dataset(Modality="CT")
    assert chosen(rule_set, ds, Arrival(calling_aet="CT1", called_aet="RESEARCH")) == "to_research"
    assert chosen(rule_set, ds, Arrival(calling_aet="RESEARCH", called_aet="NODE")) == "rest"


def test_association_keys_come_from_the_arrival_not_the_dataset():
    rule_set = rules(scanner="{CallingAET: CT1}")
    assert chosen(rule_set, Dataset(), Arrival(calling_aet="CT1")) == "scanner"
    # the sender's AE title recorded in the dataset does not count
    ds = dataset(Modality="CT", SourceApplicationEntityTitle="CT1")
    assert chosen(rule_set, ds, Arrival(calling_aet="OTHER")) is None


def test_multi_valued_attribute_matches_if_any_value_matches():
    ds = dataset(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert chosen(rules(axial="{ImageType: AXIAL}"), ds) == "axial"
    assert chosen(rules(original="{ImageType: ORIGINAL}"), ds) == "original"
    assert chosen(rules(localizer="{ImageType: LOCALIZER}"), ds) is None
    assert chosen(rules(either="{ImageType: [LOCALIZER, PRIMARY]}"), ds) == "either"
    assert chosen(rules(derived='{ImageType: "DERIV*"}'), ds) is None
    # the whole backslash-joined value is not what is matched
    assert chosen(rules(joined='{ImageType: "ORIGINAL\\\\PRIMARY\\\\AXIAL"}'), ds) is None


def test_numeric_yaml_value_matches_the_datasets_number():
    rule_set = rules(big="{Rows: 512}")
    assert chosen(rule_set, dataset(Rows=512)) == "big"
    assert chosen(rule_set, dataset(Rows=256)) is None
    # IS and DS attributes hold numbers as text in DICOM; a YAML number still matches them
    assert chosen(rules(third="{SeriesNumber: 3}"), dataset(SeriesNumber="3")) == "third"
    assert chosen(rules(thin="{SliceThickness: 2.5}"), dataset(SliceThickness="2.5")) == "thin"
    assert chosen(rules(thin="{SliceThickness: 2.5}"), dataset(SliceThickness="5")) is None


def test_numeric_values_in_a_list_match_any():
    rule_set = rules(square="{Columns: [256, 512]}")
    assert chosen(rule_set, dataset(Columns=512)) == "square"
    assert chosen(rule_set, dataset(Columns=1024)) is None


def test_yaml_yes_and_no_match_the_dicom_text():
    # YAML 1.1 reads NO and YES as booleans; the rule still means the words
    rule_set = rules(clean="{BurnedInAnnotation: NO}", burned="{BurnedInAnnotation: YES}")
    assert chosen(rule_set, dataset(BurnedInAnnotation="NO")) == "clean"
    assert chosen(rule_set, dataset(BurnedInAnnotation="YES")) == "burned"


@pytest.mark.parametrize(
    "pattern, matches",
    [
        ("CTImageStorage", True),
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ('"*ImageStorage"', True),
        ('"1.2.840.10008.5.1.4.1.1.*"', True),
        ("MRImageStorage", False),
        ("1.2.840.10008.5.1.4.1.1.4", False),
        ("ctimagestorage", False),
    ],
)
def test_uid_attribute_matches_by_dotted_uid_or_by_keyword(pattern, matches):
    ds = dataset(SOPClassUID=uid.CTImageStorage)
    assert chosen(rules(ct_class=f"{{SOPClassUID: {pattern}}}"), ds) == (
        "ct_class" if matches else None
    )


def test_uid_without_a_keyword_matches_by_dotted_value_only():
    private = "1.2.826.0.1.3680043.8.498.1"
    rule_set = rules(private=f"{{SOPClassUID: '{private}'}}", rest=None)
    assert chosen(rule_set, dataset(SOPClassUID=private)) == "private"
    assert chosen(rule_set, dataset(SOPClassUID=uid.CTImageStorage)) == "rest"


def _with_transfer_syntax(ts: str) -> Dataset:
    ds = dataset(Modality="CT", SOPClassUID=uid.CTImageStorage)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


@pytest.mark.parametrize(
    "ts, expected",
    [
        (uid.JPEGBaseline8Bit, "lossy_input"),
        (uid.JPEG2000, "lossy_input"),
        (uid.JPEGLSLossless, "rest"),
        (uid.ExplicitVRLittleEndian, "rest"),
    ],
)
def test_transfer_syntax_uid_is_matched_from_the_file_meta(ts, expected):
    rule_set = rules(lossy_input="{TransferSyntaxUID: [JPEGBaseline8Bit, JPEG2000]}", rest=None)
    assert chosen(rule_set, _with_transfer_syntax(ts)) == expected


def test_transfer_syntax_uid_matches_by_dotted_uid_too():
    rule_set = rules(baseline="{TransferSyntaxUID: 1.2.840.10008.1.2.4.50}")
    assert chosen(rule_set, _with_transfer_syntax(uid.JPEGBaseline8Bit)) == "baseline"
    assert chosen(rule_set, _with_transfer_syntax(uid.JPEGExtended12Bit)) is None


def test_transfer_syntax_uid_without_file_meta_is_missing():
    rule_set = rules(lossy_input='{TransferSyntaxUID: "*"}', rest=None)
    assert chosen(rule_set, dataset(Modality="CT")) == "rest"


def test_binary_attributes_never_match():
    rule_set = rules(pixels='{PixelData: "*"}', rest=None)
    assert chosen(rule_set, dataset(PixelData=b"\x00\x01")) == "rest"


def test_the_contract_example_routes_as_documented():
    rule_set = rules(
        mammo_lossless="{Modality: MG}",
        color_ultrasound="{Modality: US, PhotometricInterpretation: RGB}",
        ct_from_scanner_1='{Modality: [CT, PT], CallingAET: "CT1*"}',
        everything_else=None,
    )
    ybr_us = dataset(Modality="US", PhotometricInterpretation="YBR_FULL")
    cases = [
        (dataset(Modality="MG"), Arrival("CT1", "DICOM-NODE"), "mammo_lossless"),
        (dataset(Modality="US", PhotometricInterpretation="RGB"), NO_ARRIVAL, "color_ultrasound"),
        (ybr_us, NO_ARRIVAL, "everything_else"),
        (dataset(Modality="PT"), Arrival("CT1-PETCT", "DICOM-NODE"), "ct_from_scanner_1"),
        (dataset(Modality="CT"), Arrival("MR1", "DICOM-NODE"), "everything_else"),
        (Dataset(), NO_ARRIVAL, "everything_else"),
    ]
    assert [chosen(rule_set, ds, arrival) for ds, arrival, _ in cases] == [c[2] for c in cases]


def test_select_rule_accepts_any_iterable_of_rules():
    rule_set = rules(mr="{Modality: MR}", ct="{Modality: CT}")
    picked = select_rule(iter(rule_set), dataset(Modality="CT"), NO_ARRIVAL)
    assert picked is rule_set[1]
