"""A/B: how text tokenization (in a producer thread) affects end-to-end throughput.

    PYTHONUNBUFFERED=1 python benchmarks/tokenize_ab.py --messages 8000

Modes: ``call`` (``tokenizer(text)``, the default) and ``backend`` (the Rust tokenizer's
``encode`` directly), each timed single-threaded (prepare only) and end to end (prepare
in a thread + pipelined classify), alternating, on one warm engine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from stream_classifier import bench
from stream_classifier.config import EngineConfig
from stream_classifier.engine import nli


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--shape", default="large")
    parser.add_argument("--json")
    args = parser.parse_args()
    modes = {"call": nli.tokenize, "backend": nli.tokenize_backend}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench.build_model_dir(bench.SHAPES[args.shape], Path(tmp) / "m", 0)
        engine = nli.NliEngine.load(EngineConfig(model=str(model_dir)), 65536)
        engine.warmup()
        events = bench.make_events(args.messages, 4, 4)
        for mode in ["call", "backend", "call", "backend"]:
            nli.tokenize = modes[mode]  # type: ignore[assignment]
            start = time.perf_counter()
            for e in events[:4000]:
                engine.prepare(e.text, e.labels, bench.TEMPLATE, False)
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
            engine, list(bench._micro_batches(engine, events, 1024, False))
        )
        print(json.dumps({"pre_tokenized_msgs_per_s": len(events) / seconds}))
        print("cpu threads", torch.get_num_threads())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
