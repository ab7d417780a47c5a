"""The NLI engine on a CUDA device, fp16, against the ModelScope golden outputs.

Deselected by default (``-m "not gpu"`` in pyproject.toml): CI has no GPU. Run on a GPU
machine with ``pytest -m gpu tests/test_engine_gpu.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine.nli import NliEngine
from stream_classifier.messages import parse_labels

pytestmark = pytest.mark.gpu

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden.json").read_text("utf-8"))
FP16_TOLERANCE = 2e-3  # ENGINE.md's fidelity bar for fp16


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> NliEngine:
    assert torch.cuda.is_available(), "these tests need a CUDA device"
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cuda"), 65536)


def prepared(engine: NliEngine, case: dict[str, Any]) -> Any:
    labels = case["labels"]
    labels = parse_labels(labels) if isinstance(labels, str) else labels
    return engine.prepare(case["text"], labels, case["hypothesis_template"], case["multi_label"])


def test_fp16_on_cuda_matches_the_reference_within_the_fp16_bar(engine: NliEngine) -> None:
    results = engine.classify([prepared(engine, case) for case in GOLDEN])
    for case, result in zip(GOLDEN, results, strict=True):
        expected = dict(zip(case["expected"]["labels"], case["expected"]["scores"], strict=True))
        ours = dict(zip(result.labels, result.scores, strict=True))
        assert ours == pytest.approx(expected, abs=FP16_TOLERANCE), case["name"]
        assert list(result.scores) == sorted(result.scores, reverse=True)


def test_batched_equals_one_message_at_a_time_on_cuda(engine: NliEngine) -> None:
    together = engine.classify([prepared(engine, case) for case in GOLDEN])
    for case, batched in zip(GOLDEN, together, strict=True):
        (alone,) = engine.classify([prepared(engine, case)])
        assert dict(zip(alone.labels, alone.scores, strict=True)) == pytest.approx(
            dict(zip(batched.labels, batched.scores, strict=True)), abs=FP16_TOLERANCE
        )
