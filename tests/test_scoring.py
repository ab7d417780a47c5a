"""The engine stage: PipelinedScorer keeps two batches on the device, in order, isolating."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stream_classifier.config import EngineConfig, TopicConfig
from stream_classifier.engine.base import EngineError, Prepared, Scores
from stream_classifier.engine.capabilities import Capabilities
from stream_classifier.engine.nli import NliEngine
from stream_classifier.messages import ClassifyRequest, Envelope, SourceRef
from stream_classifier.metrics import Metrics
from stream_classifier.preparing import ProcessPreparer
from stream_classifier.scoring import (
    Outcome,
    Pieces,
    PipelinedScorer,
    ThreadScorer,
    make_scorer,
)
from stream_classifier.service import Service

TOPIC = TopicConfig(input="in", output="out", dead_letter="dlq", labels=["a", "b"])
WAIT_S = 10.0


def request(text: str, offset: int = 0) -> ClassifyRequest:
    envelope = Envelope(SourceRef(topic="in", partition=0, offset=offset), None, b"", [], 0)
    req = ClassifyRequest(envelope, offset, text, ("a", "b"), TOPIC)
    req.prepared = Prepared(("a", "b"), False, 16, text)
    return req


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def scores_of(text: str) -> Scores:
    return Scores(("a", "b"), (float(len(text)), 0.0))


class FakePending:
    def __init__(self, engine: FakeEngine, number: int, texts: list[str]) -> None:
        self.engine = engine
        self.number = number
        self.texts = texts

    def result(self) -> list[Scores]:
        gate = self.engine.gates.get(self.number)
        if gate is not None:
            assert gate.wait(WAIT_S)
        with self.engine.lock:
            self.engine.calls.append(f"result {self.number}")
            self.engine.in_flight -= 1
        if "device-lost" in self.texts:
            raise EngineError("device lost")
        if self.engine.fail_at == "result" and "poison" in self.texts:
            raise ValueError("poison")
        return [scores_of(text) for text in self.texts]


class FakeEngine:
    """Records what the scorer asks, in order; ``gates`` hold a batch's result back."""

    model_id = "fake"

    def __init__(self, fail_at: str = "launch") -> None:
        self.fail_at = fail_at
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.launched = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.gates: dict[int, threading.Event] = {}
        #: Hold ``classify_async`` of that batch number (a launch waiting for queue room).
        self.launch_gates: dict[int, threading.Event] = {}
        self.threads: set[str] = set()
        #: Launches asked to hold their last pass back; launch counts seen by flush().
        self.holding: list[int] = []
        self.flushed_after: set[int] = set()
        #: Each launch's texts, by launch number.
        self.texts_of: dict[int, list[str]] = {}

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        return Prepared(tuple(labels), multi_label, 16, text)

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        return self.classify_async(batch).result()

    def classify_async(self, batch: Sequence[Prepared], hold_tail: bool = False) -> FakePending:
        texts = [str(item.payload) for item in batch]
        with self.lock:
            self.threads.add(threading.current_thread().name)
            self.launched += 1
            number = self.launched
            self.texts_of[number] = texts
            self.calls.append(f"launch {number}")
            if hold_tail:
                self.holding.append(number)
            if "poison" in texts and self.fail_at == "launch":
                raise ValueError("poison")
            if "device-gone" in texts:
                raise EngineError("device gone")
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        gate = self.launch_gates.get(number)
        if gate is not None:
            gate.wait(WAIT_S)
        return FakePending(self, number, texts)

    def flush(self) -> None:
        with self.lock:
            self.flushed_after.add(self.launched)

    def warmup(self) -> None:
        return None


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def scorer(engine: FakeEngine) -> Iterator[PipelinedScorer]:
    scorer = PipelinedScorer(engine, Metrics())
    yield scorer
    for gate in engine.gates.values():
        gate.set()
    scorer.shutdown()


def test_outcomes_come_back_in_request_order_for_every_batch(scorer: PipelinedScorer) -> None:
    batches = [[request(f"text {b}-{i}" + "x" * i) for i in range(b + 1)] for b in range(6)]
    futures = [scorer.submit(batch) for batch in batches]
    for batch, future in zip(batches, futures, strict=True):
        assert future.result(WAIT_S) == [scores_of(r.text) for r in batch]


