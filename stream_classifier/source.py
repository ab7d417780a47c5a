"""The consumer side: one ``confluent_kafka.Consumer`` in a consumer group.

Offsets are never committed automatically: the service commits exactly what the
:class:`~stream_classifier.offsets.OffsetTracker` says is finished. Partition assignment is
cooperative-sticky, so a rebalance moves only the partitions that change hands.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from stream_classifier.offsets import TopicPartition as TP

log = logging.getLogger(__name__)

RebalanceCallback = Callable[[list[TP]], None]


class SourceError(Exception):
    """The consumer hit an error it cannot recover from."""


class KafkaSource:
    def __init__(
        self,
        consumer_config: dict[str, Any],
        topics: list[str],
        on_assign: RebalanceCallback,
        on_revoke: RebalanceCallback,
        on_lost: RebalanceCallback,
    ) -> None:
        self._config = consumer_config
        self._topics = topics
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._consumer: Consumer | None = None

    def start(self) -> None:
        self._consumer = Consumer(self._config)
        self._consumer.subscribe(
            self._topics,
            on_assign=lambda _c, parts: self._on_assign(_tps(parts)),
            on_revoke=lambda _c, parts: self._on_revoke(_tps(parts)),
            on_lost=lambda _c, parts: self._on_lost(_tps(parts)),
        )

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("source not started")
        return self._consumer

    def consume(self, max_messages: int, timeout: float) -> list[Message]:
        """Fetch up to ``max_messages``; transient errors are logged, fatal ones raise.

        Waits up to ``timeout`` for the first message only, then takes what is already
        fetched: consume(n, timeout) alone would hold a lone event until n arrive.
        """
        messages = self.consumer.consume(num_messages=1, timeout=timeout)
        if messages and max_messages > 1:
            messages += self.consumer.consume(num_messages=max_messages - 1, timeout=0)
        good: list[Message] = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            elif error.fatal():
                raise SourceError(f"consumer fatal error: {error.str()}")
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error on %s: %s", message.topic(), error.str())
        return good

    def commit(self, offsets: dict[TP, int]) -> bool:
        """Commit synchronously; False (and a log line) if the group refused it."""
        partitions = [TopicPartition(topic, part, off) for (topic, part), off in offsets.items()]
        try:
            results = self.consumer.commit(offsets=partitions, asynchronous=False)
        except KafkaException as exc:
            log.warning("commit failed, will retry: %s", exc.args[0].str())
            return False
        failed = [tp for tp in results or [] if tp.error is not None]
        for tp in failed:
            assert tp.error is not None
            log.warning(
                "commit of %s[%d]@%d failed: %s", tp.topic, tp.partition, tp.offset, tp.error.str()
            )
        return not failed

    def pause_all(self) -> None:
        """Stop fetching (consume() keeps serving the group); fetched data is re-read later."""
        assigned = self.consumer.assignment()
        if assigned:
            self.consumer.pause(assigned)

    def resume_all(self) -> None:
        assigned = self.consumer.assignment()
        if assigned:
            self.consumer.resume(assigned)

    def seek_to_committed(self, partitions: list[TP], fallback: dict[TP, int]) -> None:
        """Read these partitions again from their committed offsets (or ``fallback``)."""
        if not partitions:
            return
        committed = self.consumer.committed(
            [TopicPartition(topic, part) for topic, part in partitions], timeout=30
        )
        for tp in committed:
            offset = tp.offset if tp.offset >= 0 else fallback.get((tp.topic, tp.partition))
            if offset is None:
                continue
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def consumer_config(
    client: dict[str, Any], group_id: str, auto_offset_reset: str
) -> dict[str, Any]:
    return {
        **client,
        "group.id": group_id,
        # The service decides what is finished; librdkafka must never commit on its own.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "partition.assignment.strategy": "cooperative-sticky",
        "auto.offset.reset": auto_offset_reset,
        # Input written by transactional producers: only read what they committed.
        "isolation.level": "read_committed",
    }


def _tps(parts: list[TopicPartition]) -> list[TP]:
    return [(tp.topic, tp.partition) for tp in parts]
