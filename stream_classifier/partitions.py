"""Every assigned partition's state in the loop, kept in step in one place.

Five facts per partition used to live in six collections of the service, updated by hand
in five methods: whether it is ours, its assignment epoch, the next offset expected, its
pause state and whether it is being read again. :class:`Partitions` owns them all and
asserts their invariants after every change (:meth:`Partitions.check`):

- paused, unsettled and rewinding partitions are assigned ones;
- a partition read again has no next offset until its seek is done.

The epoch of a partition grows each time it is released (or replayed): results scored for
an older epoch are stale and never written, even if the partition came back since.
The pause half follows the idea of Quix Streams' ``PausingManager``: the loop says what it
wants held, this object says what to pause and resume to get there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from stream_classifier.offsets import TopicPartition


@dataclass(frozen=True)
class PauseChange:
    pause: list[TopicPartition]
    resume: list[TopicPartition]


class Partitions:
    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self._epochs: dict[TopicPartition, int] = {}
        #: The offset after the last one taken since assigned (or rewound): what arrives
        #: below it again is already in hand.
        self._next: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        #: Assigned partitions whose pause state librdkafka may not match (new ones).
        self._unsettled: set[TopicPartition] = set()
        #: Partitions to read again: from their committed offset (None) or from the
        #: offset given (a partition replayed after its records failed).
        self.rewinding: dict[TopicPartition, int | None] = {}

    # -- assignment (from the rebalance callbacks and the loop) ----------------------------

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self.assigned.update(partitions)

    def unassign(self, partitions: Iterable[TopicPartition]) -> None:
        self.assigned.difference_update(partitions)

    def settle(self, partitions: Iterable[TopicPartition]) -> None:
        """New partitions: their pause state is set explicitly at the next pause turn."""
        self._unsettled.update(tp for tp in partitions if tp in self.assigned)
        self.check()

    def release(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions that left: a new epoch, and nothing else of them kept."""
        for tp in partitions:
            self.new_epoch(tp)
            self.rewinding.pop(tp, None)
            self.paused.discard(tp)
            self._unsettled.discard(tp)
        self.check()

    def new_epoch(self, tp: TopicPartition) -> None:
        self._epochs[tp] = self._epochs.get(tp, 0) + 1
        self._next.pop(tp, None)

    def epoch(self, tp: TopicPartition) -> int:
        return self._epochs.get(tp, 0)

    def current(self, tp: TopicPartition, epoch: int) -> bool:
        """Still ours, in the epoch its events were read in."""
        return tp in self.assigned and self.epoch(tp) == epoch

    # -- reading ---------------------------------------------------------------------------

    def take(self, tp: TopicPartition, offset: int) -> bool:
        """Whether a consumed event is new and ours to process (and note it if so)."""
        if tp not in self.assigned or tp in self.rewinding:
            return False  # not ours (any more), or read again from its target soon
        if offset < self._next.get(tp, 0):
            # librdkafka moved the fetch position back without a rebalance (seen after a
            # pause right at assignment): these events are in hand already.
            return False
        self._next[tp] = offset + 1
        return True

    def rewind(self, partitions: Iterable[TopicPartition], offset: int | None = None) -> None:
        """Read these again: from the committed offset (None) or from ``offset``."""
        for tp in partitions:
            if tp in self.assigned:
                self.rewinding[tp] = offset
        self.check()

    def rewound(self, tp: TopicPartition) -> None:
        """The seek is done (or nothing was to be read again): read it from there."""
        self._next.pop(tp, None)
        del self.rewinding[tp]

    # -- pausing ---------------------------------------------------------------------------

    def holding_all(self) -> bool:
        return bool(self.assigned) and self.paused == self.assigned

    def pause_change(self, held: set[TopicPartition]) -> PauseChange | None:
        """What to pause and resume so that exactly the ``held`` partitions and those read
        again are paused; None when nothing changes."""
        want = (held & self.assigned) | set(self.rewinding)
        if want == self.paused and not self._unsettled:
            return None  # most turns
        pause = sorted((want - self.paused) | (want & self._unsettled))
        resume = sorted(tp for tp in (self.paused - want) | (self._unsettled - want))
        self.paused = want
        self._unsettled.clear()
        self.check()
        return PauseChange(pause, [tp for tp in resume if tp in self.assigned])

    def check(self) -> None:
        assert self.paused <= self.assigned, (
            f"paused and not assigned: {self.paused - self.assigned}"
        )
        assert self._unsettled <= self.assigned, "unsettled and not assigned"
        assert self.rewinding.keys() <= self.assigned, "read again and not assigned"
