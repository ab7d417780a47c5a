"""What is safe to commit: the one owner of offsets and commits, for both guarantees.

The service loop hands the checkpoint what it consumed and, per scored batch, the records
to write with the offsets after the batch; the checkpoint decides when offsets move.

- :class:`AtLeastOnce`: each event's records are produced with delivery reports. Per
  partition the committable offset is the end of the prefix whose records were all
  acknowledged. When a record fails in a way a later attempt may cure (an outage of any
  length), its partition is replayed in order from that prefix's end, as Kafka Streams
  does: a late re-send of one record would land after newer records of its key.
- :class:`ExactlyOnce`: each batch is one transaction holding its records and its
  consumed offsets. When a transaction does not commit, the checkpoint aborts it (or
  replaces the producer, which settles a transaction of unknown outcome) and asks the
  loop to rewind to the group's committed offsets, which it reads here and never guesses.

In both, a record the cluster refuses for good is replaced by a smaller dead letter
(:func:`stream_classifier.records.smaller`), and a fatal error (authorization,
configuration) stops the service with its reason: :mod:`stream_classifier.kafka_errors`
decides which is which. An outage of the output is logged once when it starts and once
when it ends.

Both are driven from the Kafka thread only: :meth:`Checkpoint.turn` once a loop turn,
:meth:`Checkpoint.commit_revoked` from inside a revoke callback. Neither blocks longer
than one bounded client call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from confluent_kafka import OFFSET_BEGINNING

from stream_classifier.kafka_errors import Verdict
from stream_classifier.offsets import OffsetTracker, TopicPartition
from stream_classifier.sink import DeliveryFailure, Record, Sink, SinkError, TransactionFailed
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


class _Backoff:
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


class _Outage:
    """Logs an outage of the output once when it starts and once when it ends."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._since: float | None = None
        self._failures = 0

    def failed(self, reason: str) -> None:
        self._failures += 1
        if self._since is None:
            self._since = self._clock()
            log.warning("output not writable: %s; holding input and retrying until it is", reason)

    def succeeded(self) -> None:
        if self._since is not None:
            log.warning(
                "output writable again after %.1fs (%d failed attempts)",
                self._clock() - self._since,
                self._failures,
            )
        self._since = None
        self._failures = 0


class _Rewinds:
    """Where a partition must be read again from: the group's committed offset, never a guess.

    While the group has no committed offset for a partition: its beginning under
    ``auto.offset.reset=earliest``; under ``latest``, the first offset consumed since it
    was assigned (the position the reset policy gave this owner).
    """

    def __init__(self, source: Source, earliest: bool) -> None:
        self._source = source
        self._earliest = earliest
        self._first: dict[TopicPartition, int] = {}

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
            return None
        targets: dict[TopicPartition, int] = {}
        for tp in partitions:
            offset = committed.get(tp)
            if offset is None:
                offset = OFFSET_BEGINNING if self._earliest else self._first.get(tp)
            if offset is not None:
                targets[tp] = offset
        return targets


class AtLeastOnce(_Rewinds):
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
        super().__init__(source, earliest)
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
        self._backoff = _Backoff(clock)
        self._outage = _Outage(clock)
        self._last_commit = clock()
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
        if self._clock() - self._last_commit >= self._interval:
            self._commit(None)

    def _commit(self, partitions: set[TopicPartition] | None) -> bool:
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
            self._commit(set(partitions))

    def finish(self, timeout: float) -> bool:
        left = self._sink.flush(timeout)
        if self._failure is not None:
            raise self._failure
        return self._commit(None) and left == 0 and not self._replays

    def in_flight(self) -> int:
        return len(self._left)

    def health(self) -> tuple[bool, str]:
        if self._backoff.failures >= UNHEALTHY_FAILURES:
            return False, f"output not writable: {self._backoff.failures} replays in a row failed"
        return True, "ok"


def _event(record: Record) -> tuple[TopicPartition, int]:
    source = record.source
    return (source.topic, source.partition), source.offset


