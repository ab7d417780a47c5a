"""Priority topics on the real broker: a live topic's events overtake a bulk backlog, a
flooded live topic does not starve the bulk one, and in both every event is written once
(exactly_once) or at least once, in its partition's order, and committed.

The engine is :class:`keyword_engine.KeywordEngine` with a fixed cost per event (a
capacity of ~1,000 events/s), so that a backlog of 256-event batches takes seconds to
clear. What goes first is read from the order the engine scored events in, counted in
events, not in time.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from conftest import RunningService, service_config
from kafka_helpers import (
    Record,
    committed,
    create_topics,
    end_offsets,
    ordered_producer,
    produce,
    read_all,
    unique,
    wait_until,
)
from keyword_engine import KeywordEngine

from stream_classifier.assemble import build_service
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.messages import ClassifyRequest
from stream_classifier.metrics import Metrics
from stream_classifier.scoring import Outcome, Pieces, PipelinedScorer, priority_of
from stream_classifier.service import Service

pytestmark = pytest.mark.kafka

BULK_PARTITIONS = 3
MODES = ("at_least_once", "exactly_once")


def topic_pair(bootstrap: str, live_priority: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    topics = []
    for name, priority, partitions in (("live", live_priority, 1), ("bulk", 0, BULK_PARTITIONS)):
        names = {"input": unique(name), "output": unique(name + "-out"), "dead_letter": unique("d")}
        create_topics(bootstrap, [names["input"]], partitions)
        create_topics(bootstrap, [names["output"], names["dead_letter"]], partitions)
        topics.append({**names, "name": name, "labels": ["spam", "harmless"], "priority": priority})
    return topics[0], topics[1]


def settings(topic: dict[str, Any]) -> dict[str, Any]:
    """The topic's settings without the test's own ``name``."""
    return {k: v for k, v in topic.items() if k != "name"}


def events(prefix: str, count: int) -> list[bytes]:
    return [
        json.dumps({"id": f"{prefix}-{i}", "text": f"{prefix}-{i}"}).encode() for i in range(count)
    ]


def keys(count: int) -> list[bytes]:
    return [f"k{i % 7}".encode() for i in range(count)]


def config_for(
    bootstrap: str, mode: str, live: dict[str, Any], bulk: dict[str, Any], **extra: Any
) -> Any:
    processing = {
        "guarantee": mode,
        "max_batch_messages": 256,
        "priority_batch_messages": 8,
        **extra,
    }
    return service_config(bootstrap, [settings(live), settings(bulk)], processing=processing)


def check_written_in_order_and_committed(
    bootstrap: str, mode: str, group: str, topic: dict[str, Any], count: int, partitions: int
) -> None:
    """Every event has an output (one under exactly_once), each source partition's outputs
    in offset order per key, and the group committed to the end."""
    records: list[Record] = read_all(bootstrap, topic["output"], count, timeout=120)
    ids = [r.json_value()["id"] for r in records]
    assert set(ids) == {f"{topic['name']}-{i}" for i in range(count)}
    if mode == "exactly_once":
        assert len(ids) == count, "exactly once: no event written twice"
    by_key: dict[tuple[int, bytes | None], list[int]] = {}
    for record in records:  # one output partition per key, read in its order
        source = record.json_value()["source"]
        by_key.setdefault((source["partition"], record.key), []).append(source["offset"])
    for offsets in by_key.values():
        firsts = list(dict.fromkeys(offsets))  # a re-send (at_least_once) repeats, never reorders
        assert firsts == sorted(firsts), f"out of order: {firsts}"
    ends = end_offsets(bootstrap, topic["input"], partitions)

    def drained() -> bool:
        return committed(bootstrap, group, topic["input"], partitions) == ends

    wait_until(drained, 60, f"{group} committed to the end of {topic['input']}")


def bulk_scored_before_the_last_live(
    engine: KeywordEngine, arriving: int, since: Callable[[], int | None]
) -> int:
    """Once every live event is scored: the bulk events scored from ``since()`` (a count
    of events scored, read then) to the last live one."""
    wait_until(lambda: engine.scored.count(f"live-{arriving - 1}") > 0, 60, "live scored")
    last_live = max(i for i, text in enumerate(engine.scored) if text.startswith("live"))
    first = since()
    assert first is not None
    return sum(1 for text in engine.scored[first : last_live + 1] if text.startswith("bulk"))


def check_both_written(
    bootstrap: str,
    mode: str,
    group: str,
    live: dict[str, Any],
    bulk: dict[str, Any],
    arriving: int,
    backlog: int,
) -> None:
    check_written_in_order_and_committed(bootstrap, mode, group, live, arriving, 1)
    check_written_in_order_and_committed(bootstrap, mode, group, bulk, backlog, BULK_PARTITIONS)


def bulk_scored_while_live_arrives(
    bootstrap: str,
    config: Any,
    live: dict[str, Any],
    bulk: dict[str, Any],
    backlog: int,
    arriving: int,
) -> int:
    """The service on a keyword engine (~1,000 events/s) with the bulk backlog under way:
    ``arriving`` live events at once, then the bulk events scored from their arrival to the
    last of them. Every event is checked written, in order, and committed."""
    engine = KeywordEngine(seconds_per_event=0.001)
    # The live events' producer connects (and gets its producer id) before the count starts:
    # its start-up, under load, let hundreds of bulk events be scored before they were sent.
    producer = ordered_producer(bootstrap)
    warm = unique("warm")
    create_topics(bootstrap, [warm])
    produce(bootstrap, warm, [b"{}"], producer=producer)
    with RunningService(build_service(config, engine)):
        wait_until(lambda: len(engine.scored) >= 200, 60, "the backlog under way")
        started_at = len(engine.scored)
        produce(
            bootstrap, live["input"], events("live", arriving), keys(arriving), producer=producer
        )
        bulk_between = bulk_scored_before_the_last_live(engine, arriving, lambda: started_at)
        mode = config.processing.guarantee
        check_both_written(bootstrap, mode, config.kafka.group_id, live, bulk, arriving, backlog)
    return bulk_between


@pytest.mark.parametrize("mode", MODES)
def test_live_events_overtake_a_bulk_backlog(bootstrap: str, mode: str) -> None:
    live, bulk = topic_pair(bootstrap)
    backlog, arriving = 3_000, 20
    produce(bootstrap, bulk["input"], events("bulk", backlog), keys(backlog))
    config = config_for(bootstrap, mode, live, bulk)
    bulk_between = bulk_scored_while_live_arrives(bootstrap, config, live, bulk, backlog, arriving)
    # Ahead of them: at most two small bulk batches, and each batch of live events carries
    # the bulk topic's share (priority_min_share); read first come, first served, they
    # wait behind every full batch already queued (two: 512 events, when last measured).
    assert bulk_between < 256, (
        f"{bulk_between} bulk events were scored between the live events' arrival and the"
        " last of them: they queued behind a full batch of the backlog"
    )


@pytest.mark.parametrize("mode", MODES)
def test_a_flooded_live_topic_does_not_starve_the_bulk_one(bootstrap: str, mode: str) -> None:
    live, bulk = topic_pair(bootstrap)
    flood, backlog = 3_000, 100
    produce(bootstrap, live["input"], events("live", flood), keys(flood))
    produce(bootstrap, bulk["input"], events("bulk", backlog), keys(backlog))
    config = config_for(bootstrap, mode, live, bulk, priority_min_share=0.2)
    engine = KeywordEngine(seconds_per_event=0.0005)
    with RunningService(build_service(config, engine)):
        check_written_in_order_and_committed(
            bootstrap, mode, config.kafka.group_id, bulk, backlog, BULK_PARTITIONS
        )
        check_written_in_order_and_committed(bootstrap, mode, config.kafka.group_id, live, flood, 1)
    last_bulk = max(i for i, text in enumerate(engine.scored) if text.startswith("bulk"))
    live_before = sum(1 for text in engine.scored[:last_bulk] if text.startswith("live"))
    assert live_before < flood / 2, (
        f"the bulk topic finished only after {live_before} of {flood} live events: starved"
        f" (scored in runs of one topic: {runs(engine.scored)})"
    )


def runs(scored: Sequence[str]) -> str:
    """What the engine scored, as runs of one topic: ``live×256 bulk×8 ...``."""
    out: list[str] = []
    for topic, group in itertools.groupby(text.split("-")[0] for text in scored):
        out.append(f"{topic}×{sum(1 for _ in group)}")
    return " ".join(out)


class DeviceLikeEngine(KeywordEngine):
    """The keyword engine behind ``classify_async`` as a GPU engine has it: a launch
    returns at once and ``result()`` (the scorer's waiter thread) does the work, one
    launch after another, like passes queued on one device."""

    def classify_async(self, batch: Sequence[Prepared], hold_tail: bool = False) -> Later:
        items = list(batch)
        return Later(lambda: self.classify(items))

    def flush(self) -> None:
        return None


class Watched(PipelinedScorer):
    """Notes how many events the engine had scored when the first live batch came."""

    def __init__(self, engine: DeviceLikeEngine, pieces: Pieces | None) -> None:
        super().__init__(engine, Metrics(), pieces=pieces)
        self.scored = engine.scored
        self.live_came_at: int | None = None

    def submit(self, requests: list[ClassifyRequest]) -> Future[list[Outcome]]:
        if self.live_came_at is None and priority_of(requests) > 0:
            self.live_came_at = len(self.scored)
        return super().submit(requests)


class Later:
    def __init__(self, work: Callable[[], list[Scores]]) -> None:
        self.work = work

    def result(self) -> list[Scores]:
        return self.work()


@pytest.mark.parametrize("mode", MODES)
def test_live_events_overtake_bulk_pieces_on_the_pipelined_stage(bootstrap: str, mode: str) -> None:
    """On a GPU the engine stage keeps two launches on the device. Bulk batches of 256
    events go there in pieces of about 8 events (``Pieces``): a live batch is launched
    after the pieces already there, not after two whole bulk batches, and written before
    the bulk batch submitted ahead of it. Every event still once, in order, committed."""
    live, bulk = topic_pair(bootstrap)
    backlog, arriving = 3_000, 20
    produce(bootstrap, bulk["input"], events("bulk", backlog), keys(backlog))
    config = config_for(bootstrap, mode, live, bulk, priority_batch_messages=256)
    engine = DeviceLikeEngine(seconds_per_event=0.001)
    producer = ordered_producer(bootstrap)
    warm = unique("warm")
    create_topics(bootstrap, [warm])
    produce(bootstrap, warm, [b"{}"], producer=producer)
    scorer = Watched(engine, Pieces(top=1, tokens=16))
    with RunningService(Service(config, engine, Metrics(), scorer=scorer)):
        wait_until(lambda: len(engine.scored) >= 600, 60, "the backlog under way")
        produce(
            bootstrap, live["input"], events("live", arriving), keys(arriving), producer=producer
        )
        bulk_between = bulk_scored_before_the_last_live(
            engine, arriving, lambda: scorer.live_came_at
        )
        check_both_written(bootstrap, mode, config.kafka.group_id, live, bulk, arriving, backlog)
    # Whole batches: up to two of 256 on the device ahead of the live batch. Pieces: two
    # of about 8 (and more live batches, each behind at most two pieces).
    assert bulk_between < 64, (
        f"{bulk_between} bulk events were scored between the first live batch reaching the"
        " engine stage and the last live event: it waited behind whole bulk batches"
    )


def test_the_loop_waits_on_a_full_engine_stage_while_live_events_arrive(bootstrap: str) -> None:
    """With a live topic's partitions open, the loop used to turn at once, thousands of
    times a second, while live events were due and the engine stage had no room for them:
    each turn took the interpreter lock from the engine thread, and on a CPU the engine
    lost most of its rate. Now it waits for the stage to return a batch, and every event
    is still written, in order, and committed."""
    live, bulk = topic_pair(bootstrap)
    backlog, arriving = 300, 40
    produce(bootstrap, bulk["input"], events("bulk", backlog), keys(backlog))
    config = config_for(bootstrap, "at_least_once", live, bulk)
    engine = KeywordEngine(seconds_per_event=0.02)  # a batch of 8 bulk events: 160 ms
    producer = ordered_producer(bootstrap)
    service = build_service(config, engine)
    consume = service.source.consume
    turns: list[float] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        turns.append(time.monotonic())
        return consume(*args, **kwargs)

    service.source.consume = counted  # type: ignore[method-assign]
    with RunningService(service):
        wait_until(lambda: len(engine.scored) >= 40, 60, "the backlog under way")
        started, before = time.monotonic(), len(turns)
        for i in range(arriving):  # a live event every 50 ms: most find the stage full
            produce(
                bootstrap, live["input"], events("live", arriving)[i : i + 1], producer=producer
            )
            time.sleep(0.05)
        seconds, count = time.monotonic() - started, len(turns) - before
        check_both_written(
            bootstrap, "at_least_once", config.kafka.group_id, live, bulk, arriving, backlog
        )
    assert count / seconds < 100, f"{count} turns in {seconds:.1f} s: the loop spun"


def test_a_full_fetch_queue_does_not_hold_the_live_topic_back(bootstrap: str) -> None:
    """librdkafka compares the consumer's one queue with ``queued.min.messages`` for each
    partition it might fetch: while a bulk backlog's prefetch is over it, the live topic's
    next fetch is put off too, for ``fetch.queue.backoff.ms``. At librdkafka's default
    (1,000 ms) live events came out in bursts a second apart on a GPU (a 250,000-event
    backlog passes the default threshold of 100,000); with levels the service sets 10 ms.
    Here the threshold is low, so that a small backlog passes it."""
    live, bulk = topic_pair(bootstrap)
    backlog, arriving = 3_000, 20
    produce(bootstrap, bulk["input"], events("bulk", backlog), keys(backlog))
    config = service_config(
        bootstrap,
        [settings(live), settings(bulk)],
        kafka={"consumer_extra": {"queued.min.messages": 100}},
        processing={
            "guarantee": "at_least_once",
            "max_batch_messages": 256,
            "priority_batch_messages": 8,
        },
    )
    bulk_between = bulk_scored_while_live_arrives(bootstrap, config, live, bulk, backlog, arriving)
    # Put off for a second: about 230 bulk events in between (8 at a time, while a live
    # event waits); for 10 ms: 16-24, when measured.
    assert bulk_between < 96, (
        f"{bulk_between} bulk events were scored between the live events' arrival and the"
        " last of them: the live topic's fetch was put off while the consumer's queue was full"
    )
