"""KafkaSource's background commit, with a fake librdkafka consumer whose commit blocks
as librdkafka's does while the group's coordinator moves."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from stream_classifier.source import (
    LEVELS_FETCH_QUEUE_BACKOFF_MS,
    LEVELS_FETCH_WAIT_MAX_MS,
    KafkaSource,
    SourceError,
    service_consumer_config,
)


class BlockingConsumer:
    """``commit`` waits for ``release``, then answers with ``error`` (None: committed)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.error: KafkaError | None = None
        self.calls: list[list[TopicPartition]] = []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        assert not asynchronous
        self.calls.append(offsets)
        self.release.wait(30)
        if self.error is not None:
            raise KafkaException(self.error)
        return offsets


def source_over(consumer: BlockingConsumer) -> KafkaSource:
    source = KafkaSource({}, ["in"])
    source._consumer = consumer  # type: ignore[assignment]
    return source


def test_a_blocked_commit_leaves_the_loop_free_and_reports_when_it_lands() -> None:
    consumer = BlockingConsumer()
    source = source_over(consumer)
    source.commit_in_background({("in", 0): 7})
    assert source.commit_outcome(0.05) is None  # still held by the coordinator move
    with pytest.raises(RuntimeError):
        source.commit_in_background({("in", 0): 8})  # one at a time
    consumer.release.set()
    assert source.commit_outcome(10) is True
    assert [(tp.topic, tp.partition, tp.offset) for tp in consumer.calls[0]] == [("in", 0, 7)]


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(KafkaError.REBALANCE_IN_PROGRESS, False), (KafkaError.GROUP_AUTHORIZATION_FAILED, None)],
)
def test_a_background_commit_failure_is_reported_on_the_loop(code: int, outcome: Any) -> None:
    """A refusal retrying can cure is a failed commit (retried at the next interval); one
    it cannot (an ACL revoked) raises on the loop, as a commit made there would."""
    consumer = BlockingConsumer()
    consumer.error = KafkaError(code)
    consumer.release.set()
    source = source_over(consumer)
    source.commit_in_background({("in", 0): 7})
    if outcome is None:
        with pytest.raises(SourceError, match="commit refused"):
            source.commit_outcome(10)
    else:
        assert source.commit_outcome(10) is outcome


def test_close_waits_for_the_commit_in_flight() -> None:
    """The handle is destroyed only after the helper's commit has returned from it."""
    consumer = BlockingConsumer()
    source = source_over(consumer)
    source.commit_in_background({("in", 0): 7})
    committing = source._committing
    assert committing is not None
    closed: list[bool] = []
    consumer.close = lambda: closed.append(not committing.is_alive())  # type: ignore[attr-defined]
    threading.Timer(0.2, consumer.release.set).start()
    source.close()
    assert closed == [True]


def service_config(priorities: list[int], consumer_extra: dict[str, Any]) -> Any:
    from stream_classifier.config import ServiceConfig

    topics = [
        {
            "input": f"in-{i}",
            "output": f"o-{i}",
            "dead_letter": "d",
            "labels": ["a"],
            "priority": priority,
        }
        for i, priority in enumerate(priorities)
    ]
    kafka = {"bootstrap_servers": "127.0.0.1:1", "consumer_extra": consumer_extra}
    return ServiceConfig(kafka=kafka, topics=topics)


@pytest.mark.parametrize(
    ("priorities", "extra", "expected"),
    [
        ([1, 0], {}, LEVELS_FETCH_WAIT_MAX_MS),  # levels: a newly fetchable partition's wait
        ([1, 0], {"fetch.wait.max.ms": 300}, 300),  # the operator's setting wins
        ([0, 0], {}, None),  # one level: librdkafka's default
    ],
)
def test_with_priority_levels_a_fetch_waits_for_data_at_most_a_tenth_of_a_second(
    priorities: list[int], extra: dict[str, Any], expected: int | None
) -> None:
    """librdkafka keeps one fetch in flight per broker. A bulk backlog whose partitions
    became fetchable just after a fetch of the live topic's drained partition went out
    waited for the broker's long poll, 500 ms by default, while the live flood was
    scored (the broker test ``test_a_flooded_live_topic_does_not_starve_the_bulk_one``)."""
    settings = service_consumer_config(service_config(priorities, extra), None)
    assert settings.get("fetch.wait.max.ms") == expected


@pytest.mark.parametrize(
    ("priorities", "extra", "expected"),
    [
        ([1, 0], {}, LEVELS_FETCH_QUEUE_BACKOFF_MS),
        ([1, 0], {"fetch.queue.backoff.ms": 500}, 500),  # the operator's setting wins
        ([0, 0], {}, None),  # one level: librdkafka's default
    ],
)
def test_with_priority_levels_a_full_fetch_queue_puts_the_next_fetch_off_briefly(
    priorities: list[int], extra: dict[str, Any], expected: int | None
) -> None:
    """librdkafka compares the consumer's one queue with its thresholds for each
    partition: a bulk backlog's prefetch over ``queued.min.messages`` put the live
    topic's next fetch off for a second, and live events came out in bursts a second
    apart (docs/RELIABILITY.md)."""
    settings = service_consumer_config(service_config(priorities, extra), None)
    assert settings.get("fetch.queue.backoff.ms") == expected