def test_next_batch_is_queued_before_waiting_on_the_current_one_two_at_most(
    engine: FakeEngine, scorer: PipelinedScorer
) -> None:
    engine.gates[1] = threading.Event()
    futures = [scorer.submit([request(f"batch {n}")]) for n in range(1, 5)]
    wait_for(lambda: engine.launched >= 2)  # batch 2 is queued while batch 1 computes
    assert engine.calls[:2] == ["launch 1", "launch 2"]
    assert not futures[0].done()
    engine.gates[1].set()
    for future in futures:
        future.result(WAIT_S)
    assert engine.calls.index("launch 2") < engine.calls.index("result 1")
    assert engine.calls.index("result 1") < engine.calls.index("launch 3")
    assert engine.most_in_flight == 2
    assert engine.threads == {"engine"}  # one thread calls the engine


def test_a_batch_is_resolved_while_the_next_launch_is_still_waiting(
    engine: FakeEngine, scorer: PipelinedScorer
) -> None:
    """On a GPU, ``classify_async`` can wait for room in the device's queue for much of a
    batch's time; the batch before it must reach the service meanwhile, so that the
    service writes it and hands over the next one without waiting for that launch."""
    engine.launch_gates[2] = threading.Event()
    first = scorer.submit([request("first")])
    second = scorer.submit([request("second")])
    assert first.result(WAIT_S) == [scores_of("first")]
    assert engine.calls == ["launch 1", "launch 2", "result 1"]  # launch 2 not returned yet
    assert not second.done()
    engine.launch_gates[2].set()
    assert second.result(WAIT_S) == [scores_of("second")]


def test_a_batch_isolated_early_is_resolved_without_waiting_for_the_one_before_it(
    engine: FakeEngine, scorer: PipelinedScorer
) -> None:
    """Futures resolve as their batches finish; the service decides the order of writes
    (``PendingBatches``: submission order within a partition)."""
    engine.gates[1] = threading.Event()
    first = scorer.submit([request("slow")])
    second = scorer.submit([request("fine"), request("poison"), request("also fine")])
    assert second.result(WAIT_S) == [
        scores_of("fine"),
        "ValueError: poison",
        scores_of("also fine"),
    ]
    assert not first.done()
    engine.gates[1].set()
    assert first.result(WAIT_S) == [scores_of("slow")]


@pytest.mark.parametrize("fail_at", ["launch", "result"])
def test_poison_request_is_isolated_and_the_rest_scored(fail_at: str) -> None:
    engine = FakeEngine(fail_at=fail_at)
    scorer = PipelinedScorer(engine, Metrics())
    try:
        texts = ["one", "two", "poison", "four", "five"]
        outcomes = scorer.submit([request(t) for t in texts]).result(WAIT_S)
        expected: list[Outcome] = [scores_of(t) for t in texts]
        expected[2] = "ValueError: poison"
        assert outcomes == expected
        assert scorer.submit([request("after")]).result(WAIT_S) == [scores_of("after")]
    finally:
        scorer.shutdown()


@pytest.mark.parametrize("text", ["device-gone", "device-lost"])  # at launch, at result()
def test_engine_error_fails_the_batch_and_later_batches_still_score(
    scorer: PipelinedScorer, text: str
) -> None:
    failed = scorer.submit([request("fine"), request(text)])
    later = scorer.submit([request("later")])
    with pytest.raises(EngineError):
        failed.result(WAIT_S)
    assert later.result(WAIT_S) == [scores_of("later")]


def test_batch_metrics_are_recorded_per_scored_batch(engine: FakeEngine) -> None:
    metrics = Metrics()
    scorer = PipelinedScorer(engine, metrics)
    try:
        scorer.submit([request("a"), request("b"), request("c")]).result(WAIT_S)
    finally:
        scorer.shutdown()
    sample = metrics.registry.get_sample_value
    assert sample("stream_classifier_batch_messages_count") == 1
    assert sample("stream_classifier_batch_messages_sum") == 3
    assert sample("stream_classifier_batch_pairs_sum") == 6
    assert sample("stream_classifier_batch_tokens_sum") == 48
    assert sample("stream_classifier_engine_seconds_count") == 1


def test_shutdown_finishes_batches_on_the_device_and_cancels_the_rest(
    engine: FakeEngine,
) -> None:
    scorer = PipelinedScorer(engine, Metrics())
    engine.gates[1] = threading.Event()
    futures: list[Future[list[Outcome]]] = [
        scorer.submit([request(f"batch {n}")]) for n in range(1, 4)
    ]
    wait_for(lambda: engine.launched >= 2)
    stopping = threading.Thread(target=scorer.shutdown)
    stopping.start()
    wait_for(lambda: scorer._closed)  # the stop is queued behind batch 3
    engine.gates[1].set()
    stopping.join(WAIT_S)
    assert not stopping.is_alive()
    assert futures[0].result(0) == [scores_of("batch 1")]
    assert futures[1].result(0) == [scores_of("batch 2")]
    with pytest.raises(CancelledError):
        futures[2].result(0)
    assert engine.launched == 2
    with pytest.raises(RuntimeError, match="shutdown"):
        scorer.submit([request("late")])
    assert {t.name for t in threading.enumerate()} & {"engine", "engine-wait"} == set()


