"""Group rebalances: the callbacks record what changed (inside ``consume()``), the loop
applies it afterwards, between two of its own steps."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from stream_classifier.checkpoint import Checkpoint
from stream_classifier.exactly_once import ExactlyOnce
from stream_classifier.intake import Intake
from stream_classifier.metrics import Metrics
from stream_classifier.offsets import TopicPartition
from stream_classifier.partitions import Partitions

log = logging.getLogger(__name__)

#: How long a revoke callback may wait for acknowledgements before committing.
REVOKE_FLUSH_S = 5.0


@dataclass
class Change:
    """What the callbacks saw during one consume()."""

    assigned: list[TopicPartition] = field(default_factory=list)
    released: list[TopicPartition] = field(default_factory=list)
    lost: bool = False


class Rebalances:
    """The rebalance listener of the service's consumer, and what follows a change."""

    def __init__(
        self,
        partitions: Partitions,
        checkpoint: Checkpoint,
        intake: Intake,
        metrics: Metrics,
        closing: Callable[[], bool],
    ) -> None:
        self.partitions = partitions
        self.checkpoint = checkpoint
        self.intake = intake
        self.metrics = metrics
        self._closing = closing
        #: Recorded by the callbacks since the loop last applied them.
        self.change = Change()
        #: Told of each assignment in its callback (``run``'s start-up clock: group joined).
        self.on_assigned: Callable[[list[TopicPartition]], object] = lambda partitions: None

    # -- the callbacks ---------------------------------------------------------------------

    def assigned(self, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", partitions)
        self.partitions.assign(partitions)
        self.change.assigned += partitions
        self.on_assigned(partitions)

    def revoked(self, partitions: list[TopicPartition]) -> None:
        """The one thing that must happen inside the callback: commit what is finished."""
        log.info("revoked %s", partitions)
        if not self._closing():
            self.checkpoint.commit_revoked(partitions, REVOKE_FLUSH_S)
        self._forget(partitions)

    def lost(self, partitions: list[TopicPartition]) -> None:
        log.warning(
            "lost %s: their unfinished events will be read again by their owner", partitions
        )
        self._forget(partitions)
        self.change.lost = True

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self.partitions.unassign(partitions)
        self.change.released += partitions

    # -- the loop's side -------------------------------------------------------------------

    def apply(self) -> None:
        """Act on what the callbacks recorded (nothing, most turns)."""
        change = self.change
        if not (change.assigned or change.released or change.lost):
            return
        self.change = Change()
        if change.released:
            self._release(change.released)
            # Revoked and assigned again within one consume(): what it returned for such a
            # partition may predate either callback, so drop it and read again.
            self.partitions.rewind(change.released)
        if change.assigned:
            self.checkpoint.assigned(change.assigned)
            self.partitions.settle(change.assigned)
            if isinstance(self.checkpoint, ExactlyOnce):
                # Read new partitions from the committed offset the loop fetches itself
                # (an error until no open transaction holds offsets of them), not from
                # where librdkafka starts them: when another member's open transaction
                # holds their offsets (UNSTABLE_OFFSET_COMMIT) and the assignment changes
                # while librdkafka retries, it starts them at auto.offset.reset instead
                # (rd_kafka_assignment_apply_offsets keeps the broker's -1). That re-read
                # committed events, written twice (docs/RELIABILITY.md, "A new owner
                # started at auto.offset.reset").
                self.partitions.rewind(change.assigned)
        if change.lost and isinstance(self.checkpoint, ExactlyOnce):
            # Losing the group means the cluster was unreachable: start the transactional
            # producer afresh rather than trust its cached coordinators (librdkafka #5456).
            self.checkpoint.replace_producer()
        self.metrics.assigned_partitions.set(len(self.partitions.assigned))

    def _release(self, partitions: Iterable[TopicPartition]) -> None:
        gone = set(partitions)
        dropped = self.drop_queued(gone)
        self.checkpoint.released(gone)
        self.partitions.release(gone)
        for topic, partition in gone:
            self.metrics.forget_partition(topic, partition)
        if dropped:
            log.info("dropped %d queued events of released partitions", dropped)

    def drop_queued(self, partitions: set[TopicPartition]) -> int:
        """Forget every event of these partitions not yet written; a new epoch discards
        those already with the engine (see :class:`~stream_classifier.pending.Submitted`)."""
        dropped = self.intake.drop(partitions)
        for tp in partitions:
            self.partitions.new_epoch(tp)
        return dropped
