"""The planned method (docs/PERFORMANCE.md), one step at a time, on the same events (large
shape, 4 labels).

    PYTHONUNBUFFERED=1 python benchmarks/gpu_steps.py --messages 8000 --json OUT.json

Each variant is our engine with one change; the table gives end-to-end msgs/s (prepare in
a thread + classify in 1024-message micro-batches, like ``bench``), the forward pass alone
on one 65,536-token batch, peak memory, and the largest score difference against the same
model in fp32 (first 200 messages).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stream_classifier.config import EngineConfig
from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.nli import NliEngine
from stream_classifier.engine.packed import LayerWeights, PackedBert
from stream_classifier.tools import bench


def rest_gelu_epilogue(
    self: PackedBert, hidden: torch.Tensor, context: torch.Tensor, w: LayerWeights
) -> torch.Tensor:
    attended = F.linear(context.reshape(hidden.shape), w.out_weight, w.out_bias)
    hidden = F.layer_norm(attended + hidden, hidden.shape[-1:], *w.norm1, self.eps)
    up = torch._addmm_activation(w.up_bias, hidden, w.up_weight.t(), use_gelu=True)
    down = F.linear(up, w.down_weight, w.down_bias)
    return F.layer_norm(down + hidden, hidden.shape[-1:], *w.norm2, self.eps)


def compile_rest(engine: NliEngine) -> None:
    forward = engine.forward
    assert isinstance(forward, PackedBert)
    forward._rest = torch.compile(forward._rest, dynamic=True)  # type: ignore[method-assign]


def compile_rest_autotune(engine: NliEngine) -> None:
    forward = engine.forward
    assert isinstance(forward, PackedBert)
    forward._rest = torch.compile(  # type: ignore[method-assign]
        forward._rest, dynamic=True, mode="max-autotune-no-cudagraphs"
    )


def compile_layer(engine: NliEngine) -> None:
    forward = engine.forward
    assert isinstance(forward, PackedBert)
    forward._layer = torch.compile(forward._layer, dynamic=True)  # type: ignore[method-assign]


def gelu_epilogue(engine: NliEngine) -> None:
    forward = engine.forward
    assert isinstance(forward, PackedBert)
    forward._rest = types.MethodType(rest_gelu_epilogue, forward)  # type: ignore[method-assign]


def eager(engine: NliEngine) -> None:
    forward = engine.forward
    assert isinstance(forward, PackedBert)
    forward.compile_layers = False  # nor on the warm-up's helper thread
    forward.layer, forward._compiled = forward._layer, False


def compile_layer_autotune(engine: NliEngine) -> None:
    forward = engine.forward
    assert isinstance(forward, PackedBert)
    forward.compile_layers = False  # the warm-up's default compile would replace it
    forward.layer = torch.compile(forward._layer, dynamic=True, mode="max-autotune-no-cudagraphs")
    forward._compiled = True


def epilogue_eager(engine: NliEngine) -> None:
    eager(engine)
    gelu_epilogue(engine)


VARIANTS: dict[str, tuple[str, int, Callable[[NliEngine], None] | None]] = {
    "padded (HF model, length-sorted, vectorised, one copy back)": ("padded", 65536, None),
    "packed eager (varlen flash, fused QKV, CLS-only last layer)": ("packed", 65536, eager),
    "packed + compile(layer, dynamic) [default]": ("packed", 65536, None),
    "packed eager + tanh-GELU cuBLASLt epilogue": ("packed", 65536, epilogue_eager),
    "packed + compile(layer), 131072-token batches": ("packed", 131072, None),
    "packed + compile(layer, max-autotune-no-cudagraphs)": (
        "packed",
        65536,
        compile_layer_autotune,
    ),
}


def forward_only(engine: NliEngine, events: list[bench.Event], shape: bench.Shape) -> float:
    """MFU of the model call alone on one 65,536-token batch of the workload."""
    prepared = [engine.prepare(e.text, e.labels, bench.TEMPLATE, False) for e in events]
    ids = np.concatenate([p.payload.ids for p in prepared])  # type: ignore[attr-defined]
    lengths = np.concatenate([p.payload.lengths for p in prepared])  # type: ignore[attr-defined]
    a_lengths = np.concatenate([p.payload.a_lengths for p in prepared])  # type: ignore[attr-defined]
    everything = TokenBatch(ids, lengths, a_lengths)
    from stream_classifier.engine.batches import packed_batches, padded_batches

    # "packed-flash" / "packed-sdpa" / "padded-sdpa" ("cpu-" first on a CPU)
    if engine.backend.removeprefix("cpu-").startswith("packed"):
        rows = packed_batches(lengths, engine.max_batch_tokens)[0]
    else:
        rows = padded_batches(lengths, engine.max_batch_tokens, 8)[len(lengths) // 3000]
    batch = everything.take(rows)
    flops = sum(shape.flops(int(n)) for n in batch.lengths)
    with torch.inference_mode():
        for _ in range(3):
            engine.forward(batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            engine.forward(batch)
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    return flops / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--only", default="")
    parser.add_argument("--json")
    args = parser.parse_args()
    shape = bench.SHAPES["large"]
    device = torch.device("cuda")
    peak = bench.matmul_peak(device)
    print(f"peak fp16 matmul 8192^3: {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench.build_model_dir(shape, Path(tmp) / "large", 0)
        events = bench.make_events(args.messages, args.labels, 4)
        ref = NliEngine.load(
            EngineConfig(model=str(model_dir), dtype="float32"), 65536, backend="padded"
        )
        sample = [ref.prepare(e.text, e.labels, bench.TEMPLATE, False) for e in events[:200]]
        reference = bench.as_dicts(ref.classify(sample))
        del ref, sample
        bench.reset_memory(device)
        lengths = None
        for name, (backend, budget, patch) in VARIANTS.items():
            if args.only and not any(word in name for word in args.only.split(",")):
                continue
            engine = NliEngine.load(EngineConfig(model=str(model_dir)), budget, backend=backend)  # type: ignore[arg-type]
            if patch is not None:
                patch(engine)
            start = time.perf_counter()
            try:
                engine.warmup()
            except Exception as exc:  # noqa: BLE001 - report and go on to the next variant
                print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
                continue
            torch.cuda.synchronize()
            warmup = time.perf_counter() - start
            if lengths is None:
                lengths = bench.pair_lengths(engine, events)
            flops = sum(shape.flops(n) for n in lengths)
            bench.reset_memory(device)
            scores, seconds = bench.run_ours(engine, events, 1024, False)
            memory = torch.cuda.max_memory_allocated() / 1e9
            fwd = forward_only(engine, events[:4000], shape)
            row = {
                "variant": name,
                "msgs_per_s": len(events) / seconds,
                "pairs_per_s": len(lengths) / seconds,
                "mfu": flops / seconds / peak,
                "forward_only_mfu": fwd / peak,
                "peak_memory_gb": memory,
                "weights_gb": bench.weights_gb(engine.model),
                "warmup_s": warmup,
                "max_diff_vs_fp32": bench.max_difference(scores[:200], reference),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del engine, scores
            bench.reset_memory(device)
    print("| variant | msgs/s | pairs/s | MFU | fwd-only MFU | peak GB | warmup s | diff vs fp32 |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['msgs_per_s']:,.0f} | {r['pairs_per_s']:,.0f} | {r['mfu']:.3f} "
            f"| {r['forward_only_mfu']:.3f} | {r['peak_memory_gb']:.2f} | {r['warmup_s']:.1f} "
            f"| {r['max_diff_vs_fp32']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_tflops": peak / 1e12, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
