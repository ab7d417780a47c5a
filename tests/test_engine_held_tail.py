"""A micro-batch's last, partial pass held back for the next one's first pairs.

While the input is saturated the scorer queues each micro-batch behind another, and the
packed engine then keeps the batch's last pass (short of the token budget) until the next
batch's pairs fill it. Scores must not change, a held batch's result must come once the
next batch or a flush queues its pass, and a failure there must reach both batches.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine_nli import GOLDEN

from stream_classifier.config import EngineConfig
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.engine.batches import TokenBatch, packed_batches
from stream_classifier.engine.nli import NliEngine, pair_set

BUDGET = 512
LABELS = ("体育", "财经", "科技")


class PassSizes:
    """Wraps the engine's forward pass: records each pass's token count."""

    def __init__(self, engine: NliEngine) -> None:
        self.inner = engine.forward
        self.tokens: list[int] = []

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        self.tokens.append(batch.tokens)
        return self.inner(batch)


@pytest.fixture
def engine(tiny_model: Path) -> NliEngine:
    config = EngineConfig(model=str(tiny_model), device="cpu")
    engine = NliEngine.load(config, BUDGET, backend="packed")
    assert engine.backend == "cpu-packed-sdpa"
    return engine


def micro_batches(engine: NliEngine, count: int, size: int) -> list[list[Prepared]]:
    characters = "".join(case["text"] for case in GOLDEN)
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(count):
        texts = ["".join(rng.choice(list(characters), rng.integers(4, 60))) for _ in range(size)]
        batches.append([engine.prepare(t, LABELS, "这篇文章的标题是{}", False) for t in texts])
    return batches


def scores_of(results: list[list[Scores]]) -> list[tuple[float, ...]]:
    return [s.scores for batch in results for s in batch]


def test_held_passes_are_full_and_the_scores_do_not_change(engine: NliEngine) -> None:
    batches = micro_batches(engine, count=5, size=9)
    passes = PassSizes(engine)
    engine.forward = passes
    alone = [engine.classify(batch) for batch in batches]
    passes_alone = len(passes.tokens)
    passes.tokens.clear()
    pending = [engine.classify_async(batch, hold_tail=True) for batch in batches]
    engine.flush()
    held = [p.result() for p in pending]
    # as many passes as one stream of all the pairs needs: each full but the last
    lengths = np.concatenate([pair_set(item).lengths for batch in batches for item in batch])
    assert len(passes.tokens) == len(packed_batches(lengths, BUDGET)) < passes_alone
    assert [s.labels for b in held for s in b] == [s.labels for b in alone for s in b]
    np.testing.assert_allclose(scores_of(held), scores_of(alone), rtol=0, atol=1e-5)


def test_a_held_pass_runs_with_the_next_batch_or_at_flush(engine: NliEngine) -> None:
    first, second = micro_batches(engine, count=2, size=9)
    passes = PassSizes(engine)
    engine.forward = passes
    whole = len(passes.tokens), engine.classify(first)
    passes_of_first = len(passes.tokens) - whole[0]
    passes.tokens.clear()
    pending = engine.classify_async(first, hold_tail=True)
    assert len(passes.tokens) == passes_of_first - 1, "the last pass was not held back"
    engine.flush()
    assert len(passes.tokens) == passes_of_first
    engine.flush()  # nothing held: nothing runs
    assert len(passes.tokens) == passes_of_first
    np.testing.assert_allclose(
        [s.scores for s in pending.result()], [s.scores for s in whole[1]], rtol=0, atol=1e-5
    )
    later = engine.classify_async(second, hold_tail=False)
    assert len(later.result()) == len(second)


def test_a_failing_pass_fails_the_batch_whose_pass_it_carried(engine: NliEngine) -> None:
    first, second = micro_batches(engine, count=2, size=9)
    pending = engine.classify_async(first, hold_tail=True)

    def broken(batch: TokenBatch) -> torch.Tensor:
        raise RuntimeError("kernel failed")

    engine.forward = broken
    with pytest.raises(RuntimeError, match="kernel failed"):
        engine.classify_async(second)
    with pytest.raises(RuntimeError, match="kernel failed"):
        pending.result()


def test_a_held_batch_is_ready_once_the_pass_with_its_last_pairs_is_queued(
    engine: NliEngine,
) -> None:
    """Not after the whole next launch: the service writes a batch (and hands over the
    next one) while the device still runs the next batch's other passes."""
    first, second = micro_batches(engine, count=2, size=24)
    pending = engine.classify_async(first, hold_tail=True)
    inner = engine.forward
    ready_during_pass: list[bool] = []

    def forward(batch: TokenBatch) -> torch.Tensor:
        if len(ready_during_pass) == 1:  # the next launch's second pass
            came = threading.Event()

            def wait_for_result() -> None:
                pending.result()
                came.set()

            threading.Thread(target=wait_for_result, daemon=True).start()
            ready_during_pass.append(came.wait(10))
        else:
            ready_during_pass.append(False)
        return inner(batch)

    engine.forward = forward
    later = engine.classify_async(second)
    assert len(ready_during_pass) >= 3, "the next launch had too few passes to tell"
    assert ready_during_pass[1], "the held batch waited for the whole next launch"
    assert len(later.result()) == len(second)
