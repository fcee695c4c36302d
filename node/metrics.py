"""The Prometheus exporter: /metrics in the text format, with prometheus-client's names.

Two kinds of figures:
- request counts and latency histograms, observed as requests happen: HTTP (by route,
  method and status) and DIMSE (by service and final status, from pynetdicom's
  EVT_DIMSE_RECV / EVT_DIMSE_SENT notifications, so the DICOM handlers are untouched);
- everything `Node.metrics()` reports (the dict the Admin Metrics RPC serves), read at
  scrape time and renamed by Prometheus's conventions: dots to underscores, `_count`
  dropped, cumulative figures as counters ending in `_total`, `_ms` as `_seconds`, and
  `pacsnode.ring.members_<state>_count` as one `pacsnode_ring_members{state=...}`.

Each node has its own registry (never the global one): many nodes share one process in
tests and the simulator.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pynetdicom import evt

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Node.metrics() names that are levels (may go down); every other figure only grows.
_GAUGES = frozenset({
    "pacsnode.store.instances_count",
    "pacsnode.store.studies_count",
    "pacsnode.store.received_bytes",
    "pacsnode.store.stored_bytes",
    "pacsnode.store.conflicts_count",
    "pacsnode.store.missing_blob_files_count",
    "pacsnode.hints.queue_depth_count",
    "pacsnode.hints.queue_bytes",
    "pacsnode.repair.pending_ranges_count",
    "pacsnode.repair.last_pass_ms",
    "pacsnode.membership.awareness_count",
    "pacsnode.membership.broadcast_queue_depth_count",
    "pacsnode.membership.incarnation_count",
})
_MEMBERS = re.compile(r"^pacsnode\.ring\.members_([a-z]+)_count$")
_HELP = {
    "pacsnode.store.instances_count": "Instances held by this node (primary copies).",
    "pacsnode.store.stored_bytes": "Bytes this node's store holds (compressed).",
    "pacsnode.store.received_bytes": "Bytes of the instances this node holds, as received.",
    "pacsnode.store.missing_blob_files_count": "Records whose blob file was gone when the store opened (unreadable here).",
    "pacsnode.hints.queue_depth_count": "Hints held here for owners that were unreachable.",
    "pacsnode.repair.pulled_bytes": "Bytes pulled by anti-entropy repair and rebalancing.",
    "pacsnode.repair.pending_ranges_count": "Token ranges this node owns but is still filling.",
}

# PS3.7 command fields of the requests a node serves.
_SERVICES = {0x0001: "C-STORE", 0x0010: "C-GET", 0x0020: "C-FIND", 0x0021: "C-MOVE", 0x0030: "C-ECHO"}
_PENDING = (0xFF00, 0xFF01)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def prometheus_name(dotted: str) -> tuple[str, bool, float]:
    """(name, is_counter, scale) for one Node.metrics() name."""
    counter = dotted not in _GAUGES
    name = dotted.replace(".", "_")
    scale = 1.0
    if name.endswith("_count"):
        name = name[: -len("_count")]
    elif name.endswith("_ms"):
        name = name[: -len("_ms")] + "_seconds"
        scale = 0.001
    return name, counter, scale


class NodeCollector:
    """Reads the node's figures at scrape time."""

    def __init__(self, figures: Callable[[], dict[str, float]], extra: Callable[[], dict[str, float]]) -> None:
        self._figures = figures
        self._extra = extra  # Gauges computed here (disk free, under-replicated studies).

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self._figures()
        except Exception as error:  # A scrape must not fail the node; say so in the log.
            log.error("metrics.collect.failed error=%r", error)
            figures = {}
        members = GaugeMetricFamily("pacsnode_ring_members", "Members of the ring as this node sees them, by state.",
                                    labels=["state"])
        for dotted, value in sorted(figures.items()):
            match = _MEMBERS.match(dotted)
            if match:
                members.add_metric([match.group(1)], float(value))
                continue
            name, counter, scale = prometheus_name(dotted)
            text = _HELP.get(dotted, f"{dotted} (Node.metrics).")
            if counter:
                yield CounterMetricFamily(name, text, value=float(value) * scale)
            else:
                yield GaugeMetricFamily(name, text, value=float(value) * scale)
        yield members
        try:
            extra = self._extra()
        except Exception as error:
            log.error("metrics.collect.failed error=%r", error)
            extra = {}
        for name, value in sorted(extra.items()):
            yield GaugeMetricFamily(name, name.replace("_", " "), value=float(value))


