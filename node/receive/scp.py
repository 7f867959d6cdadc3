"""The Storage SCP: pynetdicom's server and the association policy (with c_store.py, the
only modules that know pynetdicom serves; what they use of pynetdicom's internals is in
node/pynetdicom_patches.py). A C-STORE is written to the spool and fsync'd, and only then
answered Success; nothing here decodes pixels.

pynetdicom negotiates, releases and answers C-ECHO; C-STORE requests never reach its DIMSE
layer (c_store.py serves them in the socket's thread). Were one to, pynetdicom's default
handler would answer it with a failure status, never Success.

It also takes Storage Commitment reports (N-EVENT-REPORT, Push Model) that a destination's
peer sends on an association it opens to the node, and hands them on (`on_commitment`: the
pipeline, which finds the destination by the report's Transaction UID).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom.uid import UID_dictionary
from pynetdicom import AE, evt
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid, uid_to_service_class

from node import pynetdicom_patches
from node.config import Config
from node.deliver.commitment import STORAGE_COMMITMENT_PUSH_MODEL, OnReport
from node.deliver.destinations.dicom import answer_report, set_nodelay
from node.ops import observe as metrics
from node.pynetdicom_patches import (
    association_request,
    awaiting_local_response,
    close_connection,
    end_acse_wait,
    send_reject,
)
from node.receive import c_store
from node.receive.connection_slots import ConnectionSlots
from node.spool import Spool, SpoolEntry
from node.tls import server_context
from node.transcode.codecs import receivable_syntaxes
from node.vocabulary.status import OUT_OF_RESOURCES, SUCCESS

# Seconds making a received instance durable may take before the log says so: a sender waits
# for it, and gives up after its DIMSE timeout (often 30-60 s).
SLOW_STORE = 5.0

log = logging.getLogger("dicom_node.receive")


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pydicom knows, retired and trial ones included (older scanners
    still send e.g. Ultrasound Image Storage (Retired) 1.2.840.10008.5.1.4.1.1.6)."""
    return sorted(
        uid
        for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and "Commitment" not in name
    )


def _register_unknown_storage_classes() -> None:
    """pynetdicom aborts a C-STORE whose SOP class it has no service class for (it lacks the
    retired ones): register those with its Storage service class."""
    for uid in storage_sop_classes():
        if uid_to_service_class(uid) is ServiceClass:
            register_uid(uid, UID_dictionary[uid][4] or f"Storage_{uid}", StorageServiceClass)


def _reject(assoc, result: int, source: int, reason: int) -> None:
    """A-ASSOCIATE-RJ from an EVT_REQUESTED handler. pynetdicom queues the PDU for its DUL
    thread and closes the socket as soon as the handler returns; wait (briefly) until the PDU
    has left (the state machine leaves Sta3), so the peer reads the reason, not a reset."""
    send_reject(assoc, result, source, reason)
    deadline = time.monotonic() + 2.0
    while awaiting_local_response(assoc) and time.monotonic() < deadline:
        time.sleep(0.001)


def _verification_only(primitive) -> bool:
    """An association that proposes nothing but Verification: an administrator's C-ECHO."""
    proposed = primitive.presentation_context_definition_list
    return bool(proposed) and all(cx.abstract_syntax == Verification for cx in proposed)


def _commitment_only(primitive) -> bool:
    """An association that proposes Storage Commitment (and perhaps Verification), nothing
    else: a peer bringing the report of a commitment the node asked for."""
    proposed = primitive.presentation_context_definition_list
    syntaxes = {cx.abstract_syntax for cx in proposed}
    return STORAGE_COMMITMENT_PUSH_MODEL in syntaxes and syntaxes <= {
        STORAGE_COMMITMENT_PUSH_MODEL, Verification
    }


