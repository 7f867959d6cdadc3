"""The codec registry: it agrees with what configuration accepts, and a codec registered there is
what the transcoder, capability.refusal, `dicom-node explain` and the codec matrix use."""

from __future__ import annotations

import dataclasses

from pydicom import dcmread, uid
from pydicom.pixels import get_decoder

from node.config.targets import Target, TranscodeSpec, parse_target
from node.ops.explain import explain_file
from node.transcode import capability, codecs
from node.transcode.codecs import rle
from node.transcode.codecs.base import FrameJob
from node.transcode.step import transcode
from node.vocabulary.syntaxes import (
    ENCODABLE,
    J2K_FAMILY,
    JPEGXL,
    LOSSLESS,
    LOSSY_METHOD,
    JPEGXLJPEGRecompression,
    JPEGXLLossless,
)
from tests.conftest import data_file, one_rule_config
from tools.codec_matrix import matrix_targets


def test_the_registry_encodes_exactly_what_configuration_accepts_in_its_order():
    assert codecs.encodable_syntaxes() == ENCODABLE


def test_no_syntax_has_two_encoders():
    syntaxes = codecs.encodable_syntaxes()
    assert len(set(syntaxes)) == len(syntaxes)


def test_mct_applies_to_exactly_the_syntaxes_configuration_allows_it_for():
    with_mct = {ts for c in codecs.REGISTERED if c.colour_transform for ts in c.encodes}
    assert with_mct == J2K_FAMILY


def test_every_encodable_syntax_is_lossless_or_has_a_lossy_method_to_record():
    assert all(ts in LOSSLESS or ts in LOSSY_METHOD for ts in codecs.encodable_syntaxes())


def test_each_codec_decodes_what_it_encodes_and_names_its_matrix_columns_rightly():
    labels = [label for c in codecs.REGISTERED for label, _ in c.matrix_columns]
    assert len(set(labels)) == len(labels)
    for codec in codecs.REGISTERED:
        assert set(codec.encodes) <= set(codec.decodes), codec.name
        for label, settings in codec.matrix_columns:
            assert parse_target(dict(settings)).syntax in codec.encodes, label


def test_received_syntaxes_are_offered_compressed_lossless_first_as_before():
    before = (
        uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL,
        uid.RLELossless, uid.JPEGLosslessSV1, uid.JPEGLossless, JPEGXLLossless,
        uid.JPEGLSNearLossless, uid.JPEG2000, uid.HTJ2K, JPEGXL, JPEGXLJPEGRecompression,
        uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit,
        uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
    )  # fmt: skip
    available = tuple(ts for ts in before if not ts.is_compressed or get_decoder(ts).is_available)
    assert codecs.receivable_syntaxes() == available
    assert set(ENCODABLE) <= set(available)  # every output is verified by decoding it


def test_a_registered_codec_is_what_every_part_of_the_node_uses(tmp_path, monkeypatch):
    built: list[FrameJob] = []

    def build(job: FrameJob):
        built.append(job)
        return rle.build(job)

    double = dataclasses.replace(
        rle.CODEC, name="RLE (a test double)", build=build,
        matrix_columns=(("RLE-double", {"syntax": "RLELossless"}),),
    )  # fmt: skip
    registry = tuple(double if c is rle.CODEC else c for c in codecs.REGISTERED)
    monkeypatch.setattr(codecs, "REGISTERED", registry)
    source = dcmread(data_file("CT_small.dcm"))

    result = transcode(source, TranscodeSpec(Target(uid.RLELossless)))
    assert result.outcome == "recompressed" and result.max_error == 0
    assert [job.syntax for job in built] == [uid.RLELossless]

    out = explain_file(one_rule_config(tmp_path, "RLELossless"), data_file("CT_small.dcm"))
    assert "recompressed to RLELossless" in out and len(built) == 2

    columns = matrix_targets()
    assert "RLE-double" in columns and "RLE" not in columns

    limited = dataclasses.replace(double, max_bits_stored=8)
    monkeypatch.setattr(codecs, "REGISTERED", (limited, *registry))
    assert capability.refusal(capability.pixel_facts(source), Target(uid.RLELossless)) == (
        "Bits Stored 16 is above the 8 bits the RLELossless encoder supports"
    )
