"""Passes replayed from CUDA graphs: the fixed shapes a pass is fitted into, and what comes back.

No GPU here, so no graph is captured: the same fixed-shape pass runs directly
(``capture=False``), with padding tokens that belong to no sequence and empty sequences at
the end. The flash kernel is stood in for by a loop that leaves every row it does not own
as NaN, so a padding row that reached a real one would show. ``tests/test_engine_gpu.py``
checks real graphs against the eager pass on a GPU.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_engine_backend import (
    assert_scores_like_the_reference,
    pretend_flash_capable,
    varlen_attention,
)

from stream_classifier.config import EngineConfig
from stream_classifier.engine import graphs
from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.graphs import (
    GraphedForward,
    Shape,
    bucket_tokens,
    pass_budget,
    shape_of,
)
from stream_classifier.engine.nli import NliEngine
from stream_classifier.engine.packed import PackedBert

BUDGET = 4096


@pytest.fixture
def engine(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> NliEngine:
    pretend_flash_capable(monkeypatch, varlen_attention)
    config = EngineConfig(model=str(tiny_model), device="cpu")
    engine = NliEngine.load(config, BUDGET)
    assert isinstance(engine.forward, GraphedForward)
    return engine


def random_pairs(rng: np.random.Generator, rows: int, longest: int) -> TokenBatch:
    lengths = rng.integers(5, longest + 1, size=rows).astype(np.int32)
    lengths[0] = longest
    a_lengths = np.maximum(1, lengths // 2 - 2).astype(np.int32)
    ids = rng.integers(110, 500, size=int(lengths.sum())).astype(np.int32)
    return TokenBatch(ids, lengths, a_lengths)


def test_the_flash_engine_replays_fixed_shape_passes_and_scores_like_the_reference(
    engine: NliEngine,
) -> None:
    assert engine.backend == "cpu-packed-flash-graphs"
    assert isinstance(engine.forward, GraphedForward)
    assert_scores_like_the_reference(engine)  # the first pass: eager
    assert_scores_like_the_reference(engine)  # then from its fixed shape
    assert engine.forward.captured >= 1


@pytest.mark.parametrize(("rows", "longest"), [(1, 7), (3, 40), (9, 130), (20, 200), (6, 512)])
def test_a_padded_pass_returns_the_eager_logits_of_its_real_pairs(
    engine: NliEngine, rows: int, longest: int
) -> None:
    graphed = engine.forward
    assert isinstance(graphed, GraphedForward)
    batch = random_pairs(np.random.default_rng(rows), rows, longest)
    with torch.inference_mode():
        eager = graphed.packed(batch)
        graphed(batch)  # a shape's first pass runs eagerly
        fixed = graphed(batch)
    shape = shape_of(batch, BUDGET)
    assert shape is not None
    assert (shape.tokens, shape.sequences) != (batch.tokens, batch.rows), "nothing was padded"
    assert fixed.shape == (rows, 2)
    assert torch.isfinite(fixed).all()
    torch.testing.assert_close(fixed, eager, rtol=0, atol=1e-5)


def test_one_graph_per_shape(engine: NliEngine) -> None:
    graphed = engine.forward
    assert isinstance(graphed, GraphedForward)
    rng = np.random.default_rng(1)
    first, second = random_pairs(rng, 6, 40), random_pairs(rng, 6, 40)
    assert shape_of(first, BUDGET) == shape_of(second, BUDGET)
    with torch.inference_mode():
        graphed(first)
        graphed(first)
        graphed(second)
        assert graphed.captured == 1
        other = random_pairs(rng, 30, 200)
        graphed(other)
        assert graphed.captured == 1, "a shape seen once was captured"
        graphed(other)
    assert graphed.captured == 2


def pairs_of(lengths: list[int]) -> TokenBatch:
    """Pairs of exactly these lengths (random ids)."""
    sizes = np.array(lengths, dtype=np.int32)
    ids = np.random.default_rng(len(lengths)).integers(110, 500, size=int(sizes.sum()))
    return TokenBatch(ids.astype(np.int32), sizes, np.maximum(1, sizes // 2 - 2))


def count_eager_passes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    passes: Counter[str] = Counter()
    eager = PackedBert.__call__

    def counting(self: PackedBert, batch: TokenBatch) -> torch.Tensor:
        passes["eager"] += 1
        return eager(self, batch)

    monkeypatch.setattr(PackedBert, "__call__", counting)
    return passes


def test_a_shape_replays_a_graph_of_its_tokens_with_room_for_it_and_is_never_captured(
    engine: NliEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a paced load most batches end in a pass of a new shape, and a pass run eagerly or
    captured held the busy engine thread for up to half a second on an H100."""
    graphed = engine.forward
    assert isinstance(graphed, GraphedForward)
    longer = pairs_of([300, 100, 100, 100])  # 600 tokens, longest 300
    shorter = pairs_of([120, 120, 120, 120, 120])  # 600 tokens, longest 120
    wide, narrow = shape_of(longer, BUDGET), shape_of(shorter, BUDGET)
    assert wide is not None and narrow is not None
    assert (wide.tokens, wide.sequences) == (narrow.tokens, narrow.sequences)
    assert wide.length > narrow.length
    with torch.inference_mode():
        graphed(longer)
        graphed(longer)  # captured
        passes = count_eager_passes(monkeypatch)
        expected = graphed.packed(shorter)
        passes.clear()
        results = [graphed(shorter) for _ in range(3)]
    assert passes["eager"] == 0
    assert graphed.captured == 1, "captured a shape that a graph had room for"
    for result in results:
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


