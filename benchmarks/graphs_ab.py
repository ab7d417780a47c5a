"""CUDA-graph passes against eager ones: one machine, one process, rounds interleaved.

    PYTHONUNBUFFERED=1 python benchmarks/graphs_ab.py --batches 12 --rounds 3 --json out.json

Two engines on one random large model (``engine.cuda_graphs`` on and off), the reference
workload (docs/PERFORMANCE.md), 1024-event micro-batches, pre-tokenized and queued two deep
(bench's model side). Each round runs both engines alone, then beside a pure-Python thread
at each switch interval (that thread stands for the service's Kafka thread;
launch_timeline.py says why it matters). The graphed engine's first two passes over the
workload (eager, then capturing) are timed apart; the rounds after them replay only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from launch_timeline import busy_loop, run

from stream_classifier.config import EngineConfig
from stream_classifier.engine.nli import NliEngine
from stream_classifier.tools import bench


def measure(engine: NliEngine, chunks: list[Any], interval: float | None) -> float:
    """msgs/s of one two-deep run, beside a busy thread at ``interval`` when given."""
    stop = threading.Event()
    thread = threading.Thread(target=busy_loop, args=(stop, [0]))
    if interval is not None:
        sys.setswitchinterval(interval)
        thread.start()
    try:
        return float(run(engine, chunks, True)["msgs_per_s"])
    finally:
        if interval is not None:
            stop.set()
            thread.join()
        sys.setswitchinterval(0.005)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switch-intervals", default="0.0005,0.005")
    parser.add_argument("--json")
    args = parser.parse_args()
    intervals: list[float | None] = [None]
    intervals += [float(x) for x in args.switch_intervals.split(",") if x]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "options": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(bench.build_model_dir(bench.SHAPES["large"], Path(tmp) / "m", 0))
        engines = {
            name: NliEngine.load(EngineConfig(model=model_dir, cuda_graphs=graphs), 65536)
            for name, graphs in (("eager", False), ("graphs", True))
        }
        for engine in engines.values():
            engine.warmup()
        events = bench.make_events(1024 * args.batches, args.labels, args.labels)
        chunks = list(bench.micro_batches(engines["eager"], events, 1024, False))
        graphed = engines["graphs"].forward
        for name in ("first_pass", "second_pass"):
            report[f"graphs_{name}_msgs_per_s"] = measure(engines["graphs"], chunks, None)
        report["graphs_captured"] = getattr(graphed, "captured", None)
        report["graphs_capture_s"] = getattr(graphed, "capture_s", None)
        rates: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
            for interval in intervals:
                for name, engine in engines.items():
                    key = f"{name}@{'alone' if interval is None else f'{interval * 1e3:g}ms'}"
                    rate = measure(engine, chunks, interval)
                    rates.setdefault(key, []).append(rate)
                    print(f"round {round_} {key}: {rate:,.0f} msgs/s", flush=True)
        report["graphs_captured_after"] = getattr(graphed, "captured", None)
        report["rates"] = rates
        print("| run | eager msgs/s (median) | graphs msgs/s (median) | graphs / eager |")
        print("| --- | --- | --- | --- |")
        for interval in intervals:
            where = "alone" if interval is None else f"{interval * 1e3:g}ms"
            eager = statistics.median(rates[f"eager@{where}"])
            graphs = statistics.median(rates[f"graphs@{where}"])
            print(f"| {where} | {eager:,.0f} | {graphs:,.0f} | {graphs / eager:.3f} |")
        print({k: v for k, v in report.items() if k != "rates"})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
