"""``stream-classifier bench --pipeline``: the Kafka path alone, against a real broker.

The model is replaced by :class:`BenchNullEngine`, an engine that costs nothing and exists
only here (``run`` cannot select it: ``engine.kind`` accepts ``nli`` and ``embedding``).
Three measurements on the same broker, each on fresh topics:

1. **ceiling**: a raw confluent-kafka loop that consumes and produces the same events,
   with no decoding, batching or commits: the most any Python service could do;
2. **throughput**: the whole service (decode, batch, engine thread, produce, commit) on a
   pre-filled topic, from start to the last offset committed;
3. **latency**: events produced at a steady rate while the service runs; for each, the
   time from its timestamp to its output's delivery report.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import Consumer, Producer

from stream_classifier.assemble import build_service
from stream_classifier.config import ServiceConfig
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.outputs import Observer
from stream_classifier.service import Service
from stream_classifier.sink import Record
from stream_classifier.tools.kafka_io import create_topics, fill, produce_at_rate

TEXTS = [
    "Your invoice shows a charge I never authorised, please refund it",
    "快递三天还没到，客服也不回消息",
    "Buy cheap pills online now, limited offer!!!",
    "The app crashes every time I open the settings page",
]


class BenchNullEngine:
    """A bench-only engine: no model, uniform scores. Never used by ``run``."""

    model_id = "bench-null-engine"

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        return Prepared(tuple(labels), multi_label, 8 * len(labels), None)

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        return [
            Scores(item.labels, tuple(1.0 / len(item.labels) for _ in item.labels))
            for item in batch
        ]

    def warmup(self) -> None:
        return None


@dataclass
class PipelineReport:
    events: int
    ceiling_msgs_per_s: float
    service_msgs_per_s: float
    ratio_to_ceiling: float
    latency_rate_msgs_per_s: int
    latency_p50_ms: float
    latency_p99_ms: float


def run_pipeline_bench(bootstrap: str, events: int, rate: int, seconds: float) -> PipelineReport:
    ceiling = _ceiling(bootstrap, events)
    throughput = _service_throughput(bootstrap, events)
    p50, p99 = _service_latency(bootstrap, rate, seconds)
    return PipelineReport(
        events=events,
        ceiling_msgs_per_s=round(ceiling),
        service_msgs_per_s=round(throughput),
        ratio_to_ceiling=round(throughput / ceiling, 3),
        latency_rate_msgs_per_s=rate,
        latency_p50_ms=round(p50, 2),
        latency_p99_ms=round(p99, 2),
    )


def format_report(report: PipelineReport) -> str:
    rows = [
        ("raw confluent-kafka consume+produce (ceiling)", f"{report.ceiling_msgs_per_s:,.0f}"),
        ("stream-classifier, bench-null engine", f"{report.service_msgs_per_s:,.0f}"),
        ("ratio to ceiling", f"{report.ratio_to_ceiling:.2f}"),
        (
            f"latency at {report.latency_rate_msgs_per_s:,} msgs/s: p50 ms",
            f"{report.latency_p50_ms}",
        ),
        (
            f"latency at {report.latency_rate_msgs_per_s:,} msgs/s: p99 ms",
            f"{report.latency_p99_ms}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"pipeline bench, {report.events:,} events (msgs/s unless noted)"]
    lines += [f"  {name:<{width}}  {value:>10}" for name, value in rows]
    return "\n".join(lines)


def report_json(report: PipelineReport) -> str:
    return json.dumps(asdict(report), indent=2)


# -- the three measurements ----------------------------------------------------------------


def _topics(bootstrap: str, partitions: int = 3) -> tuple[str, str, str]:
    run = uuid.uuid4().hex[:8]
    names = (f"bench-{run}.in", f"bench-{run}.out", f"bench-{run}.dlq")
    create_topics(bootstrap, names, partitions)
    return names


def _payloads(events: int) -> list[bytes]:
    return [json.dumps({"id": i, "text": TEXTS[i % len(TEXTS)]}).encode() for i in range(events)]


def _fill(bootstrap: str, topic: str, events: int) -> None:
    fill(bootstrap, topic, _payloads(events))


def _ceiling(bootstrap: str, events: int) -> float:
    source, sink, _ = _topics(bootstrap)
    _fill(bootstrap, source, events)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-raw-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    consumer.subscribe([source])
    seen = 0
    started: float | None = None
    while seen < events:
        for message in consumer.consume(num_messages=1000, timeout=1.0):
            if message.error():
                continue
            started = started or time.perf_counter()
            producer.produce(sink, value=message.value(), key=message.key())
            seen += 1
        producer.poll(0)
    producer.flush(60)
    consumer.close()
    assert started is not None
    return events / (time.perf_counter() - started)


def _bench_config(bootstrap: str, names: tuple[str, str, str]) -> ServiceConfig:
    return ServiceConfig(
        kafka={"bootstrap_servers": bootstrap, "group_id": f"bench-{uuid.uuid4().hex[:6]}"},
        processing={"max_batch_messages": 1024, "max_batch_wait_ms": 5},
        engine={"kind": "nli", "model": BenchNullEngine.model_id},
        metrics={"enabled": False},
        topics=[
            {
                "input": names[0],
                "output": names[1],
                "dead_letter": names[2],
                "labels": ["billing", "shipping", "spam", "technical issue"],
            }
        ],
    )


class _Running:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.stop = threading.Event()
        self.thread = threading.Thread(target=service.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> _Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def _service_throughput(bootstrap: str, events: int) -> float:
    names = _topics(bootstrap)
    _fill(bootstrap, names[0], events)
    counter = _Counter()
    service = build_service(_bench_config(bootstrap, names), BenchNullEngine(), observers=[counter])
    started = time.perf_counter()
    with _Running(service):
        _wait(lambda: counter.n >= events, 600)
        elapsed = time.perf_counter() - started
    return events / elapsed


class _Counter(Observer):
    def __init__(self) -> None:
        self.n = 0

    def written(self, _record: Record) -> None:
        self.n += 1


class _Latencies(Observer):
    def __init__(self) -> None:
        self.ms: list[float] = []

    def written(self, record: Record) -> None:
        if record.source.timestamp:
            self.ms.append(time.time() * 1000.0 - record.source.timestamp)


def _service_latency(bootstrap: str, rate: int, seconds: float) -> tuple[float, float]:
    names = _topics(bootstrap)
    timing = _Latencies()
    service = build_service(_bench_config(bootstrap, names), BenchNullEngine(), observers=[timing])
    latencies = timing.ms
    total = int(rate * seconds)
    with _Running(service):
        _wait(lambda: bool(service.assigned_partitions), 60)
        # Produce from another process, unpinned, so the load does not share our core.
        producer = multiprocessing.get_context("spawn").Process(
            target=_produce_at_rate, args=(bootstrap, names[0], rate, total)
        )
        producer.start()
        _wait(lambda: len(latencies) >= total, 120)
        producer.join(30)
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]


def _produce_at_rate(bootstrap: str, topic: str, rate: int, total: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    produce_at_rate(bootstrap, topic, _payloads(total), rate)


def _wait(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("pipeline bench did not finish in time")
        time.sleep(0.01)
