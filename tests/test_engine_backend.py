"""Which forward pass the NLI engine runs, and the fallback where flash attention fails.

A GPU without PyTorch's flash kernels (a T4 or V100, sm_75/sm_70, or a build without them)
must get padded SDPA, not a crash at warm-up. No GPU here: the tests pretend the device has
flash attention, so the engine takes the packed flash path on the CPU, where that kernel
really does not exist (or is replaced by one that fails the way a T4's does).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from ranking import assert_same_ranking
from test_engine_nli import GOLDEN, prepare

from stream_classifier.config import EngineConfig
from stream_classifier.engine import packed
from stream_classifier.engine.nli import NliEngine


class FlashCalls:
    """Stands in for ``packed.flash_varlen``; counts calls, then fails or delegates."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        result: torch.Tensor = self.inner(*args)
        return result


def no_kernel_image(*args: Any) -> torch.Tensor:
    """What the flash call raises on a GPU the kernels were not built for."""
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_queries: torch.Tensor,
    cu_keys: torch.Tensor,
    max_queries: int,
    max_keys: int,
    scale: float,
) -> torch.Tensor:
    """The flash kernel's contract, one sequence at a time (``[tokens, heads, dim]``).

    Rows of no sequence (and of empty ones) stay NaN, so a padding row that reached a real
    one would show.
    """
    assert max_queries >= int((cu_queries[1:] - cu_queries[:-1]).max()), "grid too small"
    assert max_keys >= int((cu_keys[1:] - cu_keys[:-1]).max()), "grid too small"
    out = torch.full_like(query, float("nan"))
    for index in range(cu_queries.shape[0] - 1):
        q0, q1 = int(cu_queries[index]), int(cu_queries[index + 1])
        k0, k1 = int(cu_keys[index]), int(cu_keys[index + 1])
        if q0 == q1 or k0 == k1:
            continue
        attended = torch.nn.functional.scaled_dot_product_attention(
            query[q0:q1].transpose(0, 1),
            key[k0:k1].transpose(0, 1),
            value[k0:k1].transpose(0, 1),
            scale=scale,
        )
        out[q0:q1] = attended.transpose(0, 1)
    return out


def pretend_flash_capable(monkeypatch: pytest.MonkeyPatch, kernel: Any) -> FlashCalls:
    calls = FlashCalls(kernel)
    monkeypatch.setattr(packed, "flash_unavailable", lambda device, dtype: None, raising=False)
    monkeypatch.setattr(packed, "flash_varlen", calls, raising=False)
    return calls


def load(tiny_model: Path, backend: Any) -> NliEngine:
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), 4096, backend=backend)


def assert_scores_like_the_reference(engine: NliEngine) -> None:
    results = engine.classify([prepare(engine, case) for case in GOLDEN])
    for case, result in zip(GOLDEN, results, strict=True):
        assert_same_ranking(result, case["expected"])


@pytest.mark.parametrize(
    ("backend", "fallback"), [("auto", "cpu-padded-sdpa"), ("packed", "cpu-packed-sdpa")]
)
@pytest.mark.parametrize("kernel", ["missing", "no_kernel_image"])
def test_flash_failing_its_probe_at_load_falls_back_to_sdpa(
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    backend: str,
    fallback: str,
    kernel: str,
) -> None:
    # "missing": the real aten flash op, which has no CPU kernel at all
    real = getattr(packed, "flash_varlen", None) if kernel == "missing" else no_kernel_image
    calls = pretend_flash_capable(monkeypatch, real)
    with caplog.at_level(logging.WARNING, logger="stream_classifier.engine.nli"):
        engine = load(tiny_model, backend)
    assert calls.calls >= 1, "the flash path was never tried"
    assert engine.backend == fallback
    assert any("flash attention failed its probe" in r.getMessage() for r in caplog.records)
    tried = calls.calls
    engine.warmup()
    assert_scores_like_the_reference(engine)
    assert calls.calls == tried, "the fallback still calls flash attention"


def test_flash_passing_its_probe_is_the_packed_flash_backend(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = pretend_flash_capable(monkeypatch, varlen_attention)
    engine = load(tiny_model, "auto")
    assert engine.backend == "cpu-packed-flash-graphs"
    tried = calls.calls
    assert_scores_like_the_reference(engine)
    assert calls.calls > tried
    config = EngineConfig(model=str(tiny_model), device="cpu", cuda_graphs=False)
    assert NliEngine.load(config, 4096).backend == "cpu-packed-flash"


def test_without_flash_the_default_on_cpu_is_padded_sdpa(tiny_model: Path) -> None:
    assert load(tiny_model, "auto").backend == "cpu-padded-sdpa"
    assert load(tiny_model, "padded").backend == "cpu-padded-sdpa"
    assert load(tiny_model, "packed").backend == "cpu-packed-sdpa"


@pytest.mark.parametrize(
    ("capability", "dtype", "has_kernels", "usable"),
    [
        ((7, 5), torch.float16, True, False),  # T4
        ((7, 0), torch.float16, True, False),  # V100
        ((8, 0), torch.float16, True, True),  # A100
        ((9, 0), torch.bfloat16, True, True),  # H100
        ((9, 0), torch.float32, True, False),  # fp32: no flash kernel
        ((9, 0), torch.float16, False, False),  # a build without flash attention
    ],
)
def test_flash_is_chosen_by_capability_dtype_and_build(
    monkeypatch: pytest.MonkeyPatch,
    capability: tuple[int, int],
    dtype: torch.dtype,
    has_kernels: bool,
    usable: bool,
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: has_kernels)
    reason = packed.flash_unavailable(torch.device("cuda", 0), dtype)
    assert (reason is None) == usable, reason
    assert packed.flash_unavailable(torch.device("cpu"), torch.float16) is not None


def test_the_engine_section_can_turn_layer_compiling_off(tiny_model: Path) -> None:
    """``compile_layers: false`` reaches the engine (a fast start, no torch.compile)."""
    config = EngineConfig(model=str(tiny_model), device="cpu")
    assert NliEngine.load(config, 4096).compile_layers is True
    off = config.model_copy(update={"compile_layers": False})
    engine = NliEngine.load(off, 4096, backend="packed")
    assert engine.compile_layers is False
    assert_scores_like_the_reference(engine)
