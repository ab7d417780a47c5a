"""Exactly-once writing: one transaction per batch, holding its records and its offsets.

The other half of :mod:`stream_classifier.checkpoint` (whose docstring says what both
guarantees promise); it shares that module's back-off, outage log and rewind targets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from stream_classifier.checkpoint import (
    UNHEALTHY_FAILURES,
    Backoff,
    Clock,
    GiveUp,
    OutageLog,
    Replace,
    Rewinds,
)
from stream_classifier.kafka_errors import Verdict
from stream_classifier.offsets import TopicPartition
from stream_classifier.sink import DeliveryFailure, Record, Sink, SinkError, TransactionFailed
from stream_classifier.source import Source

log = logging.getLogger(__name__)


class ExactlyOnce(Rewinds):
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
        super().__init__(source, earliest, clock)
        self._sink = sink
        self._clock = clock
        self._earliest = earliest
        self._on_committed = on_committed
        self._replace = replace
        self._give_up = give_up
        self._backoff = Backoff(clock)
        self._outage = OutageLog(clock)
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
        #: The transaction committing in the background, until its outcome is taken.
        self._committing: _Committing | None = None
        #: A transaction accepted by :meth:`write` failed to commit (see :meth:`undone`).
        self._undone = False

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
        if self._committing is not None:
            # Its outcome comes later: until then the output is as the last one found it
            # (up, or still down while a retry commits: the input stays held).
            return self._backoff.failures == 0
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
        """Open one batch's transaction and start its commit on a helper thread; False if
        it failed before that (rewind and redo). Its outcome is taken by :meth:`settled`
        (a commit that fails there makes :meth:`undone` true). The caller waits until
        :meth:`settled` before the next write."""
        assert self._committing is None, "write while a transaction is committing"
        self._failed = []
        try:
            self._sink.begin()
            written = [w for r in records if (w := self._produce(self._instead(r))) is not None]
            if self._failed:
                raise TransactionFailed(self._failed[0][1].reason, abortable=True)
            self._sink.commit_in_background(offsets, self._source.group_metadata())
        except TransactionFailed as exc:
            self._failed_transaction(exc)
            return False
        self._committing = _Committing(records, offsets, written)
        return True

    def settled(self, timeout: float) -> bool:
        """Whether the last transaction has its outcome (waiting up to ``timeout``)."""
        committing = self._committing
        if committing is None:
            return True
        try:
            if not self._sink.commit_landed(timeout):
                return False
        except TransactionFailed as exc:
            self._committing = None
            self._undone = True
            self._failed_transaction(exc)
            return True
        self._committing = None
        self._committed(committing)
        return True

    def undone(self) -> bool:
        """A transaction that :meth:`write` accepted did not commit: everything not
        committed must be read again. True once per such transaction."""
        undone, self._undone = self._undone, False
        return undone

    def _committed(self, committed: _Committing) -> None:
        self._backoff.succeeded()
        self._outage.succeeded()
        for tp in committed.offsets:
            self._pins.pop(tp, None)
        for record in committed.records:
            self._refused.pop(_refusal_key(record), None)
        self._on_committed(committed.written)

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
        if not self.settled(0.0):
            return  # the producer is the committing thread's until then
        self._sink.poll(0)
        if self._pins:
            self._commit_pins(set(self._pins))

    def _commit_pins(self, partitions: set[TopicPartition]) -> None:
        pins = {tp: off for tp, off in self._pins.items() if tp in partitions}
        if pins and self._source.commit(pins):
            for tp in pins:
                self._pins.pop(tp, None)

    def commit_revoked(self, partitions: list[TopicPartition], timeout: float) -> None:
        """The transaction committing is waited for (its offsets are the next owner's
        start); unwritten events are redone. A new partition's starting point is
        committed so that the next owner starts there."""
        self.settled(timeout)
        self._commit_pins(set(partitions))

    def finish(self, timeout: float) -> bool:
        """Every written batch committed in its own transaction, the last one included."""
        return self.settled(timeout) and not self.undone()

    def in_flight(self) -> int:
        return 0

    def health(self) -> tuple[bool, str]:
        if self._backoff.failures >= UNHEALTHY_FAILURES:
            return False, f"{self._backoff.failures} transactions failed in a row"
        return True, "ok"


@dataclass(frozen=True)
class _Committing:
    """A transaction committing: the records asked for, the forms written, the offsets."""

    records: list[Record]
    offsets: dict[TopicPartition, int]
    written: list[Record]


def _refusal_key(record: Record) -> tuple[str, int, int, str, str]:
    first = record.first or record
    source = record.source
    return source.topic, source.partition, source.offset, first.topic, first.kind
