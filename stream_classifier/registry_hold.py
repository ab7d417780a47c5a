"""Events that wait for the schema registry, in their partitions' order.

When the registry cannot answer for an event's schema (down, timing out), the event is
neither dead-lettered nor skipped: it is held, with every later event of its partition
behind it, and its partition is paused. Its offset is not committed (the event is consumed
and not finished), so a restart or a new owner reads it again. Every retry, spaced by the
checkpoint's back-off, decodes the held events in order until one fails again. The outage
is logged once when it starts and once when it ends, as an output outage is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from stream_classifier.checkpoint import Backoff, OutageLog
from stream_classifier.messages import Envelope
from stream_classifier.offsets import TopicPartition

#: Hands one held event back to the intake (raises RegistryUnavailable while it is down).
Accept = Callable[[Envelope, float], None]


def partition_of(envelope: Envelope) -> TopicPartition:
    return envelope.source.topic, envelope.source.partition


class RegistryHold:
    def __init__(self, clock: Callable[[], float], on_failure: Callable[[], None]) -> None:
        self._events: dict[TopicPartition, deque[tuple[Envelope, float]]] = {}
        self._backoff = Backoff(clock)
        self._outage = OutageLog(
            clock, "schema registry unavailable", "schema registry available again"
        )
        self._on_failure = on_failure

    def __len__(self) -> int:
        return sum(len(events) for events in self._events.values())

    @property
    def partitions(self) -> set[TopicPartition]:
        """The partitions to keep paused."""
        return set(self._events)

    def holds(self, envelope: Envelope) -> bool:
        return partition_of(envelope) in self._events

    def add(self, envelope: Envelope, arrived: float) -> None:
        """An event behind a held one of its partition."""
        self._events[partition_of(envelope)].append((envelope, arrived))

    def start(self, envelope: Envelope, arrived: float, reason: str) -> None:
        """The registry failed on this event: hold it (and its partition from here)."""
        self._events[partition_of(envelope)] = deque([(envelope, arrived)])
        self._failed(reason)

    def retry(self, accept: Accept) -> None:
        """When the back-off allows: hand the held events back in order, each partition's
        until one fails again (then the rest wait for the next retry)."""
        from stream_classifier.formats import RegistryUnavailable

        if not self._events or not self._backoff.due():
            return
        for tp in list(self._events):
            events = self._events[tp]
            while events:
                try:
                    accept(*events[0])
                except RegistryUnavailable as exc:
                    self._failed(str(exc))
                    return
                events.popleft()
            del self._events[tp]
        self._backoff.succeeded()
        self._outage.succeeded()

    def drop(self, partitions: Iterable[TopicPartition]) -> int:
        """Forget the held events of partitions no longer ours (or read again)."""
        dropped = 0
        for tp in partitions:
            dropped += len(self._events.pop(tp, ()))
        return dropped

    def clear(self) -> None:
        self._events.clear()

    def _failed(self, reason: str) -> None:
        self._backoff.failed()
        self._outage.failed(reason)
        self._on_failure()
