"""The checkpoint alone, with fake ports: what it commits, replays and writes instead.

Fast feedback for the one owner of commits; the simulation and the broker tests prove
the same behaviour inside the whole loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from stream_classifier.checkpoint import OUTAGE_REMINDER_S, AtLeastOnce, OutageLog
from stream_classifier.exactly_once import ExactlyOnce
from stream_classifier.kafka_errors import Verdict
from stream_classifier.messages import Envelope, SourceRef
from stream_classifier.offsets import TopicPartition
from stream_classifier.records import smaller
from stream_classifier.sink import DeliveryFailure, Record, SinkError, TransactionFailed

TP = ("in", 0)
TOO_LARGE = DeliveryFailure("Broker: Message size too large", Verdict.DEAD_LETTER, 10)
TIMED_OUT = DeliveryFailure("Local: Message timed out", Verdict.RIDE_OUT, -192)
DENIED = DeliveryFailure("Broker: Topic authorization failed", Verdict.FATAL, 29)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeSource:
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)

    background: dict[TopicPartition, int] | None = None
    #: The background commit stays in flight while this is set (a coordinator moving).
    hold: bool = False

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        self.commits.append(dict(offsets))
        return True

    def commit_in_background(self, offsets: dict[TopicPartition, int]) -> None:
        """Sent now (recorded in ``commits``), its outcome known at the next turn."""
        assert self.background is None
        self.background = offsets
        self.commits.append(dict(offsets))

    def commit_outcome(self, timeout: float) -> bool | None:
        assert self.background is not None
        if self.hold:
            return None
        self.background = None
        return True

    def committed(
        self, partitions: list[TopicPartition], timeout: float
    ) -> dict[TopicPartition, int | None]:
        return {}

    def group_metadata(self) -> object:
        return ("member", 1)


@dataclass
class FakeSink:
    """Queues records; ``refuse`` decides which are refused on ``produce`` itself."""

    refuse: dict[str, DeliveryFailure] = field(default_factory=dict)
    produced: list[Record] = field(default_factory=list)
    committed: list[list[Record]] = field(default_factory=list)
    open: list[Record] | None = None
    #: The commit asked for in the background, and whether it stays in flight.
    background: tuple[dict[TopicPartition, int], object] | None = None
    hold: bool = False

    restarts: int = 0

    def start(self) -> None: ...
    def restart(self) -> None:
        self.restarts += 1

    def poll(self, timeout: float) -> None: ...
    def flush(self, timeout: float) -> int:
        return 0

    def produce(
        self, record: Record, abandoned: Callable[[], bool] = lambda: False
    ) -> DeliveryFailure | None:
        failure = self.refuse.get(record.topic)
        if failure is not None:
            return failure
        self.produced.append(record)
        if self.open is not None:
            self.open.append(record)
        return None

    def begin(self) -> None:
        self.open = []

    def commit(self, offsets: dict[TopicPartition, int], group_metadata: object) -> None:
        assert self.open is not None
        self.committed.append(self.open)
        self.open = None

    def commit_in_background(
        self, offsets: dict[TopicPartition, int], group_metadata: object
    ) -> None:
        self.background = (offsets, group_metadata)

    def commit_landed(self, timeout: float) -> bool:
        if self.hold:
            return False
        assert self.background is not None
        offsets, group_metadata = self.background
        self.background = None
        self.commit(offsets, group_metadata)
        return True

    def abort(self) -> None:
        self.open = None

    def close(self, timeout: float) -> int:
        return 0


def record(
    offset: int, topic: str = "out", value: bytes = b"v", kind: str = "output", partition: int = 0
) -> Record:
    source = SourceRef(topic="in", partition=partition, offset=offset, timestamp=1)
    envelope = Envelope(source, b"key", b"input-" + str(offset).encode(), [("h", b"1")], 0.0)
    return Record(topic, b"key", value, [("h", b"1")], 1, source, kind, None, envelope, "dlq")


def at_least_once(sink: FakeSink, source: FakeSource, given_up: list[Record]) -> AtLeastOnce:
    return AtLeastOnce(
        source,  # type: ignore[arg-type]
        sink,
        commit_interval_s=0.0,
        clock=Clock(),
        replace=lambda r, f: smaller(r, f, 1_000_000),
        give_up=lambda r, f: given_up.append(r),
    )


def test_a_failed_record_replays_its_partition_from_the_acknowledged_prefix() -> None:
    sink, source = FakeSink(), FakeSource()
    given_up: list[Record] = []
    checkpoint = at_least_once(sink, source, given_up)
    for offset in range(4):
        checkpoint.consumed(TP, offset)
    records = [record(offset) for offset in range(4)]
    checkpoint.write(records, {TP: 4})
    checkpoint.on_delivery(records[0], None)
    checkpoint.turn()
    assert source.commits[-1] == {TP: 1}
    checkpoint.on_delivery(records[2], TIMED_OUT)  # 1 is still out, 3 gets through later
    checkpoint.on_delivery(records[3], None)
    assert checkpoint.replays() == {TP: 1}, "read again from the first unfinished event"
    assert checkpoint.replays() == {}, "handed over once"
    checkpoint.on_delivery(records[1], None)  # a late report of a forgotten record
    checkpoint.turn()
    assert all(c[TP] <= 1 for c in source.commits), "never past the failed event"


def written(checkpoint: AtLeastOnce, partitions: int, offsets: int) -> list[list[Record]]:
    """Records of ``offsets`` events on each input partition, produced, none acknowledged."""
    records = []
    for partition in range(partitions):
        tp = ("in", partition)
        for offset in range(offsets):
            checkpoint.consumed(tp, offset)
        mine = [record(offset, partition=partition) for offset in range(offsets)]
        checkpoint.write(mine, {tp: offsets})
        records.append(mine)
    return records


def test_a_time_out_replaces_the_producer_and_replays_every_partition_with_records_out() -> None:
    """Records queued behind a timed-out one would be written before the replay."""
    sink, source = FakeSink(), FakeSource()
    checkpoint = at_least_once(sink, source, [])
    first, second, third = written(checkpoint, 3, 2)
    checkpoint.on_delivery(third[0], None)
    checkpoint.on_delivery(third[1], None)  # partition 2 is all acknowledged
    checkpoint.on_delivery(second[0], None)
    checkpoint.on_delivery(first[1], TIMED_OUT)
    assert sink.restarts == 1, "the producer's queue is purged"
    assert checkpoint.replays() == {("in", 0): 0, ("in", 1): 1}
    checkpoint.on_delivery(first[0], None)  # late reports of the old producer change nothing
    checkpoint.on_delivery(second[1], TIMED_OUT)
    assert sink.restarts == 1 and checkpoint.replays() == {}
    checkpoint.turn()
    assert source.commits[-1] == {("in", 2): 2}, "the replayed ones commit after their replay"


def test_a_partition_released_with_records_out_replaces_the_producer() -> None:
    """Its queued records would land after the new owner's."""
    sink, source = FakeSink(), FakeSource()
    checkpoint = at_least_once(sink, source, [])
    first, second = written(checkpoint, 2, 2)
    checkpoint.released([("in", 1)])
    assert sink.restarts == 1
    assert checkpoint.replays() == {("in", 0): 0}
    checkpoint.on_delivery(first[0], None)
    checkpoint.released([("in", 0)])
    assert sink.restarts == 1, "nothing of it was still out"


