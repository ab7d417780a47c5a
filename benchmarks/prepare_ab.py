"""A/B of the prepare stage: where tokenizing runs, and what it leaves to the other threads.

    PYTHONUNBUFFERED=1 python benchmarks/prepare_ab.py --messages 4000 --repeats 3 \\
        --json OUT.json

(docs/PERFORMANCE.md quotes a run: benchmarks/results/2026-11-26-cpu/prepare_ab_cpu.json.)
The reference workload (docs/PERFORMANCE.md; 4 labels, the bench vocabulary; tokenizing
needs no model), prepared through each preparer the service can use, alternating,
``repeats`` times:

- ``inline``: ``engine.prepare`` on the submitting thread (the Kafka thread);
- ``thread``: on one other thread; transformers' fast tokenizer call releases the
  interpreter lock inside the Rust ``encode_batch``, the rest (the wrapper, the pair
  assembly) holds it;
- ``thread-batched``: one other thread that tokenizes every waiting text (up to 64) in one
  Rust ``encode_batch`` call, so the lock is released once per chunk rather than per text
  (``PairTokenizer.prepare_many``, on a thread of this script's own);
- ``process-N``: N worker processes (:class:`ProcessPreparer`), fed in chunks.

Each is run twice per repeat: ``quiet`` (nothing else in the process) and ``busy`` (beside
a pure-Python thread, a stand-in for the engine thread that builds batches and launches
kernels, and for the Kafka thread's own Python work). Per run: the rate (all submitted,
then all waited for), the submitting thread's CPU time per event (what the Kafka thread
pays), and, when busy, how much the busy thread got done compared with running alone
(1.0: tokenizing took nothing from it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from stream_classifier.config import EngineConfig
from stream_classifier.engine.base import Prepared, PrepareTask
from stream_classifier.engine.nli import NliEngine, PairTokenizer
from stream_classifier.engine.windows import Windowing
from stream_classifier.preparing import (
    InlinePreparer,
    Preparer,
    ProcessPreparer,
    ThreadPreparer,
)
from stream_classifier.tools import bench


class BatchedThreadPreparer:
    """One thread; the waiting texts (up to ``chunk``) prepared by one ``prepare_many``,
    which tokenizes them in one ``encode_batch`` call."""

    def __init__(self, engine: NliEngine, chunk: int = 64) -> None:
        self.pairs = PairTokenizer(engine.tokenizer, engine.max_length)
        self.chunk = chunk
        self._queue: deque[tuple[Future[Prepared], PrepareTask]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(
        self,
        text: str,
        labels: Sequence[str],
        template: str,
        multi_label: bool,
        windowing: Windowing | None = None,
        later: bool = False,
    ) -> Future[Prepared]:
        if windowing is not None:
            raise ValueError("this benchmark's preparer reads texts whole (no windows)")
        future: Future[Prepared] = Future()
        with self._cond:
            self._queue.append((future, (text, labels, template, multi_label)))
            self._cond.notify()
        return future

    def flush(self, everything: bool = False) -> None:
        pass  # each event started when submitted

    def deferred(self) -> int:
        return 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                take = [self._queue.popleft() for _ in range(min(self.chunk, len(self._queue)))]
            results = self.pairs.prepare_many([task for _, task in take])
            for (future, _), result in zip(take, results, strict=True):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


class Spinner:
    """A pure-Python loop in a thread; ``rate`` is its iterations per second."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        while not self._stop.is_set():
            for _ in range(1000):
                self.count += 1

    def __enter__(self) -> Spinner:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rate = self.count / (time.perf_counter() - self.started)


def alone(seconds: float) -> float:
    with Spinner() as spinner:
        time.sleep(seconds)
    return spinner.rate


def prepare_all(preparer: Preparer, events: list[bench.Event]) -> dict[str, float]:
    cpu = time.thread_time()
    start = time.perf_counter()
    futures = [preparer.submit(e.text, e.labels, bench.TEMPLATE, False) for e in events]
    preparer.flush()  # InlinePreparer prepares only here
    for future in futures:
        future.result()
    seconds = time.perf_counter() - start
    return {
        "msgs_per_s": len(events) / seconds,
        "kafka_thread_us_per_event": (time.thread_time() - cpu) / len(events) * 1e6,
    }


def one_run(preparer: Preparer, events: list[bench.Event]) -> dict[str, float]:
    quiet = prepare_all(preparer, events)
    with Spinner() as spinner:
        busy = prepare_all(preparer, events)
    seconds = time.perf_counter() - spinner.started
    return {
        "quiet_msgs_per_s": quiet["msgs_per_s"],
        "quiet_kafka_thread_us_per_event": quiet["kafka_thread_us_per_event"],
        "busy_msgs_per_s": busy["msgs_per_s"],
        "busy_kafka_thread_us_per_event": busy["kafka_thread_us_per_event"],
        "busy_thread_share": spinner.rate / alone(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="process pool sizes")
    parser.add_argument("--json")
    args = parser.parse_args()
    events = bench.make_events(args.messages, 4, 4)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench.build_model_dir(bench.SHAPES["tiny"], Path(tmp) / "m", 0)
        engine = NliEngine.load(EngineConfig(model=str(model_dir), device="cpu"), 65536)
        preparers: dict[str, Preparer] = {
            "inline": InlinePreparer(engine),
            "thread": ThreadPreparer(engine),
            "thread-batched": BatchedThreadPreparer(engine),
        }
        for workers in (int(n) for n in args.workers.split(",")):
            preparers[f"process-{workers}"] = ProcessPreparer(engine.preparer_factory(), workers)
        for preparer in preparers.values():  # warm: hypothesis caches, worker imports
            one_run(preparer, events[:200])
        rows: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            for name, preparer in preparers.items():
                row = {"preparer": name, "repeat": repeat, **one_run(preparer, events)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        for preparer in preparers.values():
            preparer.shutdown()
    keys = [k for k in rows[0] if k not in ("preparer", "repeat")]
    summary = {
        name: {
            key: statistics.median(r[key] for r in rows if r["preparer"] == name) for key in keys
        }
        for name in preparers
    }
    print(
        "| preparer | msgs/s quiet | Kafka-thread CPU µs/event quiet | msgs/s beside a busy "
        "thread | Kafka-thread CPU µs/event | busy thread's share of its solo rate |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in summary.items():
        print(
            f"| {name} | {row['quiet_msgs_per_s']:,.0f} "
            f"| {row['quiet_kafka_thread_us_per_event']:.0f} | {row['busy_msgs_per_s']:,.0f} "
            f"| {row['busy_kafka_thread_us_per_event']:.0f} | {row['busy_thread_share']:.2f} |"
        )
    if args.json:
        report = {
            "command": "python benchmarks/prepare_ab.py "
            f"--messages {args.messages} --repeats {args.repeats} --workers {args.workers}",
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "load_average_1m": os.getloadavg()[0],
            },
            "medians": summary,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
