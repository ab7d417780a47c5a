"""ONNX Runtime on CPU against our fp32 engine, same events, same length-sorted batches.

    PYTHONPATH=/tmp/ort python benchmarks/onnx_cpu.py --shape base --messages 100

The model is exported with ``torch.onnx.export`` (dynamic batch and sequence axes) and run
by an ``InferenceSession`` (all graph optimisations, intra-op threads = torch's). Both
sides get exactly the same padded batches: the ORT session replaces the engine's model
call (``engine.forward``), so tokenization, batching and scoring are shared; only the
model call differs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort  # type: ignore[import-not-found]
import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.nli import NliEngine
from stream_classifier.engine.shared import round_up
from stream_classifier.tools import bench


def export(model_dir: Path, path: Path) -> None:
    """The checkpoint as transformers' classifier (a module whose call returns the logits),
    the same weights as the engine's."""
    model, _ = bench.transformers_bert(model_dir, torch.device("cpu"), torch.float32)
    ids = torch.ones((2, 16), dtype=torch.long)
    torch.onnx.export(
        model,
        (ids, torch.zeros_like(ids), torch.ones_like(ids)),
        str(path),
        input_names=["input_ids", "token_type_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={
            name: {0: "batch", 1: "seq"}
            for name in ["input_ids", "token_type_ids", "attention_mask"]
        },
        opset_version=17,
        dynamo=False,
    )


def ort_forward(session: ort.InferenceSession, pad_id: int):  # type: ignore[no-untyped-def]
    def forward(batch: TokenBatch) -> torch.Tensor:
        width = round_up(batch.max_length)
        rows = np.repeat(np.arange(batch.rows), batch.lengths)
        columns = batch.positions()
        arrays = {
            "input_ids": np.full((batch.rows, width), pad_id, dtype=np.int64),
            "token_type_ids": np.zeros((batch.rows, width), dtype=np.int64),
            "attention_mask": np.zeros((batch.rows, width), dtype=np.int64),
        }
        arrays["input_ids"][rows, columns] = batch.ids
        arrays["token_type_ids"][rows, columns] = batch.token_types()
        arrays["attention_mask"][rows, columns] = 1
        logits = session.run(["logits"], arrays)[0]
        return torch.from_numpy(logits[:, [0, 2]].astype(np.float32))

    return forward


def timed(engine: NliEngine, events: list[bench.Event]) -> tuple[float, list]:  # type: ignore[type-arg]
    prepared = [engine.prepare(e.text, e.labels, bench.TEMPLATE, False) for e in events]
    start = time.perf_counter()
    scores = engine.classify(prepared)
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    shape = bench.SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench.build_model_dir(shape, Path(tmp) / "m", 0)
        engine = NliEngine.load(EngineConfig(model=str(model_dir), device="cpu"), 65536)
        events = bench.make_events(args.messages, 4, 4)
        onnx_path = Path(tmp) / "model.onnx"
        export(model_dir, onnx_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        timed(engine, events[:8])
        torch_s, torch_scores = timed(engine, events)
        torch_rss = None
        engine.forward = ort_forward(session, engine.pad_id)
        timed(engine, events[:8])
        ort_s, ort_scores = timed(engine, events)
        diff = bench.max_difference(ort_scores, bench.as_dicts(torch_scores))
    pairs = args.messages * 4
    flops = sum(shape.flops(n) for n in bench.pair_lengths(engine, events))
    report = {
        "shape": args.shape,
        "messages": args.messages,
        "threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "torch_fp32_msgs_per_s": args.messages / torch_s,
        "ort_fp32_msgs_per_s": args.messages / ort_s,
        "torch_pairs_per_s": pairs / torch_s,
        "ort_pairs_per_s": pairs / ort_s,
        "torch_gflops": flops / torch_s / 1e9,
        "ort_gflops": flops / ort_s / 1e9,
        "ort_speedup": torch_s / ort_s,
        "max_score_diff": diff,
        "torch_rss": torch_rss,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
