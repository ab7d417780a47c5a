"""A/B: how text tokenization (in a producer thread) affects end-to-end throughput.

    PYTHONUNBUFFERED=1 python benchmarks/tokenize_ab.py --messages 8000

Modes: ``batch`` (the engine's path: one Rust ``encode_batch`` per chunk, the interpreter
lock released for the whole chunk), ``call`` (``tokenizer(text)`` per text, the path
before 2026-11-26) and ``backend`` (the Rust tokenizer's ``encode`` per text, which holds
the lock), each timed single-threaded (prepare only, 1024-event chunks) and end to end
(prepare in a thread + pipelined classify), alternating, on one warm engine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine import nli
from stream_classifier.tools import bench


def _per_text_call(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def _per_text_backend(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    backend = tokenizer.backend_tokenizer
    return [backend.encode(text, add_special_tokens=False).ids for text in texts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--shape", default="large")
    parser.add_argument("--json")
    args = parser.parse_args()
    modes = {"batch": nli.tokenize_many, "call": _per_text_call, "backend": _per_text_backend}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench.build_model_dir(bench.SHAPES[args.shape], Path(tmp) / "m", 0)
        engine = nli.NliEngine.load(EngineConfig(model=str(model_dir)), 65536)
        engine.warmup()
        events = bench.make_events(args.messages, 4, 4)
        for mode in ["batch", "call", "backend", "batch", "call", "backend"]:
            nli.tokenize_many = modes[mode]
            start = time.perf_counter()
            for _ in bench.micro_batches(engine, events[:4000], 1024, False):
                pass
            prepare_rate = len(events[:4000]) / (time.perf_counter() - start)
            _, seconds = bench.run_ours(engine, events, 1024, False)
            row = {
                "mode": mode,
                "prepare_msgs_per_s": prepare_rate,
                "end_to_end_msgs_per_s": len(events) / seconds,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        _, seconds = bench.run_prepared(
            engine, list(bench.micro_batches(engine, events, 1024, False))
        )
        print(json.dumps({"pre_tokenized_msgs_per_s": len(events) / seconds}))
        print("cpu threads", torch.get_num_threads())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
