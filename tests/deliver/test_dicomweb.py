"""The STOW-RS session against scripted HTTP answers (httpx.MockTransport): what each status and
each Store Instances Response means for each instance of a request, the request it sends, and
its configuration."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.config.schema import DicomWebDestination, WebAuth
from node.deliver.destinations.base import Delivered, Failed
from node.deliver.destinations.dicomweb import StowSession, store_response
from node.deliver.queue import Delivery
from tests.config.helpers import parse, problems
from tests.conftest import data_file


@pytest.fixture
def files(tmp_path: Path) -> list[tuple[str, Path]]:
    made = []
    for i in range(3):
        ds = dcmread(data_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path)
        made.append((str(ds.SOPInstanceUID), path))
    return made


def deliveries(files) -> list[Delivery]:
    ct, explicit = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    return [Delivery(i, f"e{i}", 0, "cloud", str(p), None, ct, explicit, 0.0, 0, 0)
            for i, (_, p) in enumerate(files)]  # fmt: skip


def session(tmp_path: Path, answer, **kwargs) -> tuple[StowSession, list[httpx.Request]]:
    secret = tmp_path / "token"
    secret.write_text("tok-1\n")
    auth = WebAuth(bearer_token_file=secret)
    dest = DicomWebDestination("cloud", "http://archive/dicom-web", auth, **kwargs)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return answer(request)

    stow = StowSession(dest)
    stow._client = httpx.Client(transport=httpx.MockTransport(handler), auth=stow._auth)
    return stow, seen


def response_json(failed: dict[str, int], referenced: list[str]) -> str:
    def item(uid: str, reason: int | None = None) -> dict:
        out = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            out["00081197"] = {"vr": "US", "Value": [reason]}
        return out

    return json.dumps({
        "00081198": {"vr": "SQ", "Value": [item(u, r) for u, r in failed.items()]},
        "00081199": {"vr": "SQ", "Value": [item(u) for u in referenced]},
    })  # fmt: skip


def outcome(results) -> dict[str, str]:
    return {d.entry: type(r).__name__ for r in results for d in r.deliveries}


def test_one_request_carries_the_batch_as_multipart_related(tmp_path, files):
    stow, seen = session(tmp_path, lambda r: httpx.Response(200, text=response_json({}, [])))
    results = list(stow.deliver(deliveries(files), lambda: False))
    assert outcome(results) == {"e0": "Delivered", "e1": "Delivered", "e2": "Delivered"}
    (request,) = seen
    assert request.url == "http://archive/dicom-web/studies"
    kind = request.headers["content-type"]
    assert kind.startswith('multipart/related; type="application/dicom"; boundary=')
    assert request.headers["authorization"] == "Bearer tok-1"
    assert int(request.headers["content-length"]) == len(request.content)
    boundary = kind.split("boundary=")[1].encode()
    parts = request.content.split(b"--" + boundary)[1:-1]
    assert [p.split(b"\r\n\r\n", 1)[1][:-2] for p in parts] == [p.read_bytes() for _, p in files]


def test_a_failed_instance_fails_alone_and_a_duplicate_counts_as_delivered(tmp_path, files):
    (a, _), (b, _), (c, _) = files
    answer = response_json({b: 0xC000, c: 0x0111}, [a])
    stow, _ = session(tmp_path, lambda r: httpx.Response(409, text=answer))
    results = list(stow.deliver(deliveries(files), lambda: False))
    assert outcome(results) == {"e0": "Delivered", "e1": "Failed", "e2": "Delivered"}
    (failed,) = [r for r in results if isinstance(r, Failed)]
    assert "Failure Reason C000H" in str(failed.error) and not stow.transient(failed.error)


@pytest.mark.parametrize(
    "status, headers, transient, wait",
    [(503, {}, True, 0.0), (429, {"Retry-After": "7"}, True, 7.0), (400, {}, False, 0.0),
     (401, {}, False, 0.0), (404, {}, False, 0.0)],
)  # fmt: skip
def test_what_each_status_means(tmp_path, files, status, headers, transient, wait):
    stow, _ = session(tmp_path, lambda r: httpx.Response(status, headers=headers))
    (result,) = list(stow.deliver(deliveries(files), lambda: False))
    assert isinstance(result, Failed) and len(result.deliveries) == 3
    assert stow.transient(result.error) is transient
    assert stow.wait_at_least(result.error) == wait


def test_a_timeout_is_transient(tmp_path, files):
    def answer(request):
        raise httpx.ReadTimeout("slow", request=request)

    stow, _ = session(tmp_path, answer)
    (result,) = list(stow.deliver(deliveries(files), lambda: False))
    assert stow.transient(result.error) and "no answer within 60 s" in str(result.error)


def test_batches_are_cut_by_count_and_bytes(tmp_path, files):
    stow, seen = session(tmp_path, lambda r: httpx.Response(200), max_batch=2)
    assert all(isinstance(r, Delivered) for r in stow.deliver(deliveries(files), lambda: False))
    assert [r.content.count(b"Content-Type: application/dicom\r\n") for r in seen] == [2, 1]
    size = files[0][1].stat().st_size
    stow, seen = session(tmp_path, lambda r: httpx.Response(200), max_batch_bytes=size)
    list(stow.deliver(deliveries(files), lambda: False))
    assert len(seen) == 3  # each alone: two would be above max_batch_bytes


def test_a_rotated_token_is_read_again(tmp_path, files):
    stow, seen = session(tmp_path, lambda r: httpx.Response(200))
    list(stow.deliver(deliveries(files)[:1], lambda: False))
    (tmp_path / "token").write_text("tok-2-longer\n")
    list(stow.deliver(deliveries(files)[1:2], lambda: False))
    assert [r.headers["authorization"] for r in seen] == ["Bearer tok-1", "Bearer tok-2-longer"]


def test_the_xml_store_instances_response_is_read_too():
    xml = """<?xml version="1.0"?><NativeDicomModel>
      <DicomAttribute tag="00081198" vr="SQ"><Item number="1">
        <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3</Value></DicomAttribute>
        <DicomAttribute tag="00081197" vr="US"><Value number="1">49152</Value></DicomAttribute>
      </Item></DicomAttribute>
      <DicomAttribute tag="00081199" vr="SQ"><Item number="1">
        <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.4</Value></DicomAttribute>
      </Item></DicomAttribute></NativeDicomModel>"""
    answer = httpx.Response(202, text=xml, headers={"Content-Type": "application/dicom+xml"})
    assert store_response(answer) == ({"1.2.3": 0xC000}, {"1.2.4"})


def test_dicomweb_configuration(tmp_path):
    (tmp_path / "pw").write_text("x")
    config = parse(f"""\
        destinations:
          cloud:
            type: dicomweb
            url: https://pacs.example.org/dicom-web/
            auth: {{username: node, password_file: {tmp_path / "pw"}}}
            max_batch: 20
            max_batch_bytes: 100MB
            timeout: 2m
        rules: [{{name: r, send_to: [cloud]}}]
        """)  # fmt: skip
    dest = config.destinations["cloud"]
    assert (dest.url, dest.max_batch, dest.max_batch_bytes, dest.timeout) == (
        "https://pacs.example.org/dicom-web", 20, 100_000_000, 120.0,
    )  # fmt: skip
    assert dest.auth == WebAuth(None, "node", tmp_path / "pw")


def test_dicomweb_configuration_problems_name_their_lines(tmp_path):
    assert problems(f"""\
        destinations:
          a: {{type: dicomweb, url: ftp://x}}                                   # <- 2
          b: {{type: dicomweb, url: http://x, auth: {{username: u}}}}             # <- 3
          c: {{type: dicomweb, url: http://x, auth: {{bearer_token_file: {tmp_path}/none}}}}
          d: {{type: dicomweb}}                                                 # <- 5
        rules: [{{name: r, send_to: [a, b, c, d]}}]
        """) == [
        "node.yaml:2: destinations.a.url: expected an http:// or https:// URL (the DICOMweb "
        "root; STOW-RS posts to URL/studies), got 'ftp://x'",
        "node.yaml:3: destinations.b.auth: username and password_file go together",
        f"node.yaml:4: destinations.c.auth.bearer_token_file: no such file: {tmp_path}/none",
        "node.yaml:5: destinations.d: missing required key 'url'",
    ]  # fmt: skip