def test_a_record_refused_for_good_becomes_smaller_dead_letters_then_is_given_up() -> None:
    sink, source = FakeSink(), FakeSource()
    given_up: list[Record] = []
    checkpoint = at_least_once(sink, source, given_up)
    checkpoint.consumed(TP, 0)
    checkpoint.consumed(TP, 1)
    first, second = record(0), record(1)
    checkpoint.write([first, second], {TP: 2})
    checkpoint.on_delivery(second, None)
    checkpoint.on_delivery(first, TOO_LARGE)  # the broker refuses the output
    letter = sink.produced[-1]
    assert (letter.topic, letter.stage, letter.code) == ("dlq", 1, "output_too_large")
    assert letter.value == b"input-0"
    checkpoint.on_delivery(letter, TOO_LARGE)  # and the dead letter
    assert sink.produced[-1].stage == 2 and sink.produced[-1].value is None
    checkpoint.on_delivery(sink.produced[-1], TOO_LARGE)
    last = sink.produced[-1]
    assert last.stage == 3 and last.key is None and last.timestamp == 0
    checkpoint.on_delivery(last, TOO_LARGE)
    assert given_up and given_up[0].stage == 3
    checkpoint.turn()
    assert source.commits[-1] == {TP: 2}, "the given-up event's offset advances"
    assert checkpoint.replays() == {}