class Metrics:
    """One node's registry: request instruments plus the node's own figures."""

    def __init__(self, figures: Callable[[], dict[str, float]] = dict,
                 extra: Callable[[], dict[str, float]] = dict,
                 dimse_sink: Callable[[str, int, float], None] | None = None) -> None:
        """`dimse_sink(service, status, seconds)`: where each answered DIMSE request goes
        instead of this registry's instruments (a DICOM worker process forwards them to
        its node, DimseForwarder)."""
        self._dimse_sink = dimse_sink
        self.registry = CollectorRegistry(auto_describe=False)
        self.http_requests = Counter("pacsnode_http_requests", "HTTP requests answered, by route and status.",
                                     ["route", "method", "status"], registry=self.registry)
        self.http_latency = Histogram("pacsnode_http_request_duration_seconds",
                                      "Time from request to the last byte of the answer, by route.",
                                      ["route", "method"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.dimse_requests = Counter("pacsnode_dimse_requests", "DIMSE requests answered, by service and final status.",
                                      ["service", "status"], registry=self.registry)
        self.dimse_latency = Histogram("pacsnode_dimse_request_duration_seconds",
                                       "Time from a DIMSE request received to its final response sent, by service.",
                                       ["service"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.store_latency = Histogram("pacsnode_store_write_duration_seconds",
                                       "Time of each local instance write (replica or hint), synced, as the "
                                       "replication code waits for it.", buckets=_LATENCY_BUCKETS,
                                       registry=self.registry)
        self.registry.register(NodeCollector(figures, extra))
        self._open: dict[tuple[int, int], tuple[str, float]] = {}  # (association, message id) -> (service, start)
        self._lock = threading.Lock()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_store_write(self, seconds: float) -> None:
        self.store_latency.observe(seconds)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_latency.labels(route, method).observe(seconds)

    # ------------------------------------------------------------------ DIMSE
    def dimse_handlers(self) -> list[tuple[Any, Callable[[Any], None]]]:
        """Notification handlers to bind on the DICOM server."""
        return [(evt.EVT_DIMSE_RECV, self.on_received), (evt.EVT_DIMSE_SENT, self.on_sent)]

    def on_received(self, event: Any) -> None:
        """EVT_DIMSE_RECV: a request starts its count and time (responses are ignored:
        node/acceptor.py decodes C-STORE responses itself while this is the one bound)."""
        command = getattr(event.message, "command_set", None)
        if command is None:
            return
        self.request_received(event.assoc, int(getattr(command, "CommandField", 0) or 0),
                              int(getattr(command, "MessageID", 0) or 0))

    def request_received(self, assoc: Any, command_field: int, message_id: int) -> None:
        """A message was received (from on_received, or directly for the C-ECHO requests
        the acceptor decodes itself: node/acceptor.py StoreResponseHook.request_received):
        a request starts its count and time."""
        service = _SERVICES.get(command_field)
        if service is None:
            return  # A response to our own sub-operation, a C-CANCEL, an N- service.
        with self._lock:
            self._open[(id(assoc), message_id)] = (service, time.monotonic())
            if len(self._open) > 10_000:  # Requests whose association died unanswered.
                self._open.pop(next(iter(self._open)))

    def on_sent(self, event: Any) -> None:
        """EVT_DIMSE_SENT: a final response ends its request's count and time."""
        command = getattr(event.message, "command_set", None)
        if command is None or not int(getattr(command, "CommandField", 0) or 0) & 0x8000:
            return  # A request we send (a C-GET/C-MOVE sub-operation).
        self.response_sent(event.assoc, int(getattr(command, "MessageIDBeingRespondedTo", -1)),
                           int(getattr(command, "Status", 0) or 0))

    def response_sent(self, assoc: Any, message_id_responded: int, status: int) -> None:
        """A response was sent (from on_sent, or directly for the C-STORE responses the
        acceptor encodes itself: node/acceptor.py StoreResponseHook)."""
        if status in _PENDING:
            return
        key = (id(assoc), message_id_responded)
        with self._lock:
            opened = self._open.pop(key, None)
        if opened is None:
            return
        service, started = opened
        seconds = time.monotonic() - started
        if self._dimse_sink is not None:
            self._dimse_sink(service, status, seconds)
            return
        self.observe_dimse(service, status, seconds)

    def observe_dimse(self, service: str, status: int, seconds: float) -> None:
        """One answered DIMSE request (here, or in a DICOM worker: node/workers.py)."""
        self.dimse_requests.labels(service, f"0x{status:04X}").inc()
        self.dimse_latency.labels(service).observe(seconds)


class DimseForwarder:
    """A DICOM worker's answered requests, sent to the node's /metrics in batches (a
    METRICS frame a second, node/archive_channel.py) by a daemon thread, with the worker's
    count of refused associations so far (a total, so a frame lost does not lose counts)."""

    INTERVAL_S = 1.0
    BATCH_MAX = 10_000  # Kept when the channel is down; older ones dropped past this.

    def __init__(self, send: Callable[[list[list[Any]], int], None], refused: Callable[[], int] = lambda: 0) -> None:
        self._send = send
        self._refused = refused
        self._refused_sent = 0
        self._pending: list[list[Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pacsnode-metrics-forward", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, service: str, status: int, seconds: float) -> None:
        with self._lock:
            self._pending.append([service, status, round(seconds, 6)])
            if len(self._pending) > self.BATCH_MAX:
                del self._pending[: len(self._pending) - self.BATCH_MAX]

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        refused = self._refused()
        if batch or refused != self._refused_sent:
            self._send(batch, refused)
            self._refused_sent = refused

    def _run(self) -> None:
        while True:
            time.sleep(self.INTERVAL_S)
            try:
                self.flush()
            except Exception as error:  # Never the worker's end: the next batch tries again.
                log.error("metrics.forward_failed error=%s", type(error).__name__)
