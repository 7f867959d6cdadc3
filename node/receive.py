"""The Storage SCP: the only module that knows pynetdicom serves. A C-STORE is written to the
spool and fsync'd, and only then answered Success; nothing here decodes pixels.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path

from pydicom.uid import UID_dictionary
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid, uid_to_service_class

from node import observe as metrics
from node.config import Config
from node.deliver import set_nodelay
from node.spool import Spool, SpoolEntry
from node.syntaxes import receivable_syntaxes

log = logging.getLogger("dicom_node.receive")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
MAX_PDU = 1 << 20  # what senders may put in one PDU: bounded memory, ~10-15% faster than 16 KiB


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


def _stream_received_datasets_to(folder: Path) -> None:
    """pynetdicom writes each received dataset to a temporary file as its PDUs arrive, instead
    of collecting it in memory (twice: the buffer, then the bytes the handler asks for), so a
    1 GB multi-frame instance costs the node no memory. The file goes in the spool's tmp/, not
    /tmp, which may be RAM (tmpfs); leftovers after a crash are removed with the rest of tmp/.
    pynetdicom unlinks it when the handler returns; the handler copies it first."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined]
        tempfile.NamedTemporaryFile, dir=folder
    )


class StorageSCP:
    def __init__(self, config: Config, spool: Spool, on_stored: Callable[[SpoolEntry], None]):
        self.config = config
        self.spool = spool
        self.on_stored = on_stored
        self._server = None
        _register_unknown_storage_classes()
        ae = AE(ae_title=config.node.ae_title)
        ae.maximum_associations = 32
        ae.maximum_pdu_size = MAX_PDU
        _stream_received_datasets_to(spool.tmp)
        syntaxes = list(receivable_syntaxes())
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, syntaxes)
        ae.add_supported_context(Verification)
        self.ae = ae

    def start(self) -> None:
        node = self.config.node
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
        ]
        self._server = self.ae.start_server(
            (node.host, node.port), block=False, evt_handlers=handlers
        )
        log.info("listening as %s on %s:%d", node.ae_title, node.host, self.port)

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
        set_nodelay(event.assoc)

    def _on_requested(self, event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        patterns = self.config.accept.calling_aets
        if not any(fnmatchcase(calling, p) for p in patterns):
            address = event.assoc.requestor.address
            log.warning("rejected association from %s (%s): calling AE title not allowed",
                        calling, address)  # fmt: skip
            # A-ASSOCIATE-RJ: rejected-permanent, service-user, calling-AE-title-not-recognized
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            metrics.REJECTED_ASSOCIATIONS.labels("calling-aet").inc()

    def _on_store(self, event) -> int:
        requestor = event.assoc.requestor
        problem = self.spool.room_problem()
        if problem:  # the sender may retry later; never Success without storage
            log.error("refused an instance from %s with 0xA700: %s", requestor.ae_title, problem)
            metrics.REFUSED.labels("0xA700").inc()
            return STATUS_OUT_OF_RESOURCES
        try:
            meta = event.file_meta
            meta.SourceApplicationEntityTitle = self.config.node.ae_title
            meta.SendingApplicationEntityTitle = requestor.ae_title.strip()
            # The title the sender called (rules may route on it), not necessarily ours.
            meta.ReceivingApplicationEntityTitle = requestor.primitive.called_ae_title.strip()
            received = Path(event.dataset_path)  # pynetdicom's file: its meta, then the dataset
            _, offset = split_dataset(received)
            size = received.stat().st_size - offset
            entry = self.spool.store_file(meta, received, offset, self.config.key)
        except OSError as exc:
            log.error(
                "cannot spool an instance from %s: %s; answered 0xA700", requestor.ae_title, exc
            )
            metrics.REFUSED.labels("0xA700").inc()
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # a request so malformed it cannot even be framed
            log.error("cannot understand a C-STORE from %s: %s", requestor.ae_title, exc)
            metrics.REFUSED.labels("0xC000").inc()
            return STATUS_CANNOT_UNDERSTAND
        metrics.RECEIVED.labels(meta.SendingApplicationEntityTitle).inc()
        metrics.BYTES_IN.inc(size)
        self.on_stored(entry)
        return STATUS_SUCCESS
