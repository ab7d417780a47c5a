"""Talk to the real test broker as an independent client would."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
    )
    for future in futures.values():
        future.result(timeout=30)
    # Created is not yet listed: a process started now (its start-up check lists topics)
    # could still find them missing on a loaded machine.
    wanted = set(futures)
    wait_until(lambda: wanted <= set(admin.list_topics(timeout=10).topics), 30, f"{wanted} listed")


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]
    timestamp: int


def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | None],
    keys: Iterable[bytes | None] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    values = list(values)
    key_list = list(keys) if keys is not None else [None] * len(values)
    errors: list[str] = []

    def report(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    for key, value in zip(key_list, values, strict=True):
        kwargs = {"partition": partition} if partition is not None else {}
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report, **kwargs)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not errors, errors


class TopicReader:
    """An independent read_committed reader of every partition, from the beginning.

    It assigns partitions directly (no group join), so reading again is cheap.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.records: list[Record] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique("reader"),
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        metadata = self._consumer.list_topics(topic, timeout=30)
        partitions = sorted(metadata.topics[topic].partitions)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def poll(self, timeout: float) -> None:
        for message in self._consumer.consume(num_messages=5000, timeout=timeout):
            if message.error():
                continue
            self.records.append(
                Record(
                    topic=message.topic(),
                    partition=message.partition(),
                    offset=message.offset(),
                    key=message.key(),
                    value=message.value(),
                    headers=dict(message.headers() or []),
                    timestamp=message.timestamp()[1],
                )
            )

    def read_until(self, count: int, timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline:
            self.poll(min(0.5, max(0.0, deadline - time.monotonic())))
        return self.records

    def read_to_end(self, timeout: float) -> list[Record]:
        """Read until every partition's position reaches its end offset (or the deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll(0.2)
            if self.caught_up():
                return self.records
        raise AssertionError(f"{self.topic}: not at the end after {timeout:.0f}s")

    def caught_up(self) -> bool:
        for tp in self._consumer.position(self._consumer.assignment()):
            high = self._consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
            if high > 0 and tp.offset < high:
                return False
        return True

    def close(self) -> None:
        self._consumer.close()


def read_to_end(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Record]:
    reader = TopicReader(bootstrap, topic)
    try:
        return reader.read_to_end(timeout)
    finally:
        reader.close()


def read_all(bootstrap: str, topic: str, count: int, timeout: float = 60.0) -> list[Record]:
    """Read from the beginning (read_committed) until ``count`` records or the deadline."""
    reader = TopicReader(bootstrap, topic)
    try:
        return reader.read_until(count, timeout)
    finally:
        reader.close()


def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        offsets = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=30
        )
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in offsets}


def end_offsets(
    bootstrap: str, topic: str, partitions: int = 1, isolation: str = "read_committed"
) -> dict[int, int]:
    """Each partition's end as a reader of ``isolation`` sees it: under read_committed the
    last stable offset, which stops before the first transaction still open."""
    config = {"bootstrap.servers": bootstrap, "group.id": unique("probe")}
    consumer = Consumer({**config, "isolation.level": isolation})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_drained(
    bootstrap: str, group: str, topic: str, partitions: int = 1, timeout: float = 90.0
) -> None:
    """Wait until the group's committed offsets equal the topic's end offsets (a partition
    that never held an event has nothing to commit: its offset stays unset)."""

    def drained() -> bool:
        done = committed(bootstrap, group, topic, partitions)
        ends = end_offsets(bootstrap, topic, partitions)
        return all(done[p] == end or (end == 0 and done[p] < 0) for p, end in ends.items())

    wait_until(drained, timeout, f"{group} committed to the end of {topic}")
