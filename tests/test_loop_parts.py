"""The loop's parts on their own, without a broker: partition state, the intake, the
batches with the engine, and what outputs count."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from typing import Any

from conftest import service_config

from stream_classifier.batcher import Batch
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.intake import Intake
from stream_classifier.messages import ClassifyRequest, Envelope, Rejection, SourceRef
from stream_classifier.metrics import Metrics
from stream_classifier.outputs import Observer, Outputs
from stream_classifier.partitions import Partitions
from stream_classifier.pending import PendingBatches
from stream_classifier.preparing import InlinePreparer
from stream_classifier.scoring import Outcome
from stream_classifier.sink import Record

TP = ("in", 0)
LABELS = ["spam", "ham"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- partition state ------------------------------------------------------------------------


def test_events_of_a_partition_released_meanwhile_are_not_current() -> None:
    partitions = Partitions()
    partitions.assign([TP])
    epoch = partitions.epoch(TP)
    assert partitions.current(TP, epoch)
    partitions.unassign([TP])
    partitions.release([TP])
    partitions.assign([TP])  # assigned back: events read before are still stale
    assert not partitions.current(TP, epoch)
    assert partitions.current(TP, partitions.epoch(TP))


def test_an_offset_delivered_again_without_a_rebalance_is_not_taken_twice() -> None:
    partitions = Partitions()
    partitions.assign([TP])
    assert [partitions.take(TP, offset) for offset in (0, 1, 2)] == [True, True, True]
    assert not partitions.take(TP, 1), "librdkafka moved the fetch position back"
    assert partitions.take(TP, 3)
    assert not partitions.take(("in", 9), 0), "not ours"


def test_a_partition_read_again_is_held_and_takes_nothing_until_rewound() -> None:
    partitions = Partitions()
    partitions.assign([TP, ("in", 1)])
    partitions.settle([TP, ("in", 1)])
    first = partitions.pause_change(set())
    assert first is not None and first.resume == [TP, ("in", 1)], "new ones set explicitly"
    partitions.take(TP, 5)
    partitions.rewind([TP], 2)
    assert not partitions.take(TP, 6)
    change = partitions.pause_change(set())
    assert change is not None and change.pause == [TP] and change.resume == []
    partitions.rewound(TP)
    assert partitions.take(TP, 2), "read from the rewind target"
    change = partitions.pause_change(set(partitions.assigned))
    assert change is not None and change.pause == [("in", 1)] and partitions.holding_all()
    assert partitions.pause_change(set(partitions.assigned)) is None, "nothing to change"


def test_released_partitions_keep_no_pause_or_rewind_state() -> None:
    partitions = Partitions()
    partitions.assign([TP])
    partitions.rewind([TP])
    partitions.pause_change(set(partitions.assigned))
    partitions.unassign([TP])
    partitions.release([TP])
    assert not partitions.paused and not partitions.rewinding
    partitions.check()


# -- intake ---------------------------------------------------------------------------------


class Preparing(InlinePreparer):
    """Tokenizing that finishes when the test says so, or raises for a text."""

    def __init__(self) -> None:
        self.futures: list[Future[Prepared]] = []
        #: Each submission's ``later``, in order.
        self.later: list[bool] = []

    def submit(
        self,
        text: str,
        labels: Any,
        template: str,
        multi_label: bool,
        windowing: Any = None,
        later: bool = False,
    ) -> Any:
        future: Future[Prepared] = Future()
        if "boom" in text:
            future.set_exception(ValueError("cannot tokenize"))
        self.futures.append(future)
        self.later.append(later)
        return future

    def finish(self) -> None:
        for future in self.futures:
            if not future.done():
                future.set_result(object())  # type: ignore[arg-type]


def envelope(offset: int, value: bytes, partition: int = 0) -> Envelope:
    source = SourceRef(topic="in", partition=partition, offset=offset, timestamp=None)
    return Envelope(source, None, value, [], 0.0)


def event(text: str) -> bytes:
    return json.dumps({"text": text}).encode()


def intake(clock: Clock, preparer: Preparing, batch: int = 3) -> Intake:
    topic = {"input": "in", "output": "out", "dead_letter": "dlq", "labels": LABELS}
    config = service_config(
        "127.0.0.1:1",
        [topic],
        processing={"max_batch_messages": batch, "max_batch_wait_ms": 1000},
    )
    return Intake(config, preparer, clock)


def test_events_join_the_batch_in_order_once_tokenized_and_rejections_keep_their_place() -> None:
    clock, preparer = Clock(), Preparing()
    parts = intake(clock, preparer)
    parts.accept(envelope(0, event("a")))
    parts.accept(envelope(1, b"{not json"))
    parts.accept(envelope(2, event("boom")))
    parts.fill()
    assert len(parts.batcher) == 0, "the first is not tokenized yet: nothing overtakes it"
    assert parts.take_due(engine_idle=True) is None
    preparer.finish()
    parts.fill()
    batch = parts.take_due(engine_idle=False)
    assert batch is not None, "full at three"
    kinds = [type(item).__name__ for item in batch.items]
    assert kinds == ["ClassifyRequest", "Rejection", "Rejection"]
    assert [item.envelope.source.offset for item in batch.items] == [0, 1, 2]
    assert isinstance(batch.items[2], Rejection) and batch.items[2].code == "prepare_failed"


def test_a_batch_goes_when_due_or_at_once_to_an_idle_engine() -> None:
    clock, preparer = Clock(), Preparing()
    parts = intake(clock, preparer)
    parts.accept(envelope(0, event("a")))
    preparer.finish()
    parts.fill()
    assert parts.take_due(engine_idle=False) is None
    clock.now += 2.0
    due = parts.take_due(engine_idle=False)
    assert due is not None and len(due) == 1
    parts.accept(envelope(1, event("b")))
    preparer.finish()
    parts.fill()
    idle = parts.take_due(engine_idle=True)
    assert idle is not None and len(idle) == 1


def test_dropping_a_partition_forgets_its_events_wherever_they_wait() -> None:
    clock, preparer = Clock(), Preparing()
    parts = intake(clock, preparer, batch=10)
    parts.accept(envelope(0, event("a"), partition=0))
    parts.accept(envelope(0, event("b"), partition=1))
    preparer.finish()
    parts.fill()
    parts.accept(envelope(1, event("c"), partition=1))
    assert parts.drop({("in", 1)}) == 2
    assert len(parts) == 1 and parts.room() == 9


# -- batches with the engine ----------------------------------------------------------------


class ManualScorer:
    overtakes = False

    def __init__(self) -> None:
        self.futures: list[Future[list[Outcome]]] = []

    def submit(self, requests: list[ClassifyRequest]) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        self.futures.append(future)
        return future

    def shutdown(self) -> None: ...


def test_a_partitions_results_come_out_in_submission_order_and_discarded_ones_never() -> None:
    clock, scorer = Clock(), ManualScorer()
    pending = PendingBatches(scorer, 3, clock)
    for _ in range(3):
        pending.submit(Batch(), {("in", 0): 0, ("in", 1): 0})
    assert not pending.has_room()
    scorer.futures[1].set_result([])
    assert pending.take_finished(False, lambda: True) is None, "the oldest is not done"
    scorer.futures[0].set_result([])
    assert pending.take_finished(False, lambda: True) is not None
    assert pending.take_finished(False, lambda: False) is None, "held while unwritable"
    pending.discard()
    scorer.futures[2].set_result([])
    assert pending.take_finished(False, lambda: True) is None, "a rewind discarded them"
    assert len(pending) == 0


def test_a_batch_of_other_partitions_is_taken_before_an_unfinished_earlier_one() -> None:
    """A live batch that overtook bulk work on the device is written without waiting for
    the bulk batch submitted before it; one sharing a partition with it still waits."""
    clock, scorer = Clock(), ManualScorer()
    pending = PendingBatches(scorer, 4, clock)
    pending.submit(Batch(), {("bulk", 0): 0, ("bulk", 1): 0})
    pending.submit(Batch(), {("live", 0): 0})
    pending.submit(Batch(), {("bulk", 1): 0, ("live", 1): 0})
    scorer.futures[2].set_result([])
    assert pending.take_finished(False, lambda: True) is None, "bulk 1 comes first"
    scorer.futures[1].set_result([])
    taken = pending.take_finished(False, lambda: True)
    assert taken is not None and set(taken[0].epochs) == {("live", 0)}
    assert pending.take_finished(False, lambda: True) is None
    scorer.futures[0].set_result([])
    first = pending.take_finished(False, lambda: True)
    assert first is not None and set(first[0].epochs) == {("bulk", 0), ("bulk", 1)}
    last = pending.take_finished(False, lambda: True)
    assert last is not None and set(last[0].epochs) == {("bulk", 1), ("live", 1)}


def test_waiting_for_results_waits_for_the_batch_that_holds_the_others_back() -> None:
    clock, scorer = Clock(), ManualScorer()
    pending = PendingBatches(scorer, 2, clock)
    pending.submit(Batch(), {("in", 0): 0})
    pending.submit(Batch(), {("in", 0): 0})
    scorer.futures[1].set_result([])
    threading.Timer(0.05, lambda: scorer.futures[0].set_result([])).start()
    taken = pending.take_finished(True, lambda: True, deadline=clock.now + 5.0)
    assert taken is not None and taken[0].future is scorer.futures[0]


def test_the_engine_counts_as_stalled_only_while_work_waits_with_nothing_back() -> None:
    clock, scorer = Clock(), ManualScorer()
    pending = PendingBatches(scorer, 2, clock)
    clock.now = 100.0
    assert pending.stalled_s() == 0.0, "idle is not stalled"
    pending.submit(Batch(), {})
    clock.now = 130.0
    assert pending.stalled_s() == 30.0
    scorer.futures[0].set_result([])
    assert pending.stalled_s() == 0.0


def test_a_full_engine_is_waited_for_up_to_the_timeout() -> None:
    clock, scorer = Clock(), ManualScorer()
    pending = PendingBatches(scorer, 1, clock)
    assert not pending.wait_for_engine(0.01), "nothing to wait for"
    pending.submit(Batch(), {})
    threading.Timer(0.05, lambda: scorer.futures[0].set_result([])).start()
    assert pending.wait_for_engine(5.0)
    assert scorer.futures[0].done(), "returned once the batch was scored"


# -- outputs --------------------------------------------------------------------------------


class Heard(Observer):
    def __init__(self) -> None:
        self.written_records: list[Record] = []

    def written(self, record: Record) -> None:
        self.written_records.append(record)


def test_outputs_are_counted_once_written_not_when_built() -> None:
    metrics, heard = Metrics(), Heard()
    outputs = Outputs(metrics, "model", [heard])
    topic = service_config(
        "127.0.0.1:1",
        [{"input": "in", "output": "out", "dead_letter": "dlq", "labels": LABELS}],
    ).topics[0]
    request = ClassifyRequest(envelope(0, event("x")), "e0", "x", tuple(LABELS), topic)
    rejected = Rejection(envelope(1, b"{"), "not_json", "value is not JSON")
    scores = Scores(("spam", "ham"), (0.9, 0.1))
    records = outputs.build(Batch([request, rejected]), {id(request): scores}, lambda name: topic)
    assert [r.kind for r in records] == ["output", "dead_letter"]
    produced = metrics.produced.labels("in")
    assert produced._value.get() == 0, "built is not written"
    assert metrics.dead_letters.labels("in", "not_json")._value.get() == 1
    outputs.committed(records)
    assert produced._value.get() == 1
    assert heard.written_records == records
