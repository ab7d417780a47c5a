"""What a pass costs a token, by the pass's size: is a short pass dearer?

    PYTHONUNBUFFERED=1 python benchmarks/pass_size_cost.py --json pass_size_cost.json
    python benchmarks/pass_size_cost.py --device cpu --shape tiny --sizes 256,1024,4096,8192

The engine as the service runs it, the reference workload (docs/PERFORMANCE.md; random
weights, 4 labels): for each size, the first pass of that workload's pairs cut at that
many tokens. On a GPU (compiled layers, CUDA graphs) it is replayed from its graph and
timed on the device; on a CPU it goes through the engine's padded passes as a piece of
that size does in the service, timed on the clock. The median over ``--repeats`` and the
time per real token. Priority topics run the bulk level in pieces (a quarter of a pass
on a GPU, 1,024 tokens on a CPU) and the live level in small batches: what their passes
cost against full ones bounds the rate beside a backlog.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine.batches import TokenBatch, packed_batches
from stream_classifier.engine.nli import NliEngine, pair_set
from stream_classifier.tools import bench

sys.path.insert(0, str(Path(__file__).parent))
from graph_pass_profile import gpu_ms  # noqa: E402

SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 49152, 65528)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=tuple(bench.SHAPES), default="large")
    parser.add_argument("--json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    report: dict[str, Any] = {"device": device, "shape": args.shape, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(bench.build_model_dir(bench.SHAPES[args.shape], Path(tmp) / "m", 0))
        engine = NliEngine.load(EngineConfig(model=model_dir, device=args.device), 65536)
        engine.warmup()
        events = bench.make_events(1024, 4, 4)
        chunk = next(bench.micro_batches(engine, events, 1024, False))
        everything = TokenBatch.concatenate([pair_set(item) for item in chunk])
        print("tokens  pairs  ms/pass  us/token  vs full", flush=True)
        with engine_stream(engine), torch.inference_mode():
            for size in (int(s) for s in args.sizes.split(",")):
                batch = everything.take(packed_batches(everything.lengths, size)[0])
                # A GPU replays the pass's graph; a CPU pads the piece as the service does.
                call = functools.partial(engine.forward if gpu else engine.logits, batch)
                for _ in range(3):  # the second pass of a shape captures its graph
                    call()
                ms = gpu_ms(call, args.repeats) if gpu else clock_ms(call, args.repeats)
                row = {"budget": size, "tokens": batch.tokens, "pairs": batch.rows, "ms": ms}
                row["us_per_token"] = 1e3 * ms / batch.tokens
                report["rows"].append(row)
        full = report["rows"][-1]["us_per_token"]
        for row in report["rows"]:
            row["vs_full"] = row["us_per_token"] / full
            print(
                f"{row['tokens']:6d} {row['pairs']:6d} {row['ms']:8.2f} "
                f"{row['us_per_token']:9.3f} {row['vs_full']:8.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def engine_stream(engine: NliEngine) -> Any:
    """The engine's CUDA stream as the current one (nothing on a CPU)."""
    return torch.cuda.stream(engine.stream) if engine.stream is not None else nullcontext()


def clock_ms(call: Callable[[], Any], repeats: int) -> float:
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


if __name__ == "__main__":
    main()
