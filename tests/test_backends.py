"""Which backend the NLI engine runs, and why: flash, memory-efficient, padded.

The engine tries the packed kernels fastest first (variable-length flash attention, then
variable-length memory-efficient attention), each only where the device should have it and
after a probe call at load, and falls back to padded batches. No GPU here: the kernels are
stood in for (``varlen_attention`` computes each sequence on its own and leaves every other
row NaN, so a padding row that reached a real one would show; ``no_kernel_image`` fails the
way a GPU without the kernel does), and "the device should have it" is patched.

The tests marked ``gpu`` run the real kernels (deselected by default, ``-m "not gpu"`` in
pyproject.toml; on a GPU machine: ``pytest -m gpu tests/test_backends.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_engine_backend import (
    FlashCalls,
    assert_scores_like_the_reference,
    no_kernel_image,
    varlen_attention,
)
from test_engine_nli import GOLDEN, prepare

from stream_classifier.config import EngineConfig
from stream_classifier.engine import packed
from stream_classifier.engine.base import EngineError, Scores
from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.graphs import GraphedForward
from stream_classifier.engine.nli import NliEngine
from stream_classifier.tools import bench

NLI_LOG = "stream_classifier.engine.nli"
T4_FLASH = "the GPU has compute capability 7.5, flash attention needs 8.0 or newer"
OLD_GPU = "the GPU has compute capability 3.7, memory-efficient attention needs 5.0 or newer"
FP16_TOLERANCE = 2e-3  # the fp16 fidelity budget (docs/PERFORMANCE.md)


class Kernels:
    """The two packed kernels as a test sets them up: each present or not (``None`` or the
    reason it is missing) and, where present, what its calls do."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.flash = FlashCalls(varlen_attention)
        self.efficient = FlashCalls(varlen_attention)
        monkeypatch.setattr(packed, "flash_varlen", self.flash)
        monkeypatch.setattr(packed, "efficient_varlen", self.efficient)

    def set(self, kernel: str, missing: str | None, works: bool = True) -> None:
        self.monkeypatch.setattr(packed, f"{kernel}_unavailable", lambda device, dtype: missing)
        getattr(self, kernel).inner = varlen_attention if works else no_kernel_image


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> Kernels:
    return Kernels(monkeypatch)


def load(tiny_model: Path, backend: Any = "auto", graphs: bool = True) -> NliEngine:
    config = EngineConfig(model=str(tiny_model), device="cpu", cuda_graphs=graphs)
    return NliEngine.load(config, 4096, backend=backend)


# flash: missing (a T4), or present and working/failing; efficient likewise.
CASES = [
    # (flash missing, flash works, efficient missing, efficient works, backend asked, chosen)
    (None, True, None, True, "auto", "cpu-packed-flash-graphs"),
    (T4_FLASH, True, None, True, "auto", "cpu-packed-efficient-graphs"),
    (None, False, None, True, "auto", "cpu-packed-efficient-graphs"),
    (T4_FLASH, True, None, False, "auto", "cpu-padded-sdpa"),
    (T4_FLASH, True, OLD_GPU, True, "auto", "cpu-padded-sdpa"),
    (None, False, None, False, "auto", "cpu-padded-sdpa"),
    (None, False, None, False, "packed", "cpu-packed-sdpa"),
    (T4_FLASH, True, None, True, "packed", "cpu-packed-efficient-graphs"),
    (None, True, None, True, "efficient", "cpu-packed-efficient-graphs"),
    (None, True, None, True, "flash", "cpu-packed-flash-graphs"),
    (None, True, None, True, "padded", "cpu-padded-sdpa"),
]


