"""Storage Commitment (Push Model) for DICOM destinations, against real peers: Orthanc as the
commitment SCP (the node declared in its DicomModalities, so that it opens the association
back to the node's AE title and port with its report), and a pynetdicom SCP that holds its
reports until the test lets them go, reports failures, answers on the delivery's own
association, or never answers. Nothing leaves the spool before it is committed."""

from __future__ import annotations

import re
import threading
import time

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from tests.conftest import data_file, free_port, storescu, wait_for
from tests.harness import http_get
from tests.system.test_delivery import queue_table

pytestmark = pytest.mark.integration

COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
FILES = ("CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm")
# CT gets a lossy output, whose SOP Instance UID is its own: the request must name that one
RULES = (
    "  - {name: ct, match: {Modality: CT}, transcode: {syntax: JPEGLSNearLossless, jls_error: 2},"
    " send_to: [pacs]}\n"
    "  - {name: rest, transcode: {syntax: keep}, send_to: [pacs]}"
)


def config(peer_port: int, ae: str, extra: str = "", http: int | None = None) -> str:
    """The node: calling AE titles limited to storescu's, so that the peer's reports get in
    only as the reports of a committing destination."""
    return (
        "node: {host: 127.0.0.1, port: {port}, spool: ./spool, workers: 2}\n"
        + (f"http: {{host: 127.0.0.1, port: {http}}}\n" if http else "")
        + 'accept: {calling_aets: ["STORESCU"], echo_any_aet: false}\n'
        "destinations:\n"
        f"  pacs: {{type: dicom, host: 127.0.0.1, port: {peer_port}, ae_title: {ae}, timeout: 10,"
        " storage_commitment: true,"
        f" retry: {{initial_delay: 0.2, max_delay: 1, give_up_after: 1h}}{extra}}}\n"
        f"rules:\n{RULES}\n"
    )


def spooled(node) -> int:
    return len(list((node.spool / "incoming").glob("*.dcm")))


def awaiting(node) -> int:
    """The awaiting-commitment column of `dicom-node queue` for pacs."""
    return int(queue_table(node)["pacs"][5])


class CommitmentPeer:
    """A pynetdicom Storage and Storage Commitment SCP (AE title PEER). It records what it
    stores and each N-ACTION; its reports follow `mode`:
    - "hold": each waits until `release()` lets the reports of the requests received so far
      go, each on an association the peer opens to the node (DICOM-NODE at `node_port`);
    - "same": at once, on the association the request came on;
    - "never": none.
    `fail_first`: SOP Instance UIDs reported failed (Failure Reason 0x0110) the first time they
    are asked for.

    The node asks once per batch it sent: instances that arrive apart are asked apart."""

    def __init__(self, mode: str = "hold", fail_first: set[str] | None = None):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.mode = mode
        self.fail_first = set(fail_first or ())
        self.node_port = 0
        self.stored: list[str] = []  # SOP Instance UIDs, in the order received
        self.requests: list[tuple[str, list[str], float]] = []  # (transaction, UIDs, time)
        self.report_statuses: list[int | None] = []  # the node's answers to the reports
        self.reported_on_same_association = 0
        self._gates: list[threading.Event] = []  # one per request: its report may go
        self._lock = threading.Lock()
        self.port = free_port()
        ae = AE(ae_title="PEER")
        syntaxes = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.80",
                    "1.2.840.10008.1.2.4.81"]  # fmt: skip
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(COMMITMENT)
        ae.add_requested_context(COMMITMENT)  # for the reports on its own associations
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action),
                    (evt.EVT_DIMSE_SENT, self._sent)]  # fmt: skip
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        self.ae = ae
        self._pending_same: dict[int, Dataset] = {}  # association -> report, after the response
        self._closed = False

    def _store(self, event) -> int:
        with self._lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event):
        info = event.action_information
        uids = [str(item.ReferencedSOPInstanceUID) for item in info.ReferencedSOPSequence]
        gate = threading.Event()
        with self._lock:
            asked = {uid for _, earlier, _ in self.requests for uid in earlier}
            self.requests.append((str(info.TransactionUID), uids, time.monotonic()))
            self._gates.append(gate)
        failed = (self.fail_first & set(uids)) - asked
        report = _report(info, failed)
        if self.mode == "same":
            with self._lock:
                self._pending_same[id(event.assoc)] = report
        elif self.mode == "hold":
            threading.Thread(target=self._report_later, args=(report, gate), daemon=True).start()
        return 0x0000, None

    def _sent(self, event) -> None:
        """The N-ACTION response has left: a report "same" goes on this association now."""
        if type(event.message).__name__ != "N_ACTION_RSP":
            return
        with self._lock:
            report = self._pending_same.pop(id(event.assoc), None)
        if report is not None:
            assoc = event.assoc
            threading.Thread(target=self._report_on, args=(assoc, report), daemon=True).start()

    def _report_on(self, assoc, report: Dataset) -> None:
        status = _send_report(assoc, report)
        with self._lock:
            self.reported_on_same_association += 1
            self.report_statuses.append(status)

    def _report_later(self, report: Dataset, gate: threading.Event) -> None:
        gate.wait()
        if self._closed:
            return
        assoc = self.ae.associate("127.0.0.1", self.node_port, ae_title="DICOM-NODE")
        status = None
        if assoc.is_established:
            status = _send_report(assoc, report)
            assoc.release()
        with self._lock:
            self.report_statuses.append(status)

    def release(self) -> None:
        with self._lock:
            gates = list(self._gates)
        for gate in gates:
            gate.set()

    def asked(self, since: int = 0) -> list[str]:
        """The SOP Instance UIDs of the requests from the `since`-th on, in order."""
        with self._lock:
            return [uid for _, uids, _ in self.requests[since:] for uid in uids]

    def close(self) -> None:
        self._closed = True
        self.release()
        self.server.shutdown()
        self.ae.shutdown()