LIVE = TopicConfig(
    input="live", output="live.out", dead_letter="dlq", labels=["a", "b"], priority=1
)
#: Lower levels' batches in pieces of at most three of ``request``'s 16-token requests.
PIECES = Pieces(top=1, tokens=48)


def live_request(text: str) -> ClassifyRequest:
    return replace(request(text), topic=LIVE)


def test_a_lower_levels_batch_goes_to_the_device_in_pieces_and_comes_back_whole() -> None:
    engine, metrics = FakeEngine(), Metrics()
    scorer = PipelinedScorer(engine, metrics, pieces=PIECES)
    try:
        bulk = [request(f"bulk {n}") for n in range(8)]
        assert scorer.submit(bulk).result(WAIT_S) == [scores_of(r.text) for r in bulk]
        live = [live_request(f"live {n}") for n in range(8)]
        assert scorer.submit(live).result(WAIT_S) == [scores_of(r.text) for r in live]
    finally:
        scorer.shutdown()
    assert engine.launched == 3 + 1, "8 bulk requests in pieces of 3, 3 and 2; live whole"
    sample = metrics.registry.get_sample_value
    assert sample("stream_classifier_batch_messages_count") == 2, "recorded per batch"
    assert sample("stream_classifier_batch_messages_sum") == 16


def test_a_lower_levels_pieces_hold_requests_of_similar_widths_and_it_comes_back_in_order() -> None:
    """Pieces cut from the batch sorted widest first: on a CPU a piece's padded passes are
    then few and full. The batch's outcomes still come back in its own order."""
    engine = FakeEngine()
    scorer = PipelinedScorer(engine, Metrics(), pieces=Pieces(top=1, tokens=64))
    widths = [8, 32, 8, 16, 32, 16]  # tokens per pair, two labels each
    bulk = [request(f"{width}-wide #{n}") for n, width in enumerate(widths)]
    for req, width in zip(bulk, widths, strict=True):
        req.prepared = Prepared(("a", "b"), False, 2 * width, req.text)
    try:
        assert scorer.submit(bulk).result(WAIT_S) == [scores_of(r.text) for r in bulk]
    finally:
        scorer.shutdown()
    assert list(engine.texts_of.values()) == [
        ["32-wide #1"],
        ["32-wide #4"],
        ["16-wide #3", "16-wide #5"],
        ["8-wide #0", "8-wide #2"],
    ]


def test_a_live_batch_overtakes_the_bulk_pieces_not_yet_on_the_device() -> None:
    engine = FakeEngine()
    engine.gates[1] = threading.Event()
    scorer = PipelinedScorer(engine, Metrics(), pieces=PIECES)
    try:
        bulk = scorer.submit([request(f"bulk {n}") for n in range(12)])  # four pieces
        wait_for(lambda: engine.launched >= 2)  # two pieces on the device, two waiting
        live = scorer.submit([live_request("live")])  # reaches the engine thread first
        engine.gates[1].set()
        assert live.result(WAIT_S) == [scores_of("live")]
        assert len(bulk.result(WAIT_S)) == 12
    finally:
        engine.gates[1].set()
        scorer.shutdown()
    assert engine.launched == 5
    assert engine.texts_of[3] == ["live"], "the live batch went third, before pieces 3-4"


def test_on_a_cpu_a_live_batch_is_computed_right_after_the_bulk_piece_computing_now() -> None:
    """A CPU computes a piece inside ``classify_async`` (here: the launch gate), one at a
    time: a live batch submitted meanwhile waits for that piece only."""
    engine = FakeEngine()
    engine.launch_gates[1] = threading.Event()
    scorer = PipelinedScorer(engine, Metrics(), depth=1, pieces=PIECES)
    try:
        bulk = scorer.submit([request(f"bulk {n}") for n in range(12)])  # four pieces
        wait_for(lambda: engine.launched >= 1)  # the first piece computing
        live = scorer.submit([live_request("live")])
        engine.launch_gates[1].set()
        assert live.result(WAIT_S) == [scores_of("live")]
        assert len(bulk.result(WAIT_S)) == 12
    finally:
        engine.launch_gates[1].set()
        scorer.shutdown()
    assert engine.texts_of[2] == ["live"], "the live batch went second, before pieces 2-4"
    assert engine.most_in_flight == 1