def test_a_fatal_delivery_error_stops_at_least_once() -> None:
    sink, source = FakeSink(), FakeSource()
    checkpoint = at_least_once(sink, source, [])
    checkpoint.consumed(TP, 0)
    only = record(0)
    checkpoint.write([only], {TP: 1})
    checkpoint.on_delivery(only, DENIED)
    with pytest.raises(SinkError, match="authorization"):
        checkpoint.turn()


def exactly_once(sink: FakeSink, given_up: list[Record]) -> ExactlyOnce:
    return ExactlyOnce(
        FakeSource(),  # type: ignore[arg-type]
        sink,
        Clock(),
        replace=lambda r, f: smaller(r, f, 1_000_000),
        give_up=lambda r, f: given_up.append(r),
    )


def test_exactly_once_writes_the_smaller_form_in_the_same_transaction() -> None:
    sink = FakeSink(refuse={"out": TOO_LARGE})  # produce() itself refuses (producer limit)
    checkpoint = exactly_once(sink, [])
    assert checkpoint.write([record(0)], {TP: 1})
    assert checkpoint.settled(0.0) and not checkpoint.undone()
    assert [r.topic for r in sink.committed[0]] == ["dlq"]


def test_exactly_once_redoes_a_transaction_refused_by_the_broker_with_the_smaller_form() -> None:
    sink = FakeSink()
    checkpoint = exactly_once(sink, [])
    original = record(0)

    def refuse_at_commit(offsets: dict[TopicPartition, int], group_metadata: object) -> None:
        checkpoint.on_delivery(original, TOO_LARGE)  # the report arrives during commit
        raise TransactionFailed("commit_transaction: 1 message(s) failed", abortable=True)

    sink.commit = refuse_at_commit  # type: ignore[method-assign]
    assert checkpoint.write([original], {TP: 1}), "accepted: its commit runs in the background"
    assert checkpoint.settled(0.0)
    assert checkpoint.undone(), "the loop is told to rewind"
    assert not checkpoint.undone(), "once"
    del sink.commit  # the redo commits
    redo = record(0)  # the batch is rebuilt after the rewind
    assert checkpoint.write([redo], {TP: 1})
    assert checkpoint.settled(0.0) and not checkpoint.undone()
    assert [(r.topic, r.code) for r in sink.committed[0]] == [("dlq", "output_too_large")]


