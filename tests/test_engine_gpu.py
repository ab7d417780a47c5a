"""The NLI engine on a CUDA device, fp16, against the ModelScope golden outputs.

Deselected by default (``-m "not gpu"`` in pyproject.toml): CI has no GPU. Run on a GPU
machine with ``pytest -m gpu tests/test_engine_gpu.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine import packed
from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.graphs import GraphedForward
from stream_classifier.engine.nli import NliEngine
from stream_classifier.messages import parse_labels

pytestmark = pytest.mark.gpu

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden.json").read_text("utf-8"))
FP16_TOLERANCE = 2e-3  # the fp16 fidelity budget (docs/PERFORMANCE.md)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> NliEngine:
    assert torch.cuda.is_available(), "these tests need a CUDA device"
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cuda"), 65536)


def prepared(engine: NliEngine, case: dict[str, Any]) -> Any:
    labels = case["labels"]
    labels = parse_labels(labels) if isinstance(labels, str) else labels
    return engine.prepare(case["text"], labels, case["hypothesis_template"], case["multi_label"])


def assert_matches_the_reference(engine: NliEngine) -> None:
    """Every golden case scored within the fp16 budget of the fp32 reference."""
    results = engine.classify([prepared(engine, case) for case in GOLDEN])
    for case, result in zip(GOLDEN, results, strict=True):
        expected = dict(zip(case["expected"]["labels"], case["expected"]["scores"], strict=True))
        ours = dict(zip(result.labels, result.scores, strict=True))
        assert ours == pytest.approx(expected, abs=FP16_TOLERANCE), case["name"]


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


def test_the_backend_follows_the_gpu_capability(engine: NliEngine) -> None:
    """Ampere and newer run packed flash attention; older GPUs (T4, V100) packed
    memory-efficient attention, both replayed from CUDA graphs."""
    major, _ = torch.cuda.get_device_capability()
    expected = "packed-flash-graphs" if major >= 8 else "packed-efficient-graphs"
    assert engine.backend == expected


def random_pairs(seed: int, rows: int) -> TokenBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 513, size=rows).astype(np.int32)
    a_lengths = np.maximum(1, lengths // 2 - 2).astype(np.int32)
    return TokenBatch(
        rng.integers(110, 500, size=int(lengths.sum())).astype(np.int32), lengths, a_lengths
    )


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
def test_passes_replayed_from_cuda_graphs_equal_the_eager_passes(
    tiny_model: Path, kernel: Literal["flash", "efficient"]
) -> None:
    """Many passes of many shapes (the last of each call short of the budget), twice,
    with either packed attention kernel."""
    config = EngineConfig(model=str(tiny_model), device="cuda")
    graphed = NliEngine.load(config, 16384, backend=kernel)
    eager = NliEngine.load(config.model_copy(update={"cuda_graphs": False}), 16384, backend=kernel)
    assert (graphed.backend, eager.backend) == (f"packed-{kernel}-graphs", f"packed-{kernel}")
    graphed.warmup()
    eager.warmup()  # the same layers (compiled ones, where they compile) in both
    forward = graphed.forward
    assert isinstance(forward, GraphedForward)
    for _ in range(2):  # a shape is captured on its second pass
        for seed, rows in [(0, 700), (1, 333), (2, 41)]:
            batch = random_pairs(seed, rows)
            torch.testing.assert_close(
                graphed.logits(batch), eager.logits(batch), rtol=0, atol=FP16_TOLERANCE
            )
    # the full passes' shape (the warm-up's), and each call's last, short pass
    assert forward.captured >= 3 and forward.failed == 0


def no_kernel_image(*args: Any) -> torch.Tensor:
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


@pytest.mark.parametrize("how", ["asked", "packed_kernels_fail"])
def test_padded_fp16_sdpa_matches_the_reference_within_the_fp16_bar(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """What a GPU without either packed kernel runs: asked for, or after the probes failed."""
    config = EngineConfig(model=str(tiny_model), device="cuda")
    if how == "packed_kernels_fail":
        monkeypatch.setattr(packed, "flash_varlen", no_kernel_image)
        monkeypatch.setattr(packed, "efficient_varlen", no_kernel_image)
        padded = NliEngine.load(config, 65536)
    else:
        padded = NliEngine.load(config, 65536, backend="padded")
    assert padded.backend == "padded-sdpa"
    assert next(padded.model.parameters()).dtype == torch.float16
    padded.warmup()
    assert_matches_the_reference(padded)


def test_held_back_passes_on_cuda_score_like_batches_alone(tiny_model: Path) -> None:
    """Micro-batches queued two deep, each holding its last pass for the next one (graphs,
    the engine's stream, copies back started mid-launch), against each batch alone."""
    engine = NliEngine.load(EngineConfig(model=str(tiny_model), device="cuda"), 4096)
    engine.warmup()
    cases = [prepared(engine, case) for case in GOLDEN]
    batches = [cases * (3 + k) for k in range(5)]  # several passes each at 4,096 tokens
    alone = [engine.classify(batch) for batch in batches]
    pending = [engine.classify_async(batch, hold_tail=k > 0) for k, batch in enumerate(batches)]
    engine.flush()
    for queued, expected in zip(pending, alone, strict=True):
        got = queued.result()
        assert len(got) == len(expected)
        for ours, theirs in zip(got, expected, strict=True):
            assert dict(zip(ours.labels, ours.scores, strict=True)) == pytest.approx(
                dict(zip(theirs.labels, theirs.scores, strict=True)), abs=FP16_TOLERANCE
            )


def test_layers_left_uncompiled_match_the_reference_within_the_fp16_bar(
    tiny_model: Path,
) -> None:
    """``compile_layers: false`` (a start without torch.compile): the same backend, its
    scores within the fp16 budget of the fp32 reference, like the compiled layers'."""
    config = EngineConfig(model=str(tiny_model), device="cuda", compile_layers=False)
    eager = NliEngine.load(config, 65536)
    assert eager.backend.startswith("packed-flash")
    eager.warmup()
    assert_matches_the_reference(eager)


def test_layers_compiled_on_a_helper_thread_are_taken_and_score_alike(tiny_model: Path) -> None:
    """The service's start (``compile_in_background``): eager passes while the layers
    compile on a helper thread, then the compiled layers and freshly captured graphs, each
    within the fp16 budget of the reference."""
    engine = NliEngine.load(EngineConfig(model=str(tiny_model), device="cuda"), 65536)
    engine.warmup_eagerly()
    forward = engine.forward
    assert isinstance(forward, GraphedForward)
    version = forward.packed.version
    assert_matches_the_reference(engine)  # eager, before the compile starts
    compiling = engine.compile_in_background()
    assert compiling is not None
    assert_matches_the_reference(engine)  # while it compiles (or just after)
    compiling.join()
    captured = forward.captured
    for _ in range(2):  # the first pass takes the compiled layer; a shape captures on its second
        assert_matches_the_reference(engine)
    assert forward.packed.version > version and forward.failed == 0
    assert forward.captured > captured  # graphs of the compiled layers
