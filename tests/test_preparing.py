"""The prepare stage: worker processes tokenize exactly like the engine does inline.

Worker processes are spawned: they import this module to unpickle the fake factories, so
it imports nothing heavy at the top (the tiny engine is imported inside its test).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_classifier.engine.base import EngineError, Prepared, Scores
from stream_classifier.engine.capabilities import Capabilities
from stream_classifier.preparing import (
    LATER_PER_FLUSH,
    InlinePreparer,
    PreparerCrashed,
    ProcessPreparer,
    ThreadPreparer,
    make_preparer,
)

WAIT_S = 120.0


class Unpicklable(Exception):
    def __init__(self, detail: str, code: int) -> None:  # pickling loses ``code``
        super().__init__(detail)
        self.code = code


class FakeSide:
    """Prepared payload: (pid of the process that prepared it, text)."""

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        if text == "bad":
            raise ValueError("bad text")
        if text == "odd":
            raise Unpicklable("odd text", 7)
        if text == "crash":
            os._exit(3)  # the worker dies, as under the OOM killer
        return Prepared(tuple(labels), multi_label, len(text), (os.getpid(), text))


def payload(prepared: Prepared) -> tuple[Any, str]:
    """A fake's payload: (what prepared it: a pid or a thread name, text)."""
    assert isinstance(prepared.payload, tuple)
    return prepared.payload


class PreparesOnly:
    """The rest of the Engine protocol, for fakes the tests only prepare with."""

    model_id = "fake"

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        raise NotImplementedError

    def warmup(self) -> None:
        return None


@dataclass(frozen=True)
class FakeFactory:
    def __call__(self) -> FakeSide:
        return FakeSide()


@dataclass(frozen=True)
class FailingFactory:
    def __call__(self) -> FakeSide:
        raise OSError("no vocabulary here")


def results(futures: list[Future[Prepared]]) -> list[Prepared | BaseException]:
    out: list[Prepared | BaseException] = []
    for future in futures:
        error = future.exception(WAIT_S)
        out.append(error if error is not None else future.result())
    return out


def test_process_preparer_prepares_exactly_like_the_engine_inline(tiny_model: Path) -> None:
    from stream_classifier.config import EngineConfig
    from stream_classifier.engine.nli import NliEngine

    engine = NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), 4096)
    long_text = "这是一段很长的文本，" * 120  # cut to the pair budget
    cases = [
        ("快递太慢了", ["物流", "服务", "价格"], "{}", False),
        ("客服态度很好，下次还来", ["物流", "服务"], "这篇文章的标题是{}", True),
        (long_text, ["物流", "服务", "价格", "质量"], "{}", False),
        ("价格有点贵", ["只有一个标签"], "关于{}", False),
    ] * 5
    preparer = make_preparer(engine, 2, Capabilities.of(engine))
    assert isinstance(preparer, ProcessPreparer)
    try:
        via_workers = [preparer.submit(*case).result(WAIT_S) for case in cases]
    finally:
        preparer.shutdown()
    inline_preparer = InlinePreparer(engine)
    futures = [inline_preparer.submit(*case) for case in cases]
    inline_preparer.flush()
    inline = [future.result(0) for future in futures]
    for ours, theirs in zip(via_workers, inline, strict=True):
        assert (ours.labels, ours.multi_label, ours.tokens) == (
            theirs.labels,
            theirs.multi_label,
            theirs.tokens,
        )
        for field in ("ids", "lengths", "a_lengths"):
            assert np.array_equal(getattr(ours.payload, field), getattr(theirs.payload, field))
    assert engine.classify(via_workers) == engine.classify(inline)


def test_a_failing_prepare_is_that_events_exception_and_the_rest_are_prepared() -> None:
    preparer = ProcessPreparer(FakeFactory(), workers=1)
    try:
        texts = ["one", "bad", "two", "odd", "three"]
        outcomes = results([preparer.submit(t, ["a"], "{}", False) for t in texts])
    finally:
        preparer.shutdown()
    assert [payload(o)[1] for o in outcomes if isinstance(o, Prepared)] == ["one", "two", "three"]
    bad, odd = outcomes[1], outcomes[3]
    assert isinstance(bad, ValueError) and str(bad) == "bad text"
    # an exception that does not survive pickling still says what it was
    assert isinstance(odd, RuntimeError) and str(odd) == "Unpicklable: odd text"
    assert all(payload(o)[0] != os.getpid() for o in outcomes if isinstance(o, Prepared))


