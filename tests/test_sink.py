"""The transactional producer's lifecycle in KafkaSink, with a fake librdkafka producer.

Seen in the fault suite under load (a broker down 15 s, exactly_once): a new producer's
``init_transactions`` timed out while the transaction coordinator was loading; the sink
replaced that producer, but the first one's request for a producer id went on in the
background, completed after the second one's and fenced it, and the service stopped on
``_FENCED``. librdkafka asks for the call again on the same producer after a time-out.
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_classifier import sink as sink_module
from stream_classifier.sink import KafkaSink, TransactionFailed

TIMED_OUT = KafkaError(
    KafkaError._TIMED_OUT,
    "Timed out waiting for operation to finish, retry call to resume",
    retriable=True,
)
REFUSED = KafkaError(KafkaError._STATE, "Local: Erroneous state", retriable=False)


class FakeProducer:
    """Raises the queued errors from ``init_transactions``, then succeeds."""

    made: list[FakeProducer] = []
    failures: list[KafkaError] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.inits = 0
        self.retired = False
        FakeProducer.made.append(self)

    def init_transactions(self, timeout: float) -> None:
        self.inits += 1
        if FakeProducer.failures:
            raise KafkaException(FakeProducer.failures.pop(0))

    def purge(self, **_: bool) -> None:
        self.retired = True


@pytest.fixture
def producers(monkeypatch: pytest.MonkeyPatch) -> list[FakeProducer]:
    FakeProducer.made, FakeProducer.failures = [], []
    monkeypatch.setattr(sink_module, "Producer", FakeProducer)
    return FakeProducer.made


def transactional_sink() -> KafkaSink:
    return KafkaSink({"bootstrap.servers": "x", "transactional.id": "t"}, lambda r, f: None)


def test_an_init_that_timed_out_is_resumed_on_the_same_producer(
    producers: list[FakeProducer],
) -> None:
    FakeProducer.failures = [TIMED_OUT, TIMED_OUT]
    sink = transactional_sink()
    with pytest.raises(TransactionFailed):
        sink.start()
    with pytest.raises(TransactionFailed):
        sink.restart()
    sink.restart()
    assert len(producers) == 1 and producers[0].inits == 3
    # Once it has its producer id, a restart replaces it (and the new one fences it).
    sink.restart()
    assert len(producers) == 2 and producers[0].retired and producers[1].inits == 1


def test_an_init_refused_otherwise_gets_a_new_producer(producers: list[FakeProducer]) -> None:
    FakeProducer.failures = [REFUSED]
    sink = transactional_sink()
    with pytest.raises(TransactionFailed):
        sink.start()
    sink.restart()
    assert len(producers) == 2 and producers[0].retired and producers[1].inits == 1


def test_a_producer_without_transactions_is_replaced_on_restart(
    producers: list[FakeProducer],
) -> None:
    sink = KafkaSink({"bootstrap.servers": "x"}, lambda r, f: None)
    sink.start()
    sink.restart()
    assert len(producers) == 2 and producers[0].inits == 0 and producers[0].retired
