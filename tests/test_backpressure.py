"""A slow engine: partitions pause, polling goes on, the group never rebalances."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import RunningService, service_config
from kafka_helpers import create_topics, produce, read_all, unique

from stream_classifier.config import EngineConfig
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.engine.nli import NliEngine
from stream_classifier.offsets import TopicPartition
from stream_classifier.service import Service

pytestmark = pytest.mark.kafka

BATCH_SECONDS = 7.0  # longer than max.poll.interval.ms below (its minimum: session.timeout)


class SlowEngine:
    """The tiny NLI engine, but every batch takes BATCH_SECONDS."""

    def __init__(self, inner: NliEngine) -> None:
        self.inner = inner
        self.model_id = inner.model_id

    def prepare(self, text: str, labels: Sequence[str], template: str, multi: bool) -> Prepared:
        return self.inner.prepare(text, labels, template, multi)

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        time.sleep(BATCH_SECONDS)
        return self.inner.classify(batch)

    def warmup(self) -> None:
        return None


class WatchedService(Service):
    """Notes every revocation and loss, and the most partitions paused at once."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.revocations: list[list[TopicPartition]] = []
        self.max_paused = 0.0
        listener = self.rebalances
        revoked, lost = listener.revoked, listener.lost

        def on_revoke(partitions: list[TopicPartition]) -> None:
            if not self.closing:
                self.revocations.append(partitions)
            revoked(partitions)

        def on_lost(partitions: list[TopicPartition]) -> None:
            self.revocations.append(partitions)
            lost(partitions)

        listener.revoked = on_revoke  # type: ignore[method-assign]
        listener.lost = on_lost  # type: ignore[method-assign]

    def _apply_pause(self) -> None:
        super()._apply_pause()
        self.max_paused = max(self.max_paused, self.metrics.paused_partitions._value.get())


def test_slow_engine_pauses_partitions_without_rebalance_or_loss(
    bootstrap: str, tiny_model: Path
) -> None:
    engine = NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), 4096)
    topics = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, list(topics.values()))
    config = service_config(
        bootstrap,
        [{**topics, "labels": ["a", "b"]}],
        kafka={
            "consumer_extra": {
                "max.poll.interval.ms": 6000,
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
            }
        },
        processing={"max_batch_messages": 5, "max_pending_batches": 1, "max_batch_wait_ms": 10},
    )
    n = 15  # 3 batches x 7 s: each one past max.poll.interval.ms if polling stopped
    produce(bootstrap, topics["input"], [json.dumps({"text": f"t{i}"}).encode() for i in range(n)])
    service = WatchedService(config, SlowEngine(engine))
    with RunningService(service):
        outputs = read_all(bootstrap, topics["output"], n, timeout=120)
    offsets = sorted(r.json_value()["source"]["offset"] for r in outputs)
    assert offsets == list(range(n))
    assert service.max_paused >= 1, "partitions were never paused"
    assert service.revocations == [], "the group rebalanced"