def test_a_worker_that_dies_is_replaced_and_only_its_event_fails() -> None:
    preparer = ProcessPreparer(FakeFactory(), workers=1, chunk_events=8, max_crashes=1)
    try:
        texts = ["first", "crash", "second", "third"]
        outcomes = results([preparer.submit(t, ["a"], "{}", False) for t in texts])
        after = preparer.submit("after", ["a"], "{}", False).result(WAIT_S)
    finally:
        preparer.shutdown()
    assert isinstance(outcomes[1], PreparerCrashed)
    prepared = [o for i, o in enumerate(outcomes) if i != 1]
    assert [payload(o)[1] for o in prepared if isinstance(o, Prepared)] == texts[:1] + texts[2:]
    assert payload(after)[1] == "after"
    assert preparer.restarts >= 1


def test_shutdown_stops_the_workers_and_refuses_new_events() -> None:
    preparer = ProcessPreparer(FakeFactory(), workers=2)
    futures = [preparer.submit(f"text {i}", ["a"], "{}", False) for i in range(40)]
    pids = {payload(future.result(WAIT_S))[0] for future in futures}
    preparer.shutdown()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # exited and reaped
    with pytest.raises(RuntimeError, match="shutdown"):
        preparer.submit("late", ["a"], "{}", False)


def test_a_factory_that_fails_in_the_workers_fails_at_start() -> None:
    with pytest.raises(EngineError, match="did not start"):
        ProcessPreparer(FailingFactory(), workers=1)


def test_make_preparer_is_inline_without_workers_or_a_factory() -> None:
    class NoFactory(PreparesOnly):
        model_id = "no-factory"

        def prepare(
            self, text: str, labels: Sequence[str], template: str, multi_label: bool
        ) -> Prepared:
            return FakeSide().prepare(text, labels, template, multi_label)

    capabilities = Capabilities.of(NoFactory())
    assert not capabilities.process_preparing
    assert isinstance(make_preparer(NoFactory(), 0, capabilities), InlinePreparer)
    assert isinstance(make_preparer(NoFactory(), 2, capabilities), InlinePreparer)


class ChunkSide(FakeSide, PreparesOnly):
    """Records each ``prepare_many`` chunk; a chunk holding "boom" fails as a whole."""

    def __init__(self) -> None:
        self.chunks: list[list[str]] = []

    def prepare_many(
        self, tasks: Sequence[tuple[str, Sequence[str], str, bool]]
    ) -> list[Prepared | Exception]:
        self.chunks.append([task[0] for task in tasks])
        if any(task[0] == "boom" for task in tasks):
            raise RuntimeError("the whole chunk failed")
        results: list[Prepared | Exception] = []
        for task in tasks:
            try:
                results.append(self.prepare(*task))
            except Exception as exc:  # noqa: BLE001 - in its place, like the engine's
                results.append(exc)
        return results


def test_inline_preparer_tokenizes_one_chunk_per_flush_and_isolates_failures() -> None:
    side = ChunkSide()
    preparer = InlinePreparer(side)
    first = [preparer.submit(t, ["a"], "{}", False) for t in ("one", "bad", "two")]
    assert not any(future.done() for future in first)  # nothing runs before the flush
    preparer.flush()
    second = [preparer.submit(t, ["a"], "{}", False) for t in ("boom", "three")]
    preparer.flush()
    assert side.chunks == [["one", "bad", "two"], ["boom", "three"]]
    outcomes = results(first + second)
    assert isinstance(outcomes[1], ValueError)
    # the chunk that failed as a whole was prepared again event by event
    prepared = [payload(o)[1] for o in outcomes if isinstance(o, Prepared)]
    assert prepared == ["one", "two", "boom", "three"]


def test_inline_preparer_takes_events_submitted_later_a_bounded_chunk_a_flush() -> None:
    """A lower level's events wait behind the live level's and go a chunk at a time, so
    that one flush never holds the Kafka thread for a whole fetched backlog."""
    side = ChunkSide()
    preparer = InlinePreparer(side)
    bulk = [preparer.submit(f"bulk{i}", ["a"], "{}", False, later=True) for i in range(300)]
    live = preparer.submit("live", ["a"], "{}", False)
    assert preparer.deferred() == 300
    preparer.flush()
    assert side.chunks[0] == ["live"] + [f"bulk{i}" for i in range(LATER_PER_FLUSH)]
    assert live.done() and not bulk[LATER_PER_FLUSH].done()
    assert preparer.deferred() == 300 - LATER_PER_FLUSH
    preparer.flush(everything=True)
    assert preparer.deferred() == 0 and all(future.done() for future in bulk)
    done = [o for o in results(bulk) if isinstance(o, Prepared)]
    assert [payload(o)[1] for o in done] == [f"bulk{i}" for i in range(300)]
    left = preparer.submit("left", ["a"], "{}", False, later=True)
    preparer.shutdown()
    assert left.cancelled() and preparer.deferred() == 0


