"""Kafka chores the benchmarks share: topics made, filled at once or at a steady rate."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

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


def fill(bootstrap: str, topic: str, payloads: Iterable[bytes]) -> None:
    """Write every payload (keyed by its index) as fast as the producer takes them."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "enable.idempotence": True,  # keeps the payloads in order across retries
        }
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
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 1, "enable.idempotence": True}
    )
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