class StorageSCP:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        on_stored: Callable[[SpoolEntry], None],
        on_commitment: OnReport | None = None,
    ):
        self.config = config
        self.spool = spool
        self.on_stored = on_stored
        self.on_commitment = on_commitment  # settles a Storage Commitment report
        self._server = None
        _register_unknown_storage_classes()
        ae = AE(ae_title=config.node.ae_title)
        limits = config.limits
        # pynetdicom counts its association threads against maximum_associations, also those
        # whose peer has gone; the node counts open connections (ConnectionSlots, by their
        # close event) and established associations (_on_requested) itself.
        ae.maximum_associations = 1 << 20
        ae.maximum_pdu_size = limits.max_pdu_size
        ae.acse_timeout = limits.association_timeout
        ae.dimse_timeout = limits.dimse_timeout
        ae.network_timeout = limits.idle_timeout
        # pydicom checks every value it encodes or decodes here (command sets, File Meta) and
        # only warns, which the node does not show: a tenth of the receiving CPU for nothing.
        # Workers (other processes) keep the default.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
        # the service installed them already; tests and benchmarks build a StorageSCP alone
        pynetdicom_patches.install()
        c_store.serve_c_store_requests(ae, self, spool.tmp)
        syntaxes = list(receivable_syntaxes())
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, syntaxes)
        ae.add_supported_context(Verification)
        # Storage Commitment reports from peers: the peer (the commitment SCP) may propose
        # the SCP role for itself (role selection), or nothing (default roles); either is fine
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, ["1.2.840.10008.1.2.1",
                                 "1.2.840.10008.1.2"], scu_role=True, scp_role=True)  # fmt: skip
        self.ae = ae
        # an association thread not started yet (ident None) is open too
        self.connections = ConnectionSlots(
            still_open=lambda assoc: assoc.is_alive() or assoc.ident is None
        )

    def start(self) -> None:
        node = self.config.node
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_N_EVENT_REPORT, self._on_event_report),
        ]
        context = server_context(node.tls) if node.tls is not None else None
        self._server = self.ae.start_server(
            (node.host, node.port), block=False, evt_handlers=handlers, ssl_context=context
        )
        log.info("listening as %s on %s:%d%s", node.ae_title, node.host, self.port,
                 " (TLS" + (", client certificates required)" if node.tls.require_client_cert
                            else ")") if node.tls else "")  # fmt: skip

    def alive(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.node.port

    def stop(self, deadline: float = 30.0) -> None:
        """Stop accepting; associations in progress get `deadline` seconds to finish (each
        C-STORE they complete is spooled and acked as usual), then the rest are aborted."""
        server, self._server = self._server, None
        if server is not None:
            # Only established associations can be carrying instances; a socket that never
            # sent an A-ASSOCIATE-RQ (a port probe, a stalled client) is simply aborted.
            running = [a for a in server.active_associations if a.is_established]
            server.shutdown()  # closes the listening socket; running associations go on
            end = time.monotonic() + deadline
            for assoc in running:
                assoc.join(max(0.0, end - time.monotonic()))
            left = [a for a in running if a.is_alive()]
            if left:
                log.warning("aborting %d association(s) still open after %.0f s",
                            len(left), deadline)  # fmt: skip
        self.ae.shutdown()

    # --- handlers: run on the association threads -----------------------------------------

    def _on_connection(self, event) -> None:
        limits = self.config.limits
        address = event.address[0]
        refusal = self.connections.admit(
            event.assoc, address, limits.max_connections, limits.max_connections_per_address
        )
        if refusal is not None:
            log.warning("closed a connection from %s: %s", address, refusal.why)
            metrics.REJECTED_ASSOCIATIONS.labels(refusal.limit).inc()
            close_connection(event.assoc)  # no A-ABORT yet: nothing was negotiated (Sta2)
            return
        set_nodelay(event.assoc)

    def _on_connection_closed(self, event) -> None:
        """The connection is gone (runs on its socket's thread): its slot is free at once.
        If it went before its A-ASSOCIATE-RQ arrived, the association's thread would wait
        for one until association_timeout; a None ends that wait as the timeout does."""
        assoc = event.assoc
        self.connections.release(assoc)
        if assoc.is_acceptor and association_request(assoc) is None:
            end_acse_wait(assoc)

    def _on_requested(self, event) -> None:
        """Access control, before anything is accepted: network, calling and called AE title.
        A refusal is an A-ASSOCIATE-RJ (rejected-permanent, by the service user) with the
        reason PS3.8 Table 9-21 defines, a warning in the log and a metric. With
        accept.echo_any_aet, an association proposing only Verification needs no allowed
        calling AE title (it can do nothing but C-ECHO)."""
        config = self.config
        accept = config.accept
        primitive = association_request(event.assoc)
        calling = primitive.calling_ae_title.strip()
        called = primitive.called_ae_title.strip()
        address = event.assoc.requestor.address
        reporter = _commitment_only(primitive) and self._commitment_peer(calling, called)
        if not accept.allows_address(address):
            refusal = ("network", 0x01, f"address {address} is outside accept.networks")
        elif not any(fnmatchcase(calling, p) for p in accept.calling_aets) and not (
            accept.echo_any_aet and _verification_only(primitive)
        ) and not reporter:
            refusal = ("calling-aet", 0x03, "calling AE title not allowed")
        elif not any(fnmatchcase(called, p) for p in accept.called_aets) and not reporter:
            refusal = ("called-aet", 0x07, f"called AE title {called!r} is not this node's")
        else:
            busy = sum(1 for a in self.ae.active_associations if a.is_acceptor and a.is_established)
            if busy < config.limits.max_associations:
                return
            log.warning("rejected association from %s (%s): %d associations running, "
                        "limits.max_associations", calling, address, busy)  # fmt: skip
            # counted first: once the A-ASSOCIATE-RJ has left, anyone may look at the metric
            metrics.REJECTED_ASSOCIATIONS.labels("max-associations").inc()
            # rejected-transient, by the service provider (presentation), local limit exceeded
            _reject(event.assoc, 0x02, 0x03, 0x02)
            return
        kind, reason, why = refusal
        log.warning("rejected association from %s (%s) to %s: %s", calling, address, called, why)
        metrics.REJECTED_ASSOCIATIONS.labels(kind).inc()
        _reject(event.assoc, 0x01, 0x01, reason)

    def _commitment_peer(self, calling: str, called: str) -> bool:
        """Whether `calling` is the AE title of a destination that asks for Storage
        Commitment, calling the title the node sends it from: its reports are let in
        (networks and limits still apply; such an association can carry nothing else)."""
        return any(
            getattr(dest, "storage_commitment", False)
            and dest.ae_title == calling
            and called in (dest.calling_ae_title, self.config.node.ae_title)
            for dest in self.config.destinations.values()
        )

    def _on_event_report(self, event) -> tuple[int, None]:
        """A Storage Commitment report on an association a peer opened (pynetdicom's thread)."""
        calling = event.assoc.requestor.ae_title.strip()
        return answer_report(calling, event, self.on_commitment), None

    def store_received(self, received: Path, size: int, calling: str) -> int:
        """Spool a received file in the spool's tmp/ (its Part 10 header, with the AE titles
        rules may route on, then a dataset of `size` bytes); the C-STORE status to answer."""
        config = self.config  # one configuration for the whole request, whatever reloads do
        problem = self.room_problem()  # again: other associations may have filled it meanwhile
        if problem:  # the sender may retry later; never Success without storage
            return self.refuse(calling, problem)
        started = time.monotonic()
        try:  # c_store refused it already if it is above limits.max_instance_size
            entry = self.spool.adopt_received(received, config.key)  # renamed, not copied
        except OSError as exc:
            return self.refuse(calling, f"cannot spool it: {exc}")
        took = time.monotonic() - started
        if took > SLOW_STORE:  # the sender waits for this: its DIMSE timeout may be near
            log.warning("storing an instance from %s took %.1f s (fsync of the spool's "
                        "disk): its sender waited that long for the response", calling, took)
        metrics.RECEIVED.labels(calling).inc()
        metrics.BYTES_IN.inc(size)
        self.on_stored(entry)
        return SUCCESS

    @property
    def max_instance_size(self) -> int:
        return self.config.limits.max_instance_size

    def room_problem(self) -> str | None:
        """Why the spool cannot take an instance now (asked before any of it is written, and
        again before it is stored), or None."""
        return self.spool.room_problem()

    @staticmethod
    def refuse(calling: str, why: str, status: int = OUT_OF_RESOURCES) -> int:
        """A failure status, logged and counted; by default 0xA700 Out of Resources (the
        sender may try again later)."""
        log.error("refused an instance from %s with 0x%04X: %s", calling, status, why)
        metrics.REFUSED.labels(f"0x{status:04X}").inc()
        return status
