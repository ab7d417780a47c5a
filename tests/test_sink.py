"""The transactional producer's lifecycle in KafkaSink, with a fake librdkafka producer.

Seen in the fault suite under load (a broker down 15 s, exactly_once): a new producer's
``init_transactions`` timed out while the transaction coordinator was loading; the sink
replaced that producer, but the first one's request for a producer id went on in the
background, completed after the second one's and fenced it, and the service stopped on
``_FENCED``. librdkafka asks for the call again on the same producer after a time-out.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_classifier import sink as sink_module
from stream_classifier.kafka_errors import Verdict
from stream_classifier.messages import SourceRef
from stream_classifier.sink import CallCut, KafkaSink, Record, TransactionFailed

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
    produced: list[str] = []
    offsets_timeouts: list[float] = []
    commits = 0
    coordinator = threading.Event()

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

    def produce(self, topic: str, **_: Any) -> None:
        FakeProducer.produced.append(topic)

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        """Blocks while the test holds the coordinator, as librdkafka #5511 does."""
        FakeProducer.offsets_timeouts.append(timeout)
        FakeProducer.coordinator.wait()

    def commit_transaction(self, timeout: float) -> None:
        FakeProducer.commits += 1


@pytest.fixture
def producers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeProducer]]:
    FakeProducer.made, FakeProducer.failures, FakeProducer.produced = [], [], []
    FakeProducer.offsets_timeouts, FakeProducer.commits = [], 0
    FakeProducer.coordinator = threading.Event()
    FakeProducer.coordinator.set()
    monkeypatch.setattr(sink_module, "Producer", FakeProducer)
    yield FakeProducer.made
    FakeProducer.coordinator.set()  # the calls cut still wait on it, on their own threads


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


def test_an_init_that_lasts_names_the_coordinator_once(
    producers: list[FakeProducer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """librdkafka retries a refused request for a producer id (CONCURRENT_TRANSACTIONS)
    without end and only says so in its own log: past STUCK_INIT_S the service's log names
    the coordinator and the page that says what clears it, once."""
    FakeProducer.failures = [TIMED_OUT, TIMED_OUT, TIMED_OUT]
    sink = transactional_sink()
    with pytest.raises(TransactionFailed):
        sink.start()
    assert "no producer id" not in caplog.text  # a short wait is normal
    monkeypatch.setattr(sink_module, "STUCK_INIT_S", 0.0)
    for _ in range(2):
        with pytest.raises(TransactionFailed):
            sink.restart()
    told = [r for r in caplog.records if "no producer id" in r.getMessage()]
    assert len(told) == 1 and told[0].levelname == "ERROR"
    assert "'t'" in told[0].getMessage() and "OPERATIONS.md" in told[0].getMessage()
    sink.restart()
    assert len(producers) == 1 and producers[0].inits == 4


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


def test_offsets_calls_cut_in_a_row_get_longer_bounds_until_a_commit(
    producers: list[FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen on the replicated cluster after clean bounces: calls cut at 3 s three times in
    a row while a restarted node loaded its coordinators back, each new producer waiting
    on the cut transaction's abort, 48 s without output. A cut in a row triples the next
    call's bound (up to the other calls' bound); a commit brings it back to the first."""
    monkeypatch.setattr(sink_module, "OFFSETS_BOUND_S", 0.01)
    monkeypatch.setattr(sink_module, "TXN_TIMEOUT_S", 0.1)
    monkeypatch.setattr(sink_module, "HANG_MARGIN_S", 0.05)
    sink = transactional_sink()
    sink.start()
    offsets = {("in", 0): 5}
    FakeProducer.coordinator.clear()  # every call blocks until it is set
    for _ in range(4):
        with pytest.raises(CallCut):
            sink.commit(offsets, object())
        sink.restart()  # as the checkpoint does after a call of unknown outcome
    assert FakeProducer.offsets_timeouts == pytest.approx([0.01, 0.03, 0.09, 0.15])
    assert FakeProducer.commits == 0 and len(producers) == 5
    FakeProducer.coordinator.set()
    sink.commit(offsets, object())
    sink.commit(offsets, object())
    assert FakeProducer.offsets_timeouts[4:] == pytest.approx([0.15, 0.01])
    assert FakeProducer.commits == 2
    assert sink_module.offsets_bound(10_000) == pytest.approx(0.15)  # an outage of any length


def record(size: int) -> Record:
    source = SourceRef(topic="in", partition=0, offset=0, timestamp=None)
    return Record("out", b"k", b"v" * size, [("h", b"1")], 0, source, "output")


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_a_record_over_its_topics_limit_is_refused_before_it_is_sent(
    producers: list[FakeProducer], monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """Sent, it would fail its whole transaction (an abort per refused form, slow under
    load); refused here, its dead letter takes its place. Compressed batches are the
    broker's to measure."""
    reads: list[list[str]] = []

    def limits(config: dict[str, Any], topics: list[str]) -> dict[str, int]:
        reads.append(topics)
        return {"out": 1500}

    monkeypatch.setattr(sink_module, "topic_limits", limits)
    config = {"bootstrap.servers": "x", "compression.type": compression}
    sink = KafkaSink(config, lambda r, f: None, ["out"])
    sink.start()
    sink.restart()
    assert reads == [["out"]]  # read once, not at every new producer
    assert sink.produce(record(1000)) is None
    failure = sink.produce(record(1500))
    if compression == "none":
        assert failure is not None and failure.verdict is Verdict.DEAD_LETTER
        assert failure.code == KafkaError.MSG_SIZE_TOO_LARGE
        assert "max.message.bytes 1500" in failure.reason
        assert FakeProducer.produced == ["out"]
    else:
        assert failure is None and FakeProducer.produced == ["out", "out"]