def _report(request: Dataset, failed: set[str]) -> Dataset:
    """The Event Information of the report for `request`: everything committed but `failed`."""
    report = Dataset()
    report.TransactionUID = request.TransactionUID
    ok, bad = [], []
    for item in request.ReferencedSOPSequence:
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.ReferencedSOPClassUID
        ref.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
        if str(item.ReferencedSOPInstanceUID) in failed:
            ref.FailureReason = 0x0110
            bad.append(ref)
        else:
            ok.append(ref)
    if ok:
        report.ReferencedSOPSequence = DicomSequence(ok)
    if bad:
        report.FailedSOPSequence = DicomSequence(bad)
    return report


def _send_report(assoc, report: Dataset) -> int | None:
    event_type = 2 if "FailedSOPSequence" in report else 1
    status, _reply = assoc.send_n_event_report(report, event_type, COMMITMENT,
                                               COMMITMENT_INSTANCE)  # fmt: skip
    return int(status.Status) if "Status" in status else None


@pytest.fixture
def peer_factory():
    peers: list[CommitmentPeer] = []

    def make(mode: str = "hold", fail_first: set[str] | None = None) -> CommitmentPeer:
        peer = CommitmentPeer(mode, fail_first)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


def _metric(http: int, name: str) -> float:
    for line in http_get(http, "/metrics").decode().splitlines():
        if line.startswith(f'{name}{{destination="pacs"}} '):
            return float(line.split()[-1])
    return 0.0


# --- Orthanc as the commitment SCP --------------------------------------------------------------


def test_orthanc_commits_what_the_node_sent_and_only_then_it_leaves_the_spool(
    node_factory, orthanc
):
    port = free_port()
    orthanc.declare_modality("node", "DICOM-NODE", "127.0.0.1", port)
    orthanc.start()
    node = node_factory(config(orthanc.dicom_port, "ORTHANC"), port=port)
    sources = {name: dcmread(data_file(name)) for name in FILES}
    storescu(node.port, [data_file(name) for name in FILES])
    orthanc.wait_count(len(FILES))
    node.wait_spool_empty(timeout=60)  # committed: Orthanc's report came on its association
    assert awaiting(node) == 0 and queue_table(node)["pacs"][1] == "0"
    got = {ds.SOPInstanceUID for ds in orthanc.datasets()}
    ct = sources["CT_small.dcm"].SOPInstanceUID
    assert ct not in got  # the lossy output's own UID is what Orthanc has, and committed
    assert {sources[n].SOPInstanceUID for n in FILES if n != "CT_small.dcm"} <= got
    log = node.log_text()
    committed = re.findall(r"pacs committed (\d+) instance\(s\) of transaction", log)
    assert sum(map(int, committed)) == 3  # by Orthanc's reports, on associations it opened
    assert "rejected association" not in log and "not committed" not in log


# --- a pynetdicom SCP ---------------------------------------------------------------------------


def test_instances_await_commitment_until_the_report_arrives(node_factory, peer_factory):
    peer = peer_factory("hold")
    http = free_port()
    node = node_factory(config(peer.port, "PEER", http=http))
    peer.node_port = node.port
    sources = {name: dcmread(data_file(name)) for name in FILES}
    storescu(node.port, [data_file(name) for name in FILES])
    wait_for(lambda: len(peer.asked()) == 3, 60, "all three asked to be committed")
    assert sorted(peer.asked()) == sorted(peer.stored)  # the UIDs the peer got, each once
    assert sources["CT_small.dcm"].SOPInstanceUID not in peer.asked()  # the lossy output's own
    # the peer has them all; nothing is released before its report
    wait_for(lambda: awaiting(node) == 3, 30, "3 awaiting commitment")
    assert spooled(node) == 3 and queue_table(node)["pacs"][1] == "0"
    assert _metric(http, "dicom_node_queue_awaiting_commitment") == 3
    assert _metric(http, "dicom_node_instances_forwarded_total") == 0

    peer.release()
    node.wait_spool_empty(timeout=60)
    assert awaiting(node) == 0
    assert _metric(http, "dicom_node_queue_awaiting_commitment") == 0
    assert _metric(http, "dicom_node_instances_forwarded_total") == 3
    wait_for(lambda: len(peer.report_statuses) == len(peer.requests), 30, "every report answered")
    assert set(peer.report_statuses) == {0x0000}
    assert len(peer.stored) == 3 and len(peer.asked()) == 3  # nothing sent or asked twice


