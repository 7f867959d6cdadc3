"""Storage Commitment (Push Model, PS3.4 Annex J) as the destination worker sees it: what a
session that can ask a peer to commit what it sent provides, and the peer's answer.

A DICOM destination with `storage_commitment: true` sends its C-STOREs, then asks the peer, in
one N-ACTION (transaction), to commit the instances it got; the queue holds them
(`awaiting-commitment`) until an N-EVENT-REPORT for that transaction says which were committed
and which failed. The report arrives on the delivery's own association while it is open, or on
one the peer opens to the node's Storage SCP (node/receive/scp.py); both end in the worker of
the destination whose transaction it is (DestinationWorker.settle_commitment).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from node.deliver.queue import Delivery

# PS3.4 J.3: the Storage Commitment Push Model SOP class and its well-known instance
STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID
ALL_COMMITTED = 1  # N-EVENT-REPORT Event Type ID: every reference committed
SOME_FAILED = 2  # ... some were not (FailedSOPSequence)

# N-EVENT-REPORT response statuses (PS3.7 Annex C)
REPORT_TAKEN = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT = 0x0115


@dataclass(frozen=True)
class Reference:
    """An instance as the peer knows it: the SOP Class and Instance UIDs of what it got."""

    sop_class: str
    sop_instance: str


@dataclass(frozen=True)
class CommitmentReport:
    """An N-EVENT-REPORT of the Storage Commitment Push Model: for `transaction_uid`, the
    references committed and those that failed (with the Failure Reason, when given)."""

    transaction_uid: str
    event_type: int  # ALL_COMMITTED or SOME_FAILED
    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int | None], ...]


OnReport = Callable[[CommitmentReport], int]  # settles a report; the status to answer it with


class CommittingSession(Protocol):
    """What a destination session offers when its destination asks for Storage Commitment."""

    def reference(self, d: Delivery) -> Reference:
        """The UIDs the peer got for `d` (read from the file it sent: a lossy output carries
        its own SOP Instance UID)."""
        ...

    def request_commitment(
        self, transaction_uid: str, references: Sequence[Reference], on_report: OnReport
    ) -> None:
        """Ask the peer to commit `references` as one transaction (an N-ACTION, on the
        association the instances went over when it is still open); `on_report` gets the
        reports that arrive on that association. Raises DeliveryError when the peer did not
        take the request (retryable: not now; otherwise it refused it)."""
        ...


def report_from(event_type: int, info: Dataset) -> CommitmentReport:
    """The report an N-EVENT-REPORT's Event Type ID and Event Information make; ValueError
    when it is not a Storage Commitment result."""
    if event_type not in (ALL_COMMITTED, SOME_FAILED):
        raise ValueError(f"Event Type ID {event_type} is not a Storage Commitment result")
    transaction_uid = str(info.get("TransactionUID", "") or "")
    if not transaction_uid:
        raise ValueError("the Event Information has no Transaction UID")

    def reference(item) -> Reference:
        return Reference(str(item.get("ReferencedSOPClassUID", "") or ""),
                         str(item.get("ReferencedSOPInstanceUID", "") or ""))  # fmt: skip

    committed = tuple(reference(item) for item in info.get("ReferencedSOPSequence", None) or ())
    failed = tuple(
        (reference(item), int(item.FailureReason) if "FailureReason" in item else None)
        for item in info.get("FailedSOPSequence", None) or ()
    )
    return CommitmentReport(transaction_uid, event_type, committed, failed)


def request_dataset(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    """The N-ACTION's Action Information (PS3.4 J.3.2.1.1.1)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for ref in references:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class
        item.ReferencedSOPInstanceUID = ref.sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = DicomSequence(items)
    return ds
