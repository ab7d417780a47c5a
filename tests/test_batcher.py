from __future__ import annotations

import pytest

from stream_classifier.batcher import MicroBatcher
from stream_classifier.config import TopicConfig
from stream_classifier.engine.base import Prepared
from stream_classifier.messages import ClassifyRequest, Envelope, Rejection, SourceRef

TOPIC = TopicConfig(input="in", output="out", dead_letter="dlq", labels=["a", "b"])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(offset: int, tokens: int = 16, partition: int = 0) -> ClassifyRequest:
    envelope = Envelope(SourceRef(topic="in", partition=partition, offset=offset), None, b"", [], 0)
    req = ClassifyRequest(envelope, offset, "text", ("a", "b"), TOPIC)
    req.prepared = Prepared(("a", "b"), False, tokens, None)
    return req


def test_batch_is_due_at_max_messages() -> None:
    batcher = MicroBatcher(max_messages=3, max_wait_ms=1000, clock=Clock())
    for offset in range(2):
        batcher.add(request(offset))
    assert not batcher.is_due()
    batcher.add(request(2))
    assert batcher.is_due()
    with pytest.raises(OverflowError):
        batcher.add(request(3))


def test_batch_is_not_cut_by_tokens() -> None:
    """A batch is one commit, not one forward pass (the engine cuts it into passes): 1024
    events of 400 tokens each stay one batch, not the ~160 that one 65,536-token pass holds."""
    batcher = MicroBatcher(max_messages=1024, max_wait_ms=1000, clock=Clock())
    for offset in range(1023):
        batcher.add(request(offset, tokens=400))
    assert not batcher.is_due()
    batcher.add(request(1023, tokens=70_000))
    assert batcher.is_due()
    assert len(batcher.take()) == 1024


def test_batch_is_due_when_first_request_waited_max_wait() -> None:
    clock = Clock()
    batcher = MicroBatcher(max_messages=100, max_wait_ms=20, clock=clock)
    assert batcher.time_left() == float("inf")
    batcher.add(request(0))
    clock.now += 0.015
    batcher.add(request(1))
    assert not batcher.is_due()
    clock.now += 0.005
    assert batcher.is_due()
    assert [r.event_id for r in batcher.take().requests] == [0, 1]
    assert not batcher.is_due()


def test_drop_removes_only_the_released_partitions() -> None:
    batcher = MicroBatcher(max_messages=100, max_wait_ms=20, clock=Clock())
    batcher.add(request(0, partition=0))
    batcher.add(request(0, partition=1))
    assert batcher.drop([("in", 1)]) == 1
    assert [r.envelope.source.partition for r in batcher.take().requests] == [0]


def test_rejections_ride_in_the_open_batch_and_count_in_its_offsets() -> None:
    batcher = MicroBatcher(max_messages=100, max_wait_ms=20, clock=Clock())
    batcher.add(request(4))
    batcher.add(Rejection(request(5).envelope, "not_json", "bad"))
    batcher.add(request(0, partition=1))
    batch = batcher.take()
    assert [r.event_id for r in batch.requests] == [4, 0]
    assert [r.code for r in batch.rejections] == ["not_json"]
    assert batch.next_offsets() == {("in", 0): 6, ("in", 1): 1}
