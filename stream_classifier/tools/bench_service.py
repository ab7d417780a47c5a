"""``stream-classifier bench --service``: the real service through a real broker.

What users run is the service, so this measures it the way they run it, on the same
random-weight StructBERT and the same reference workload (docs/PERFORMANCE.md) as ``bench``.
For each label count:

1. **the engine alone** (in a child process, so that its GPU memory is gone before the
   service starts): ``bench``'s end-to-end rate (tokenizing in a thread, two micro-batches
   queued on the device) and its pre-tokenized rate, 1024-message micro-batches;
2. for each guarantee, **the service saturated**: N events pre-filled into a fresh
   12-partition topic, then ``python -m stream_classifier.cli run`` started as its own
   process with the settings a user gets by default for the device (or those given). The
   rate is N over the time from its first consume (its ``/metrics``, polled) to its last
   commit (the group's committed offsets, polled with a consumer of the group), and, as in
   the issue's table, between the reading of 10% and 90% of the outputs (an independent
   ``read_committed`` reader). On a GPU: the busy fraction over that window (NVML
   utilisation, sampled every 100 ms);
3. **the service at a load**: with the same process still running, events produced at 50%
   and 90% of that saturated rate for ``latency_seconds`` each; per event, the time from its
   input timestamp (set when produced) to its output being read (outputs carry the input's
   timestamp), p50 and p99; beside it, the service's own ``latency_ms`` (consumed to
   written);
4. the service's rate over the engine's pre-tokenized rate: the ratio the issue's targets
   are stated in.

The broker is given (``--bootstrap``); ``benchmarks/gpu-service.sh`` starts one on a machine
without Java or network and runs this for 4 and 10 labels in both guarantees.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from stream_classifier.tools import bench
from stream_classifier.tools.kafka_io import create_topics, fill, produce_at_rate

#: How often the first consume (the service's /metrics) and the commits are polled.
POLL_S = 0.05
#: How often the GPU's utilisation is read.
GPU_SAMPLE_S = 0.1
#: Logged by ``run`` at start-up: the settings the device resolved.
SETTINGS_LINE = re.compile(
    r"micro-batches of up to (\d+) messages; engine stage (\w+); prepare stage (\w+); "
    r"interpreter switch interval ([\d.e-]+) ms"
)


@dataclass(frozen=True)
class ServiceBenchOptions:
    bootstrap: str = "127.0.0.1:9092"
    shape: str = "large"
    device: str = "auto"
    labels: tuple[int, ...] = (4, 10)
    #: Pre-filled events per label count (and guarantee).
    events: int = 20_000
    guarantees: tuple[str, ...] = ("at_least_once", "exactly_once")
    partitions: int = 12
    #: Fractions of the saturated rate to measure latency at.
    loads: tuple[float, ...] = (0.5, 0.9)
    latency_seconds: float = 20.0
    #: processing.max_batch_messages / prepare_workers for the service; None: its default.
    max_batch_messages: int | None = None
    prepare_workers: int | None = None
    #: A command the service runs under (a profiler: ``py-spy record -o FILE --``).
    service_prefix: tuple[str, ...] = ()
    #: Micro-batch of the engine-alone measurement (``bench``'s default).
    engine_batch_messages: int = 1024
    max_batch_tokens: int = 65536
    #: engine.cuda_graphs, for the service and the engine-alone numbers.
    cuda_graphs: bool = True
    seed: int = 0
    #: Longest wait for any one step (start-up, draining the pre-filled topic, ...).
    step_timeout_s: float = 900.0


@dataclass
class LatencyRow:
    load: float
    target_msgs_per_s: float
    produced: int
    produced_msgs_per_s: float
    p50_ms: float
    p99_ms: float
    service_p50_ms: float
    service_p99_ms: float


@dataclass
class ServiceRow:
    labels: int
    guarantee: str
    events: int
    startup_s: float
    seconds: float
    msgs_per_s: float
    #: None where the outputs came in too few bursts to tell (a short run).
    msgs_per_s_10_90: float | None
    gpu_busy: float | None
    #: Share of that time the engine stage had no micro-batch (engine_idle_seconds).
    engine_idle: float | None
    settings: dict[str, str]
    #: At each load: a fraction of ``msgs_per_s``, or of ``msgs_per_s_after_compile``
    #: where the layers compile on a helper thread (loads then run after the compile).
    latency: list[LatencyRow] = field(default_factory=list)
    exit_code: int | None = None
    #: Events dead-lettered (the workload has none: anything here is a problem).
    dead_letters: int = 0
    ratio_to_engine: float | None = None
    ratio_10_90_to_engine: float | None = None
    #: Mean events per micro-batch while saturated (the service's own histogram).
    batch_messages_mean: float | None = None
    #: The pre-filled events again, produced at once after the layers compiled on a helper
    #: thread were taken: outputs per second between 10% and 90% of them.
    msgs_per_s_after_compile: float | None = None
    ratio_after_compile_to_engine: float | None = None
    #: The service's start-up clock (``stream_classifier_startup_seconds``), "total" being
    #: its first output, and its log lines on the first output and the compiled layers.
    startup: dict[str, float] = field(default_factory=dict)
    startup_lines: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)


# -- the engine alone (a child process) ------------------------------------------------------


def engine_numbers(
    model_dir: str, options: ServiceBenchOptions, labels: int, count: int
) -> dict[str, Any]:
    """``bench``'s two rates for the engine on these events (run in a child process)."""
    import torch

    from stream_classifier.config import EngineConfig
    from stream_classifier.engine.nli import NliEngine

    config = EngineConfig(model=model_dir, device=options.device, cuda_graphs=options.cuda_graphs)
    engine = NliEngine.load(config, options.max_batch_tokens)
    engine.warmup()
    events = bench.make_events(count, labels, options.seed + labels)
    size = options.engine_batch_messages
    _, end_to_end_s = bench.run_ours(engine, events, size, False)
    chunks = list(bench.micro_batches(engine, events, size, False))
    _, model_s = bench.run_prepared(engine, chunks)
    return {
        "messages": count,
        "batch_messages": size,
        "backend": engine.backend,
        "cuda_graphs_captured": getattr(engine.forward, "captured", None),
        "cuda_graphs_failed": getattr(engine.forward, "failed", None),
        "end_to_end_msgs_per_s": count / end_to_end_s,
        "pre_tokenized_msgs_per_s": count / model_s,
        "environment": bench.environment(engine.device),
        "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
    }


