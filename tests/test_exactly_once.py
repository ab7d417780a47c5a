"""Exactly-once on the real broker: one transaction per micro-batch, aborts redone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningService, service_config
from kafka_helpers import (
    committed,
    create_topics,
    produce,
    read_all,
    unique,
    wait_drained,
    wait_until,
)

from stream_classifier.assemble import build_service
from stream_classifier.config import EngineConfig
from stream_classifier.engine.nli import NliEngine
from stream_classifier.offsets import TopicPartition
from stream_classifier.sink import TransactionFailed

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> NliEngine:
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), max_batch_tokens=4096)


def eos_setup(bootstrap: str, partitions: int = 2, **topic: Any) -> Any:
    topics = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, list(topics.values()), partitions)
    return service_config(
        bootstrap,
        [{**topics, "labels": ["spam", "ok"], **topic}],
        processing={
            "guarantee": "exactly_once",
            "max_batch_messages": 16,
            "transactional_id": unique("txn"),
        },
    )


def mixed(n: int) -> list[bytes]:
    return [
        b"not json" if i % 9 == 4 else json.dumps({"text": f"offer {i}"}).encode() for i in range(n)
    ]


def sources(records: list[Any], dead: bool = False) -> Counter[tuple[int, int]]:
    if dead:
        return Counter(
            (
                int(r.headers["stream-classifier.source.partition"]),
                int(r.headers["stream-classifier.source.offset"]),
            )
            for r in records
        )
    return Counter(
        (json.loads(r.value)["source"]["partition"], json.loads(r.value)["source"]["offset"])
        for r in records
    )


def assert_exactly_once(bootstrap: str, config: Any, n: int, partitions: int = 2) -> None:
    topic = config.topics[0]
    values = mixed(n)
    bad = values.count(b"not json")
    outputs = sources(read_all(bootstrap, topic.output, n - bad + 1, timeout=15))
    dead = sources(read_all(bootstrap, topic.dead_letter, bad + 1, timeout=5), dead=True)
    assert sum(outputs.values()) == n - bad and max(outputs.values()) == 1
    assert sum(dead.values()) == bad and max(dead.values()) == 1
    assert not set(outputs) & set(dead)


def test_exactly_once_every_event_once_and_offsets_in_the_transaction(
    bootstrap: str, engine: NliEngine
) -> None:
    config = eos_setup(bootstrap)
    n = 200
    produce(bootstrap, config.topics[0].input, mixed(n), keys=[str(i).encode() for i in range(n)])
    service = build_service(config, engine)
    with RunningService(service):
        wait_drained(bootstrap, config.kafka.group_id, config.topics[0].input, 2)
    assert_exactly_once(bootstrap, config, n)
    assert service.metrics.transactions.labels("committed")._value.get() >= 2


@pytest.mark.parametrize("abortable", [True, False], ids=["abortable", "unknown-outcome"])
def test_exactly_once_aborted_transaction_is_redone_without_duplicates(
    bootstrap: str, engine: NliEngine, abortable: bool
) -> None:
    """An abortable error aborts; an unknown outcome (a hung call) replaces the producer,
    which fences the old one and settles its transaction. Both redo the batch; its
    decisions are counted once, when committed."""
    config = eos_setup(
        bootstrap, lanes=[{"name": "spam", "labels": ["spam"], "min_score": 0.5}, {"name": "rest"}]
    )
    n = 120
    produce(bootstrap, config.topics[0].input, mixed(n), keys=[str(i).encode() for i in range(n)])
    service = build_service(config, engine)
    real_commit = service.sink.commit
    aborts: list[dict[TopicPartition, int]] = []

    def commit_failing_twice(offsets: dict[TopicPartition, int], group_metadata: object) -> None:
        if len(aborts) < 2:
            aborts.append(offsets)
            raise TransactionFailed("simulated", abortable=abortable)
        real_commit(offsets, group_metadata)

    service.sink.commit = commit_failing_twice  # type: ignore[method-assign]
    with RunningService(service):
        wait_drained(bootstrap, config.kafka.group_id, config.topics[0].input, 2)
    assert len(aborts) == 2
    assert service.metrics.transactions.labels("aborted")._value.get() == 2
    assert service.healthy()[0]
    assert_exactly_once(bootstrap, config, n)
    decided = service.metrics.registry.get_sample_value
    topic = config.topics[0].input
    counted = sum(
        decided("stream_classifier_decisions_total", {"topic": topic, "decision": d}) or 0
        for d in ("spam", "rest")
    )
    assert counted == n - mixed(n).count(b"not json")


def test_exactly_once_outputs_invisible_to_read_committed_until_commit(
    bootstrap: str, engine: NliEngine
) -> None:
    config = eos_setup(bootstrap, partitions=1)
    produce(bootstrap, config.topics[0].input, mixed(10))
    service = build_service(config, engine)
    service.sink.commit = lambda offsets, group_metadata: (_ for _ in ()).throw(  # type: ignore[method-assign]
        RuntimeError("crash before commit")
    )
    runner = RunningService(service)
    with runner:
        wait_until(lambda: runner.error is not None, 60, "the simulated crash")
    # The records were written inside a transaction that never committed.
    assert read_all(bootstrap, config.topics[0].output, 1, timeout=5) == []
    assert committed(bootstrap, config.kafka.group_id, config.topics[0].input) == {0: -1001}


def test_exactly_once_failing_output_is_unhealthy_commits_nothing_and_recovers(
    bootstrap: str, engine: NliEngine
) -> None:
    config = eos_setup(bootstrap, partitions=1)
    topic = config.topics[0]
    config = config.model_copy(
        update={
            "kafka": config.kafka.model_copy(update={"extra": {"allow.auto.create.topics": False}}),
            "processing": config.processing.model_copy(update={"delivery_timeout_ms": 2000}),
            "topics": [topic.model_copy(update={"output": unique("missing")})],
        }
    )
    produce(bootstrap, topic.input, mixed(30))
    service = build_service(config, engine)
    with RunningService(service):
        wait_until(lambda: not service.healthy()[0], 120, "repeated aborts to show")
        wait_until(
            lambda: service.metrics.transactions.labels("aborted")._value.get() >= 2,
            60,
            "the failing transaction to be aborted and retried",
        )
        assert committed(bootstrap, config.kafka.group_id, topic.input) == {0: -1001}
        create_topics(bootstrap, [config.topics[0].output])
        wait_until(
            lambda: committed(bootstrap, config.kafka.group_id, topic.input) == {0: 30},
            120,
            "recovery once the topic exists",
        )
        assert service.healthy()[0]
    outputs = sources(read_all(bootstrap, config.topics[0].output, 100, timeout=5))
    assert sum(outputs.values()) == 30 - mixed(30).count(b"not json")
    assert max(outputs.values()) == 1
