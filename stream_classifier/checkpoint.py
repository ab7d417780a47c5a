"""What is safe to commit: the one owner of offsets and commits, for both guarantees.

The service loop hands the checkpoint what it consumed and, per scored batch, the records
to write with the offsets after the batch; the checkpoint decides when offsets move.

- :class:`AtLeastOnce`: each event's records are produced with delivery reports. Per
  partition the committable offset is the end of the prefix whose records were all
  acknowledged. When a record fails in a way a later attempt may cure (an outage of any
  length), its partition is replayed in order from that prefix's end, as Kafka Streams
  does: a late re-send of one record would land after newer records of its key.
- :class:`~stream_classifier.exactly_once.ExactlyOnce` (its own module): each batch is
  one transaction holding its records and its consumed offsets. Its commit runs on a
  helper thread while the loop goes on consuming and feeding the engine; the next batch
  is written once it has landed (:meth:`Checkpoint.settled`). When a transaction does
  not commit, the checkpoint aborts it (or replaces the producer, which settles a
  transaction of unknown outcome) and asks the loop to rewind to the group's committed
  offsets (:meth:`Checkpoint.undone`), which it reads here and never guesses.

In both, a record the cluster refuses for good is replaced by a smaller dead letter
(:func:`stream_classifier.records.smaller`), and a fatal error (authorization,
configuration) stops the service with its reason: :mod:`stream_classifier.kafka_errors`
decides which is which. An outage of the output is logged once when it starts and once
when it ends.

Both are driven from the Kafka thread only: :meth:`Checkpoint.turn` once a loop turn,
:meth:`Checkpoint.commit_revoked` from inside a revoke callback. Neither blocks longer
than one bounded client call; the commits that run on helper threads (exactly_once's
transactions, at_least_once's periodic offset commits) are one at a time, their outcome
taken on the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from confluent_kafka import OFFSET_BEGINNING

from stream_classifier.kafka_errors import Verdict
from stream_classifier.offsets import OffsetTracker, TopicPartition
from stream_classifier.sink import DeliveryFailure, Record, Sink, SinkError
from stream_classifier.source import OffsetsUnavailable, Source

log = logging.getLogger(__name__)

#: Failures in a row after which the checkpoint reports the service unhealthy.
UNHEALTHY_FAILURES = 3
#: Longest pause between two attempts after a failure (exactly-once retries, re-sends).
BACKOFF_MAX_S = 5.0
#: How long a committed-offsets read may wait for the group coordinator.
COMMITTED_TIMEOUT_S = 10.0

Clock = Callable[[], float]
#: The next form of a record refused for good (None: give up), and what is told of one
#: given up.
Replace = Callable[[Record, DeliveryFailure], "Record | None"]
GiveUp = Callable[[Record, DeliveryFailure], None]


class Checkpoint(Protocol):
    def start(self) -> None: ...
    def assigned(self, partitions: Iterable[TopicPartition]) -> None: ...
    def released(self, partitions: Iterable[TopicPartition]) -> None: ...
    def consumed(self, tp: TopicPartition, offset: int) -> None: ...
    def can_write(self) -> bool: ...
    def write(self, records: list[Record], offsets: dict[TopicPartition, int]) -> bool: ...
    def settled(self, timeout: float) -> bool: ...
    def undone(self) -> bool: ...
    def turn(self) -> None: ...
    def commit_revoked(self, partitions: list[TopicPartition], timeout: float) -> None: ...
    def finish(self, timeout: float) -> bool: ...
    def rewind_targets(
        self, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int] | None: ...
    def in_flight(self) -> int: ...
    def health(self) -> tuple[bool, str]: ...
    def replays(self) -> dict[TopicPartition, int]: ...
    def on_delivery(self, record: Record, failure: DeliveryFailure | None) -> None: ...


class Backoff:
    """Failures in a row, and when the next attempt may run."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.failures = 0
        self._retry_at = 0.0

    def failed(self) -> None:
        self.failures += 1
        self._retry_at = self._clock() + min(BACKOFF_MAX_S, 0.1 * 2**self.failures)

    def succeeded(self) -> None:
        self.failures = 0
        self._retry_at = 0.0

    def due(self) -> bool:
        return self._clock() >= self._retry_at