def _engine_in_child(
    model_dir: Path, options: ServiceBenchOptions, labels: int, count: int
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as child:
        future = child.submit(engine_numbers, str(model_dir), options, labels, count)
        return future.result(options.step_timeout_s)


# -- Kafka helpers -----------------------------------------------------------------------------


def _payloads(texts: Sequence[str], first_id: int) -> list[bytes]:
    return [
        json.dumps({"id": first_id + i, "text": text}, ensure_ascii=False).encode()
        for i, text in enumerate(texts)
    ]


class OutputReader:
    """Reads every output as an independent read_committed consumer, in a thread; per
    output: its id, when it was read, input timestamp to read (ms), the service's
    latency_ms."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 10,
            }
        )
        self._consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        )
        self._lock = threading.Lock()
        self.read: dict[int, tuple[float, float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="output-reader", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            messages = self._consumer.consume(1000, 0.05)
            now_wall, now = time.time(), time.monotonic()
            batch: dict[int, tuple[float, float, float]] = {}
            for message in messages:
                if message.error():
                    continue
                value = json.loads(message.value() or b"{}")
                _, timestamp = message.timestamp()
                batch[int(value["id"])] = (now, now_wall * 1e3 - timestamp, value["latency_ms"])
            with self._lock:
                self.read.update(batch)
        self._consumer.close()

    def count(self, ids: range) -> int:
        with self._lock:
            return sum(1 for i in ids if i in self.read)

    def rows(self, ids: range) -> list[tuple[float, float, float]]:
        with self._lock:
            return [self.read[i] for i in ids if i in self.read]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


#: How long one look at the committed offsets may wait for them to be stable.
COMMITTED_TIMEOUT_S = 1.0


class CommitWatcher:
    """The service group's committed offsets on the input topic, summed."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
        )
        self._partitions = [TopicPartition(topic, p) for p in range(partitions)]

    def committed(self) -> int:
        """The offsets committed, summed; -1 while a transaction's offsets are pending.

        A ``read_committed`` consumer asks for stable offsets, and the broker answers
        ``UNSTABLE_OFFSET_COMMIT`` while any of these partitions has a transaction's
        offsets pending: under exactly_once with back-to-back transactions, until the
        last one lands. So the call is short, and a time-out is asked again."""
        try:
            offsets = self._consumer.committed(self._partitions, timeout=COMMITTED_TIMEOUT_S)
        except KafkaException:
            return -1
        return sum(max(0, tp.offset) for tp in offsets)

    def close(self) -> None:
        self._consumer.close()


