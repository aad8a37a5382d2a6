"""Prometheus metrics for the daemon (prometheus-client).

* ``overlay_rpc_duration_seconds{method}``: latency histogram per RPC;
* ``overlay_rpc_requests_total{method,code}``: calls by status code (errors
  are the codes other than OK);
* ``overlay_cleanup_backlog_directories`` / ``_bytes``: orphans moved to the
  trash and not yet deleted;
* ``overlay_snapshots{kind}``: snapshots by kind, read at scrape time;
* ``overlay_metadata_bytes{what="used"|"map_size"}``: LMDB map use;
* ``overlay_grpc_connections`` (open now), ``overlay_grpc_connections_accepted_total``,
  ``overlay_grpc_pending_calls`` (received, not yet answered),
  ``overlay_grpc_rejected_requests_total`` (refused before any method: not
  gRPC, malformed, over a limit), ``overlay_grpc_shed_connections_total``
  (closed for a limit: idle, replaced or refused at max_connections) and
  ``overlay_grpc_buffered_bytes`` (request bytes held now): the transport.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from overlay.snapshots import Info, Kind, Snapshotter

__all__ = ["Metrics"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StateCollector(Collector):
    def __init__(self, backend: Snapshotter, store: Callable[[], tuple[int, int]] | None) -> None:
        self._backend = backend
        self._store = store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = dict.fromkeys((Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED), 0)

        def count(info: Info) -> None:
            counts[info.kind] = counts.get(info.kind, 0) + 1

        snapshots = GaugeMetricFamily("overlay_snapshots", "Snapshots by kind", labels=["kind"])
        try:
            self._backend.walk(count)
        except Exception:  # a scrape must not fail because the store is closing
            return
        for kind, n in counts.items():
            snapshots.add_metric([kind.filter_value], n)
        yield snapshots
        if self._store is not None:
            used, size = self._store()
            meta = GaugeMetricFamily("overlay_metadata_bytes", "LMDB map use", labels=["what"])
            meta.add_metric(["used"], used)
            meta.add_metric(["map_size"], size)
            yield meta


class _TransportCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        try:
            st = self._stats()
        except ValueError:  # the server is shutting down
            return
        yield GaugeMetricFamily("overlay_grpc_connections", "Client connections open",
                                value=st["connections"])
        yield CounterMetricFamily("overlay_grpc_connections_accepted",
                                  "Client connections accepted", value=st["accepted"])
        yield GaugeMetricFamily("overlay_grpc_pending_calls",
                                "Calls received and not yet answered", value=st["pending"])
        yield CounterMetricFamily(
            "overlay_grpc_rejected_requests",
            "Requests refused before reaching a method (not gRPC, compressed, malformed, "
            "over a limit)", value=st["rejected"])
        yield CounterMetricFamily(
            "overlay_grpc_shed_connections",
            "Connections closed for a limit (idle, replaced or refused at max_connections)",
            value=st["shed"])
        yield GaugeMetricFamily("overlay_grpc_buffered_bytes",
                                "Request bytes (headers and messages) the transport holds",
                                value=st["buffered"])


class Metrics:
    """The daemon's metrics on their own registry (tests can read it)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rpc_duration = Histogram(
            "overlay_rpc_duration_seconds", "RPC latency", ["method"],
            buckets=_BUCKETS, registry=self.registry,
        )
        self.rpc_requests = Counter(
            "overlay_rpc_requests", "RPCs by status code", ["method", "code"],
            registry=self.registry,
        )
        self.backlog_directories = Gauge(
            "overlay_cleanup_backlog_directories",
            "Orphan directories in the trash, not yet deleted", registry=self.registry,
        )
        self.backlog_bytes = Gauge(
            "overlay_cleanup_backlog_bytes",
            "Bytes held by orphans in the trash, not yet deleted", registry=self.registry,
        )
        self.reclaimed_bytes = Counter(
            "overlay_cleanup_reclaimed_bytes", "Bytes freed by cleanup", registry=self.registry,
        )

    def watch(self, backend: Snapshotter,
              store: Callable[[], tuple[int, int]] | None = None) -> None:
        """Report snapshot counts (and LMDB use) of ``backend`` at scrape time."""
        self.registry.register(_StateCollector(backend, store))

    def watch_transport(self, stats: Callable[[], dict[str, int]]) -> None:
        """Report the gRPC transport's connections and pending calls at scrape time."""
        self.registry.register(_TransportCollector(stats))

    def serve(self, address: str) -> Any:
        """Expose /metrics on ``host:port``; returns the HTTP server."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0",
                                            registry=self.registry)
        return server

    def observe(self, method: str, code: str, seconds: float) -> None:
        """One served call (the server's ``observe`` hook)."""
        self.rpc_duration.labels(method).observe(seconds)
        self.rpc_requests.labels(method, code).inc()
