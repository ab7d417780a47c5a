"""Micro-batching: the sole owner of events waiting for the engine.

A batch closes at the first of: ``max_batch_messages`` events, or ``max_batch_wait_ms``
since its first event arrived (the service also hands it over early when the engine has
nothing to do). A batch is the unit of one commit (one transaction under exactly_once),
not of one forward pass: the engine cuts its pairs into passes of at most
``max_batch_tokens`` padded tokens, which is what bounds device memory. So a batch is not
cut by tokens: on a GPU a 1024-event batch at 4 labels is about 390,000 tokens, six
passes queued back to back, where a batch cut at one pass's 65,536 tokens held about 170
events and the loop's cost per batch (a turn to notice it, a write, a commit or a
transaction) came 6 times as often.

Rejected events ride in the batch that is open when they arrive, so that
every batch is a contiguous run of each partition's events: committing a batch's offsets
commits exactly the events whose outputs (or dead letters) that batch wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from stream_classifier.messages import ClassifyRequest, Rejection
from stream_classifier.offsets import TopicPartition

Item = ClassifyRequest | Rejection


@dataclass
class Batch:
    """Events in the order they were consumed: requests to score and rejections to route."""

    items: list[Item] = field(default_factory=list)

    @property
    def requests(self) -> list[ClassifyRequest]:
        return [item for item in self.items if isinstance(item, ClassifyRequest)]

    @property
    def rejections(self) -> list[Rejection]:
        return [item for item in self.items if isinstance(item, Rejection)]

    def next_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the offset after the batch's last event (what to commit)."""
        offsets: dict[TopicPartition, int] = {}
        for item in self.items:
            source = item.envelope.source
            tp = (source.topic, source.partition)
            offsets[tp] = max(offsets.get(tp, 0), source.offset + 1)
        return offsets

    def without(self, partitions: Iterable[TopicPartition]) -> Batch:
        gone = set(partitions)
        return Batch([item for item in self.items if topic_partition(item) not in gone])

    def __len__(self) -> int:
        return len(self.items)


class MicroBatcher:
    def __init__(
        self,
        max_messages: int,
        max_wait_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_messages = max_messages
        self.max_wait_s = max_wait_ms / 1000.0
        self._clock = clock
        self._batch = Batch()
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._batch)

    def add(self, item: Item) -> None:
        if self.is_full():
            raise OverflowError("batch is full: take() it before adding more")
        if not self._batch.items:
            self._opened_at = self._clock()
        self._batch.items.append(item)

    def is_full(self) -> bool:
        return len(self._batch) >= self.max_messages

    def is_due(self) -> bool:
        """Full, or its first event has waited ``max_batch_wait_ms``."""
        return bool(self._batch.items) and (self.is_full() or self.time_left() <= 0.0)

    def time_left(self) -> float:
        """Seconds until the open batch is due by time (inf when nothing is waiting)."""
        if self._opened_at is None:
            return float("inf")
        return self._opened_at + self.max_wait_s - self._clock()

    def take(self) -> Batch:
        batch, self._batch = self._batch, Batch()
        self._opened_at = None
        return batch

    def drop(self, partitions: Iterable[TopicPartition]) -> int:
        """Remove the waiting events of these partitions; return how many were dropped."""
        kept = self._batch.without(partitions)
        dropped = len(self._batch) - len(kept)
        if dropped:
            opened_at = self._opened_at
            self.take()
            for item in kept.items:
                self.add(item)
            if kept.items:
                self._opened_at = opened_at
        return dropped


def topic_partition(item: Item) -> TopicPartition:
    return item.envelope.source.topic, item.envelope.source.partition
