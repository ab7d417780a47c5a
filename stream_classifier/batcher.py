"""Micro-batching: the sole owner of requests waiting for the engine.

A batch closes at the first of: ``max_batch_messages`` requests, ``max_batch_tokens``
(sum of the requests' padded pair lengths, the memory bound), or ``max_batch_wait_ms``
since its first request arrived. A request bigger than the token budget on its own still
forms a batch of one (the engine splits its pairs into budget-sized GPU batches).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from stream_classifier.messages import ClassifyRequest
from stream_classifier.offsets import TopicPartition


class MicroBatcher:
    def __init__(
        self,
        max_messages: int,
        max_tokens: int,
        max_wait_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_messages = max_messages
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self._clock = clock
        self._pending: list[ClassifyRequest] = []
        self._tokens = 0
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def tokens(self) -> int:
        return self._tokens

    def fits(self, request: ClassifyRequest) -> bool:
        """Whether ``request`` can join the open batch without breaking a bound."""
        if not self._pending:
            return True
        return (
            len(self._pending) < self.max_messages
            and self._tokens + _cost(request) <= self.max_tokens
        )

    def add(self, request: ClassifyRequest) -> None:
        if not self.fits(request):
            raise OverflowError("batch is full: take() it before adding more")
        if not self._pending:
            self._opened_at = self._clock()
        self._pending.append(request)
        self._tokens += _cost(request)

    def is_full(self) -> bool:
        return len(self._pending) >= self.max_messages or self._tokens >= self.max_tokens

    def is_due(self) -> bool:
        """Full, or its first request has waited ``max_batch_wait_ms``."""
        return bool(self._pending) and (self.is_full() or self.time_left() <= 0.0)

    def time_left(self) -> float:
        """Seconds until the open batch is due by time (inf when nothing is waiting)."""
        if self._opened_at is None:
            return float("inf")
        return self._opened_at + self.max_wait_s - self._clock()

    def take(self) -> list[ClassifyRequest]:
        batch, self._pending = self._pending, []
        self._tokens = 0
        self._opened_at = None
        return batch

    def drop(self, partitions: Iterable[TopicPartition]) -> list[ClassifyRequest]:
        """Remove and return the waiting requests of these partitions."""
        gone = set(partitions)
        dropped = [r for r in self._pending if _tp(r) in gone]
        if dropped:
            kept = [r for r in self._pending if _tp(r) not in gone]
            opened_at = self._opened_at
            self.take()
            for request in kept:
                self.add(request)
            if kept:
                self._opened_at = opened_at
        return dropped


def _cost(request: ClassifyRequest) -> int:
    return int(request.prepared.tokens) if request.prepared is not None else 0


def _tp(request: ClassifyRequest) -> TopicPartition:
    return request.envelope.source.topic, request.envelope.source.partition