#: 1,100 and 950 tokens: the larger one's graph is at most a quarter larger.
LARGER, SMALLER = pairs_of([300] + [100] * 8), pairs_of([200] + [75] * 10)


def test_a_new_shape_borrows_a_graph_a_little_larger_until_its_own_is_captured(
    engine: NliEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    graphed = engine.forward
    assert isinstance(graphed, GraphedForward)
    larger, smaller = LARGER, SMALLER
    big, small = shape_of(larger, BUDGET), shape_of(smaller, BUDGET)
    assert big is not None and small is not None
    assert small.tokens < big.tokens <= small.tokens * graphs.BORROW_TOKENS
    too_small = pairs_of([120] * 6)  # 720 tokens: the larger graph is over a quarter more
    passes = count_eager_passes(monkeypatch)
    with torch.inference_mode():
        graphed(larger)
        graphed(larger)
        assert (passes["eager"], graphed.captured) == (1, 1)
        expected = graphed.packed(smaller)
        passes.clear()
        borrowed = graphed(smaller)
        assert (passes["eager"], graphed.captured) == (0, 1), "the first pass did not borrow"
        own = graphed(smaller)
        assert graphed.captured == 2, "the second pass did not capture its own shape"
        graphed(too_small)
    assert passes["eager"] == 1, "a pass borrowed a graph over a quarter larger"
    torch.testing.assert_close(borrowed, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(own, expected, rtol=0, atol=1e-5)


def test_a_shape_whose_capture_failed_borrows_where_it_can(
    engine: NliEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    graphed = engine.forward
    assert isinstance(graphed, GraphedForward)
    larger, smaller = LARGER, SMALLER
    with torch.inference_mode():
        graphed(larger)
        graphed(larger)

        def refuse(shape: Shape) -> Any:
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(graphed, "_static", refuse)
        passes = count_eager_passes(monkeypatch)
        expected = graphed.packed(smaller)
        passes.clear()
        results = [graphed(smaller) for _ in range(3)]
    assert (graphed.captured, graphed.failed, passes["eager"]) == (1, 1, 0)
    for result in results:
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


def test_a_pass_over_the_budget_runs_eagerly(engine: NliEngine) -> None:
    graphed = engine.forward
    assert isinstance(graphed, GraphedForward)
    single = random_pairs(np.random.default_rng(2), 1, 512)
    with torch.inference_mode():
        graphed(single)
        small_budget = GraphedForward(graphed.packed, max_tokens=256, capture=False)
        small_budget(single)
        result = small_budget(single)
    assert small_budget.captured == 0
    assert result.shape == (1, 2)


def test_a_shape_that_cannot_be_captured_runs_eagerly_and_is_counted(
    engine: NliEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    graphed = engine.forward
    assert isinstance(graphed, GraphedForward)

    def refuse(shape: Shape) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed, "_static", refuse)
    batch = random_pairs(np.random.default_rng(3), 5, 50)
    logger = "stream_classifier.engine.graphs"
    with caplog.at_level(logging.WARNING, logger=logger), torch.inference_mode():
        eager = graphed.packed(batch)
        graphed(batch)
        fallback = graphed(batch)
        graphed(batch)
    assert (graphed.captured, graphed.failed) == (0, 1), "tried to capture the shape again"
    assert any("running them eagerly" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(fallback, eager, rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 7, 255, 256, 257, 1000, 4095, 4096, 40_000, 65_535, 65_536])
def test_token_buckets_pad_little_avoid_multiples_of_64_and_stay_in_the_budget(
    tokens: int,
) -> None:
    bucket = bucket_tokens(tokens, 65_536)
    assert bucket is not None
    assert tokens <= bucket <= 65_536
    assert bucket - tokens < max(graphs.MIN_TOKENS, (tokens + 8) / 8)
    assert bucket % 64 == 56 or bucket == 65_536 > pass_budget(65_536) >= tokens - 8
    assert bucket_tokens(tokens, tokens) == tokens or tokens < graphs.MIN_TOKENS
    assert bucket_tokens(65_537, 65_536) is None


def test_the_engine_fills_its_passes_to_the_bucket_under_the_budget(
    tiny_model: Path, monkeypatch: Any
) -> None:
    pretend_flash_capable(monkeypatch, varlen_attention)
    engine = NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), BUDGET)
    assert engine.pass_tokens == pass_budget(BUDGET) == 4088 == bucket_tokens(4088, BUDGET)


def test_full_passes_share_the_bucket_just_under_the_budget() -> None:
    assert pass_budget(65_536) == 65_528 == bucket_tokens(65_528, 65_536)
    assert bucket_tokens(61_433, 65_536) == 65_528
    assert pass_budget(60_000) == 60_000  # not a multiple of 64: the budget itself


def test_the_warm_up_pass_has_the_shape_of_full_passes_of_real_texts() -> None:
    """The engine's warm-up (longest pairs) captures the graph that full passes of texts
    like the reference workload's (docs/PERFORMANCE.md) replay: same token bucket, sequences
    and longest pair (512)."""
    warm_up = TokenBatch(np.zeros(127 * 512, np.int32), np.full(127, 512, np.int32), np.ones(127))
    rng = np.random.default_rng(6)
    for median in (60, 150):  # the reference workload's text lengths, and longer ones
        texts = np.clip(rng.lognormal(np.log(median), 0.7, size=4000), 8, 480)
        lengths = (texts + 12).astype(np.int32)  # + [CLS], [SEP]s and the hypothesis
        rows = int(np.searchsorted(np.cumsum(lengths), pass_budget(65_536), side="right"))
        full = TokenBatch(
            np.zeros(int(lengths[:rows].sum()), np.int32), lengths[:rows], np.ones(rows)
        )
        assert shape_of(full, 65_536) == shape_of(warm_up, 65_536) == Shape(65_528, 1024, 512)


def test_a_budget_off_the_bucket_grid_caps_the_bucket() -> None:
    assert bucket_tokens(59_900, 60_000) == 60_000


def test_shape_rounds_sequences_to_powers_of_two_and_length_to_flash_blocks() -> None:
    batch = random_pairs(np.random.default_rng(4), 9, 130)
    shape = shape_of(batch, 65_536)
    assert shape == Shape(bucket_tokens(batch.tokens, 65_536) or 0, 16, 256)
    assert shape_of(random_pairs(np.random.default_rng(5), 1, 20), 65_536) == Shape(248, 8, 128)


def test_static_inputs_pad_with_empty_sequences_and_unowned_tokens() -> None:
    batch = TokenBatch(
        np.array([101, 5, 102, 7, 102, 101, 9, 102, 8, 8, 102], dtype=np.int32),
        np.array([5, 6], dtype=np.int32),
        np.array([1, 2], dtype=np.int32),
    )
    shape = Shape(16, 8, 128)
    host = graphs.static_inputs(batch, shape)
    ids, types, positions, cu = host[:16], host[16:32], host[32:48], host[48:]
    assert ids[:11].tolist() == batch.ids.tolist() and not ids[11:].any()
    assert types[:11].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1]
    assert positions[:11].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]
    assert cu.tolist() == [0, 5, 11, 11, 11, 11, 11, 11, 11]