def test_a_live_batch_is_resolved_before_the_bulk_batch_submitted_ahead_of_it() -> None:
    engine = FakeEngine()
    scorer = PipelinedScorer(engine, Metrics(), pieces=PIECES)
    try:
        engine.gates[1] = threading.Event()
        engine.gates[4] = threading.Event()  # launched after the live batch: a bulk piece
        bulk = scorer.submit([request(f"bulk {n}") for n in range(12)])
        wait_for(lambda: engine.launched >= 2)
        live = scorer.submit([live_request("live")])
        engine.gates[1].set()
        assert live.result(WAIT_S) == [scores_of("live")]
        assert engine.texts_of[3] == ["live"]
        assert not bulk.done()
        engine.gates[4].set()
        assert len(bulk.result(WAIT_S)) == 12
    finally:
        for gate in engine.gates.values():
            gate.set()
        scorer.shutdown()


def test_a_poison_request_in_one_piece_fails_only_itself() -> None:
    engine = FakeEngine(fail_at="result")
    scorer = PipelinedScorer(engine, Metrics(), pieces=PIECES)
    try:
        texts = [f"bulk {n}" for n in range(7)]
        texts[4] = "poison"
        outcomes = scorer.submit([request(t) for t in texts]).result(WAIT_S)
    finally:
        scorer.shutdown()
    expected: list[Outcome] = [scores_of(t) for t in texts]
    expected[4] = "ValueError: poison"
    assert outcomes == expected


def test_shutdown_finishes_a_batch_whose_first_piece_is_on_the_device() -> None:
    engine = FakeEngine()
    engine.gates[1] = threading.Event()
    scorer = PipelinedScorer(engine, Metrics(), pieces=PIECES, depth=1)
    started = scorer.submit([request(f"bulk {n}") for n in range(9)])  # three pieces
    unstarted = scorer.submit([request("later")])
    wait_for(lambda: engine.launched >= 1)
    stopping = threading.Thread(target=scorer.shutdown)
    stopping.start()
    wait_for(lambda: scorer._closed)
    engine.gates[1].set()
    stopping.join(WAIT_S)
    assert not stopping.is_alive()
    assert len(started.result(0)) == 9
    with pytest.raises(CancelledError):
        unstarted.result(0)
    assert engine.launched == 3


def test_make_scorer_pipelines_engines_with_classify_async_on_a_gpu_or_with_levels(
    engine: FakeEngine,
) -> None:
    class Plain:
        model_id = "plain"

        def prepare(
            self, text: str, labels: Sequence[str], template: str, multi_label: bool
        ) -> Prepared:
            return Prepared(tuple(labels), multi_label, 1, None)

        def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
            return []

        def warmup(self) -> None:
            return None

    def on_gpu(engine: Any, cuda: bool = True) -> Capabilities:
        return replace(Capabilities.of(engine), cuda=cuda)

    assert Capabilities.of(engine).pipelined and not Capabilities.of(Plain()).pipelined
    levels = Pieces(top=1, tokens=64)
    pipelined = make_scorer(engine, Metrics(), on_gpu(engine))
    # On a CPU with priority levels: one piece at a time, so a live batch goes next.
    cpu_levels = make_scorer(engine, Metrics(), on_gpu(engine, cuda=False), levels)
    scorers = [pipelined, cpu_levels, make_scorer(Plain(), Metrics(), on_gpu(Plain()), levels)]
    # Nothing to overlap on a CPU:
    scorers.append(make_scorer(engine, Metrics(), on_gpu(engine, cuda=False)))
    try:
        assert isinstance(pipelined, PipelinedScorer) and pipelined.depth == 2
        assert isinstance(cpu_levels, PipelinedScorer) and cpu_levels.depth == 1
        assert cpu_levels.pieces == levels
        assert all(isinstance(s, ThreadScorer) for s in scorers[2:])
    finally:
        for scorer in scorers:
            scorer.shutdown()


def test_real_engine_scores_equal_classify(tiny_model: Path) -> None:
    engine = NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), 4096)
    texts = ["快递太慢了", "客服态度很好", "价格有点贵", "质量不错" * 30]
    requests = []
    for i, text in enumerate(texts):
        req = request(text, i)
        req.prepared = engine.prepare(text, ["物流", "服务", "价格"], "{}", False)
        requests.append(req)
    scorer = PipelinedScorer(engine, Metrics())
    try:
        first = scorer.submit(requests[:2])
        second = scorer.submit(requests[2:])
        outcomes = first.result(WAIT_S) + second.result(WAIT_S)
    finally:
        scorer.shutdown()
    # the same batches through classify (batch composition moves fp32 scores by ~1e-7)
    expected = engine.classify([r.prepared for r in requests[:2]])
    expected += engine.classify([r.prepared for r in requests[2:]])
    assert outcomes == expected