def test_nli_chunk_tokenizing_equals_the_tokenizer_call(tiny_model: Path) -> None:
    """One ``encode_batch`` per chunk gives each text the ids ``tokenizer(text)`` gives."""
    from transformers_reference import reference_tokenizer

    from stream_classifier.config import EngineConfig
    from stream_classifier.engine.nli import NliEngine, pair_set, tokenize_many

    engine = NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), 4096)
    texts = [
        "快递太慢了",
        "Délivery was LATE, café closed!!",
        "  spaces   around  ",
        "mixed 中文 and English 123 [SEP] [CLS]",
        "emoji 😀 and tabs\tnew\nlines",
        "",
        "这是一段很长的文本，" * 120,
    ]
    reference = reference_tokenizer(tiny_model)
    expected = [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert tokenize_many(engine.tokenizer, texts) == expected
    tasks = [(t, ("物流", "服务"), "这篇文章的标题是{}", False) for t in texts]
    chunked = engine.prepare_many(tasks)
    for task, ours in zip(tasks, chunked, strict=True):
        assert isinstance(ours, Prepared)
        alone = engine.prepare(*task)
        assert ours.tokens == alone.tokens
        assert np.array_equal(pair_set(ours).ids, pair_set(alone).ids)


def test_thread_preparer_prepares_off_the_calling_thread() -> None:
    preparer = ThreadPreparer(FakeThreadEngine())
    try:
        good = preparer.submit("ok", ["a"], "{}", False).result(WAIT_S)
        bad = preparer.submit("bad", ["a"], "{}", False).exception(WAIT_S)
    finally:
        preparer.shutdown()
    assert payload(good)[0].startswith("prepare")
    assert isinstance(bad, ValueError)


class FakeThreadEngine(PreparesOnly):
    model_id = "fake"

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        import threading

        if text == "bad":
            raise ValueError("bad text")
        return Prepared(tuple(labels), multi_label, 1, (threading.current_thread().name, text))


def test_device_defaults_fill_only_what_was_not_set() -> None:
    from stream_classifier.config import ProcessingConfig

    unset = ProcessingConfig()
    assert unset.for_device(gpu=False).max_batch_messages == 256
    assert unset.for_device(gpu=False).prepare_workers == 0
    assert unset.for_device(gpu=True).max_batch_messages == 1024
    assert unset.for_device(gpu=True).prepare_workers == 0  # measured slower on an H100
    assert unset.for_device(gpu=True).max_pending_batches == 3  # one ready behind two
    assert unset.for_device(gpu=False).max_pending_batches == 2
    assert unset.for_device(gpu=False, levels=True).max_pending_batches == 3  # a live place
    # a live batch waits for the piece being computed: small on a CPU
    assert unset.for_device(gpu=False, levels=True).lower_priority_piece() == 1024
    assert unset.for_device(gpu=True, levels=True).lower_priority_piece() == 65536 // 4
    sized = ProcessingConfig(priority_piece_tokens=5000)
    assert sized.for_device(gpu=False, levels=True).lower_priority_piece() == 5000
    assert unset.for_device(gpu=False).max_pending_batches == 2
    assert unset.for_device(gpu=True).switch_interval_ms == 0.5
    assert unset.for_device(gpu=False).switch_interval_ms == 5.0
    chosen = ProcessingConfig(
        max_batch_messages=300, prepare_workers=0, max_pending_batches=2, switch_interval_ms=1
    )
    assert chosen.for_device(gpu=True) == chosen
    # resolving twice changes nothing (a SIGHUP reload compares resolved settings)
    assert unset.for_device(gpu=True).for_device(gpu=True) == unset.for_device(gpu=True)


def test_device_defaults_respect_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_classifier.config import ServiceConfig

    monkeypatch.setenv("STREAM_CLASSIFIER_PROCESSING__MAX_BATCH_MESSAGES", "256")
    topic = {"input": "i", "output": "o", "dead_letter": "d", "labels": ["a"]}
    config = ServiceConfig(topics=[topic])
    assert config.processing.for_device(gpu=True).max_batch_messages == 256
