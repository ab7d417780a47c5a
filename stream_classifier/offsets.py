"""What is safe to commit.

Per partition, the service may commit offset N+1 only when every event it consumed at or
below N has had its output (or dead-letter record) acknowledged by the broker. Outputs are
acknowledged out of order (batches, retries, two topics), so the tracker keeps the consumed
offsets of each partition in order and advances over the finished prefix.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


class OffsetOrderError(Exception):
    """An offset was registered that does not increase within its partition."""


@dataclass
class _PartitionState:
    pending: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    #: Next offset to commit (last finished + 1, or the first offset registered).
    committable: int | None = None
    committed: int | None = None
    last_registered: int | None = None


class OffsetTracker:
    """Consumed → finished → committable, per partition."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionState] = {}

    def register(self, tp: TopicPartition, offset: int) -> None:
        """Record a consumed event whose output is not yet acknowledged."""
        state = self._partitions.setdefault(tp, _PartitionState())
        last = state.last_registered
        if last is not None and offset <= last:
            raise OffsetOrderError(f"{tp[0]}[{tp[1]}] offset {offset} after {last}")
        state.last_registered = offset
        state.pending.append(offset)
        if state.committable is None:
            # Everything before the first event read since assignment is someone else's
            # finished work: committing this offset at once pins where the next owner
            # starts (under auto.offset.reset=latest it would start at the end and skip
            # what this owner read but did not finish).
            state.committable = offset

    def mark_done(self, tp: TopicPartition, offset: int) -> None:
        """Record that the event's output (or dead letter) was acknowledged."""
        state = self._partitions.get(tp)
        if state is None:
            return  # the partition was revoked meanwhile; a late ack changes nothing
        state.done.add(offset)
        while state.pending and state.pending[0] in state.done:
            finished = state.pending.popleft()
            state.done.discard(finished)
            state.committable = finished + 1

    def first_pending(self, tp: TopicPartition, default: int) -> int:
        """The lowest offset consumed and not finished (``default`` if none)."""
        state = self._partitions.get(tp)
        return state.pending[0] if state and state.pending else default

    def to_commit(self) -> dict[TopicPartition, int]:
        """Offsets that advanced since the last :meth:`committed` call."""
        return {
            tp: state.committable
            for tp, state in self._partitions.items()
            if state.committable is not None and state.committable != state.committed
        }

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            state = self._partitions.get(tp)
            if state is not None:
                state.committed = offset

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        """Events consumed but not yet acknowledged (in one partition, or in all)."""
        if tp is not None:
            state = self._partitions.get(tp)
            return len(state.pending) if state else 0
        return sum(len(state.pending) for state in self._partitions.values())

    def forget(self, partitions: list[TopicPartition]) -> None:
        """Drop partitions that are no longer ours (revoked or lost)."""
        for tp in partitions:
            self._partitions.pop(tp, None)
