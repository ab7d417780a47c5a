"""Eager packed pass GPU time at exact token counts: is a multiple of 64 slower?

    PYTHONUNBUFFERED=1 python benchmarks/pass_tokens_scan.py   # writes $OUT/m_scan.json

Pairs of the reference workload (docs/PERFORMANCE.md; large shape, 4 labels) plus one
filler pair, to exactly M tokens for M just under 65,536, 49,152 and 32,768; the median GPU
time of 5 passes each.
"""

import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.nli import NliEngine, pair_set
from stream_classifier.tools import bench

sys.path.insert(0, "benchmarks")
from graph_pass_profile import gpu_ms


def exact(everything: TokenBatch, m: int) -> TokenBatch:
    ends = np.cumsum(everything.lengths)
    k = int(np.searchsorted(ends, m - 5 - 100, side="right"))
    base = everything.take(np.arange(k))
    extra = m - base.tokens
    assert 5 <= extra <= 512, extra
    return TokenBatch(
        np.concatenate([base.ids, np.full(extra, 200, np.int32)]),
        np.concatenate([base.lengths, [extra]]).astype(np.int32),
        np.concatenate([base.a_lengths, [extra - 4]]).astype(np.int32),
    )


with tempfile.TemporaryDirectory() as tmp:
    model_dir = str(bench.build_model_dir(bench.SHAPES["large"], Path(tmp) / "m", 0))
    engine = NliEngine.load(EngineConfig(model=model_dir, cuda_graphs=False), 65536)
    engine.warmup()
    events = bench.make_events(2048, 4, 4)
    chunk = [x for c in bench.micro_batches(engine, events, 1024, False) for x in c]
    pairs = [pair_set(i) for i in chunk]
    everything = TokenBatch(
        np.concatenate([p.ids for p in pairs]),
        np.concatenate([p.lengths for p in pairs]),
        np.concatenate([p.a_lengths for p in pairs]),
    )
    rows = []
    with torch.cuda.stream(engine.stream), torch.inference_mode():
        for top in (65536, 49152, 32768):
            for d in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 100, 128, 256, 512):
                m = top - d
                batch = exact(everything, m)
                engine.forward(batch)
                engine.forward(batch)
                t = gpu_ms(functools.partial(engine.forward, batch), 5)
                row = {
                    "m": m,
                    "mod8": m % 8,
                    "mod16": m % 16,
                    "mod64": m % 64,
                    "ms": round(t, 2),
                    "us_per_token": round(1e3 * t / m, 4),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(os.environ.get("OUT", ".")) / "m_scan.json"
    out.write_text(json.dumps(rows, indent=1))