@pytest.mark.kafka
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_service_with_both_gpu_stages_scores_every_event_once_and_commits(
    bootstrap: str, tiny_model: Path, guarantee: str
) -> None:
    """The loop with the stages a GPU gets (run here on a CPU): small batches, so several
    are on the "device" at once while worker processes tokenize; the packed engine with a
    small pass budget, so that batches queued behind others hold their last pass back."""
    from conftest import RunningService, service_config
    from kafka_helpers import create_topics, produce, read_all, unique, wait_drained

    engine_config = EngineConfig(model=str(tiny_model), device="cpu")
    engine = NliEngine.load(engine_config, 256, backend="packed")
    labels = ["物流", "服务", "价格"]
    names = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, names.values(), partitions=3)
    config = service_config(
        bootstrap,
        [{**names, "labels": labels}],
        processing={"guarantee": guarantee, "max_batch_messages": 8, "max_batch_wait_ms": 5},
    )
    texts = [f"第{i}个快递太慢了，客服态度也不好" + "很" * (i % 17) for i in range(60)]
    produce(
        bootstrap,
        names["input"],
        [json.dumps({"id": i, "text": t}).encode() for i, t in enumerate(texts)],
    )
    metrics = Metrics()
    service = Service(
        config,
        engine,
        metrics,
        scorer=PipelinedScorer(engine, metrics),
        preparer=ProcessPreparer(engine.preparer_factory(), workers=2),
    )
    with RunningService(service):
        outputs = read_all(bootstrap, names["output"], len(texts))
        wait_drained(bootstrap, config.kafka.group_id, names["input"], partitions=3)
    bodies = [record.json_value() for record in outputs]
    assert sorted(body["id"] for body in bodies) == list(range(len(texts)))
    for body in bodies:
        alone = engine.classify([engine.prepare(texts[body["id"]], labels, "{}", False)])[0]
        assert body["labels"] == list(alone.labels)
        assert body["scores"] == pytest.approx(list(alone.scores), abs=1e-6)
    assert metrics.registry.get_sample_value("stream_classifier_batch_messages_sum") == 60


def test_engine_idle_time_counts_only_time_with_nothing_on_the_device(
    engine: FakeEngine,
) -> None:
    metrics = Metrics()

    def idle() -> float:
        value = metrics.registry.get_sample_value("stream_classifier_engine_idle_seconds_total")
        assert value is not None
        return value

    created = time.monotonic()
    scorer = PipelinedScorer(engine, metrics)
    try:
        time.sleep(0.3)  # nothing submitted: the engine stage is idle
        scorer.submit([request("first")]).result(WAIT_S)
        assert 0.1 <= idle() <= time.monotonic() - created
        engine.gates[2] = threading.Event()
        second = scorer.submit([request("second")])
        wait_for(lambda: engine.launched >= 2)
        before = idle()
        time.sleep(1.0)  # a batch on the device: not idle
        engine.gates[2].set()
        second.result(WAIT_S)
        scorer.submit([request("third")]).result(WAIT_S)
        assert idle() - before < 0.5
    finally:
        scorer.shutdown()


def test_thread_scorer_counts_the_time_between_batches_as_idle() -> None:
    metrics = Metrics()
    started = time.monotonic()
    scorer = ThreadScorer(FakeEngine(), metrics)
    try:
        time.sleep(0.2)
        scorer.submit([request("one")]).result(WAIT_S)
        idle = metrics.registry.get_sample_value("stream_classifier_engine_idle_seconds_total")
        assert idle is not None and 0.2 <= idle <= time.monotonic() - started
    finally:
        scorer.shutdown()


def test_a_batch_queued_behind_another_may_hold_its_last_pass_until_the_next_launch(
    engine: FakeEngine,
) -> None:
    """hold_tail only with a batch ahead on the device; a flush once the holder is alone."""
    scorer = PipelinedScorer(engine, Metrics())
    engine.gates[1] = threading.Event()
    try:
        first = scorer.submit([request("one")])
        wait_for(lambda: engine.launched >= 1)
        second = scorer.submit([request("two")])
        wait_for(lambda: engine.launched >= 2)
        third = scorer.submit([request("three")])
        engine.gates[1].set()
        for future in (first, second, third):
            future.result(WAIT_S)
    finally:
        scorer.shutdown()
    assert engine.launched == 3
    assert engine.holding == [2, 3]  # batch 1 was alone on the device
    assert 3 in engine.flushed_after, "the last batch's held pass was never flushed"
