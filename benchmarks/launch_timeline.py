"""How long the engine's host side takes per micro-batch, with the device idle or busy.

    PYTHONUNBUFFERED=1 python benchmarks/launch_timeline.py --batches 12 --json out.json

The reference workload (docs/PERFORMANCE.md; large shape, random weights, 4 labels),
1024-event micro-batches, pre-tokenized. Three runs on one warm engine:

- ``two_deep``: ``classify_async`` of batch k+1 before ``result()`` of batch k (bench's
  model side): per batch, how long ``classify_async`` takes to return (the host building
  and launching it) and how long ``result()`` then waits;
- ``serial``: each batch launched only after the one before came back (the device idle
  while the host launches): the same two durations;
- ``two_deep_busy@S``: ``two_deep`` beside a pure-Python thread (the Kafka thread's share
  of the interpreter lock) with ``sys.setswitchinterval(S)``; also how much that thread
  got done per second. PyTorch's bindings release the lock inside every op, and a thread
  that wants it back waits up to the switch interval while another thread runs Python.

When ``classify_async`` returns only after most of the batch time, the launch queue
filled up and the launching thread held the interpreter lock while blocked in it.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine.nli import NliEngine
from stream_classifier.tools import bench


def run(engine: NliEngine, chunks: list[Any], two_deep: bool) -> dict[str, Any]:
    launch: list[float] = []
    wait: list[float] = []
    start = time.perf_counter()
    pending = None
    for chunk in chunks:
        t0 = time.perf_counter()
        queued = engine.classify_async(chunk)
        launch.append(time.perf_counter() - t0)
        if not two_deep:
            t1 = time.perf_counter()
            queued.result()
            wait.append(time.perf_counter() - t1)
            continue
        if pending is not None:
            t1 = time.perf_counter()
            pending.result()
            wait.append(time.perf_counter() - t1)
        pending = queued
    if pending is not None:
        pending.result()
    seconds = time.perf_counter() - start
    return {
        "msgs_per_s": sum(len(c) for c in chunks) / seconds,
        "launch_ms_median": 1e3 * statistics.median(launch),
        "launch_ms_max": 1e3 * max(launch),
        "wait_ms_median": 1e3 * statistics.median(wait),
        "launch_ms": [round(1e3 * x, 1) for x in launch],
    }


def profile_launches(engine: NliEngine, chunks: list[Any]) -> None:
    """cProfile of the host side of ``classify_async`` (each batch waited for after)."""
    profile = cProfile.Profile()
    for chunk in chunks:
        profile.enable()
        pending = engine.classify_async(chunk)
        profile.disable()
        pending.result()
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)


def busy_loop(stop: threading.Event, counter: list[int]) -> None:
    while not stop.is_set():
        for _ in range(1000):
            pass
        counter[0] += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--json")
    parser.add_argument("--profile", action="store_true", help="cProfile 4 launches first")
    parser.add_argument(
        "--switch-intervals",
        default="0.005",
        help="sys.setswitchinterval values (s) for the runs beside the busy thread",
    )
    args = parser.parse_args()
    report: dict[str, Any] = {"launch_queue_note": "see module docstring"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench.build_model_dir(bench.SHAPES["large"], Path(tmp) / "m", 0)
        engine = NliEngine.load(EngineConfig(model=str(model_dir)), 65536)
        engine.warmup()
        events = bench.make_events(1024 * args.batches, 4, 4)
        chunks = list(bench.micro_batches(engine, events, 1024, False))
        run(engine, chunks[:3], True)  # warm
        counter = [0]
        stop = threading.Event()
        start = time.perf_counter()
        thread = threading.Thread(target=busy_loop, args=(stop, counter))
        thread.start()
        time.sleep(2.0)
        stop.set()
        thread.join()
        alone = counter[0] / (time.perf_counter() - start)
        if args.profile:
            profile_launches(engine, chunks[:4])
        names = ["two_deep", "serial"]
        names += [f"two_deep_busy@{interval}" for interval in args.switch_intervals.split(",")]
        for name in names:
            if "@" in name:
                sys.setswitchinterval(float(name.split("@")[1]))
            counter[0] = 0
            stop.clear()
            thread = threading.Thread(target=busy_loop, args=(stop, counter))
            if "busy" in name:
                thread.start()
            started = time.perf_counter()
            row = run(engine, chunks, name != "serial")
            sys.setswitchinterval(0.005)
            if "busy" in name:
                stop.set()
                thread.join()
                row["busy_thread_share"] = counter[0] / (time.perf_counter() - started) / alone
            report[name] = row
            print(name, json.dumps({k: v for k, v in row.items() if k != "launch_ms"}))
            print("  launch ms per batch:", row["launch_ms"], flush=True)
        report["device"] = torch.cuda.get_device_name(0)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