class GpuBusy:
    """NVML utilisation of the GPU this process would use, sampled in a thread."""

    def __init__(self) -> None:
        from stream_classifier.gpu import import_nvml, visible_handles

        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._nvml = import_nvml()
        self._handle: Any = None
        if self._nvml is None:
            return
        try:
            self._nvml.nvmlInit()
            handles = visible_handles(self._nvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except Exception:  # noqa: BLE001 - no driver, no GPU: no samples
            return
        if handles:
            self._handle = next(iter(handles.values()))
            threading.Thread(target=self._loop, name="gpu-busy", daemon=True).start()

    def _loop(self) -> None:
        assert self._nvml is not None
        while not self._stop.wait(GPU_SAMPLE_S):
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            except Exception:  # noqa: BLE001 - not offered here (some sandboxes): no samples
                return
            self.samples.append((time.monotonic(), float(rates.gpu) / 100.0))

    def mean(self, start: float, end: float) -> float | None:
        inside = [busy for at, busy in self.samples if start <= at <= end]
        return sum(inside) / len(inside) if inside else None

    def close(self) -> None:
        self._stop.set()


# -- one service process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric(port: int, name: str) -> float:
    """The sum of a counter's samples on the service's /metrics (0 until it answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as reply:
            text = reply.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


STARTUP_STEP = re.compile(r'^stream_classifier_startup_seconds\{step="([^"]+)"\} (\S+)$')
#: What the start-up lines of the service's log say.
STARTUP_WORDS = ("first output", "compiled on a helper thread")


def startup_steps(port: int) -> dict[str, float]:
    """The service's start-up clock, step by step, from its /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    found = (STARTUP_STEP.match(line) for line in text.splitlines())
    return {match[1]: float(match[2]) for match in found if match}


def mean_metric(port: int, histogram: str) -> float | None:
    count = metric(port, histogram + "_count")
    return metric(port, histogram + "_sum") / count if count else None


@dataclass
class _Topics:
    input: str
    output: str
    dead_letter: str


class ServiceProcess:
    """``python -m stream_classifier.cli run`` on a config written here; SIGTERM stops it."""

    def __init__(self, config: dict[str, Any], directory: Path, prefix: Sequence[str] = ()) -> None:
        self.config_path = directory / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
        self.log_path = directory / "service.log"
        self._log = self.log_path.open("wb")
        self.prefixed = bool(prefix)
        command = [*prefix, sys.executable, "-m", "stream_classifier.cli", "run"]
        self.process = subprocess.Popen(
            [*command, "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.started = time.monotonic()
        #: Its exit status once stopped (None: it had to be killed).
        self.exit_code: int | None = None

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"the service exited with {code}:\n" + "\n".join(self.tail(40)))

    def tail(self, lines: int) -> list[str]:
        self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return text.splitlines()[-lines:]

    def lines_with(self, words: Sequence[str]) -> list[str]:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return [line for line in text.splitlines() if any(word in line for word in words)]

    def settings(self) -> dict[str, str]:
        match = SETTINGS_LINE.search(self.log_path.read_text(encoding="utf-8", errors="replace"))
        if match is None:
            return {}
        batch, scorer, preparer, switch_ms = match.groups()
        return {
            "max_batch_messages": batch,
            "scorer": scorer,
            "preparer": preparer,
            "switch_interval_ms": switch_ms,
        }

    def pid(self) -> int:
        """The service's pid: the process started, or its child under a prefix command
        (a profiler writes its samples once the service it started has exited)."""
        pid = self.process.pid
        if not self.prefixed:
            return pid
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            for child in children.read_text().split():
                return int(child)
        return pid

    def stop(self, timeout: float) -> None:
        """SIGTERM (the service drains and commits), SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            os.kill(self.pid(), signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        finally:
            self._log.close()


def wait_for(condition: Any, timeout: float, what: str, service: ServiceProcess) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        service.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(POLL_S)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]


def _service_config(
    options: ServiceBenchOptions,
    model_dir: Path,
    topics: _Topics,
    labels: Sequence[str],
    guarantee: str,
    group: str,
) -> dict[str, Any]:
    processing: dict[str, Any] = {"guarantee": guarantee}
    if options.max_batch_messages is not None:
        processing["max_batch_messages"] = options.max_batch_messages
    if options.prepare_workers is not None:
        processing["prepare_workers"] = options.prepare_workers
    return {
        "kafka": {"bootstrap_servers": options.bootstrap, "group_id": group},
        "processing": processing,
        "engine": {
            "model": str(model_dir),
            "device": options.device,
            "cuda_graphs": options.cuda_graphs,
        },
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
        "topics": [
            {
                "input": topics.input,
                "output": topics.output,
                "dead_letter": topics.dead_letter,
                "labels": list(labels),
                "hypothesis_template": bench.TEMPLATE,
                "max_labels": max(10, len(labels)),
            }
        ],
    }


def run_service(
    options: ServiceBenchOptions,
    model_dir: Path,
    labels: int,
    guarantee: str,
    directory: Path,
    compiles: bool = False,
) -> ServiceRow:
    """One service process: saturated on the pre-filled topic, then at each load."""
    events = bench.make_events(options.events, labels, options.seed + labels)
    run = uuid.uuid4().hex[:8]
    topics = _Topics(f"svc-{run}.in", f"svc-{run}.out", f"svc-{run}.dlq")
    create_topics(
        options.bootstrap, [topics.input, topics.output, topics.dead_letter], options.partitions
    )
    fill(options.bootstrap, topics.input, _payloads([e.text for e in events], 0))
    group = f"bench-service-{run}"
    config = _service_config(options, model_dir, topics, events[0].labels, guarantee, group)
    reader = OutputReader(options.bootstrap, topics.output, options.partitions)
    commits = CommitWatcher(options.bootstrap, group, topics.input, options.partitions)
    gpu = GpuBusy()
    port = int(config["metrics"]["port"])
    timeout = options.step_timeout_s
    prefix = [part.replace("{guarantee}", guarantee) for part in options.service_prefix]
    service = ServiceProcess(config, directory, prefix)
    try:
        first: list[float] = []
        idle = "stream_classifier_engine_idle_seconds_total"

        def consumed() -> bool:
            if metric(port, "stream_classifier_events_consumed_total") > 0:
                first.append(time.monotonic())
            return bool(first)

        wait_for(consumed, timeout, "the first consume", service)
        idle_at_first = metric(port, idle)
        wait_for(lambda: commits.committed() >= options.events, timeout, "commit", service)
        done = time.monotonic()
        idle_share = (metric(port, idle) - idle_at_first) / (done - first[0])
        seconds = done - first[0]
        saturated = options.events / seconds
        row = ServiceRow(
            labels=labels,
            guarantee=guarantee,
            events=options.events,
            startup_s=first[0] - service.started,
            seconds=seconds,
            msgs_per_s=saturated,
            msgs_per_s_10_90=_rate_10_90(reader, options.events, timeout, service),
            gpu_busy=gpu.mean(first[0], done),
            engine_idle=idle_share,
            settings=service.settings(),
            batch_messages_mean=mean_metric(port, "stream_classifier_batch_messages"),
        )
        if compiles:  # the steady state a replica runs in, once its layers are compiled
            texts = [e.text for e in events]
            row.msgs_per_s_after_compile = _after_compile(
                options, reader, topics.input, texts, service
            )
            # The loads are fractions of that steady state, not of the start's rate.
            saturated = row.msgs_per_s_after_compile or saturated
        for index, load in enumerate(options.loads):
            row.latency.append(
                _at_load(options, reader, topics.input, saturated, load, index, service)
            )
        row.dead_letters = int(metric(port, "stream_classifier_dead_letters_total"))
        row.startup = startup_steps(port)
        row.startup_lines = service.lines_with(STARTUP_WORDS)
        row.log_tail = service.tail(30)
    finally:
        service.stop(timeout)
        gpu.close()
        commits.close()
        reader.close()
    row.exit_code = service.exit_code
    return row


def _rate_10_90(
    reader: OutputReader, count: int, timeout: float, service: ServiceProcess
) -> float | None:
    """Outputs per second between reading 10% and 90% of them (the issue's measure)."""
    ids = range(count)
    wait_for(lambda: reader.count(ids) >= count, timeout, "reading every output", service)
    return _rate_between(reader, ids)


def _rate_between(reader: OutputReader, ids: range) -> float | None:
    count = len(ids)
    times = sorted(at for at, _, _ in reader.rows(ids))
    low, high = int(0.1 * count), max(int(0.9 * count) - 1, int(0.1 * count))
    seconds = times[high] - times[low]
    return (high - low) / seconds if seconds > 0.05 else None


#: The service's log once its compile on a helper thread ended, taken or not.
COMPILE_ENDED = ("compiled on a helper thread", "they stay eager")
#: The engine's backends whose layers compile (on a helper thread in the service).
COMPILED = ("packed-flash", "packed-efficient")
#: First event id of the burst after the compile (ids of the loads are below it).
AFTER_COMPILE_FIRST_ID = 100_000_000


def _after_compile(
    options: ServiceBenchOptions,
    reader: OutputReader,
    topic: str,
    texts: Sequence[str],
    service: ServiceProcess,
) -> float | None:
    """The saturated rate once the compile on a helper thread has ended: the same events
    again, produced at once, 10% to 90% of their outputs."""
    timeout = options.step_timeout_s
    wait_for(lambda: bool(service.lines_with(COMPILE_ENDED)), timeout, "the compile", service)
    fill(options.bootstrap, topic, _payloads(texts, AFTER_COMPILE_FIRST_ID))
    ids = range(AFTER_COMPILE_FIRST_ID, AFTER_COMPILE_FIRST_ID + len(texts))
    wait_for(lambda: reader.count(ids) >= len(ids), timeout, "outputs after the compile", service)
    return _rate_between(reader, ids)


def _at_load(
    options: ServiceBenchOptions,
    reader: OutputReader,
    topic: str,
    saturated: float,
    load: float,
    index: int,
    service: ServiceProcess,
) -> LatencyRow:
    rate = load * saturated
    count = max(1, int(rate * options.latency_seconds))
    first_id = 1_000_000 * (index + 1)
    texts = [e.text for e in bench.make_events(count, 1, options.seed + 7919 * (index + 1))]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as child:
        seconds = child.submit(
            produce_at_rate, options.bootstrap, topic, _payloads(texts, first_id), rate
        ).result(options.latency_seconds * 4 + options.step_timeout_s)
    ids = range(first_id, first_id + count)
    wait_for(lambda: reader.count(ids) >= count, options.step_timeout_s, "outputs at load", service)
    rows = reader.rows(ids)
    end_to_end = [e2e for _, e2e, _ in rows]
    inside = [float(latency) for _, _, latency in rows]
    return LatencyRow(
        load=load,
        target_msgs_per_s=rate,
        produced=count,
        produced_msgs_per_s=count / seconds if seconds > 0 else rate,
        p50_ms=percentile(end_to_end, 0.50),
        p99_ms=percentile(end_to_end, 0.99),
        service_p50_ms=percentile(inside, 0.50),
        service_p99_ms=percentile(inside, 0.99),
    )


# -- the whole benchmark -----------------------------------------------------------------------


def run_service_bench(options: ServiceBenchOptions) -> dict[str, Any]:
    """Every label count and guarantee; the report as a JSON-ready dict."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stream-classifier-service-bench-") as tmp:
        root = Path(tmp)
        shape = bench.SHAPES[options.shape]
        model_dir = bench.build_model_dir(shape, root / f"structbert-{options.shape}", options.seed)
        for labels in options.labels:
            engine = _engine_in_child(model_dir, options, labels, options.events)
            compiles = engine["gpu"] is not None and engine["backend"].startswith(COMPILED)
            for guarantee in options.guarantees:
                directory = root / f"{labels}-{guarantee}"
                directory.mkdir()
                row = run_service(options, model_dir, labels, guarantee, directory, compiles)
                model_rate = engine["pre_tokenized_msgs_per_s"]
                row.ratio_to_engine = row.msgs_per_s / model_rate
                if row.msgs_per_s_after_compile is not None:
                    row.ratio_after_compile_to_engine = row.msgs_per_s_after_compile / model_rate
                if row.msgs_per_s_10_90 is not None:
                    row.ratio_10_90_to_engine = row.msgs_per_s_10_90 / model_rate
                runs.append({"service": asdict(row), "engine": engine})
                print(format_row(runs[-1]), flush=True)
    return {"options": asdict(options), "command": " ".join(sys.argv), "runs": runs}


def format_row(run: dict[str, Any]) -> str:
    service, engine = run["service"], run["engine"]
    busy = "-" if service["gpu_busy"] is None else f"{service['gpu_busy']:.2f}"
    idle = "-" if service["engine_idle"] is None else f"{service['engine_idle']:.2f}"
    steady_ratio = service["ratio_10_90_to_engine"]
    ratio = f"{service['ratio_to_engine']:.2f}"
    if steady_ratio is not None:
        ratio += f" ({steady_ratio:.2f})"
    steady = service["msgs_per_s_10_90"]
    steady_text = "-" if steady is None else f"{steady:,.0f}"
    compiled = service.get("msgs_per_s_after_compile")
    if compiled is not None:
        ratio += f" [{service['ratio_after_compile_to_engine']:.2f}]"
        steady_text += f" [{compiled:,.0f}]"
    latency = " ".join(
        f"{row['load']:.0%}: {row['p50_ms']:.0f}/{row['p99_ms']:.0f} ms"
        for row in service["latency"]
    )
    return (
        f"| {service['labels']} | {service['guarantee']} "
        f"| {service['settings'].get('max_batch_messages', '?')} "
        f"| {service['msgs_per_s']:,.0f} | {steady_text} "
        f"| {engine['end_to_end_msgs_per_s']:,.0f} | {engine['pre_tokenized_msgs_per_s']:,.0f} "
        f"| {ratio} | {busy} | {idle} | {latency} "
        f"| {service['startup_s']:.0f} | {service.get('startup', {}).get('total', 0.0):.1f} |"
    )


def format_table(report: dict[str, Any]) -> str:
    runs = report["runs"]
    device = runs[0]["engine"]["environment"]["device"] if runs else "?"
    backend = runs[0]["engine"]["backend"] if runs else "?"
    lines = [
        f"{device}, shape {report['options']['shape']}, backend {backend}, "
        f"{report['options']['events']:,} events per run, "
        f"{report['options']['partitions']} partitions",
        "| labels | guarantee | batch | service msgs/s (first consume to last commit) "
        "| service msgs/s (10-90% of outputs) [again, once compiled] | bench end to end "
        "| bench pre-tokenized | service / pre-tokenized, whole (10-90%) [once compiled] "
        "| GPU busy | engine idle "
        "| latency p50/p99 at load | start to first consume, s | start to first output, s |",
        "|" + " --- |" * 13,
    ]
    lines += [format_row(run) for run in runs]
    return "\n".join(lines)


def main(options: ServiceBenchOptions, json_path: str | None) -> int:
    report = run_service_bench(options)
    print(format_table(report))
    if json_path:
        text = json.dumps(report, indent=1, allow_nan=False)
        Path(json_path).write_text(text, encoding="utf-8")
    return 0
