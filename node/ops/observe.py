"""What the person on call looks at: Prometheus metrics on /metrics and a health verdict on
/healthz (200, or 503 with the reason), served from the `http:` section of the config."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from node.pynetdicom_patches import use_standard_log_handlers

log = logging.getLogger("dicom_node.observe")

# One registry per process: the node runs one configuration at a time.
REGISTRY = CollectorRegistry()
RECEIVED = Counter("dicom_node_instances_received", "Instances stored in the spool and acked",
                   ["calling_aet"], registry=REGISTRY)  # fmt: skip
REFUSED = Counter("dicom_node_instances_refused", "C-STOREs answered with a failure status",
                  ["status"], registry=REGISTRY)  # fmt: skip
REJECTED_ASSOCIATIONS = Counter("dicom_node_associations_rejected", "A-ASSOCIATE-RJ sent",
                                ["reason"], registry=REGISTRY)  # fmt: skip
BYTES_IN = Counter("dicom_node_bytes_received", "Bytes of instances spooled", registry=REGISTRY)
PROCESSED = Counter("dicom_node_instances_processed", "Instances routed and transcoded",
                    ["rule", "outcome"], registry=REGISTRY)  # fmt: skip
RULE_BYTES_IN = Counter("dicom_node_rule_bytes_in", "Bytes received per rule (ratio: in / out)",
                        ["rule"], registry=REGISTRY)  # fmt: skip
BYTES_OUT = Counter("dicom_node_bytes_out", "Bytes of processed output", ["rule"],
                    registry=REGISTRY)  # fmt: skip
OUTPUTS = Counter("dicom_node_outputs", "Outputs queued for a destination (one per instance "
                  "and destination)", ["rule", "destination", "syntax", "outcome"],
                  registry=REGISTRY)  # fmt: skip
OUTPUT_BYTES = Counter("dicom_node_output_bytes", "Bytes of the outputs queued for a destination",
                       ["rule", "destination", "syntax", "outcome"], registry=REGISTRY)  # fmt: skip
CODEC_SECONDS = Histogram("dicom_node_codec_seconds", "Time to route, transcode and verify one",
                          ["rule"], registry=REGISTRY)  # fmt: skip
DELIVERED = Counter("dicom_node_instances_forwarded", "Deliveries a destination took",
                    ["destination"], registry=REGISTRY)  # fmt: skip
DELIVERY_FAILURES = Counter("dicom_node_delivery_failures", "Failed delivery attempts",
                            ["destination", "kind"], registry=REGISTRY)  # fmt: skip
QUARANTINED = Counter("dicom_node_instances_quarantined", "Instances no rule matched",
                      registry=REGISTRY)  # fmt: skip
RELOADS = Counter("dicom_node_config_reloads", "Configuration reloads (SIGHUP or file change)",
                  ["result"], registry=REGISTRY)  # fmt: skip
RELOAD_OK = Gauge("dicom_node_config_last_reload_ok", "1 if the last reload was applied, "
                  "0 if it was refused (the node runs the previous configuration)",
                  registry=REGISTRY)  # fmt: skip
RELOAD_OK.set(1)
INFO = Gauge("dicom_node_info", "1, labelled with this node's name (node.name) and version: "
             "join on it to tell the nodes of a cluster apart", ["node", "version"],
             registry=REGISTRY)  # fmt: skip
DRAINING = Gauge("dicom_node_draining", "1 while the node drains (/healthz 503 draining)",
                 registry=REGISTRY)  # fmt: skip


class QueueCollector:
    """Queue depth, oldest age, dead letters and deliveries awaiting Storage Commitment per
    destination, read at scrape time."""

    def __init__(self, stats: Callable[[], list]):
        self.stats = stats

    def collect(self):
        depth = GaugeMetricFamily("dicom_node_queue_pending", "Instances waiting per destination",
                                  labels=["destination"])  # fmt: skip
        oldest = GaugeMetricFamily(
            "dicom_node_queue_oldest_seconds", "Age of the oldest waiting instance",
            labels=["destination"],
        )  # fmt: skip
        dead = GaugeMetricFamily("dicom_node_dead_letters", "Dead-lettered instances",
                                 labels=["destination"])  # fmt: skip
        awaiting = GaugeMetricFamily(
            "dicom_node_queue_awaiting_commitment",
            "Instances the destination has, held until it commits them (Storage Commitment)",
            labels=["destination"],
        )  # fmt: skip
        for s in self.stats():
            depth.add_metric([s.destination], s.pending)
            oldest.add_metric([s.destination], s.oldest_age or 0.0)
            dead.add_metric([s.destination], s.dead)
            awaiting.add_metric([s.destination], s.awaiting)
        yield from (depth, oldest, dead, awaiting)


class ObservabilityServer:
    """/metrics and /healthz. `health` returns None when healthy, else the reason."""

    def __init__(self, host: str, port: int, health: Callable[[], str | None]):
        registry, check = REGISTRY, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    problem = check()
                    text = problem if problem == "draining" else f"unhealthy: {problem}"
                    body = (f"{text}\n" if problem else "ok\n").encode()
                    self._answer(503 if problem else 200, body, "text/plain; charset=utf-8")
                else:
                    self._answer(404, b"try /metrics or /healthz\n", "text/plain")

            def _answer(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self._headers_buffer.append(b"\r\n")  # end_headers, with the body: one write
                self._headers_buffer.append(body)
                self.flush_headers()

            def handle(self) -> None:
                # A balancer's health check reads the status line and resets the connection:
                # that is its way of hanging up, not an error worth a traceback.
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    self.close_connection = True

            def log_message(self, *args) -> None:  # scrapes are not worth a log line each
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()
        log.info("metrics and health on http://%s:%d/metrics and /healthz",
                 *self.server.server_address[:2])  # fmt: skip

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def spool_write_problem(directory: str) -> str | None:
    """Can the spool take a new instance right now? Writes, fsyncs and removes a probe file."""
    probe = os.path.join(directory, f".healthz-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"spool not writable: {exc.strerror or exc}"
    return None


NODE_NAME = {"name": ""}  # this node's name (node.name) in every log record, set by the service


class _NodeName(logging.Filter):
    """Stamps each record with the node's name: one cluster's logs, merged, say which node."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = NODE_NAME["name"] or "-"
        return True


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line for log shippers; the per-instance line carries its fields
    (calling AE, SOP class, rule, syntaxes, sizes, ratio, ms, destinations) as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "node": getattr(record, "node", None),
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(verbose: bool, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(node)s %(levelname)s %(name)s: %(message)s")
        )
    handler.addFilter(_NodeName())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # The node logs each failure once, in its own words (with the retry delay); pynetdicom's
    # own ERROR lines and tracebacks for every refused retry would bury them. pydicom's
    # warnings quote element values, patient names among them. -v shows both.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    # pynetdicom's standard handlers format a description of every PDU and DIMSE message
    # whether or not the logger shows it: ~15% of the receiving CPU per instance.
    use_standard_log_handlers(verbose)
    logging.getLogger("pydicom").setLevel(logging.DEBUG if verbose else logging.ERROR)