class OutageLog:
    """Logs an outage (of the output, of the schema registry) once when it starts, every
    :data:`OUTAGE_REMINDER_S` while it lasts (with the latest cause: it may change), and
    once when it ends; not at every failed attempt. With ``grace_s``, one shorter than
    that is not logged at all (a wait that is normal for a moment)."""

    def __init__(
        self,
        clock: Clock,
        down: str = "output not writable",
        up: str = "output writable again",
        grace_s: float = 0.0,
    ) -> None:
        self._clock = clock
        self._down = down
        self._up = up
        self._grace_s = grace_s
        self._since: float | None = None
        self._logged = False
        self._reminded = 0.0
        self._failures = 0

    def failed(self, reason: str) -> None:
        self._failures += 1
        now = self._clock()
        if self._since is None:
            self._since = now
        if not self._logged:
            if now - self._since >= self._grace_s:
                self._logged, self._reminded = True, now
                log.warning("%s: %s; holding input and retrying", self._down, reason)
        elif now - self._reminded >= OUTAGE_REMINDER_S:
            self._reminded = now
            log.warning(
                "%s for %.0fs (%d failed attempts), latest: %s",
                self._down,
                now - self._since,
                self._failures,
                reason,
            )

    def succeeded(self) -> None:
        if self._since is not None and self._logged:
            log.warning(
                "%s after %.1fs (%d failed attempts)",
                self._up,
                self._clock() - self._since,
                self._failures,
            )
        self._since = None
        self._logged = False
        self._failures = 0


#: How often a lasting outage is logged again.
OUTAGE_REMINDER_S = 30.0
#: How long committed offsets may be unreadable before it is logged.
UNREADABLE_GRACE_S = 15.0


class Rewinds:
    """Where a partition must be read again from: the group's committed offset, never a guess.

    While the group has no committed offset for a partition: its beginning under
    ``auto.offset.reset=earliest``; under ``latest``, the first offset consumed since it
    was assigned (the position the reset policy gave this owner).
    """

    def __init__(self, source: Source, earliest: bool, clock: Clock) -> None:
        self._source = source
        self._earliest = earliest
        self._first: dict[TopicPartition, int] = {}
        #: Partitions to read again wait while the committed offsets cannot be read (an
        #: outage, an open transaction of another member's): normal for seconds, a stall
        #: past that.
        self._unreadable = OutageLog(
            clock,
            "committed offsets not readable, partitions to read again wait",
            "committed offsets readable again",
            grace_s=UNREADABLE_GRACE_S,
        )

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._first.pop(tp, None)

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        self._first.setdefault(tp, offset)

    def rewind_targets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int] | None:
        """Each partition's target; None when that cannot be known now (retry later)."""
        if not partitions:
            return {}
        try:
            committed = self._source.committed(partitions, COMMITTED_TIMEOUT_S)
        except OffsetsUnavailable as exc:
            log.debug("committed offsets not readable yet (%s): will retry", exc)
            self._unreadable.failed(str(exc))
            return None
        self._unreadable.succeeded()
        targets: dict[TopicPartition, int] = {}
        for tp in partitions:
            offset = committed.get(tp)
            if offset is None:
                offset = OFFSET_BEGINNING if self._earliest else self._first.get(tp)
            if offset is not None:
                targets[tp] = offset
        return targets


