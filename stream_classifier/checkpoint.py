"""What is safe to commit: the one owner of offsets and commits, for both guarantees.

The service loop hands the checkpoint what it consumed and, per scored batch, the records
to write with the offsets after the batch; the checkpoint decides when offsets move.

- :class:`AtLeastOnce`: each event's records are produced with delivery reports. Per
  partition the committable offset is the end of the prefix whose records were all
  acknowledged. A record that failed in a way a later attempt may cure (a broker outage
  of any length) is sent again, never skipped; a permanent failure stops the service.
- :class:`ExactlyOnce`: each batch is one transaction holding its records and its
  consumed offsets. When a transaction does not commit, the checkpoint aborts it (or
  replaces the producer, which settles a transaction of unknown outcome) and asks the
  loop to rewind to the group's committed offsets, which it reads here and never guesses.

Both are driven from the Kafka thread only: :meth:`Checkpoint.turn` once a loop turn,
:meth:`Checkpoint.commit_revoked` from inside a revoke callback. Neither blocks longer
than one bounded client call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from confluent_kafka import OFFSET_BEGINNING

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
            log.info("committed offsets not readable yet (%s): will retry", exc)
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
    ) -> None:
        super().__init__(source, earliest)
        self._sink = sink
        self._interval = commit_interval_s
        self._clock = clock
        self._on_written = on_written
        self._on_commit = on_commit
        self._tracker = OffsetTracker()
        #: Records produced and not yet acknowledged, by identity, with their event.
        self._records: dict[int, tuple[TopicPartition, int]] = {}
        #: Records left to acknowledge per event.
        self._left: dict[tuple[TopicPartition, int], int] = {}
        #: Records whose delivery failed and that wait to be sent again, with how many
        #: times each has failed so far.
        self._resend: list[Record] = []
        self._failures: dict[int, int] = {}
        self._resend_at = 0.0
        self._last_commit = clock()
        self._failure: SinkError | None = None

    def start(self) -> None:
        self._sink.start()

    def released(self, partitions: Iterable[TopicPartition]) -> None:
        gone = set(partitions)
        self.assigned(gone)
        self._tracker.forget(list(gone))
        self._records = {k: ev for k, ev in self._records.items() if ev[0] not in gone}
        self._left = {ev: n for ev, n in self._left.items() if ev[0] not in gone}
        self._failures = {k: n for k, n in self._failures.items() if k in self._records}
        self._resend = [r for r in self._resend if id(r) in self._records]

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        super().consumed(tp, offset)
        self._tracker.register(tp, offset)

    def can_write(self) -> bool:
        return True

    def write(self, records: list[Record], offsets: dict[TopicPartition, int]) -> bool:
        for record in records:
            event = ((record.source.topic, record.source.partition), record.source.offset)
            self._records[id(record)] = event
            self._left[event] = self._left.get(event, 0) + 1
        for record in records:
            self._sink.produce(record)
        return True

    def on_delivery(self, record: Record, failure: DeliveryFailure | None) -> None:
        event = self._records.get(id(record))
        if event is None:
            return  # its partition was released: the next owner redoes the event
        if failure is None:
            del self._records[id(record)]
            self._failures.pop(id(record), None)
            self._on_written(record)
            self._left[event] -= 1
            if self._left[event] == 0:
                del self._left[event]
                self._tracker.mark_done(*event)
        elif failure.retriable:
            failed = self._failures[id(record)] = self._failures.get(id(record), 0) + 1
            log.warning("%s record not delivered (%s): will send it again", record.kind, failure)
            self._resend.append(record)
            backoff = min(BACKOFF_MAX_S, 0.1 * 2**failed)
            self._resend_at = max(self._resend_at, self._clock() + backoff)
        elif self._failure is None:
            source = record.source
            self._failure = SinkError(
                f"could not deliver the {record.kind} record for {source.topic}"
                f"[{source.partition}]@{source.offset}: {failure.reason}"
            )

    def turn(self) -> None:
        self._sink.poll(0)
        if self._failure is not None:
            raise self._failure
        if self._resend and self._clock() >= self._resend_at:
            again, self._resend = self._resend, []
            log.info("sending %d undelivered records again", len(again))
            for record in again:
                self._sink.produce(record)
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
        return self._commit(None) and left == 0 and not self._resend

    def in_flight(self) -> int:
        return len(self._left)

    def health(self) -> tuple[bool, str]:
        worst = max(self._failures.values(), default=0)
        if worst >= UNHEALTHY_FAILURES:
            return False, f"{len(self._failures)} records undelivered, re-sending ({worst} tries)"
        return True, "ok"


class ExactlyOnce(_Rewinds):
    """One transaction per batch: records and consumed offsets commit together or not at all."""

    def __init__(
        self,
        source: Source,
        sink: Sink,
        clock: Clock,
        earliest: bool = True,
        on_committed: Callable[[list[Record]], None] = lambda records: None,
    ) -> None:
        super().__init__(source, earliest)
        self._sink = sink
        self._clock = clock
        self._on_committed = on_committed
        self._backoff = _Backoff(clock)
        #: The producer must be replaced (a transaction of unknown outcome, a lost group).
        self._broken = False

    def start(self) -> None:
        """Start the producer; if the cluster is unreachable, retry from the loop."""
        try:
            self._sink.start()
        except TransactionFailed as exc:
            log.warning("transactional producer not ready (%s): retrying", exc)
            self._broken = True
            self._backoff.failed()

    def released(self, partitions: Iterable[TopicPartition]) -> None:
        self.assigned(partitions)

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
        try:
            self._sink.begin()
            for record in records:
                self._sink.produce(record)
            self._sink.commit(offsets, self._source.group_metadata())
        except TransactionFailed as exc:
            log.warning("transaction failed (%s): rewinding to the committed offsets", exc)
            self._end_failed(exc.abortable)
            self._backoff.failed()
            return False
        self._backoff.succeeded()
        self._on_committed(records)
        return True

    def _end_failed(self, abortable: bool) -> None:
        if abortable:
            try:
                self._sink.abort()
                return
            except TransactionFailed as exc:
                log.warning("abort failed (%s): replacing the producer", exc)
        self._broken = True

    def on_delivery(self, record: Record, failure: DeliveryFailure | None) -> None:
        pass  # a failed record fails its transaction's commit, which is what counts

    def turn(self) -> None:
        self._sink.poll(0)

    def commit_revoked(self, partitions: list[TopicPartition], timeout: float) -> None:
        pass  # nothing is open between transactions; unwritten events are redone

    def finish(self, timeout: float) -> bool:
        return True  # every written batch committed in its own transaction

    def in_flight(self) -> int:
        return 0

    def health(self) -> tuple[bool, str]:
        if self._backoff.failures >= UNHEALTHY_FAILURES:
            return False, f"{self._backoff.failures} transactions failed in a row"
        return True, "ok"
