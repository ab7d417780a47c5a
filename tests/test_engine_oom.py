"""Out of memory: a failing batch is split in two and retried; nothing is lost or changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine.base import EngineError
from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.nli import Forward, NliEngine

TEXTS = ["世界那么大，我想去看看", "今天的比赛非常精彩", "新款手机发布了", "我们去旅游吧"] * 8
LABELS = ["家居", "旅游", "科技", "军事", "游戏"]


class FailAbove:
    """Wraps the model call: raises CUDA out-of-memory for batches above ``limit`` rows."""

    def __init__(self, forward: Forward, limit: int) -> None:
        self.forward = forward
        self.limit = limit
        self.rows_seen: list[int] = []

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        self.rows_seen.append(batch.rows)
        if batch.rows > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.forward(batch)


@pytest.fixture(params=["padded", "packed"])
def engine(request: pytest.FixtureRequest, tiny_model: Path) -> NliEngine:
    config = EngineConfig(model=str(tiny_model), device="cpu")
    return NliEngine.load(config, max_batch_tokens=8192, backend=request.param)


def test_split_batches_score_every_event_identically(engine: NliEngine) -> None:
    prepared = [engine.prepare(text, LABELS, "{}", False) for text in TEXTS]
    expected = engine.classify(prepared)
    splits: list[int] = []
    engine.on_out_of_memory = splits.append
    fault = FailAbove(engine.forward, limit=7)
    engine.forward = fault
    got = engine.classify(prepared)
    assert len(got) == len(TEXTS)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.labels == theirs.labels
        np.testing.assert_allclose(ours.scores, theirs.scores, rtol=0, atol=1e-6)
    assert splits, "no batch was split"
    assert all(rows > 7 for rows in splits)
    assert max(fault.rows_seen) == len(TEXTS) * len(LABELS)  # first try: one whole batch
    scored = [rows for rows in fault.rows_seen if rows <= 7]
    assert sum(scored) == len(TEXTS) * len(LABELS)  # every pair ran exactly once


def test_a_single_pair_that_does_not_fit_is_an_engine_error(engine: NliEngine) -> None:
    prepared = [engine.prepare(TEXTS[0], LABELS[:1], "{}", False)]
    engine.forward = FailAbove(engine.forward, limit=0)
    with pytest.raises(EngineError, match="single sentence pair"):
        engine.classify(prepared)


def test_worst_case_input_respects_the_token_budget(engine: NliEngine) -> None:
    """max_labels pairs of 512 tokens: no batch holds more tokens than the budget."""
    fault = FailAbove(engine.forward, limit=10**9)
    engine.forward = fault
    widths: list[int] = []

    def spy(batch: TokenBatch) -> torch.Tensor:
        widths.append(batch.rows * 512 if engine.backend.endswith("padded-sdpa") else batch.tokens)
        return fault(batch)

    engine.forward = spy
    labels = [f"标签{i}" for i in range(10)]
    prepared = [engine.prepare("中" * 2000, labels, "{}", False) for _ in range(4)]
    assert engine.classify(prepared)
    assert max(widths) <= engine.max_batch_tokens
