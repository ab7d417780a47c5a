"""Peak GPU memory at the worst input, and a real CUDA out-of-memory that is split and retried.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_memory.py --json OUT.json

1. Worst case: messages of max_labels (10) pairs of 512 tokens each (texts longer than the
   budget, truncated), classified at the default max_batch_tokens; peak allocated memory
   is compared with the weights + 2 GB bound.
2. A real out-of-memory: the allocator is capped (``set_per_process_memory_fraction``) a
   little above the weights, so 65,536-token batches cannot fit; every batch that fails is
   split in two and retried, the callback counts the splits, and every event's scores
   equal the uncapped run's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine.nli import NliEngine
from stream_classifier.tools import bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="large")
    parser.add_argument("--headroom-gb", type=float, default=0.6)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    report: dict[str, float | int | str] = {"shape": args.shape}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench.build_model_dir(bench.SHAPES[args.shape], Path(tmp) / "m", 0)
        engine = NliEngine.load(EngineConfig(model=str(model_dir)), 65536)
        engine.warmup()
        weights = bench.weights_gb(engine.model)
        report["weights_gb"] = weights
        worst = [bench.Event("中" * 700, tuple(f"标签{i}号" for i in range(10))) for _ in range(64)]
        bench.reset_memory(device)
        before = torch.cuda.memory_allocated() / 1e9
        engine.classify([engine.prepare(e.text, e.labels, bench.TEMPLATE, False) for e in worst])
        report["worst_case_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        report["worst_case_allocated_before_gb"] = before
        events = bench.make_events(2000, 4, 7)
        prepared = [engine.prepare(e.text, e.labels, bench.TEMPLATE, False) for e in events]
        expected = engine.classify(prepared)
        bench.reset_memory(device)
        used = torch.cuda.memory_allocated()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction((used + args.headroom_gb * 1e9) / total)
        splits: list[int] = []
        engine.on_out_of_memory = splits.append
        got = engine.classify(prepared)
        torch.cuda.set_per_process_memory_fraction(1.0)
        report["cap_gb"] = (used + args.headroom_gb * 1e9) / 1e9
        report["oom_splits"] = len(splits)
        report["split_rows"] = str(splits[:20])
        report["events"] = len(got)
        report["identical_scores"] = str(got == expected)
        report["max_diff"] = bench.max_difference(got, bench.as_dicts(expected))
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
