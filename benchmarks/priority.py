"""Priority topics through a real broker: a live topic's latency beside a bulk backlog.

The service runs as users run it (``stream-classifier run`` in its own process) on
``bench``'s random-weight StructBERT (``--shape``) and workload, 4 labels. Four phases,
each on fresh topics, each a fresh service process:

1. **saturated**: the bulk topic alone (one priority level, the defaults), pre-filled
   with ``--backlog`` events; its rate over ``--seconds`` once outputs flow (on a GPU,
   once the layers compiled after the first output, as in every phase);
2. **live alone**: the live topic (priority 1) beside an empty bulk topic (priority 0),
   events produced at ``--live-share`` of the saturated rate; end-to-end latency per
   event (its input timestamp to its output being read), p50 and p99;
3. **live + backlog, priorities**: the same, with the bulk topic pre-filled with
   ``--backlog`` events: the live topic's latency, and the total rate of both;
4. **live + backlog, first come first served**: both topics at priority 0 (``--no-fcfs``
   leaves it out);
5. one more phase 3 per ``--variant key=value[,key=value]``: with those processing
   settings (e.g. ``priority_piece_tokens=8192``), for comparisons in one call.

The issue's targets: in phase 3 the live p99 within 2x of phase 2's, and the total rate
at least 90% of phase 1's. Writes JSON (``--json``) and prints a table. ``--keep DIR``
keeps each phase's service log there; with ``--trace`` (a GPU) also its engine stage's
trace (``benchmarks/service_trace``), ``trace-<phase number>.json``.

    python benchmarks/priority.py --bootstrap 127.0.0.1:9092 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_classifier.engine.packed import COMPILE_STARTED
from stream_classifier.tools import bench
from stream_classifier.tools.bench_service import (
    COMPILE_ENDED,
    OutputReader,
    ServiceProcess,
    free_port,
    mean_metric,
    metric,
    percentile,
    wait_for,
)
from stream_classifier.tools.kafka_io import create_topics, fill, produce_at_rate

LABELS = 4
LIVE_FIRST_ID = 10_000_000
WARM_UP_FIRST_ID = 20_000_000
WARM_UP_EVENTS = 32
WARM_LIVE_FIRST_ID = 30_000_000


@dataclass
class Phase:
    name: str
    seconds: float
    live_produced: int = 0
    #: Live events whose output had not come by the end of the wait (3x the window).
    live_missing: int = 0
    live_p50_ms: float | None = None
    live_p99_ms: float | None = None
    #: Each live event's end-to-end latency, in the order they were produced (a tail is
    #: one stall of many events, or many short waits).
    live_latencies_ms: list[float] = field(default_factory=list)
    #: The bulk topic's outputs read inside the window, and their steady rate
    #: (:func:`steady_rate`).
    bulk_outputs: int = 0
    bulk_msgs_per_s: float = 0.0
    live_msgs_per_s: float = 0.0
    total_msgs_per_s: float = 0.0
    exit_code: int | None = None
    #: The service's last log lines and its batch metrics at the end of the window.
    log_tail: list[str] = field(default_factory=list)
    batch_messages_mean: float | None = None
    #: Seconds of the window the engine stage spent scoring, and with nothing to score.
    engine_busy_s: float = 0.0
    engine_idle_s: float = 0.0
    #: Cores used over the window (CPU seconds per second): the whole machine, the
    #: service, the broker (every ``java`` process) and the service's busiest threads.
    cpu_cores: dict[str, float] = field(default_factory=dict)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def on_gpu(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def steady_rate(times: list[float], seconds: float) -> float:
    """Outputs a second: the slope of their running count against when each was read
    (least squares), or their count over the window where all were read at once.

    A batch's outputs come out together. On a CPU a bulk batch takes seconds, so counting
    them in a window of a few batches measured where the window fell: 30 s held 3 or 4
    batches of 256 events, 26 or 34 a second from one run to the next. The slope through
    the steps is the rate of the steps, whatever their phase; for outputs that come one
    by one (a GPU) it is their count over the window, as before."""
    if len(set(times)) < 2:
        return len(times) / seconds
    ordered = np.sort(np.asarray(times))
    return float(np.polyfit(ordered, np.arange(ordered.size), 1)[0])


def cpu_ticks(service_pid: int) -> dict[str, int]:
    """CPU ticks so far: the machine's busy ones, every ``java`` process's, and each of
    the service's threads' (``thread <tid> <name>``, ``main`` for the first)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    ticks = {"machine": user + nice + system + irq + softirq + steal, "java": 0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            name, used = process_ticks(stat)
            if name == "java":
                ticks["java"] += used
    for stat in Path(f"/proc/{service_pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):
            name, used = process_ticks(stat)
            tid = int(stat.parent.name)
            ticks[f"thread {tid} {'main' if tid == service_pid else name}"] = used
    return ticks


def process_ticks(stat: Path) -> tuple[str, int]:
    """A /proc ``stat`` file's command name and user + system ticks."""
    text = stat.read_text()
    name = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return name, int(rest[11]) + int(rest[12])


def cores_used(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, float]:
    """Cores used between two :func:`cpu_ticks`: the machine, the broker, the service, and
    its eight busiest threads."""
    used = {key: (after[key] - before.get(key, 0)) / CLOCK_TICKS / seconds for key in after}
    threads = sorted((k for k in used if k.startswith("thread ")), key=lambda k: -used[k])
    cores = {"machine": used["machine"], "java": used["java"]}
    cores["service"] = sum(used[k] for k in threads)
    cores.update((k, used[k]) for k in threads[:8])
    return {k: round(v, 3) for k, v in cores.items()}


def payloads(texts: list[str], first_id: int) -> list[bytes]:
    return [
        json.dumps({"id": first_id + i, "text": text}, ensure_ascii=False).encode()
        for i, text in enumerate(texts)
    ]


def parse_variant(text: str) -> dict[str, Any]:
    """``key=value[,key=value]``: settings (integers and booleans where they parse)."""
    settings: dict[str, Any] = {}
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        value = value.strip()
        parsed: Any = value
        if value.lstrip("-").isdigit():
            parsed = int(value)
        elif value in ("true", "false"):
            parsed = value == "true"
        settings[key.strip()] = parsed
    return settings


def processing_extra(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if args.priority_batch_messages is not None:
        extra["priority_batch_messages"] = args.priority_batch_messages
    if args.priority_piece_tokens is not None:
        extra["priority_piece_tokens"] = args.priority_piece_tokens
    return extra


def topic(name: str, labels: list[str], priority: int) -> dict[str, Any]:
    return {
        "input": f"{name}.in",
        "output": f"{name}.out",
        "dead_letter": f"{name}.dlq",
        "labels": labels,
        "hypothesis_template": bench.TEMPLATE,
        "priority": priority,
    }


def run_phase(
    args: argparse.Namespace,
    model_dir: Path,
    directory: Path,
    name: str,
    priorities: tuple[int, int] | None,
    backlog: int,
    live_rate: float,
    variant: dict[str, Any] | None = None,
) -> Phase:
    """One service process; ``priorities`` (live, bulk), or None for the bulk topic alone;
    ``variant``: processing settings over the command line's."""
    run = uuid.uuid4().hex[:8]
    labels = list(bench.make_events(1, LABELS, args.seed)[0].labels)
    bulk = topic(f"prio-{run}-bulk", labels, priorities[1] if priorities else 0)
    topics = [bulk]
    if priorities is not None:
        topics.insert(0, topic(f"prio-{run}-live", labels, priorities[0]))
    names = [t[k] for t in topics for k in ("input", "output", "dead_letter")]
    create_topics(args.bootstrap, names, args.partitions)
    if backlog:
        events = bench.make_events(backlog, LABELS, args.seed)
        fill(args.bootstrap, bulk["input"], payloads([e.text for e in events], 0))
    port = free_port()
    config = {
        "kafka": {"bootstrap_servers": args.bootstrap, "group_id": f"prio-{run}"},
        "processing": {
            "guarantee": args.guarantee,
            **processing_extra(args),
            **(variant or {}),
        },
        "engine": {"model": str(model_dir), "device": args.device, **args.engine},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": port},
        "topics": topics,
    }
    directory.mkdir()
    readers = {
        t["input"]: OutputReader(args.bootstrap, t["output"], args.partitions) for t in topics
    }
    prefix = []
    if args.keep and args.trace:
        trace = Path(args.keep).resolve() / f"trace-{directory.name}.json"
        prefix = ["bash", str(Path(__file__).parent / "service_trace" / "run.sh"), str(trace)]
    service = ServiceProcess(config, directory, prefix)
    phase = Phase(name, args.seconds)
    try:
        assigned = "stream_classifier_assigned_partitions"
        wait_for(
            lambda: metric(port, assigned) >= len(topics) * args.partitions,
            300,
            "assignment",
            service,
        )
        if backlog:
            bulk_ids = range(backlog)
            reader = readers[bulk["input"]]
            wait_for(lambda: reader.count(bulk_ids) > 0, 300, "the first output", service)
        else:
            warm_up_live(args, topics[0]["input"], readers[topics[0]["input"]], service)
        wait_for_compile(service)
        if priorities is not None and args.warm_live:  # the window starts in the mixed load
            produce_live(
                args,
                topics[0]["input"],
                live_rate,
                args.warm_seconds,
                WARM_LIVE_FIRST_ID,
                args.seed + 3,
            )
        else:
            time.sleep(args.warm_seconds)  # the rate settles: caches and pools
        engine_at_start = engine_seconds(port)
        ticks_at_start = cpu_ticks(service.pid())
        started = time.monotonic()
        if priorities is not None:
            count = produce_live(
                args, topics[0]["input"], live_rate, args.seconds, LIVE_FIRST_ID, args.seed + 1
            )
            ended = time.monotonic()
            ticks_at_end = cpu_ticks(service.pid())
            live_ids = range(LIVE_FIRST_ID, LIVE_FIRST_ID + count)
            live_reader = readers[topics[0]["input"]]
            # First come, first served, some wait behind the backlog for longer than this.
            with contextlib.suppress(TimeoutError):
                wait_for(
                    lambda: live_reader.count(live_ids) >= count, args.seconds * 3, "", service
                )
            rows = live_reader.rows(live_ids)
            phase.live_latencies_ms = [round(e2e, 1) for _, e2e, _ in rows]
            phase.live_missing = count - len(rows)
            # An output still missing has waited at least since the last live event was
            # produced: its percentiles are then lower bounds.
            waited_ms = (time.monotonic() - ended) * 1000.0
            rows += [(math.inf, waited_ms, 0.0)] * phase.live_missing
            latencies = [e2e for _, e2e, _ in rows]
            phase.live_produced = count
            phase.live_p50_ms = percentile(latencies, 0.50)
            phase.live_p99_ms = percentile(latencies, 0.99)
            phase.live_msgs_per_s = sum(1 for at, _, _ in rows if started <= at <= ended) / (
                ended - started
            )
        else:
            time.sleep(args.seconds)
            ended = time.monotonic()
            ticks_at_end = cpu_ticks(service.pid())
        phase.seconds = ended - started
        phase.cpu_cores = cores_used(ticks_at_start, ticks_at_end, phase.seconds)
        if backlog:
            bulk_rows = readers[bulk["input"]].rows(range(backlog))
            inside = [at for at, _, _ in bulk_rows if started <= at <= ended]
            if len(inside) >= backlog * 0.99:
                raise RuntimeError("the backlog ran out inside the window: raise --backlog")
            phase.bulk_outputs = len(inside)
            phase.bulk_msgs_per_s = steady_rate(inside, phase.seconds)
        phase.total_msgs_per_s = phase.bulk_msgs_per_s + phase.live_msgs_per_s
        phase.batch_messages_mean = mean_metric(port, "stream_classifier_batch_messages")
        busy, idle = engine_seconds(port)
        phase.engine_busy_s, phase.engine_idle_s = (
            busy - engine_at_start[0],
            idle - engine_at_start[1],
        )
        phase.log_tail = service.tail(60)
    finally:
        service.stop(60)
        for reader in readers.values():
            reader.close()
        if args.keep:
            shutil.copy(service.log_path, Path(args.keep) / f"service-{directory.name}.log")
    phase.exit_code = service.exit_code
    print(format_row(phase), flush=True)
    return phase


def produce_live(
    args: argparse.Namespace, topic: str, rate: float, seconds: float, first_id: int, seed: int
) -> int:
    """Live events at ``rate`` for ``seconds`` (ids from ``first_id``), from a child
    process so that the producer does not share this one's interpreter; how many."""
    count = max(1, int(rate * seconds))
    texts = [e.text for e in bench.make_events(count, LABELS, seed)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as child:
        child.submit(
            produce_at_rate, args.bootstrap, topic, payloads(texts, first_id), rate
        ).result(seconds * 4 + 120)
    return count


def engine_seconds(port: int) -> tuple[float, float]:
    """The engine stage's scoring and idle seconds so far (its metrics' running sums)."""
    busy = metric(port, "stream_classifier_engine_seconds_sum")
    return busy, metric(port, "stream_classifier_engine_idle_seconds_total")


def warm_up_live(
    args: argparse.Namespace, topic: str, reader: OutputReader, service: ServiceProcess
) -> None:
    """Without a backlog, a few live events first: the first output starts the compile."""
    texts = [e.text for e in bench.make_events(WARM_UP_EVENTS, LABELS, args.seed + 2)]
    fill(args.bootstrap, topic, payloads(texts, WARM_UP_FIRST_ID))
    ids = range(WARM_UP_FIRST_ID, WARM_UP_FIRST_ID + WARM_UP_EVENTS)
    wait_for(lambda: reader.count(ids) >= WARM_UP_EVENTS, 300, "the warm-up outputs", service)


def wait_for_compile(service: ServiceProcess) -> None:
    """On a GPU the encoder layers may compile on a helper thread after the first output,
    tens of seconds at a fraction of the steady rate: the phases measure what follows.
    The service logs the compile's start as it writes the first output."""
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: bool(service.lines_with([COMPILE_STARTED])), 2, "", service)
    if service.lines_with([COMPILE_STARTED]):
        wait_for(lambda: bool(service.lines_with(COMPILE_ENDED)), 300, "the compile", service)


def format_row(phase: Phase) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    return (
        f"| {phase.name} | {ms(phase.live_p50_ms)} | {ms(phase.live_p99_ms)} | "
        f"{phase.live_msgs_per_s:.0f} | {phase.bulk_msgs_per_s:.0f} | "
        f"{phase.total_msgs_per_s:.0f} | {phase.live_missing} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--shape", default="tiny", choices=sorted(bench.SHAPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--guarantee", default="at_least_once")
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--live-share", type=float, default=0.2)
    parser.add_argument(
        "--seconds",
        type=float,
        help="each phase's window (default: 30 on a GPU, 120 on a CPU, where a bulk batch "
        "takes seconds and a window should hold a dozen)",
    )
    parser.add_argument("--warm-seconds", type=float, default=5.0)
    parser.add_argument(
        "--warm-live",
        action="store_true",
        help="produce the live topic during --warm-seconds too (the window then starts in "
        "the mixed load, its pass shapes seen)",
    )
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--priority-batch-messages", type=int)
    parser.add_argument("--priority-piece-tokens", type=int)
    parser.add_argument("--no-fcfs", action="store_true", help="leave phase 4 out")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant)
    parser.add_argument(
        "--engine", default={}, type=parse_variant, help="engine settings, key=value[,...]"
    )
    parser.add_argument("--json")
    parser.add_argument("--keep", help="a folder for each phase's service log")
    parser.add_argument(
        "--trace", action="store_true", help="trace each phase's engine stage into --keep"
    )
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = 30.0 if on_gpu(args.device) else 120.0
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stream-classifier-priority-") as tmp:
        root = Path(tmp)
        model_dir = bench.build_model_dir(bench.SHAPES[args.shape], root / "model", args.seed)
        print(
            "| phase | live p50 ms | live p99 ms | live msgs/s | bulk msgs/s | total msgs/s "
            "| live not out |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
        saturated = run_phase(
            args, model_dir, root / "1", "saturated (bulk alone)", None, args.backlog, 0.0
        )
        live_rate = args.live_share * saturated.total_msgs_per_s
        phases = [
            saturated,
            run_phase(args, model_dir, root / "2", "live alone", (1, 0), 0, live_rate),
            run_phase(
                args,
                model_dir,
                root / "3",
                "live + backlog, priorities",
                (1, 0),
                args.backlog,
                live_rate,
            ),
        ]
        if not args.no_fcfs:
            phases.append(
                run_phase(
                    args,
                    model_dir,
                    root / "4",
                    "live + backlog, first come first served",
                    (0, 0),
                    args.backlog,
                    live_rate,
                )
            )
        for number, variant in enumerate(args.variant, start=5):
            settings = ", ".join(f"{k}={v}" for k, v in variant.items())
            phases.append(
                run_phase(
                    args,
                    model_dir,
                    root / str(number),
                    f"live + backlog, priorities ({settings})",
                    (1, 0),
                    args.backlog,
                    live_rate,
                    variant,
                )
            )
    alone, mixed = phases[1], phases[2]
    summary = {
        "live_p99_over_alone": (mixed.live_p99_ms or 0) / (alone.live_p99_ms or 1),
        "total_over_saturated": mixed.total_msgs_per_s / saturated.total_msgs_per_s,
    }
    for phase in phases[3:]:
        summary[f"{phase.name}: live_p99_over_alone"] = (phase.live_p99_ms or 0) / (
            alone.live_p99_ms or 1
        )
        summary[f"{phase.name}: total_over_saturated"] = (
            phase.total_msgs_per_s / saturated.total_msgs_per_s
        )
    print(json.dumps(summary, indent=2))
    if args.json:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        report = {
            "command": " ".join(["python", *sys.argv]),
            "commit": commit,
            "machine": platform.node(),
            "python": platform.python_version(),
            "options": vars(args),
            "live_rate": live_rate,
            "phases": [asdict(p) for p in phases],
            "summary": summary,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
