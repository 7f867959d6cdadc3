"""DICOM destinations: C-STOREs to a peer over a reused association, proposing the rule's syntax
with an uncompressed fallback, and TCP_NODELAY on the node's associations (set_nodelay, which
the Storage SCP uses too). With `storage_commitment`, the session also asks the peer to commit
what it sent (N-ACTION, node/deliver/commitment.py) and hands on the N-EVENT-REPORTs that
arrive on its association.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.config import DicomDestination
from node.deliver.commitment import (
    INVALID_ARGUMENT,
    PROCESSING_FAILURE,
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    OnReport,
    Reference,
    report_from,
    request_dataset,
)
from node.deliver.destinations.base import (
    Delivered,
    DeliveryError,
    DestinationSession,
    DestinationType,
    Failed,
    Result,
)
from node.deliver.queue import Delivery
from node.vocabulary.status import STORED, is_out_of_resources, is_storage_warning
from node.vocabulary.syntaxes import syntax_name

log = logging.getLogger("dicom_node.deliver")
_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))

# DIMSE statuses that mean the peer has the instance (PS3.7 Annex C), with is_storage_warning.
_DELIVERED = STORED


class PeerSession(DestinationSession):
    """C-STOREs to one DICOM destination over a reused association.

    Per SOP class it proposes the syntax the rule produced and, in a second context, the
    uncompressed syntaxes. When the peer accepts only the latter, the instance is decoded
    (verified, so a lossless output goes out with the original pixels, bit-exact) and sent
    uncompressed; that is logged once per SOP class.
    """

    MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255

    def __init__(self, dest: DicomDestination):
        from node import pynetdicom_patches

        # with them, send_c_store(path) streams the file's encoded dataset in PDU-sized
        # chunks instead of decoding it whole: it needs a context in the file's exact syntax,
        # which is what _store picks. The service installed them already; tests may not have.
        pynetdicom_patches.install()
        self.dest = dest
        self.assoc = None
        self.sent = 0
        self.last_used = 0.0
        self._proposed: set[str] = set()
        self._warned: set[str] = set()
        self._on_report: OnReport | None = None  # settles the N-EVENT-REPORTs it receives
        # pynetdicom serves a peer's N-EVENT-REPORT in a thread of its own, which sends the
        # response when the handler returns: one exchange at a time on the association, so
        # that the response never lands between the fragments of a C-STORE being sent
        self._exchange = threading.Lock()
        self._reporters: list[threading.Thread] = []  # report threads sending their response

    def _allowed(self, syntax: str) -> bool:
        return self.dest.accept_syntaxes is None or syntax in self.dest.accept_syntaxes

    def _open(self, wanted: list[tuple[str, str]]) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.dest.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout
        ae.connection_timeout = self.dest.timeout
        ae.maximum_pdu_size = 0
        uncompressed = [ts for ts in _UNCOMPRESSED if self._allowed(ts)]
        proposed: set[str] = set()
        count = 0
        handlers = []
        if self.dest.storage_commitment:  # the N-ACTION goes on the C-STOREs' association
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, _UNCOMPRESSED)
            count += 1
            handlers.append((evt.EVT_N_EVENT_REPORT, self._on_event_report))
        for sop_class, syntax in wanted:
            extra = int(sop_class not in proposed and bool(uncompressed))
            if count + 1 + extra > self.MAX_CONTEXTS:
                break
            if self._allowed(syntax) and syntax not in _UNCOMPRESSED:
                ae.add_requested_context(sop_class, [syntax])
                count += 1
            if sop_class not in proposed and uncompressed:
                ae.add_requested_context(sop_class, uncompressed)
                count += 1
            proposed.add(sop_class)
        tls_args = None
        if self.dest.tls is not None:
            from node.tls import client_context

            tls_args = (client_context(self.dest.tls), self.dest.tls.server_name or self.dest.host)
        assoc = ae.associate(
            self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=tls_args,
            evt_handlers=handlers,
        )  # fmt: skip
        if not assoc.is_established:
            how = "rejected" if assoc.is_rejected else "failed"
            raise DeliveryError(
                f"association with {self.dest.ae_title}@{self.dest.host}:{self.dest.port} {how}"
            )
        set_nodelay(assoc)
        self.assoc, self._proposed, self.sent = assoc, proposed, 0

    def deliver(self, batch: Sequence[Delivery], stopping: Callable[[], bool]) -> Iterator[Result]:
        """One C-STORE per delivery, each settled on its own; the rest of the batch shapes a
        new association (its SOP classes and syntaxes are proposed up front)."""
        for i, d in enumerate(batch):
            if stopping():
                return
            upcoming = [(r.sop_class, r.syntax) for r in batch[i + 1 :]]
            try:
                self.send(Path(d.path), d.sop_class, d.syntax, upcoming)
            except Exception as exc:  # e.g. a file that cannot be read: not transient
                yield Failed((d,), exc)
                if self.transient(exc):  # the peer is unreachable: stop this batch
                    return
                continue
            yield Delivered((d,))

    def send(self, path: Path, sop_class: str, syntax: str, upcoming: list[tuple[str, str]]) -> int:
        """C-STORE `path`; `upcoming` (SOP class, syntax) pairs shape a new association."""
        limit = self.dest.max_per_association
        if self.assoc is not None and (
            not self.assoc.is_established
            or sop_class not in self._proposed
            or (limit and self.sent >= limit)
        ):
            self.close()
        if self.assoc is None:
            self._open([(sop_class, syntax), *upcoming])
        try:
            with self._exchange:
                self._responses_sent()
                return self._store(path, sop_class, syntax)
        finally:
            self.sent += 1
            self.last_used = time.monotonic()

    def _store(self, path: Path, sop_class: str, syntax: str) -> int:
        accepted = {
            cx.transfer_syntax[0] for cx in self.assoc.accepted_contexts
            if cx.abstract_syntax == sop_class
        }  # fmt: skip
        if syntax in accepted:
            status = self.assoc.send_c_store(path)
        elif plain := next((ts for ts in _UNCOMPRESSED if ts in accepted), None):
            if sop_class not in self._warned:
                self._warned.add(sop_class)
                log.warning(
                    "%s does not accept %s for %s; sending uncompressed (%s)",
                    self.dest.name, syntax_name(syntax), sop_class, syntax_name(plain),
                )  # fmt: skip
            status = self.assoc.send_c_store(_decompressed(path, plain))
        else:
            raise DeliveryError(
                f"{self.dest.name} accepts neither {syntax_name(syntax)} nor an uncompressed "
                f"syntax for {sop_class}",
                retryable=False,
            )
        return _check_status(self.dest.name, status)

    # --- Storage Commitment (node/deliver/commitment.py) ----------------------------------------

    def reference(self, d: Delivery) -> Reference:
        """The UIDs in the file sent (a lossy output has its own SOP Instance UID)."""
        from pydicom import dcmread

        ds = dcmread(d.path, stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])  # fmt: skip
        meta = ds.file_meta
        sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or d.sop_class
        sop_instance = ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")
        if not sop_instance:
            raise DeliveryError(f"{d.path} has no SOP Instance UID", retryable=False)
        return Reference(str(sop_class), str(sop_instance))

    def request_commitment(
        self, transaction_uid: str, references: Sequence[Reference], on_report: OnReport
    ) -> None:
        """One N-ACTION (Request Storage Commitment) on the open association, or on a new one
        that proposes Storage Commitment alone."""
        self._on_report = on_report
        if self.assoc is not None and not self.assoc.is_established:
            self.close()
        if self.assoc is None:
            self._open([])
        if not any(cx.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL
                   for cx in self.assoc.accepted_contexts):  # fmt: skip
            raise DeliveryError(
                f"{self.dest.name} did not accept Storage Commitment (Push Model)", retryable=False
            )
        with self._exchange:
            self._responses_sent()
            try:
                status, _reply = self.assoc.send_n_action(
                    request_dataset(transaction_uid, references), REQUEST_COMMITMENT,
                    STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE,
                )  # fmt: skip
            except (RuntimeError, OSError) as exc:  # the association went meanwhile
                raise DeliveryError(f"{self.dest.name}: cannot send the commitment request: "
                                    f"{exc}") from exc  # fmt: skip
        self.last_used = time.monotonic()
        code = int(status.Status) if "Status" in status else None
        if code is None:
            raise DeliveryError(
                f"{self.dest.name}: no N-ACTION response (association aborted or timed out)"
            )
        if code != 0 and not 0xB000 <= code <= 0xBFFF:  # neither Success nor a Warning
            comment = status.get("ErrorComment", "")
            raise DeliveryError(
                f"{self.dest.name} answered the commitment request with status 0x{code:04X} "
                f"{comment}".strip(),
                retryable=is_out_of_resources(code) or code == 0x0213,  # resource limitation
            )
        log.debug("%s: asked to commit %d instance(s) (transaction %s)", self.dest.name,
                  len(references), transaction_uid)  # fmt: skip

    def _on_event_report(self, event) -> tuple[int, None]:
        """An N-EVENT-REPORT on the delivery's association (pynetdicom's thread, which sends
        the response once this returns): after the exchange in progress, if any."""
        with self._exchange:
            self._reporters.append(threading.current_thread())
            return answer_report(self.dest.name, event, self._on_report), None

    def _responses_sent(self) -> None:
        """Wait until the responses to the reports served so far have left (with _exchange)."""
        for thread in self._reporters:
            thread.join(self.dest.timeout)
        self._reporters = [thread for thread in self._reporters if thread.is_alive()]

    def close_if_idle(self) -> None:
        if self.assoc is not None and time.monotonic() - self.last_used > self.dest.idle_timeout:
            self.close()

    def close(self) -> None:
        if self.assoc is not None:
            if self.assoc.is_established:
                with self._exchange:
                    self._responses_sent()
                self.assoc.release()
            self.assoc = None


def _decompressed(path: Path, syntax: str) -> Dataset:
    """The instance at `path` with native pixel data, verified against the decoded input."""
    from pydicom import dcmread

    from node.config.targets import Target, TranscodeSpec
    from node.transcode.step import transcode

    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        result = transcode(ds, TranscodeSpec(Target(UID(ExplicitVRLittleEndian))))
        if result.dataset is None:
            raise DeliveryError(f"cannot decompress for this peer: {'; '.join(result.notes)}",
                                retryable=False)  # fmt: skip
        ds = result.dataset
    ds.file_meta.TransferSyntaxUID = syntax  # explicit <-> implicit is only an encoding choice
    return ds


def _check_status(name: str, status: Dataset) -> int:
    code = int(status.Status) if "Status" in status else None
    if code is None:
        raise DeliveryError(f"{name}: no C-STORE response (association aborted or timed out)")
    if code in _DELIVERED or is_storage_warning(code):
        return code
    comment = status.get("ErrorComment", "")
    raise DeliveryError(
        f"{name} answered status 0x{code:04X} {comment}".strip(),
        retryable=is_out_of_resources(code),  # try again later
    )


def answer_report(peer: str, event, on_report: OnReport | None) -> int:
    """The status that answers a Storage Commitment N-EVENT-REPORT (a pynetdicom event, on a
    delivery's association or one the peer opened to the Storage SCP), after `on_report`
    settled it."""
    request = event.request
    if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH_MODEL:
        log.warning("%s: an N-EVENT-REPORT for %s, not Storage Commitment; refused", peer,
                    request.AffectedSOPClassUID)  # fmt: skip
        return INVALID_ARGUMENT
    try:
        report = report_from(int(event.event_type), event.event_information)
    except Exception as exc:  # e.g. an Event Information that cannot be decoded
        log.warning("%s: unreadable Storage Commitment report: %s", peer, exc)
        return INVALID_ARGUMENT
    if on_report is None:
        log.error("%s: a Storage Commitment report with nothing to settle it", peer)
        return PROCESSING_FAILURE
    return on_report(report)


def set_nodelay(assoc) -> None:
    """pynetdicom never sets TCP_NODELAY; without it small PDUs wait on delayed ACKs."""
    from node.pynetdicom_patches import tcp_socket

    sock = tcp_socket(assoc)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


TYPE = DestinationType(DicomDestination, PeerSession)
