"""Priority topics without a broker: how batches are composed from the levels, which
levels are paused, and that a priority needs a restart (tests/test_priorities_kafka.py
runs them through the broker)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import service_config
from pydantic import ValidationError
from test_loop_parts import Clock, Preparing

from stream_classifier.batcher import Batch, topic_partition
from stream_classifier.intake import Intake
from stream_classifier.messages import Envelope, SourceRef
from stream_classifier.metrics import Metrics
from stream_classifier.priorities import allocate
from stream_classifier.reload import reloaded

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


def test_the_live_level_fills_first_and_lower_levels_keep_their_share() -> None:
    take = allocate({1: 100, 0: 100}, live=1, full=20, lower_cap=8, min_share=0.1)
    assert take == {1: 18, 0: 2}, "the live level floods: the lower keeps 10% of a batch"
    take = allocate({1: 3, 0: 100}, live=1, full=20, lower_cap=8, min_share=0.1)
    assert take == {1: 3, 0: 8}, "lower levels fill up to their cap, not to a full batch"
    take = allocate({1: 0, 0: 100}, live=1, full=20, lower_cap=8, min_share=0.1)
    assert take == {1: 0, 0: 8}
    take = allocate({0: 100}, live=0, full=20, lower_cap=8, min_share=0.1)
    assert take == {0: 20}, "the live level alone: a full batch"
    take = allocate({2: 50, 1: 50, 0: 50}, live=2, full=20, lower_cap=8, min_share=0.1)
    assert take == {2: 16, 1: 2, 0: 2}, "every lower level keeps its share"
    take = allocate({1: 100, 0: 100}, live=1, full=20, lower_cap=8, min_share=0.0)
    assert take == {1: 20, 0: 0}, "no share asked: the live level may take it all"


def test_a_live_event_overtakes_a_bulk_backlog_and_each_partition_stays_in_order() -> None:
    clock = Clock()
    intake = make_intake(clock)
    accept(intake, "bulk", range(0, 30), partition=0)
    accept(intake, "bulk", range(0, 30), partition=1)
    accept(intake, "live", range(0, 3))
    batch = intake.take_due(engine_idle=False, unfinished=1)
    assert batch is not None, "live events go at once into the next slot of the engine"
    assert by_topic(batch)["live"] == [0, 1, 2]
    assert len(by_topic(batch)["bulk"]) == 8, "with bulk events up to their cap"
    seen: dict[tuple[str, int], list[int]] = {}
    while True:
        batch = intake.take_due(engine_idle=True, unfinished=0)
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
    assert intake.take_due(engine_idle=False, unfinished=2) is None, (
        "a bulk batch waits while two are unfinished: a live event would queue behind it"
    )
    bulk = intake.take_due(engine_idle=False, unfinished=1)
    assert bulk is not None and len(bulk) == 8, "a small batch, at most one ahead of live"
    intake.own({"bulk"})
    full = intake.take_due(engine_idle=False, unfinished=2)
    assert full is not None and len(full) == 20, "no live partition here: full bulk batches"


def test_a_flooded_live_topic_does_not_starve_the_bulk_one() -> None:
    clock = Clock()
    intake = make_intake(clock)
    accept(intake, "live", range(0, 1000))
    accept(intake, "bulk", range(0, 1000))
    bulk = 0
    for _ in range(20):
        batch = intake.take_due(engine_idle=False, unfinished=3)
        assert batch is not None and len(batch) == 20
        bulk += len(by_topic(batch).get("bulk", []))
    assert bulk == 20 * 2, "10% of every batch"


def test_lower_levels_are_paused_from_a_batch_in_hand_until_half_of_it_is_left() -> None:
    clock = Clock()
    intake = make_intake(clock)
    intake.own({"live", "bulk"})
    accept(intake, "live", range(0, 1))
    accept(intake, "bulk", range(0, 19))
    assert intake.held(engine_full=False) == set()
    accept(intake, "bulk", range(19, 20))
    assert intake.held(engine_full=False) == {0}, "a batch of bulk in hand"
    intake.take_due(engine_idle=True)  # the live event and 8 bulk: 12 left
    assert intake.held(engine_full=False) == {0}, "still over half a batch"
    intake.take_due(engine_idle=True)  # 8 more: 4 left
    assert intake.held(engine_full=False) == set(), "resumed under half a batch"
    accept(intake, "live", range(1, 21))
    assert intake.held(engine_full=False) == set(), "the live level: only when the engine is full"
    assert intake.held(engine_full=True) == {1}


def test_room_is_counted_for_the_live_level() -> None:
    clock = Clock()
    intake = make_intake(clock)
    accept(intake, "bulk", range(0, 40))
    accept(intake, "live", range(0, 5))
    assert intake.room() == 15, "bulk in hand does not stop live events from being fetched"


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
