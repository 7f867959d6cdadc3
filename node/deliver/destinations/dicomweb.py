"""DICOMweb destinations: STOW-RS (PS3.18 10.5), a batch of instances per POST {url}/studies as
multipart/related; type="application/dicom", streamed from the spool files (never a whole batch
in memory), with httpx. The Store Instances Response is read per instance: an instance in its
Failed SOP Sequence failed, alone.

What is transient (the destination waits, as a DICOM peer that is down): HTTP 5xx, 429 (its
Retry-After is honoured), timeouts and connection errors. What refuses the instances (counted
against max_failures, then dead letters): 400, 401, 403, 404, 409 and per-instance failures; 401
and 403 are logged once per destination as an authentication problem. An instance the archive
says it holds already (failure reason 0111H, duplicate SOP instance) counts as delivered.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydicom.filereader import read_file_meta_info

from node.config import DicomWebDestination
from node.config.schema import WebAuth
from node.deliver.destinations.base import (
    Delivered,
    DeliveryError,
    DestinationSession,
    DestinationType,
    Failed,
    Result,
)
from node.deliver.queue import Delivery

log = logging.getLogger("dicom_node.deliver")

CHUNK = 1 << 20  # bytes read from a spool file at a time while a request streams
# PS3.18 Table 10.5.3-1 / PS3.4 GG.4-1: (0008,1198) Failed SOP Sequence, (0008,1199)
# Referenced SOP Sequence, (0008,1155) Referenced SOP Instance UID, (0008,1197) Failure Reason
_FAILED, _REFERENCED, _INSTANCE, _REASON = "00081198", "00081199", "00081155", "00081197"
DUPLICATE = 0x0111  # "Duplicate SOP Instance": the archive holds it already


class StowError(DeliveryError):
    """A failed STOW-RS request; `retry_after`: seconds the server asked to wait (429)."""

    def __init__(self, message: str, retryable: bool = True, retry_after: float | None = None):
        super().__init__(message, retryable)
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Part:
    delivery: Delivery
    path: Path
    size: int
    sop_instance: str


class _Secret:
    """A credential read from a file, read again whenever the file changes (a rotated token)."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._value = ""

    def value(self) -> str:
        try:
            stat = self.path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen != self._seen:
                self._value, self._seen = self.path.read_text().strip(), seen
        except OSError as exc:
            raise StowError(f"cannot read {self.path}: {exc}", retryable=False) from None
        return self._value


class _Credentials(httpx.Auth):
    """httpx authentication from a WebAuth: Bearer or Basic, the secret read per request."""

    def __init__(self, auth: WebAuth):
        self.username = auth.username
        file = auth.bearer_token_file or auth.password_file
        assert file is not None  # configuration checked that one is given
        self.secret = _Secret(file)

    def auth_flow(self, request: httpx.Request):
        if self.username is None:
            request.headers["Authorization"] = f"Bearer {self.secret.value()}"
        else:
            pair = f"{self.username}:{self.secret.value()}".encode()
            request.headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
        yield request


