"""Prometheus metrics and the health endpoints, on one small HTTP server.

``/metrics`` is the Prometheus text format, ``/healthz`` answers 200 while the processing
loop turns and the sink has not failed, ``/readyz`` answers 200 once the engine is loaded
and partitions are assigned. Each metric is recorded where its decision is made.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Collection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "stream_classifier_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = tuple(float(2**i) for i in range(0, 14))
TOKEN_BUCKETS = tuple(float(2**i) for i in range(6, 19))


class Metrics:
    """The service's metrics, in a registry of their own (tests make as many as they like)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(PREFIX + "events_consumed", "Events read", ["topic"], registry=r)
        self.produced = Counter(
            PREFIX + "events_produced", "Scored events acknowledged", ["topic"], registry=r
        )
        self.dead_letters = Counter(
            PREFIX + "dead_letters",
            "Events sent to the dead-letter topic",
            ["topic", "reason"],
            registry=r,
        )
        self.batch_messages = Histogram(
            PREFIX + "batch_messages", "Events per micro-batch", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_pairs = Histogram(
            PREFIX + "batch_pairs",
            "Sentence pairs per micro-batch",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            PREFIX + "batch_tokens",
            "Padded tokens per micro-batch",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.engine_seconds = Histogram(
            PREFIX + "engine_seconds",
            "Engine time per micro-batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_stalled_seconds = Gauge(
            PREFIX + "engine_stalled_seconds",
            "How long work has waited on the engine with nothing coming back (0 while it"
            " returns batches or has none); over processing.engine_timeout_s /healthz fails",
            registry=r,
        )
        self.startup_seconds = Gauge(
            PREFIX + "startup_seconds",
            "Seconds each start-up step took, steps inside another taken out of it (they"
            ' add up); step="total": from the process start to the first output written',
            ["step"],
            registry=r,
        )
        self.undeliverable = Counter(
            PREFIX + "undeliverable",
            "Events given up: not even their smallest dead letter could be written",
            ["topic"],
            registry=r,
        )
        self.registry_failures = Counter(
            PREFIX + "schema_registry_failures",
            "Attempts to get a schema from the registry that failed for now (its events "
            "wait, their partitions paused)",
            registry=r,
        )
        self.engine_idle_seconds = Counter(
            PREFIX + "engine_idle_seconds",
            "Time the engine stage had no micro-batch to score (on a GPU: the device waited"
            " for the consumer side)",
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            PREFIX + "end_to_end_latency_seconds",
            "Input timestamp to output acknowledged, by the input topic's priority",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            PREFIX + "in_flight_events", "Consumed, not yet acknowledged", registry=r
        )
        self.oom_splits = Counter(
            PREFIX + "oom_splits", "Batches split after running out of GPU memory", registry=r
        )
        self.commits = Counter(PREFIX + "commits", "Offset commits", ["result"], registry=r)
        self.assigned_partitions = Gauge(
            PREFIX + "assigned_partitions", "Partitions assigned to this process", registry=r
        )
        self.paused_partitions = Gauge(
            PREFIX + "paused_partitions", "Partitions paused by backpressure", registry=r
        )
        self.consumer_lag = Gauge(
            PREFIX + "consumer_lag",
            "Messages between the committed offset and the partition end (librdkafka stats)",
            ["topic", "partition"],
            registry=r,
        )
        self.priority_lag = Gauge(
            PREFIX + "priority_lag",
            "Consumer lag summed over the assigned partitions of each priority level",
            ["priority"],
            registry=r,
        )
        self.transactions = Counter(
            PREFIX + "transactions", "Kafka transactions (exactly-once)", ["result"], registry=r
        )
        # GPU, sampled through NVML by stream_classifier.gpu (no samples without a GPU).
        self.gpu_memory_used = Gauge(
            PREFIX + "gpu_memory_used_bytes", "GPU memory in use (NVML)", ["gpu"], registry=r
        )
        self.gpu_memory_total = Gauge(
            PREFIX + "gpu_memory_total_bytes", "GPU memory installed (NVML)", ["gpu"], registry=r
        )
        self.decisions = Counter(
            PREFIX + "decisions",
            "Scored events by decision lane",
            ["topic", "decision"],
            registry=r,
        )
        self.shadow_decisions = Counter(
            PREFIX + "shadow_decisions",
            "Scored events by live decision and shadow decision (agreement where equal)",
            ["topic", "live", "shadow"],
            registry=r,
        )
        self.shadow_pairs = Counter(
            PREFIX + "shadow_pairs",
            "Engine pairs scored for shadow policies alone (their extra cost)",
            ["topic"],
            registry=r,
        )
        self.reloads = Counter(
            PREFIX + "config_reloads",
            "Configuration reloads (SIGHUP) by result: applied, invalid, refused",
            ["result"],
            registry=r,
        )
        self.gpu_utilization = Gauge(
            PREFIX + "gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran on the GPU (NVML, 0..1)",
            ["gpu"],
            registry=r,
        )

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a released partition's series, so lag alerts don't fire on what moved away."""
        with contextlib.suppress(KeyError):
            self.consumer_lag.remove(topic, str(partition))

    def record_lag(
        self, stats_json: str, assigned: Collection[tuple[str, int]], priorities: dict[str, int]
    ) -> None:
        """Consumer lag per assigned partition, from librdkafka's statistics, and its sum
        per priority level (``priorities``: each input topic's)."""
        stats = json.loads(stats_json)
        per_level = dict.fromkeys(priorities.values(), 0)
        for topic, topic_stats in stats.get("topics", {}).items():
            for partition, p in topic_stats.get("partitions", {}).items():
                lag = p.get("consumer_lag", -1)
                if (topic, int(partition)) in assigned and lag >= 0:
                    self.consumer_lag.labels(topic, partition).set(lag)
                    if topic in priorities:
                        per_level[priorities[topic]] += lag
        for level, lag in per_level.items():
            self.priority_lag.labels(str(level)).set(lag)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class HealthServer:
    """Serves /metrics, /healthz and /readyz on one port, in a daemon thread."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        healthy: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
    ) -> None:
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, metrics.render()),
            "/healthz": lambda: _probe(healthy),
            "/readyz": lambda: _probe(ready),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                route = routes.get(self.path.split("?")[0])
                status, content_type, body = route() if route else (404, "text/plain", b"")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _probe(check: Callable[[], tuple[bool, str]]) -> tuple[int, str, bytes]:
    ok, reason = check()
    return (200 if ok else 503), "text/plain; charset=utf-8", (reason + "\n").encode()