def test_exactly_once_commits_in_the_background_and_the_next_write_waits_for_it() -> None:
    """While the broker commits one batch the loop goes on (consuming, feeding the
    engine): nothing blocks it, the output counts as writable (no partition is paused for
    it), and what was committed is only reported once it has landed."""
    sink, source = FakeSink(hold=True), FakeSource()
    committed: list[list[Record]] = []
    checkpoint = ExactlyOnce(source, sink, Clock(), on_committed=committed.append)  # type: ignore[arg-type]
    first = record(0)
    assert checkpoint.write([first], {TP: 1})
    assert not checkpoint.settled(0.0), "in flight"
    assert checkpoint.can_write(), "the output is up: no partition is paused for a commit"
    checkpoint.turn()
    assert not checkpoint.finish(0.0), "a stop waits for it"
    assert committed == [] and sink.committed == []
    sink.hold = False
    assert checkpoint.settled(0.0) and not checkpoint.undone()
    assert committed == [[first]]
    assert checkpoint.write([record(1)], {TP: 2})
    assert checkpoint.finish(0.0), "the stop's wait takes the last outcome"
    assert len(committed) == 2


def test_exactly_once_pins_where_a_new_partition_began_under_latest() -> None:
    source = FakeSource()
    checkpoint = ExactlyOnce(source, FakeSink(), Clock(), earliest=False)  # type: ignore[arg-type]
    checkpoint.consumed(TP, 40)
    checkpoint.consumed(TP, 41)
    checkpoint.turn()
    assert source.commits == [{TP: 40}]
    checkpoint.turn()
    assert source.commits == [{TP: 40}], "pinned once"


def test_a_lasting_outage_is_logged_at_its_start_every_reminder_and_at_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not at every failed attempt, but not silent while it lasts either: the cause can
    change (a broker back, a producer fenced) and the operator must see the latest."""
    clock = Clock()
    outage = OutageLog(clock)
    with caplog.at_level("WARNING"):
        for second in range(int(OUTAGE_REMINDER_S * 2.5) + 1):
            clock.now = float(second)
            outage.failed("refused" if second < 40 else "fenced")
        outage.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, messages
    assert messages[0] == "output not writable: refused; holding input and retrying"
    assert messages[1].startswith("output not writable for 30s (31 failed attempts)")
    assert messages[1].endswith("latest: refused")
    assert messages[2].endswith("latest: fenced")
    assert messages[3] == "output writable again after 75.0s (76 failed attempts)"


def test_a_wait_shorter_than_its_grace_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Committed offsets unreadable for a moment (a coordinator loading) are normal; for
    longer than the grace they are a stall the operator must see, with its end."""
    clock = Clock()
    wait = OutageLog(clock, "offsets not readable", "offsets readable again", grace_s=15.0)
    with caplog.at_level("WARNING"):
        for second in range(10):
            clock.now = float(second)
            wait.failed("coordinator loading")
        wait.succeeded()
        assert caplog.records == []
        for second in range(100, 121):
            clock.now = float(second)
            wait.failed("unstable offsets")
        wait.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "offsets not readable: unstable offsets; holding input and retrying",
        "offsets readable again after 20.0s (21 failed attempts)",
    ]


def test_a_commit_in_flight_holds_no_write_and_the_next_commit_waits_for_it() -> None:
    """librdkafka holds a commit until the group's coordinator answers (a coordinator
    moving after a broker was lost): the loop goes on writing meanwhile, starts no second
    commit, and commits what was acknowledged since once the first has landed."""
    sink, source = FakeSink(), FakeSource(hold=True)
    checkpoint = at_least_once(sink, source, [])
    first = [record(offset) for offset in range(2)]
    for offset in range(4):
        checkpoint.consumed(TP, offset)
    checkpoint.write(first, {TP: 2})
    for written in first:
        checkpoint.on_delivery(written, None)
    checkpoint.turn()
    assert source.commits == [{TP: 2}]
    later = [record(offset) for offset in range(2, 4)]
    checkpoint.write(later, {TP: 4})  # the commit in flight holds no write
    for written in later:
        checkpoint.on_delivery(written, None)
    checkpoint.turn()
    assert [r.source.offset for r in sink.produced] == [0, 1, 2, 3]
    assert source.commits == [{TP: 2}], "a second commit started before the first landed"
    source.hold = False
    checkpoint.turn()  # the first lands; the next one goes out
    assert source.commits == [{TP: 2}, {TP: 4}]