class StowSession(DestinationSession):
    """STOW-RS requests to one DICOMweb archive over one reused HTTP connection pool."""

    gather = 0.2  # let a batch fill: one request for many instances

    def __init__(self, dest: DicomWebDestination):
        self.dest = dest
        self.batch_size = dest.max_batch
        self._client: httpx.Client | None = None
        self._auth = _Credentials(dest.auth) if dest.auth is not None else None
        self._warned_auth = False

    def deliver(self, batch: Sequence[Delivery], stopping: Callable[[], bool]) -> Iterator[Result]:
        for chunk in self._requests(batch):
            if stopping():
                return
            parts: list[_Part] = []
            for d in chunk:
                try:
                    path = Path(d.path)
                    meta = read_file_meta_info(path)
                    parts.append(_Part(d, path, path.stat().st_size,
                                       str(meta.MediaStorageSOPInstanceUID)))  # fmt: skip
                except Exception as exc:  # a file that cannot be read: this one fails
                    yield Failed((d,), exc)
            if not parts:
                continue
            try:
                yield from self._post(parts)
            except StowError as exc:
                yield Failed(tuple(p.delivery for p in parts), exc)
                if exc.retryable:  # the archive cannot take anything now
                    return

    def _requests(self, batch: Sequence[Delivery]) -> Iterator[list[Delivery]]:
        """The batch cut into requests of at most max_batch instances and max_batch_bytes."""
        chunk: list[Delivery] = []
        size = 0
        for d in batch:
            try:
                this = Path(d.path).stat().st_size
            except OSError:
                this = 0  # fails on its own when the request is built
            if chunk and (len(chunk) >= self.dest.max_batch
                          or size + this > self.dest.max_batch_bytes):  # fmt: skip
                yield chunk
                chunk, size = [], 0
            chunk.append(d)
            size += this
        if chunk:
            yield chunk

    def _post(self, parts: list[_Part]) -> Iterator[Result]:
        boundary = uuid.uuid4().hex
        heads = [
            f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {p.size}\r\n\r\n"
            .encode() for p in parts
        ]  # fmt: skip
        tail = f"--{boundary}--\r\n".encode()
        length = sum(len(h) + p.size + 2 for h, p in zip(heads, parts, strict=True)) + len(tail)

        def body() -> Iterator[bytes]:
            for head, part in zip(heads, parts, strict=True):
                yield head
                with part.path.open("rb") as f:
                    while data := f.read(CHUNK):
                        yield data
                yield b"\r\n"
            yield tail

        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),  # known: no chunked encoding for the archive to undo
            "Accept": "application/dicom+json",  # Orthanc takes one type only; XML is read too
        }
        try:
            response = self._http().post(f"{self.dest.url}/studies", content=body(),
                                         headers=headers)  # fmt: skip
        except httpx.TimeoutException as exc:
            raise StowError(f"{self.dest.name}: no answer within {self.dest.timeout:g} s "
                            f"({type(exc).__name__})") from None  # fmt: skip
        except httpx.HTTPError as exc:  # connection refused, reset, TLS failure...
            raise StowError(f"{self.dest.name}: {type(exc).__name__}: {exc}") from None
        yield from self._settle(parts, response)

    def _settle(self, parts: list[_Part], response: httpx.Response) -> Iterator[Result]:
        code = response.status_code
        where = f"{self.dest.name}: HTTP {code} from {self.dest.url}/studies"
        if code == 429 or code >= 500:
            raise StowError(f"{where}{_brief(response)}", retry_after=_retry_after(response))
        if code in (401, 403):
            if not self._warned_auth:
                self._warned_auth = True
                log.error("%s: authentication problem (HTTP %d): check the credentials in "
                          "its auth settings", self.dest.name, code)  # fmt: skip
            raise StowError(f"{where}: authentication refused{_brief(response)}", retryable=False)
        try:
            failed, referenced = store_response(response)
        except ValueError as exc:
            failed, referenced = None, set()
            if code < 300:  # stored, but the answer cannot be read: it says so, it has them
                log.warning("%s: unreadable Store Instances Response (%s)", where, exc)
        if failed is None:  # no per-instance answer: the status is for all of them
            if code < 300:
                yield Delivered(tuple(p.delivery for p in parts))
                return
            raise StowError(f"{where}{_brief(response)}", retryable=False)
        delivered, refused = [], []
        for p in parts:
            reason = failed.get(p.sop_instance)
            stored = reason is None and (code < 300 or p.sop_instance in referenced)
            if stored or reason == DUPLICATE:
                delivered.append(p.delivery)
            else:
                why = "not in the Store Instances Response" if reason is None else (
                    f"Failure Reason {reason:04X}H" if reason >= 0 else "failed")  # fmt: skip
                refused.append((p.delivery, why))
        if delivered:
            yield Delivered(tuple(delivered))
        for d, why in refused:
            yield Failed((d,), StowError(f"{where}: instance refused, {why}", retryable=False))

    def _http(self) -> httpx.Client:
        if self._client is None:
            verify: object = True
            if self.dest.tls is not None:
                from node.tls import client_context

                verify = client_context(self.dest.tls)
            self._client = httpx.Client(
                timeout=httpx.Timeout(self.dest.timeout), verify=verify, auth=self._auth,
                trust_env=False,  # an http_proxy of the environment is not the archive's
            )  # fmt: skip
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def store_response(response: httpx.Response) -> tuple[dict[str, int] | None, set[str]]:
    """(Failed SOP Sequence as {SOP Instance UID: Failure Reason (-1 when absent)}, or None
    when the body names no instance; the Referenced SOP Sequence's UIDs), from a DICOM JSON or
    XML Store Instances Response. ValueError when the body is neither."""
    body = response.content
    if not body.strip():
        return None, set()
    kind = response.headers.get("content-type", "")
    if "xml" in kind:
        return _from_xml(body)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"neither DICOM JSON nor XML: {exc}") from None
    if isinstance(data, list):  # some servers send the dataset in a list
        data = data[0] if data else {}
    if not isinstance(data, dict):
        raise ValueError("not a DICOM JSON dataset")

    def items(tag: str) -> list[dict]:
        return [i for i in (data.get(tag) or {}).get("Value") or [] if isinstance(i, dict)]

    def first(item: dict, tag: str):
        values = (item.get(tag) or {}).get("Value") or []
        return values[0] if values else None

    failed = {str(first(i, _INSTANCE)): int(first(i, _REASON) or -1) for i in items(_FAILED)}
    referenced = {str(first(i, _INSTANCE)) for i in items(_REFERENCED)}
    named = _FAILED in data or _REFERENCED in data
    return (failed if named else None), referenced


def _from_xml(body: bytes) -> tuple[dict[str, int] | None, set[str]]:
    """PS3.19 Native DICOM Model: <DicomAttribute tag="00081198"><Item>...</Item>..."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise ValueError(f"unreadable XML: {exc}") from None

    def items(tag: str) -> list[ElementTree.Element]:
        return [i for a in root.iter("DicomAttribute") if a.get("tag") == tag
                for i in a.findall("Item")]  # fmt: skip

    def first(item: ElementTree.Element, tag: str) -> str | None:
        for a in item.findall("DicomAttribute"):
            if a.get("tag") == tag:
                value = a.find("Value")
                return value.text if value is not None else None
        return None

    failed = {str(first(i, _INSTANCE)): int(first(i, _REASON) or -1) for i in items(_FAILED)}
    referenced = {str(first(i, _INSTANCE)) for i in items(_REFERENCED)}
    named = any(a.get("tag") in (_FAILED, _REFERENCED) for a in root.iter("DicomAttribute"))
    return (failed if named else None), referenced


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (the HTTP-date form is taken as "later": None)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _brief(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return f": {text[:200]}" if text else ""


TYPE = DestinationType(DicomWebDestination, StowSession)