@pytest.mark.parametrize(
    ("flash_missing", "flash_works", "efficient_missing", "efficient_works", "asked", "chosen"),
    CASES,
)
def test_the_fastest_kernel_that_is_there_and_passes_its_probe_is_chosen(
    tiny_model: Path,
    kernels: Kernels,
    caplog: pytest.LogCaptureFixture,
    flash_missing: str | None,
    flash_works: bool,
    efficient_missing: str | None,
    efficient_works: bool,
    asked: str,
    chosen: str,
) -> None:
    kernels.set("flash", flash_missing, flash_works)
    kernels.set("efficient", efficient_missing, efficient_works)
    with caplog.at_level(logging.INFO, logger=NLI_LOG):
        engine = load(tiny_model, asked)
    assert engine.backend == chosen

    # why each faster kernel was passed over: in the engine and in the start-up log line
    expected: list[str] = []
    tried: tuple[str, ...] = ("flash", "efficient") if asked in ("auto", "packed") else (asked,)
    if asked == "padded":
        tried = ()
    for kernel, missing, works in (
        ("flash", flash_missing, flash_works),
        ("efficient", efficient_missing, efficient_works),
    ):
        if kernel not in tried or chosen.endswith(f"packed-{kernel}-graphs"):
            break
        name = "flash attention" if kernel == "flash" else "memory-efficient attention"
        if missing is not None:
            expected.append(f"no {name}: {missing}")
        elif not works:
            expected.append(f"{name} failed its probe at load (RuntimeError: CUDA error")
    assert len(engine.backend_notes) == len(expected), engine.backend_notes
    for note, start in zip(engine.backend_notes, expected, strict=True):
        assert note.startswith(start), (note, start)
    (startup,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NLI model")]
    assert f"backend {chosen}" in startup
    for note in engine.backend_notes:
        assert note in startup
    failed_probes = [
        r
        for r in caplog.records
        if "failed its probe" in r.getMessage() and not r.getMessage().startswith("NLI model")
    ]
    assert all(r.levelno == logging.WARNING for r in failed_probes)
    assert len(failed_probes) == sum("failed its probe" in n for n in engine.backend_notes)

    # the kernel in use is the only one called from now on, and scores like the reference
    calls = (kernels.flash.calls, kernels.efficient.calls)
    assert_scores_like_the_reference(engine)
    assert_scores_like_the_reference(engine)  # the graphed backends: from a fixed shape
    flash_calls = kernels.flash.calls - calls[0]
    efficient_calls = kernels.efficient.calls - calls[1]
    assert (flash_calls > 0) == ("packed-flash" in chosen)
    assert (efficient_calls > 0) == ("packed-efficient" in chosen)


def test_a_forced_efficient_backend_never_tries_flash(tiny_model: Path, kernels: Kernels) -> None:
    kernels.set("flash", None)
    kernels.set("efficient", None)
    engine = load(tiny_model, "efficient")
    assert engine.backend == "cpu-packed-efficient-graphs"
    assert kernels.flash.calls == 0 and kernels.efficient.calls > 0
    assert engine.backend_notes == []


@pytest.mark.parametrize(
    ("asked", "missing", "works", "reason"),
    [
        ("flash", T4_FLASH, True, f"no flash attention: {T4_FLASH}"),
        ("flash", None, False, "flash attention failed its probe at load (RuntimeError"),
        ("efficient", OLD_GPU, True, f"no memory-efficient attention: {OLD_GPU}"),
        ("efficient", None, False, "memory-efficient attention failed its probe at load"),
    ],
)
def test_a_forced_kernel_that_cannot_run_is_an_error_naming_why(
    tiny_model: Path, kernels: Kernels, asked: str, missing: str | None, works: bool, reason: str
) -> None:
    """A benchmark that asks for one kernel must not measure another."""
    kernels.set("flash", None)
    kernels.set("efficient", None)
    kernels.set(asked, missing, works)
    with pytest.raises(EngineError) as raised:
        load(tiny_model, asked)
    assert f"backend '{asked}' asked for, but {reason}" in str(raised.value)


def test_without_cuda_graphs_the_efficient_backend_runs_eagerly(
    tiny_model: Path, kernels: Kernels
) -> None:
    kernels.set("flash", T4_FLASH)
    kernels.set("efficient", None)
    engine = load(tiny_model, "auto", graphs=False)
    assert engine.backend == "cpu-packed-efficient"
    assert isinstance(engine.forward, packed.PackedBert)
    assert engine.forward.attention == "efficient"
    assert_scores_like_the_reference(engine)


def test_the_efficient_backend_replays_fixed_shapes_whose_padding_never_leaks(
    tiny_model: Path, kernels: Kernels
) -> None:
    """CUDA graphs take the efficient kernel like flash: fixed token and sequence counts,
    empty sequences and rows of no sequence (NaN here) around the real ones."""
    kernels.set("flash", T4_FLASH)
    kernels.set("efficient", None)
    engine = load(tiny_model)
    graphed = engine.forward
    assert isinstance(graphed, GraphedForward) and graphed.packed.attention == "efficient"
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 200, size=30).astype(np.int32)
    batch = TokenBatch(
        rng.integers(110, 500, size=int(lengths.sum())).astype(np.int32),
        lengths,
        np.maximum(1, lengths // 2 - 2).astype(np.int32),
    )
    with torch.inference_mode():
        eager = graphed.packed(batch)
        graphed(batch)
        fixed = graphed(batch)
    assert graphed.captured == 1
    assert bool(torch.isfinite(fixed).all())
    torch.testing.assert_close(fixed, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("capability", "dtype", "first"),
    [
        ((9, 0), torch.float16, "flash"),  # H100, H200
        ((8, 0), torch.bfloat16, "flash"),  # A100
        ((7, 5), torch.float16, "efficient"),  # T4
        ((7, 0), torch.float16, "efficient"),  # V100
        ((6, 0), torch.float16, "efficient"),  # P100
        ((5, 0), torch.float16, "efficient"),  # Maxwell
        ((3, 7), torch.float16, None),  # K80: padded
        ((7, 5), torch.bfloat16, None),  # bf16 needs sm_80 for either kernel
        ((9, 0), torch.float32, None),  # fp32 on a GPU: padded
    ],
)
def test_the_kernel_follows_capability_and_dtype(
    monkeypatch: pytest.MonkeyPatch,
    capability: tuple[int, int],
    dtype: torch.dtype,
    first: str | None,
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    cuda = torch.device("cuda", 0)
    usable = [k for k in packed.VARLEN_KERNELS if packed.unavailable(k, cuda, dtype) is None]
    assert (usable[0] if usable else None) == first
    for kernel in packed.VARLEN_KERNELS:
        reason = packed.unavailable(kernel, cuda, dtype)
        assert reason is None or (kernel in reason or "flash" in reason or "memory" in reason)
    assert packed.unavailable("sdpa", cuda, dtype) is None
    assert packed.efficient_unavailable(torch.device("cpu"), torch.float16) == (
        "the device is cpu, not CUDA"
    )


def test_efficient_varlen_hands_the_kernel_one_batch_of_packed_sequences(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel wants ``[1, T, H, D]`` with ``cu_seqlens``; the engine's layers hold
    ``[T, H, D]`` views of the fused QKV product (not contiguous)."""
    seen: dict[str, Any] = {}

    def kernel(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: Any,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        dropout: float,
        mask_type: int,
        logsumexp: bool,
        scale: float,
    ) -> tuple[torch.Tensor, ...]:
        seen.update(shape=tuple(query.shape), bias=bias, dropout=dropout, mask=mask_type)
        out = varlen_attention(query[0], key[0], value[0], cu_q, cu_k, max_q, max_k, scale)
        return out[None], torch.empty(0)

    monkeypatch.setattr(torch.ops.aten, "_efficient_attention_forward", kernel)
    qkv = torch.randn(10, 3, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = packed.efficient_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 6, 6, 0.25)
    assert seen == {"shape": (1, 10, 2, 8), "bias": None, "dropout": 0.0, "mask": 0}
    assert out.shape == (10, 2, 8)
    expected = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 6, 6, 0.25)
    torch.testing.assert_close(out, expected)


def test_the_padded_fallback_pads_length_sorted_batches(tiny_model: Path) -> None:
    """Where no packed kernel works, each padded batch holds pairs of similar lengths:
    the pairs are sorted longest first before they are cut and padded."""
    engine = load(tiny_model, "padded")
    seen: list[np.ndarray] = []
    inner = engine.forward

    def spy(batch: TokenBatch) -> torch.Tensor:
        seen.append(batch.lengths.copy())
        return inner(batch)

    engine.forward = spy
    engine.max_batch_tokens = engine.pass_tokens = 2048
    rng = np.random.default_rng(0)
    cases = [dict(GOLDEN[i % len(GOLDEN)]) for i in range(60)]
    for case in cases:
        case["text"] = case["text"] * int(rng.integers(1, 6))
    engine.classify([prepare(engine, case) for case in cases])
    assert len(seen) > 1, "everything fitted one batch: nothing to check"
    widths = np.concatenate(seen)
    widths = -(-widths // 8) * 8
    assert np.all(np.diff(widths) <= 0), "pairs were padded in input order"


def test_on_a_cpu_no_padded_pass_pads_a_pair_by_more_than_a_tenth_of_its_width(
    tiny_model: Path,
) -> None:
    """A CPU computes padding as it computes tokens: a small batch of mixed lengths is cut
    into passes of similar widths, not only by the token budget, and scores as before."""
    engine = load(tiny_model, "padded")
    seen: list[np.ndarray] = []
    inner = engine.forward

    def spy(batch: TokenBatch) -> torch.Tensor:
        seen.append(-(-batch.lengths // 8) * 8)
        return inner(batch)

    rng = np.random.default_rng(1)
    cases = [dict(GOLDEN[i % len(GOLDEN)]) for i in range(24)]
    for case in cases:
        case["text"] = case["text"] * int(rng.integers(1, 6))
    requests = [prepare(engine, case) for case in cases]
    alone = [engine.classify([request])[0] for request in requests]
    engine.forward = spy
    together = engine.classify(requests)
    assert engine.device.type == "cpu"
    assert 1 < len(seen) < sum(len(widths) for widths in seen), "one pass, or one pair each"
    for widths in seen:
        assert widths.min() >= 0.9 * widths.max(), (
            f"one pass padded {widths.min()} to {widths.max()}"
        )
    for mine, reference in zip(together, alone, strict=True):
        assert mine.labels == reference.labels
        np.testing.assert_allclose(mine.scores, reference.scores, atol=1e-5)


# -- the baseline's sample size (bench) ------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "asked", "timed", "quote"),
    [
        (16000, None, 8000, True),
        (400, None, 400, True),  # as many as ours
        (16000, 500, 500, False),
        (16000, 20000, 16000, True),
    ],
)
def test_the_hf_baseline_is_timed_on_8000_messages_or_all_of_ours(
    messages: int, asked: int | None, timed: int, quote: bool
) -> None:
    options = bench.BenchOptions(messages=messages, baseline_messages=asked)
    assert bench.baseline_messages(options) == timed
    assert bench.quotable(timed, messages) is quote


def test_the_table_gives_each_ratio_with_its_sample_and_marks_small_ones() -> None:
    def row(method: str, messages: int, sample: int | None) -> dict[str, Any]:
        extra = {} if sample is None else {"baseline_messages": float(sample)}
        result = bench.Result(method, 4, messages, 1.0, 4 * messages, 1e12, None, extra=extra)
        result.speedup = 18.2
        from dataclasses import asdict

        return asdict(result.finish(1e15))

    report = {
        "environment": {"device": "test"},
        "peak_tflops": 1000.0,
        "options": {"shape": "large"},
        "results": [row("HF", 500, None), row("ours", 16000, 500), row("ours", 8000, 8000)],
    }
    table = bench.format_table(report)
    assert "18.2x (HF: 500 msgs) *" in table
    assert "18.2x (HF: 8,000 msgs) |" in table
    assert table.splitlines()[-1].startswith("* the HF pipeline ran on 500 messages")


# -- on a GPU --------------------------------------------------------------------------------


def cuda_engine(tiny_model: Path, backend: Any, budget: int = 16384) -> NliEngine:
    assert torch.cuda.is_available(), "these tests need a CUDA device"
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cuda"), budget, backend)


def random_pairs(seed: int, rows: int) -> TokenBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 513, size=rows).astype(np.int32)
    a_lengths = np.maximum(1, lengths // 2 - 2).astype(np.int32)
    return TokenBatch(
        rng.integers(110, 500, size=int(lengths.sum())).astype(np.int32), lengths, a_lengths
    )


@pytest.mark.gpu
def test_efficient_on_cuda_matches_the_reference_within_the_fp16_bar(tiny_model: Path) -> None:
    engine = cuda_engine(tiny_model, "efficient", 65536)
    assert engine.backend == "packed-efficient-graphs"
    engine.warmup()
    for _ in range(2):  # eager, then replayed
        results = engine.classify([prepare(engine, case) for case in GOLDEN])
        for case, result in zip(GOLDEN, results, strict=True):
            expected = dict(
                zip(case["expected"]["labels"], case["expected"]["scores"], strict=True)
            )
            ours = dict(zip(result.labels, result.scores, strict=True))
            assert ours == pytest.approx(expected, abs=FP16_TOLERANCE), case["name"]


def as_dict(scores: Scores) -> dict[str, float]:
    return dict(zip(scores.labels, scores.scores, strict=True))


@pytest.mark.gpu
def test_the_backends_agree_on_cuda(tiny_model: Path) -> None:
    """Flash (where the GPU has it), memory-efficient and padded on the golden cases, many
    passes and pass shapes per call (a 4,096-token budget, micro-batches of 3 to 7 copies):
    each within the fp16 budget of the reference, so two of them within twice that of each
    other (two fp16 errors). The budget is defined on real scores (docs/PERFORMANCE.md):
    random token ids up to 512 long put even the padded fp16 backend past it."""
    major, _ = torch.cuda.get_device_capability()
    names = (["flash"] if major >= 8 else []) + ["efficient", "padded"]
    engines = {name: cuda_engine(tiny_model, name, 4096) for name in names}
    for engine in engines.values():
        engine.warmup()
    expected = [
        dict(zip(case["expected"]["labels"], case["expected"]["scores"], strict=True))
        for case in GOLDEN
    ]
    for copies in range(3, 8):
        got = {
            name: engine.classify([prepare(engine, case) for case in GOLDEN] * copies)
            for name, engine in engines.items()
        }
        for name, results in got.items():
            for index, result in enumerate(results):
                ours = as_dict(result)
                reference = expected[index % len(GOLDEN)]
                assert ours == pytest.approx(reference, abs=FP16_TOLERANCE), (name, index)
                for other in names:
                    theirs = as_dict(got[other][index])
                    assert ours == pytest.approx(theirs, abs=2 * FP16_TOLERANCE), (name, other)
    graphed = engines["efficient"].forward
    assert isinstance(graphed, GraphedForward)
    assert graphed.captured >= 2 and graphed.failed == 0, (graphed.captured, graphed.failed)


@pytest.mark.gpu
def test_without_flash_auto_takes_the_efficient_kernel_on_cuda(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a T4 or V100 gets: here the flash call is made to fail its probe."""
    monkeypatch.setattr(packed, "flash_varlen", no_kernel_image)
    engine = cuda_engine(tiny_model, "auto")
    major, _ = torch.cuda.get_device_capability()
    assert engine.backend == "packed-efficient-graphs"
    assert engine.backend_notes[0].startswith(
        "flash attention failed its probe" if major >= 8 else "no flash attention"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 64, 80])
def test_the_efficient_kernel_equals_attention_per_sequence_on_cuda(head_dim: int) -> None:
    """Packed sequences (an empty one among them, rows of no sequence after them) against
    SDPA on each sequence alone; and [CLS]-only queries as the last layer asks."""
    torch.manual_seed(0)
    lengths = [5, 0, 130, 1, 77, 512]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32).cuda()
    total = int(cu[-1]) + 24  # rows of no sequence
    qkv = torch.randn(total, 3, 16, head_dim, device="cuda", dtype=torch.float16)
    scale = head_dim**-0.5
    out = packed.efficient_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 512, 512, scale)
    expected = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 512, 512, scale)
    real = int(cu[-1])
    torch.testing.assert_close(out[:real], expected[:real], rtol=0, atol=2e-3, equal_nan=True)
    starts = cu[:-1].long().clamp(max=total - 1)
    cls_cu = torch.arange(len(lengths) + 1, dtype=torch.int32, device="cuda")
    cls = packed.efficient_varlen(qkv[starts, 0], qkv[:, 1], qkv[:, 2], cls_cu, cu, 1, 512, scale)
    for index, length in enumerate(lengths):
        if length:
            torch.testing.assert_close(
                cls[index], expected[int(cu[index])], rtol=0, atol=2e-3, msg=str(index)
            )