class SlowCompiler:
    """Stands in for ``torch.compile``: the compiled layer is the eager one, its first call
    (the helper thread's) blocks until ``finish`` is set, and calls are counted by thread."""

    def __init__(self, fail: bool = False) -> None:
        self.finish = threading.Event()
        self.fail = fail
        self.calls: Counter[str] = Counter()

    def __call__(self, fn: Any, **_: Any) -> Any:
        def compiled(*args: Any) -> Any:
            self.calls[threading.current_thread().name] += 1
            if not self.finish.wait(timeout=60):
                raise TimeoutError("the test never let the compile finish")
            if self.fail:
                raise RuntimeError("inductor: no C++ compiler")
            return fn(*args)

        return compiled


@pytest.fixture
def compiler(monkeypatch: pytest.MonkeyPatch) -> SlowCompiler:
    """Layers that compile where they would on a GPU (a varlen kernel), slowly."""
    slow = SlowCompiler()
    monkeypatch.setattr(PackedBert, "compile_wanted", property(lambda self: True))
    monkeypatch.setattr(torch, "compile", slow)
    return slow


def test_the_service_scores_eagerly_while_the_layers_compile_then_takes_them(
    engine: NliEngine, compiler: SlowCompiler
) -> None:
    """No capture while the helper thread compiles (its device work would break one, and
    the graphs would hold the eager layers); the compiled layers taken, graphs recaptured."""
    graphed = engine.forward
    assert isinstance(graphed, GraphedForward)
    engine.warmup_eagerly()
    captured = graphed.captured
    compiling = engine.compile_in_background()
    assert compiling is not None and compiling.is_alive()
    assert_scores_like_the_reference(engine)  # while the helper thread compiles
    assert_scores_like_the_reference(engine)
    assert compiler.calls[threading.current_thread().name] == 0
    assert graphed.captured == captured, "a graph was captured while the layers compiled"
    compiler.finish.set()
    compiling.join(timeout=60)
    assert not compiling.is_alive()
    assert_scores_like_the_reference(engine)  # takes the compiled layers
    assert_scores_like_the_reference(engine)  # and captures their graphs
    assert compiler.calls[threading.current_thread().name] > 0
    assert graphed.captured > captured


def test_a_compile_that_fails_leaves_the_layers_eager_and_says_so(
    engine: NliEngine, compiler: SlowCompiler, caplog: pytest.LogCaptureFixture
) -> None:
    compiler.fail = True
    compiler.finish.set()
    engine.warmup_eagerly()
    compiling = engine.compile_in_background()
    assert compiling is not None
    compiling.join(timeout=60)
    assert "torch.compile of the encoder layers failed" in caplog.text
    assert_scores_like_the_reference(engine)
    assert compiler.calls[threading.current_thread().name] == 0


def test_the_benchmarks_warm_up_waits_for_the_compiled_layers(
    engine: NliEngine, compiler: SlowCompiler
) -> None:
    """``warmup()`` (bench and the benchmarks) measures the steady state: compiled."""
    compiler.finish.set()
    engine.warmup()
    calls = compiler.calls[threading.current_thread().name]
    assert calls > 0, "the warm-up's second round ran eagerly"
    assert_scores_like_the_reference(engine)
    assert compiler.calls[threading.current_thread().name] > calls