class AtLeastOnce(Rewinds):
    """Commit each partition up to the last event whose every record was acknowledged."""

    def __init__(
        self,
        source: Source,
        sink: Sink,
        commit_interval_s: float,
        clock: Clock,
        earliest: bool = True,
        on_written: Callable[[Record], None] = lambda record: None,
        on_commit: Callable[[bool], None] = lambda ok: None,
        replace: Replace = lambda record, failure: None,
        give_up: GiveUp = lambda record, failure: None,
    ) -> None:
        super().__init__(source, earliest, clock)
        self._sink = sink
        self._interval = commit_interval_s
        self._clock = clock
        self._on_written = on_written
        self._on_commit = on_commit
        self._replace = replace
        self._give_up = give_up
        self._tracker = OffsetTracker()
        #: Records produced and not yet acknowledged, by identity, with their event.
        self._records: dict[int, tuple[tuple[TopicPartition, int], Record]] = {}
        #: Records left to acknowledge per event.
        self._left: dict[tuple[TopicPartition, int], int] = {}
        #: Partitions to read again from these offsets (their records failed).
        self._replays: dict[TopicPartition, int] = {}
        self._backoff = Backoff(clock)
        self._outage = OutageLog(clock)
        self._last_commit = clock()
        #: The offsets of the commit in flight on the source's helper thread.
        self._committing: dict[TopicPartition, int] | None = None
        self._failure: SinkError | None = None

    def start(self) -> None:
        self._sink.start()

    def released(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions gone to another member. Their records still queued would be written
        after the new owner's (one that timed out, then the later ones): the producer is
        replaced and the partitions kept with records outstanding are replayed."""
        gone = set(partitions)
        outstanding = self._outstanding()
        self.assigned(gone)
        self._forget(gone)
        for tp in gone:
            self._replays.pop(tp, None)
        if gone & outstanding:
            self._restart({tp: self._tracker.first_pending(tp, 0) for tp in outstanding - gone})

    def _forget(self, gone: set[TopicPartition]) -> None:
        self._tracker.forget(list(gone))
        self._records = {k: v for k, v in self._records.items() if v[0][0] not in gone}
        self._left = {ev: n for ev, n in self._left.items() if ev[0] not in gone}

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        super().consumed(tp, offset)
        self._tracker.register(tp, offset)

    def can_write(self) -> bool:
        return self._backoff.due()

    def settled(self, timeout: float) -> bool:
        return True  # a write's failures come back as replays, partition by partition

    def undone(self) -> bool:
        return False

    def write(self, records: list[Record], offsets: dict[TopicPartition, int]) -> bool:
        records = [r for r in records if _event(r)[0] not in self._replays]
        for record in records:
            self._track(record, _event(record))
        for record in records:
            if _event(record)[0] in self._replays:
                continue  # refused to queue just now: the replay writes it, in order
            self._produce(record)
        return True

    def _track(self, record: Record, event: tuple[TopicPartition, int]) -> None:
        self._records[id(record)] = (event, record)
        self._left[event] = self._left.get(event, 0) + 1

    def _produce(self, record: Record) -> None:
        # While produce() waits for room it serves delivery reports; one of them may put
        # the record's own partition in replay, and then the replay writes it, in order.
        failure = self._sink.produce(record, abandoned=lambda: id(record) not in self._records)
        if failure is not None:
            self.on_delivery(record, failure)

    def on_delivery(self, record: Record, failure: DeliveryFailure | None) -> None:
        entry = self._records.pop(id(record), None)
        if entry is None:
            return  # its partition was released or is replayed: redone from the source
        event = entry[0]
        if failure is None:
            self._outage.succeeded()
            self._backoff.succeeded()
            self._on_written(record)
            self._acknowledged(event)
        elif failure.verdict is Verdict.DEAD_LETTER:
            self._refused(record, event, failure)
        elif failure.verdict is Verdict.RIDE_OUT:
            self._replay(event, failure)
        elif self._failure is None:
            source = record.source
            self._failure = SinkError(
                f"could not deliver the {record.kind} record for {source.topic}"
                f"[{source.partition}]@{source.offset}: {failure.reason}"
            )

    def _acknowledged(self, event: tuple[TopicPartition, int]) -> None:
        self._left[event] -= 1
        if self._left[event] == 0:
            del self._left[event]
            self._tracker.mark_done(*event)

    def _refused(
        self, record: Record, event: tuple[TopicPartition, int], failure: DeliveryFailure
    ) -> None:
        """A record that can never be written: write its smaller form, or give it up."""
        smaller = self._replace(record, failure)
        if smaller is None:
            self._give_up(record, failure)
            self._acknowledged(event)
            return
        self._left[event] -= 1
        self._track(smaller, event)
        self._produce(smaller)

    def _replay(self, event: tuple[TopicPartition, int], failure: DeliveryFailure) -> None:
        """Read the partition again from the end of its acknowledged prefix, in order.

        Records queued behind a timed-out one would still be written, before the replay
        (the idempotent producer bumps its epoch and goes on): per-key order would break.
        So the producer is replaced, its queue purged, and every partition with records
        outstanding is replayed too (Kafka Streams closes the whole task dirty likewise).
        """
        self._outage.failed(failure.reason)
        tp = event[0]
        if tp in self._replays:
            return
        replays = {other: self._tracker.first_pending(other, 0) for other in self._outstanding()}
        replays[tp] = self._tracker.first_pending(tp, default=event[1])
        self._restart(replays)
        self._backoff.failed()

    def _outstanding(self) -> set[TopicPartition]:
        """Partitions with records produced and not yet acknowledged."""
        return {event[0] for event, _ in self._records.values()}

    def _restart(self, replays: dict[TopicPartition, int]) -> None:
        """A new producer (the old one's queue purged); these partitions read again."""
        self._replays.update(replays)
        self._forget(set(replays))
        self._sink.restart()

    def replays(self) -> dict[TopicPartition, int]:
        """Partitions to read again and from where; asking hands them to the caller."""
        replays, self._replays = self._replays, {}
        return replays

    def turn(self) -> None:
        self._sink.poll(0)
        if self._failure is not None:
            raise self._failure
        if not self._landed(0.0):
            return
        if self._clock() - self._last_commit >= self._interval:
            self._last_commit = self._clock()
            offsets = self._tracker.to_commit()
            if offsets:
                self._committing = offsets
                self._source.commit_in_background(offsets)

    def _landed(self, timeout: float) -> bool:
        """Whether no background commit is in flight (waiting up to ``timeout`` for one
        to end); one that ended is accounted for here, on the loop."""
        if self._committing is None:
            return True
        ok = self._source.commit_outcome(timeout)
        if ok is None:
            return False
        offsets, self._committing = self._committing, None
        self._on_commit(ok)
        if ok:
            self._tracker.committed(offsets)
        return True

    def _commit(self, partitions: set[TopicPartition] | None, timeout: float) -> bool:
        """Commit now, on the loop (a revoke, the stop), after the background commit in
        flight has ended, or ``timeout`` later: a commit still in flight then is superseded
        by this one (a later result only makes the next turn commit these offsets again)."""
        self._landed(timeout)
        self._last_commit = self._clock()
        offsets = self._tracker.to_commit()
        if partitions is not None:
            offsets = {tp: off for tp, off in offsets.items() if tp in partitions}
        if not offsets:
            return True
        ok = self._source.commit(offsets)
        self._on_commit(ok)
        if ok:
            self._tracker.committed(offsets)
        return ok

    def commit_revoked(self, partitions: list[TopicPartition], timeout: float) -> None:
        """Inside the revoke callback: wait a little for acknowledgements, commit them."""
        if self._failure is None:
            self._sink.flush(timeout)
            self._commit(set(partitions), timeout)

    def finish(self, timeout: float) -> bool:
        left = self._sink.flush(timeout)
        if self._failure is not None:
            raise self._failure
        return self._commit(None, timeout) and left == 0 and not self._replays

    def in_flight(self) -> int:
        return len(self._left)

    def health(self) -> tuple[bool, str]:
        if self._backoff.failures >= UNHEALTHY_FAILURES:
            return False, f"output not writable: {self._backoff.failures} replays in a row failed"
        return True, "ok"


def _event(record: Record) -> tuple[TopicPartition, int]:
    source = record.source
    return (source.topic, source.partition), source.offset