class ExactlyOnce(_Rewinds):
    """One transaction per batch: records and consumed offsets commit together or not at all."""

    def __init__(
        self,
        source: Source,
        sink: Sink,
        clock: Clock,
        earliest: bool = True,
        on_committed: Callable[[list[Record]], None] = lambda records: None,
        replace: Replace = lambda record, failure: None,
        give_up: GiveUp = lambda record, failure: None,
    ) -> None:
        super().__init__(source, earliest)
        self._sink = sink
        self._clock = clock
        self._earliest = earliest
        self._on_committed = on_committed
        self._replace = replace
        self._give_up = give_up
        self._backoff = _Backoff(clock)
        self._outage = _Outage(clock)
        #: The producer must be replaced (a transaction of unknown outcome, a lost group).
        self._broken = False
        #: Delivery failures reported for the open transaction's records.
        self._failed: list[tuple[Record, DeliveryFailure]] = []
        #: Records refused for good, by event and destination: the form to write instead
        #: when their batch is redone (the refusal failed its transaction).
        self._refused: dict[tuple[str, int, int, str, str], tuple[int, DeliveryFailure]] = {}
        #: Under ``latest``: each new partition's first consumed offset, committed before
        #: the first transaction so that the next owner starts there, not at the end.
        self._pins: dict[TopicPartition, int] = {}

    def start(self) -> None:
        """Start the producer; if the cluster is unreachable, retry from the loop."""
        try:
            self._sink.start()
        except TransactionFailed as exc:
            log.warning("transactional producer not ready (%s): retrying", exc)
            self._broken = True
            self._backoff.failed()

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        if not self._earliest and tp not in self._first:
            self._pins[tp] = offset
        super().consumed(tp, offset)

    def released(self, partitions: Iterable[TopicPartition]) -> None:
        self.assigned(partitions)
        for tp in partitions:
            self._pins.pop(tp, None)

    def replace_producer(self) -> None:
        """Start a fresh producer before the next transaction (after losing the group)."""
        self._broken = True

    def can_write(self) -> bool:
        if not self._backoff.due():
            return False
        if self._broken:
            try:
                self._sink.restart()
            except TransactionFailed as exc:
                log.warning("new transactional producer failed (%s): retrying", exc)
                self._backoff.failed()
                return False
            self._broken = False
        return True

    def write(self, records: list[Record], offsets: dict[TopicPartition, int]) -> bool:
        """Commit one batch's transaction; False if it did not commit (rewind and redo)."""
        self._failed = []
        try:
            self._sink.begin()
            written = [w for r in records if (w := self._produce(self._instead(r))) is not None]
            if self._failed:
                raise TransactionFailed(self._failed[0][1].reason, abortable=True)
            self._sink.commit(offsets, self._source.group_metadata())
        except TransactionFailed as exc:
            self._failed_transaction(exc)
            return False
        self._backoff.succeeded()
        self._outage.succeeded()
        for tp in offsets:
            self._pins.pop(tp, None)
        for record in records:
            self._refused.pop(_refusal_key(record), None)
        self._on_committed(written)
        return True

    def _instead(self, record: Record) -> Record | None:
        """What to write for a record: a smaller form where an earlier attempt was refused."""
        refused = self._refused.get(_refusal_key(record))
        if refused is None:
            return record
        stage, failure = refused
        current: Record | None = record
        while current is not None and current.stage < stage:
            last = current
            current = self._replace(current, failure)
            if current is None:
                self._give_up(last, failure)
        return current

    def _produce(self, record: Record | None) -> Record | None:
        """Queue a record in the open transaction, smaller forms where it is refused."""
        while record is not None:
            failure = self._sink.produce(record)
            if failure is None:
                return record
            if failure.verdict is not Verdict.DEAD_LETTER:
                self._failed.append((record, failure))
                return None
            smaller = self._replace(record, failure)
            if smaller is None:
                self._give_up(record, failure)
            record = smaller
        return None

    def _failed_transaction(self, exc: TransactionFailed) -> None:
        failures, self._failed = self._failed, []
        fatal = [f for _, f in failures if f.verdict is Verdict.FATAL]
        if fatal:
            raise SinkError(f"a record of the transaction was refused: {fatal[0].reason}")
        for record, failure in failures:
            if failure.verdict is Verdict.DEAD_LETTER:
                self._refused[_refusal_key(record)] = (record.stage + 1, failure)
        refused = any(f.verdict is Verdict.DEAD_LETTER for _, f in failures)
        if not refused:
            self._outage.failed(str(exc))
        log.debug("transaction failed (%s): rewinding to the committed offsets", exc)
        self._end_failed(exc.abortable)
        if not refused:
            self._backoff.failed()

    def _end_failed(self, abortable: bool) -> None:
        if abortable:
            try:
                self._sink.abort()
                return
            except TransactionFailed as exc:
                log.warning("abort failed (%s): replacing the producer", exc)
        self._broken = True

    def on_delivery(self, record: Record, failure: DeliveryFailure | None) -> None:
        """A failed record fails its transaction's commit; why it failed decides the redo."""
        if failure is not None:
            self._failed.append((record, failure))

    def replays(self) -> dict[TopicPartition, int]:
        return {}  # a failed transaction rewinds every partition (write returns False)

    def turn(self) -> None:
        self._sink.poll(0)
        if self._pins:
            self._commit_pins(set(self._pins))

    def _commit_pins(self, partitions: set[TopicPartition]) -> None:
        pins = {tp: off for tp, off in self._pins.items() if tp in partitions}
        if pins and self._source.commit(pins):
            for tp in pins:
                self._pins.pop(tp, None)

    def commit_revoked(self, partitions: list[TopicPartition], timeout: float) -> None:
        """Nothing is open between transactions; unwritten events are redone. A new
        partition's starting point is committed so that the next owner starts there."""
        self._commit_pins(set(partitions))

    def finish(self, timeout: float) -> bool:
        return True  # every written batch committed in its own transaction

    def in_flight(self) -> int:
        return 0

    def health(self) -> tuple[bool, str]:
        if self._backoff.failures >= UNHEALTHY_FAILURES:
            return False, f"{self._backoff.failures} transactions failed in a row"
        return True, "ok"


def _refusal_key(record: Record) -> tuple[str, int, int, str, str]:
    first = record.first or record
    source = record.source
    return source.topic, source.partition, source.offset, first.topic, first.kind