def test_a_report_on_the_delivery_association_releases_the_instance(node_factory, peer_factory):
    """One instance: pynetdicom, as the peer, cannot take a C-STORE on the association while
    it waits for the answer to its own report (it would take the request for the answer)."""
    peer = peer_factory("same")
    node = node_factory(config(peer.port, "PEER"))
    storescu(node.port, [data_file("CT_small.dcm")])
    node.wait_spool_empty(timeout=60)
    wait_for(lambda: peer.report_statuses, 30, "the report answered")
    assert peer.reported_on_same_association == 1 and peer.report_statuses == [0x0000]
    assert awaiting(node) == 0 and peer.asked() == peer.stored and len(peer.stored) == 1


def test_failed_references_are_sent_again_and_the_committed_ones_released(
    node_factory, peer_factory
):
    mr = dcmread(data_file("MR_small.dcm")).SOPInstanceUID
    peer = peer_factory("hold", fail_first={mr})
    node = node_factory(config(peer.port, "PEER"))
    peer.node_port = node.port
    storescu(node.port, [data_file(name) for name in FILES])
    wait_for(lambda: len(peer.asked()) == 3, 60, "all three asked to be committed")
    first = len(peer.requests)
    peer.release()  # the reports so far: MR failed, the other two committed
    wait_for(lambda: peer.asked(first) == [mr], 60, "MR sent and asked for again")
    assert peer.stored.count(mr) == 2 and len(peer.stored) == 4
    # the committed ones are gone; MR, sent again, stays until its own report
    wait_for(lambda: spooled(node) == 1, 30, "the two committed ones released")
    assert awaiting(node) == 1 and int(queue_table(node)["pacs"][1]) == 0
    assert "1 not committed, to be sent again" in node.log_text()
    peer.release()
    node.wait_spool_empty(timeout=60)
    table = queue_table(node)["pacs"]
    assert (table[1], table[4], table[5]) == ("0", "0", "0")  # nothing pending, dead, awaiting
    wait_for(lambda: len(peer.report_statuses) == len(peer.requests), 30, "every report answered")
    assert set(peer.report_statuses) == {0x0000}


def test_no_answer_keeps_everything_and_asks_again_after_commitment_timeout(
    node_factory, peer_factory
):
    peer = peer_factory("never")
    node = node_factory(config(peer.port, "PEER", ", commitment_timeout: 2s"))
    storescu(node.port, [data_file(name) for name in FILES])
    wait_for(lambda: len(peer.asked()) > len(set(peer.asked())), 60, "a request sent again")
    again = next(uid for uid in peer.asked() if peer.asked().count(uid) > 1)
    (uid1, _, t1), (uid2, _, t2) = [r for r in peer.requests if again in r[1]][:2]
    assert t2 - t1 >= 1.5 and uid1 != uid2  # after commitment_timeout, a new transaction
    assert len(peer.stored) == 3  # asked again, not sent again
    wait_for(lambda: awaiting(node) == 3, 30, "all three awaiting")
    assert spooled(node) == 3  # nothing released
    assert "no Storage Commitment report for" in node.log_text()


def test_kill_9_while_awaiting_commitment_keeps_them_and_they_get_committed(
    node_factory, peer_factory
):
    peer = peer_factory("hold")
    cfg = config(peer.port, "PEER")
    node = node_factory(cfg)
    peer.node_port = node.port
    storescu(node.port, [data_file(name) for name in FILES])
    wait_for(lambda: len(peer.asked()) == 3, 60, "all three asked to be committed")
    wait_for(lambda: awaiting(node) == 3, 30, "3 awaiting commitment")
    node.kill9()
    assert awaiting(node) == 3 and spooled(node) == 3  # read from the queue while it is down
    before = len(peer.requests)
    restarted = node_factory(cfg, port=node.port)
    # whatever the peer reported while the node was down is lost: it asks again at start
    wait_for(lambda: sorted(peer.asked(before)) == sorted(peer.stored), 60,
             "the requests sent again after the restart")  # fmt: skip
    assert len(peer.stored) == 3 and spooled(restarted) == 3
    peer.release()  # every report: the first requests' are stale, the new ones commit
    restarted.wait_spool_empty(timeout=60)
    assert awaiting(restarted) == 0
    wait_for(lambda: len(peer.report_statuses) == len(peer.requests), 30, "every report answered")
    assert set(peer.report_statuses) == {0x0000}
    assert "which awaits nothing" in restarted.log_text()  # the stale ones, answered all the same
