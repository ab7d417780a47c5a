"""Priority topics without a broker: how batches are composed from the levels, which
levels are paused, and that a priority needs a restart (tests/test_priorities_kafka.py
runs them through the broker)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from conftest import service_config
from pydantic import ValidationError
from test_loop_parts import Clock, ManualScorer, Preparing

from stream_classifier.assemble import lower_level_pieces
from stream_classifier.batcher import Batch, topic_partition
from stream_classifier.intake import LEVELS_READ_PER_TURN, Intake
from stream_classifier.messages import Envelope, SourceRef
from stream_classifier.metrics import Metrics
from stream_classifier.pending import PendingBatches
from stream_classifier.priorities import Ahead, allocate
from stream_classifier.reload import reloaded
from stream_classifier.scoring import Pieces

LABELS = ["spam", "ham"]


def topics(live: int = 1, bulk: int = 0) -> list[dict[str, Any]]:
    return [
        {"input": "live", "output": "o", "dead_letter": "d", "labels": LABELS, "priority": live},
        {"input": "bulk", "output": "o", "dead_letter": "d", "labels": LABELS, "priority": bulk},
    ]


def make_intake(clock: Clock, batch: int = 20, lower: int = 8, share: float = 0.1) -> Intake:
    processing = {
        "max_batch_messages": batch,
        "max_batch_wait_ms": 1000,
        "priority_batch_messages": lower,
        "priority_min_share": share,
    }
    config = service_config("127.0.0.1:1", topics(), processing=processing)
    return Intake(config, Preparing(), clock)


def accept(intake: Intake, topic: str, offsets: range, partition: int = 0) -> None:
    for offset in offsets:
        source = SourceRef(topic=topic, partition=partition, offset=offset, timestamp=None)
        value = json.dumps({"text": f"{topic} {offset}"}).encode()
        intake.accept(Envelope(source, None, value, [], 0.0))
    preparer = intake.preparer
    assert isinstance(preparer, Preparing)
    preparer.finish()


def by_topic(batch: Batch) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for item in batch.items:
        out.setdefault(item.envelope.source.topic, []).append(item.envelope.source.offset)
    return out


# -- composing a batch ----------------------------------------------------------------------


def test_a_live_batch_holds_live_events_only_and_lower_levels_fill_small_batches() -> None:
    take = allocate({1: 100, 0: 100}, live=1, full=20, lower_cap=8, hungry=False)
    assert take == {1: 20, 0: 0}
    take = allocate({1: 3, 0: 100}, live=1, full=20, lower_cap=8, hungry=False)
    assert take == {1: 3, 0: 0}, "as quick as the live events alone"
    take = allocate({1: 0, 0: 100}, live=1, full=20, lower_cap=8, hungry=False)
    assert take == {1: 0, 0: 8}, "no live event ready: a small batch of the lower level"
    take = allocate({0: 100}, live=0, full=20, lower_cap=8, hungry=False)
    assert take == {0: 20}, "the live level alone: a full batch"
    take = allocate({2: 50, 1: 3, 0: 50}, live=2, full=20, lower_cap=8, hungry=True)
    assert take == {2: 0, 1: 3, 0: 5}, "a starved lower level goes first, highest first"


def test_a_lower_levels_tokenizing_may_wait_behind_the_live_levels() -> None:
    """Read while a live topic is owned, a bulk event is tokenized ``later`` (a chunk a
    flush), a live one at once; an instance that owns no live partition reads its bulk
    topic as its live level."""
    clock = Clock()
    intake = make_intake(clock)
    preparer = intake.preparer
    assert isinstance(preparer, Preparing)
    intake.own({"live", "bulk"})
    accept(intake, "bulk", range(0, 2))
    accept(intake, "live", range(0, 1))
    assert preparer.later == [True, True, False]
    alone = make_intake(clock)
    alone.own({"bulk"})
    accept(alone, "bulk", range(0, 2))
    assert isinstance(alone.preparer, Preparing) and alone.preparer.later == [False, False]


def test_a_live_event_overtakes_a_bulk_backlog_and_each_partition_stays_in_order() -> None:
    clock = Clock()
    intake = make_intake(clock)
    accept(intake, "bulk", range(0, 30), partition=0)
    accept(intake, "bulk", range(0, 30), partition=1)
    accept(intake, "live", range(0, 3))
    batch = intake.take_due(engine_idle=False, ahead=Ahead(1, 1))
    assert batch is not None, "live events go at once into the next slot of the engine"
    assert by_topic(batch) == {"live": [0, 1, 2]}, "and nothing else"
    seen: dict[tuple[str, int], list[int]] = {}
    while True:
        batch = intake.take_due(engine_idle=True, ahead=Ahead(0, 0))
        if batch is None:
            break
        for item in batch.items:
            seen.setdefault(topic_partition(item), []).append(item.envelope.source.offset)
    assert len(intake) == 0, "every event was batched"
    assert all(offsets == sorted(offsets) for offsets in seen.values()), seen


def test_bulk_alone_waits_for_the_engine_while_a_live_topic_is_owned() -> None:
    clock = Clock()
    intake = make_intake(clock)
    intake.own({"live", "bulk"})
    accept(intake, "bulk", range(0, 100))
    assert intake.take_due(engine_idle=False, ahead=Ahead(2, 2)) is None, (
        "a bulk batch waits while two are unfinished: a live event would queue behind it"
    )
    bulk = intake.take_due(engine_idle=False, ahead=Ahead(1, 1))
    assert bulk is not None and len(bulk) == 8, "a small batch, at most one ahead of live"
    intake.own({"bulk"})
    full = intake.take_due(engine_idle=False, ahead=Ahead(2, 2))
    assert full is not None and len(full) == 20, "no live partition here: full bulk batches"


def stage_of_three(clock: Clock, overtakes: bool) -> PendingBatches:
    """Two bulk batches and a live one submitted, the first bulk one back."""
    scorer = ManualScorer()
    scorer.overtakes = overtakes
    pending = PendingBatches(scorer, 4, clock)
    for topic, offset in (("bulk", 0), ("bulk", 1), ("live", 0)):
        intake = make_intake(clock)
        accept(intake, topic, range(offset * 10, offset * 10 + 3))
        batch = intake.take_due(engine_idle=True)
        assert batch is not None
        pending.submit(batch, {(topic, 0): offset})
    scorer.futures[0].set_result([])
    return pending


def test_where_the_stage_overtakes_bulk_and_live_batches_count_their_own_kind() -> None:
    """A live batch overtakes bulk pieces not yet launched, so it need not wait for bulk
    batches to come back, and a second bulk batch can wait in the stage, its pieces ready
    the moment the first one's last piece is done: between bulk batches the device
    waited for the loop, some 4% of an H100 beside a live topic (docs/PERFORMANCE.md)."""
    clock = Clock()
    overtaking, plain = stage_of_three(clock, overtakes=True), stage_of_three(clock, False)
    assert overtaking.ahead(live=1) == Ahead(lower=1, live=1), "each counts its own kind"
    assert plain.ahead(live=1) == Ahead(2, 2), "no overtaking: every batch counts for both"
    assert overtaking.ahead(live=None) == Ahead(2, 2), "one level: every batch counts"
    intake = make_intake(clock)
    intake.own({"live", "bulk"})
    accept(intake, "bulk", range(0, 30))
    bulk = intake.take_due(engine_idle=False, ahead=Ahead(lower=1, live=1))
    assert bulk is not None and len(bulk) == 8, "one bulk batch ahead: the next may wait"
    assert intake.take_due(engine_idle=False, ahead=Ahead(lower=2, live=0)) is None
    accept(intake, "live", range(0, 3))
    live = intake.take_due(engine_idle=False, ahead=Ahead(lower=2, live=0))
    assert live is not None and by_topic(live) == {"live": [0, 1, 2]}, "live goes at once"


def test_the_loop_may_wait_for_the_engine_until_something_in_hand_is_due() -> None:
    clock = Clock()
    intake = make_intake(clock)  # max_batch_wait_ms: 1000
    intake.own({"live", "bulk"})
    assert intake.engine_wait_s(Ahead(2, 2)) == 0.0, "nothing in hand: turn as usual"
    accept(intake, "bulk", range(0, 30))
    assert intake.engine_wait_s(Ahead(2, 2)) == 1.0, "bulk must wait: up to a batch's wait"
    assert intake.engine_wait_s(Ahead(1, 1)) == 0.0, "bulk may go now: no wait"
    accept(intake, "live", range(0, 3))
    clock.now += 0.25
    assert intake.engine_wait_s(Ahead(2, 2)) == 0.75, "until the live events are due"
    clock.now += 1.0
    assert intake.engine_wait_s(Ahead(2, 2)) == 0.0, "due: no wait"


def test_a_full_engine_stage_is_waited_for_until_the_live_batch_comes_back() -> None:
    """The loop waits on the batch the stage returns first: a live batch overtakes bulk
    pieces, so waiting on the oldest would hold its write back for the whole wait."""
    clock, scorer = Clock(), ManualScorer()
    intake = make_intake(clock)
    accept(intake, "bulk", range(0, 30))
    bulk = intake.take_due(engine_idle=True, ahead=Ahead(0, 0))
    accept(intake, "live", range(0, 3))
    live = intake.take_due(engine_idle=False, ahead=Ahead(1, 1))
    assert bulk is not None and live is not None
    pending = PendingBatches(scorer, 2, clock)
    pending.submit(bulk, {("bulk", 0): 0})
    pending.submit(live, {("live", 0): 0})
    threading.Timer(0.05, lambda: scorer.futures[1].set_result([])).start()
    started = time.monotonic()
    assert pending.wait_for_engine(5.0)
    assert scorer.futures[1].done() and not scorer.futures[0].done()
    assert time.monotonic() - started < 4.0, "woke when the live batch came back"


def test_a_flooded_live_topic_does_not_starve_the_bulk_one() -> None:
    clock = Clock()
    intake = make_intake(clock)
    intake.own({"live", "bulk"})
    accept(intake, "live", range(0, 10_000))
    accept(intake, "bulk", range(0, 10_000))
    batched = {"live": 0, "bulk": 0}
    for _ in range(100):
        batch = intake.take_due(engine_idle=False, ahead=Ahead(3, 3))
        assert batch is not None, "the engine has room: something is due"
        for name, offsets in by_topic(batch).items():
            batched[name] += len(offsets)
    share = batched["bulk"] / (batched["live"] + batched["bulk"])
    assert 0.08 < share < 0.2, f"the bulk topic got {share:.0%} of the events, asked 10%"


def test_competing_levels_are_paused_from_a_batch_in_hand_until_half_of_it_is_left() -> None:
    clock = Clock()
    intake = make_intake(clock)
    intake.own({"live", "bulk"})
    accept(intake, "live", range(0, 1))
    accept(intake, "bulk", range(0, 19))
    assert intake.held(engine_full=False) == set()
    accept(intake, "bulk", range(19, 20))
    assert intake.held(engine_full=False) == {0}, "a batch of bulk in hand"
    intake.take_due(engine_idle=True)  # the live event alone
    intake.take_due(engine_idle=True)  # 8 bulk: 12 left
    assert intake.held(engine_full=False) == {0}, "still over half a batch"
    intake.take_due(engine_idle=True)  # 8 more: 4 left
    assert intake.held(engine_full=False) == set(), "resumed under half a batch"
    accept(intake, "live", range(1, 21))
    assert intake.held(engine_full=False) == {1}, "a live flood is paused too, for bulk's share"
    intake.clear()
    intake.own({"live"})
    accept(intake, "live", range(21, 41))
    assert intake.held(engine_full=False) == set(), "nothing competes: as with one level"
    assert intake.held(engine_full=True) == {1}


def test_room_is_counted_for_the_levels_being_fetched() -> None:
    clock = Clock()
    intake = make_intake(clock)
    intake.own({"live", "bulk"})
    accept(intake, "bulk", range(0, 40))
    accept(intake, "live", range(0, 5))
    assert intake.held(engine_full=False) == {0}
    assert intake.room() == 15, "bulk in hand does not stop live events from being fetched"


def test_a_turn_reads_at_most_a_few_hundred_events_with_levels() -> None:
    """Taking what one read returns is the Kafka thread's work: with levels, a read of a
    whole bulk batch (1,024 events) held a live event read just after it for as long."""
    clock = Clock()
    intake = make_intake(clock, batch=1024, lower=512)
    intake.own({"live", "bulk"})
    assert intake.room() == LEVELS_READ_PER_TURN
    accept(intake, "live", range(0, 900))
    accept(intake, "bulk", range(0, 950))
    assert intake.room() == 124, "the room of the emptiest level being fetched, when less"


def test_one_level_batches_in_the_order_events_were_read() -> None:
    clock = Clock()
    config = service_config("127.0.0.1:1", topics(live=0, bulk=0))
    intake = Intake(config, Preparing(), clock)
    accept(intake, "bulk", range(0, 3))
    accept(intake, "live", range(0, 3))
    intake.fill()
    batch = intake.take_due(engine_idle=True)
    assert batch is not None
    assert [item.envelope.source.topic for item in batch.items] == ["bulk"] * 3 + ["live"] * 3


# -- configuration --------------------------------------------------------------------------


def test_a_priority_outside_its_range_fails_at_start_with_its_field() -> None:
    with pytest.raises(ValidationError, match="priority"):
        service_config("127.0.0.1:1", topics(live=10))


def test_a_reload_that_changes_a_priority_is_refused() -> None:
    running = service_config("127.0.0.1:1", topics())
    new = service_config("127.0.0.1:1", topics(live=2))
    metrics = Metrics()
    assert reloaded(running, lambda: new, metrics) is None
    assert metrics.reloads.labels("refused")._value.get() == 1


# -- settings that follow from priority levels ----------------------------------------------


def test_with_priority_levels_lower_levels_go_to_the_device_in_pieces() -> None:
    levels = service_config("127.0.0.1:1", topics(live=3, bulk=1))
    assert lower_level_pieces(levels) == Pieces(top=3, tokens=65536 // 4)
    sized = service_config("127.0.0.1:1", topics(), processing={"priority_piece_tokens": 5000})
    assert lower_level_pieces(sized) == Pieces(top=1, tokens=5000)
    assert lower_level_pieces(service_config("127.0.0.1:1", topics(live=0))) is None
