"""Kafka chores the benchmarks share: topics made, filled at once or at a steady rate."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]


def create_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    """Create the topics and wait until the cluster lists them (a process started right
    after may otherwise find them missing)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, num_partitions=partitions) for n in names])
    for future in futures.values():
        future.result(60)
    wanted = set(futures)
    deadline = time.monotonic() + 60
    while not wanted <= set(admin.list_topics(timeout=10).topics):
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics {sorted(wanted)} not listed after 60 s")
        time.sleep(0.1)


#: How long a new producer may take to be given its producer id.
PRODUCER_ID_WAIT_S = 60.0


def idempotent_producer(config: dict[str, Any]) -> Producer:
    """An idempotent producer (it keeps the payloads in order across retries) that already
    has its producer id.

    Why wait: records produced before the id arrives wait for it, stamped with the time of
    ``produce()``. On a broker still loading its coordinators that is 0.5-1 s, and a paced
    run counts the burst that follows as the service's latency.
    """
    states: list[str] = [""]

    def on_stats(stats: str) -> None:
        # librdkafka goes on calling this every 50 ms: parse only until the id is there
        if states[-1] != "Assigned":
            states.append(json.loads(stats).get("eos", {}).get("idemp_state", ""))

    producer = Producer(
        {
            **config,
            "enable.idempotence": True,
            "statistics.interval.ms": 50,
            "stats_cb": on_stats,
        }
    )
    deadline = time.monotonic() + PRODUCER_ID_WAIT_S
    while states[-1] != "Assigned":
        if time.monotonic() > deadline:
            raise TimeoutError(f"no producer id after {PRODUCER_ID_WAIT_S:.0f} s ({states[-1:]})")
        producer.poll(0.05)
    return producer


def fill(bootstrap: str, topic: str, payloads: Iterable[bytes]) -> None:
    """Write every payload (keyed by its index) as fast as the producer takes them."""
    producer = idempotent_producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000}
    )
    for i, value in enumerate(payloads):
        while True:
            try:
                producer.produce(topic, value=value, key=str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) != 0:
        raise RuntimeError(f"could not fill {topic}")


def produce_at_rate(bootstrap: str, topic: str, payloads: Sequence[bytes], rate: float) -> float:
    """Write the payloads at a steady ``rate`` per second; the seconds it took."""
    producer = idempotent_producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    started = time.perf_counter()
    for i, value in enumerate(payloads):
        ahead = i / rate - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)
        producer.poll(0)
        producer.produce(topic, value=value, key=str(i).encode())
    seconds = time.perf_counter() - started
    producer.flush(120)
    return seconds
