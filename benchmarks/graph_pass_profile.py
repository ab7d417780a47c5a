"""One forward pass three ways, GPU time per pass and per kernel: where graphs lose time.

    PYTHONUNBUFFERED=1 python benchmarks/graph_pass_profile.py --json out.json

The reference workload (docs/PERFORMANCE.md; large shape, random weights, 4 labels): the
pairs of 1024 events cut by the 65,536-token budget; the first (full) pass and the last
(short) pass, each run

- ``eager``: the packed forward on the pass as it is;
- ``fixed``: the same, fitted into its graph bucket (padding tokens, empty sequences) but
  launched eagerly (``GraphedForward(capture=False)``);
- ``graph``: replayed from its CUDA graph.

Per pass: the median GPU time (CUDA events) over ``--repeats``; then torch.profiler's
kernel totals of the full pass for each way, the largest first.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from stream_classifier.config import EngineConfig
from stream_classifier.engine.batches import TokenBatch, packed_batches
from stream_classifier.engine.graphs import GraphedForward
from stream_classifier.engine.nli import NliEngine, pair_set
from stream_classifier.engine.packed import PackedBert
from stream_classifier.tools import bench


def gpu_ms(call: Callable[[], Any], repeats: int) -> float:
    times: list[float] = []
    for _ in range(repeats):
        event = torch.cuda.Event
        start, end = event(enable_timing=True), event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(call: Callable[[], Any], repeats: int) -> list[tuple[str, float, int]]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0.0)
        if device_us > 0:
            rows.append((event.key[:90], device_us / repeats / 1e3, event.count // repeats))
    return sorted(rows, key=lambda row: -row[1])


def to_2_16(batch: TokenBatch) -> TokenBatch:
    """``batch`` and one more pair that brings it to 65,536 tokens: M = 2^16 eagerly."""
    extra = 65536 - batch.tokens
    assert 5 <= extra <= 512, extra
    ids = np.concatenate([batch.ids, np.full(extra, 200, dtype=np.int32)])
    return TokenBatch(
        ids,
        np.concatenate([batch.lengths, [extra]]).astype(np.int32),
        np.concatenate([batch.a_lengths, [extra - 4]]).astype(np.int32),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(bench.build_model_dir(bench.SHAPES["large"], Path(tmp) / "m", 0))
        engine = NliEngine.load(EngineConfig(model=model_dir, cuda_graphs=False), 65536)
        engine.warmup()
        packed = engine.forward
        assert isinstance(packed, PackedBert)
        events = bench.make_events(1024, 4, 4)
        chunk = next(bench.micro_batches(engine, events, 1024, False))
        pairs = [pair_set(item) for item in chunk]
        everything = TokenBatch(
            np.concatenate([p.ids for p in pairs]),
            np.concatenate([p.lengths for p in pairs]),
            np.concatenate([p.a_lengths for p in pairs]),
        )
        plan = packed_batches(everything.lengths, 65536)
        full = everything.take(plan[0])
        passes = {"full": full, "last": everything.take(plan[-1]), "full_2_16": to_2_16(full)}
        fixed = GraphedForward(packed, 65536, capture=False)
        graphed = GraphedForward(packed, 65536, capture=True)
        assert engine.stream is not None
        with torch.cuda.stream(engine.stream), torch.inference_mode():
            for name, batch in passes.items():
                ways: dict[str, Callable[[], Any]] = {
                    "eager": functools.partial(packed, batch),
                    "fixed": functools.partial(fixed, batch),
                    "graph": functools.partial(graphed, batch),
                }
                for call in ways.values():
                    call()
                    call()  # the second pass of a shape captures its graph
                row: dict[str, float] = {"tokens": batch.tokens, "sequences": batch.rows}
                row.update({way: gpu_ms(call, args.repeats) for way, call in ways.items()})
                report[name] = row
                print(name, json.dumps(row), flush=True)
                if name != "last":
                    for way, call in ways.items():
                        table = kernel_table(call, 3)
                        report[f"kernels_{name}_{way}"] = table[:25]
                        total = sum(ms for _, ms, _ in table)
                        print(f"== {way}: {total:.2f} ms of kernels per pass")
                        for key, ms, count in table[:14]:
                            print(f"  {ms:8.3f} ms  x{count:<4} {key}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
