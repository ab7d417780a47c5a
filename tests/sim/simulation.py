"""Seeded simulation of the real service loop over the in-memory Kafka model.

One seed draws a cluster (partitions of each topic, the producer's ``message.max.bytes``
and queue size, each output topic's ``max.message.bytes``) and a schedule: events (some
malformed, some that crash the engine, some whose output cannot be serialised, some too
large to write in any form; keys null or shared, headers of any bytes), instances
starting, turning, scoring, being killed (also inside ``commit_transaction``, offsets
pending), stopped, timed out of the group, reloaded; transactions failing with a known or
unknown outcome; commits refused, or landing and reported as failed; outages of the whole
cluster or of the output alone; topics deleted and created again; retention passing the
committed offsets; the engine hanging. Then the faults stop and the instances run until
every partition is committed to its end. Checked all along and at the end:

- committed offsets never pass an event without its committed output, dead letter or
  counted give-up, and never move backwards;
- every event ends as an output, a dead letter (possibly a smaller substitute, only where
  the record it replaces was refused) or a counted give-up, never silently missing; once
  (exactly_once) or at least once (at_least_once), of the right kind;
- per key, the first output of each event comes in input order (a replay may repeat);
- the input's headers reach every record written for it, names of any bytes escaped;
- every partition reaches its end once the faults stop (no stall);
- each instance holds a bounded number of events, and bounded bytes in its producer;
- the engine's liveness measure is what the model engine did, and /healthz follows it;
- no instance raises.

Replay one seed with its trace::

    python tests/sim/simulation.py --seed 1234 --mode exactly_once --trace
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sim.kafka_model import (  # noqa: E402
    BATCH_OVERHEAD,
    RAW_HEADERS,
    TP,
    Cluster,
    ProcessKilled,
    SimSink,
    SimSource,
    Stored,
    WireHeaders,
    partition_for,
)

from stream_classifier import records as records_module  # noqa: E402
from stream_classifier import service as service_module  # noqa: E402
from stream_classifier.config import ServiceConfig  # noqa: E402
from stream_classifier.engine.base import Prepared, Scores  # noqa: E402
from stream_classifier.headers import ESCAPED_NAMES_HEADER  # noqa: E402
from stream_classifier.metrics import Metrics  # noqa: E402
from stream_classifier.outputs import Observer  # noqa: E402
from stream_classifier.records import LAST_STAGE  # noqa: E402
from stream_classifier.reload import settings_version  # noqa: E402
from stream_classifier.scoring import ThreadScorer  # noqa: E402
from stream_classifier.service import Service, written_topics  # noqa: E402
from stream_classifier.sink import Record, producer_config  # noqa: E402

INPUT, OUTPUT, DLQ, ROUTED = "in", "out", "dlq", "blocked"
#: An input topic configured and never created (``levels``: a second priority level).
QUIET = "quiet"
MAX_BATCH = 4
MAX_PENDING = 2
SETTLE_STEPS = 4000
STEP_S = 0.01
#: The model producer's delivery.timeout.ms, in steps (model time is compressed).
DELIVERY_TIMEOUT_STEPS = 30
ENGINE_TIMEOUT_S = 0.5
#: Input timestamps are TS0 + the event's number: what the service copies into every
#: record's ``source`` says which event it was written for, across topic recreations.
TS0 = 1_700_000_000_000
#: Records one event may have waiting for their acknowledgement: its output or dead
#: letter, and one routed copy (the block lane's), or their smaller forms.
RECORDS_PER_EVENT = 2
#: Faults a seed may leave out (each seed keeps a random subset, so that rare
#: combinations come up too).
OPTIONAL_FAULTS = (
    "outage",
    "output_outage",
    "delete_topic",
    "retention",
    "engine_hang",
    "kill_in_commit",
    "lost_commit_response",
    "large_records",
    "small_topics",
    "small_queue",
    "headers",
)


class FakeEngine:
    """Scores instantly; raises on texts holding POISON (a poison event)."""

    model_id = "sim"

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        return Prepared(tuple(labels), multi_label, 8, text)

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        if any("POISON" in str(p.payload) for p in batch):
            raise RuntimeError("the model choked on this text")
        return [self._score(p) for p in batch]

    @staticmethod
    def _score(prepared: Prepared) -> Scores:
        """A deterministic share for the first label, the rest for the others, sorted."""
        first = (zlib.crc32(str(prepared.payload).encode()) % 100) / 100
        rest = (1.0 - first) / max(1, len(prepared.labels) - 1)
        pairs = [(first, prepared.labels[0])] + [(rest, label) for label in prepared.labels[1:]]
        pairs.sort(key=lambda pair: -pair[0])
        return Scores(tuple(label for _, label in pairs), tuple(score for score, _ in pairs))

    def warmup(self) -> None:
        pass


class LazyFuture(Future[Any]):
    """A batch handed to the model engine: run when the schedule says, or when the service
    waits on it (unless the engine hangs: then the wait takes its whole timeout)."""

    def __init__(self, executor: SimExecutor, fn: Callable[..., Any], args: tuple[Any, ...]):
        super().__init__()
        self._executor = executor
        self._call = (fn, args)
        self.submitted_at = executor.clock()

    def run_now(self) -> None:
        if self.done() or self._executor.hung():
            return
        fn, args = self._call
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the service
            self._executor.returned_at = self._executor.clock()
            self.set_exception(exc)
        else:
            self._executor.returned_at = self._executor.clock()
            self.set_result(result)

    def _wait(self, timeout: float | None) -> None:
        if self.done():
            return
        if self._executor.hung():
            if timeout is None:
                raise AssertionError("the loop waited on a hung engine without a time limit")
            self._executor.sleep(timeout)
            if self._executor.hung():
                raise TimeoutError
        self.run_now()

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return super().exception(timeout)


class SimExecutor(Executor):
    """The engine thread, run when the schedule says (or when the service waits on it)."""

    def __init__(self, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self.clock = clock
        self.sleep = sleep
        self.pending: list[LazyFuture] = []
        self.hung_until = 0.0
        #: When the engine last returned a batch (or was created).
        self.returned_at = clock()

    def hung(self) -> bool:
        return self.clock() < self.hung_until

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = LazyFuture(self, fn, args)
        self.pending.append(future)
        return future

    def work(self, n: int, rng: random.Random | None = None) -> None:
        """Finish ``n`` batches: the oldest, or (``rng``) any, as a GPU engine stage does
        when a live batch overtakes bulk pieces or a failed batch is scored again."""
        self.pending = [f for f in self.pending if not f.done()]
        chosen = (
            self.pending[:n] if rng is None else rng.sample(self.pending, min(n, len(self.pending)))
        )
        for future in chosen:
            future.run_now()

    def stalled(self) -> float:
        """What the engine did, seen from outside: how long work waited with nothing back."""
        waiting = [f.submitted_at for f in self.pending if not f.done()]
        if not waiting:
            return 0.0
        return max(0.0, self.clock() - max(min(waiting), self.returned_at))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pending.clear()


@functools.cache
def config(
    mode: str,
    block_at: float = 0.7,
    max_bytes: int = 1_000_000,
    queue_kbytes: int = 1_048_576,
    levels: bool = False,
) -> ServiceConfig:
    """The simulated service's settings; ``levels``: the input topic at priority 1 beside a
    quiet topic at 0, so that batches are composed by priority levels."""
    quiet = {"input": QUIET, "output": OUTPUT, "dead_letter": DLQ, "labels": ["a", "b"]}
    return ServiceConfig(
        kafka={
            "group_id": "sim",
            "producer_extra": {
                "message.max.bytes": max_bytes,
                "queue.buffering.max.kbytes": queue_kbytes,
            },
        },
        processing={
            "guarantee": mode,
            "max_batch_messages": MAX_BATCH,
            "max_batch_wait_ms": 20,
            "commit_interval_ms": 50,
            "max_pending_batches": MAX_PENDING,
            "shutdown_timeout_s": 5,
            "engine_timeout_s": ENGINE_TIMEOUT_S,
        },
        engine={"model": "sim", "device": "cpu"},
        metrics={"enabled": False},
        topics=[
            {
                "input": INPUT,
                "output": OUTPUT,
                "dead_letter": DLQ,
                "labels": ["a", "b"],
                "lanes": [
                    {"name": "block", "labels": ["a"], "min_score": block_at, "route": ROUTED},
                    {"name": "allow"},
                ],
                "priority": 1 if levels else 0,
            },
            *([quiet] if levels else []),
        ],
    )


MODES = ("at_least_once", "exactly_once")
CONFIGS = {mode: config(mode) for mode in MODES}
BLOCK_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9)
#: Reloads change the block lane's threshold; each version's threshold, to check against.
RELOADS = {mode: {block_at: config(mode, block_at) for block_at in BLOCK_LEVELS} for mode in MODES}
BLOCK_AT = {
    settings_version(config(MODES[0], b, levels=levels).topics[0]): b
    for b in BLOCK_LEVELS
    for levels in (False, True)
}

#: Header names of any bytes: UTF-8, not UTF-8, empty.
HEADER_NAMES = (b"trace", b"caf\xc3\xa9", b"\xff\xferaw", b"\x80", b"", b"x-\xc3")
#: ...and names confluent-kafka's producer would cut at the NUL (escaped instead).
NUL_HEADER_NAMES = (b"a\x00b",)


def _writable(name: bytes) -> bool:
    """Whether produce() can write the name as it is: UTF-8 text without a NUL."""
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in name


def event(rng: random.Random, i: int, large: bool) -> tuple[bytes | None, str]:
    """An input value and the kind of record it must produce."""
    roll = rng.random()
    if roll < 0.01:
        return None, "dead_letter"  # a tombstone
    if roll < 0.08:
        return b"{malformed", "dead_letter"
    if roll < 0.12:
        return json.dumps({"id": i, "text": f"POISON {i}"}).encode(), "dead_letter"
    if roll < 0.14:
        return b'{"id": "\\ud800", "text": "lone surrogate id"}', "dead_letter"
    if roll < 0.15:
        return b"[" * 50_000 + b"]" * 50_000, "dead_letter"
    if large and roll < 0.22:
        # An id copied into the output: an output (and a dead letter) of any size.
        return json.dumps({"id": "x" * rng.randint(100, 6000), "text": f"big {i}"}).encode(), (
            "output"
        )
    return json.dumps({"id": i, "text": f"event {i}"}).encode(), "output"


@dataclass
class Event:
    number: int
    tp: TP
    incarnation: int
    offset: int
    key: bytes | None
    headers: WireHeaders
    kind: str  # what its primary record must be: "output" or "dead_letter"
    #: "live", or gone before it was written: "expired" (retention), "deleted" (topic).
    status: str = "live"


def primary(record: Record) -> str:
    """The kind of the record a record stands for (its original, for a smaller form)."""
    return (record.first or record).kind


def event_number(record: Record) -> int:
    return (record.source.timestamp or 0) - TS0


class GaveUp(Observer):
    """The simulation hears which events the service gave up."""

    def __init__(self, hear: Callable[[Record], None]) -> None:
        self._hear = hear

    def given_up(self, record: Record) -> None:
        self._hear(record)


class ModelTime:
    """``time`` as the service reads it during a simulated call: ``monotonic()`` is model
    time. Service.turn stamps each message with time.monotonic(), not its clock, and the
    output's latency_ms comes from it: with the wall clock a record's size, and so whether
    a topic refuses it, would differ from run to run."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.monotonic = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def model_time(clock: object) -> None:
    """Give the service's modules ``clock`` as their ``time`` (ModelTime, or time back)."""
    for module in (service_module, records_module):
        module.__dict__["time"] = clock


class Instance:
    def __init__(
        self, sim: Simulation, name: str, txn_id: str, config: ServiceConfig | None = None
    ) -> None:
        self.name = name
        self.source = SimSource(sim.cluster, name)
        holder: list[Service] = []
        self.sink = SimSink(
            sim.cluster,
            lambda record, failure: holder[0]._on_delivery(record, failure),
            txn_id if sim.mode == "exactly_once" else None,
            delivery_timeout_steps=DELIVERY_TIMEOUT_STEPS,
        )
        self.executor = SimExecutor(lambda: sim.now, sim.sleep)
        engine, metrics = FakeEngine(), sim.metrics or Metrics()
        self.service = Service(
            config or sim.config,
            engine,
            metrics,
            clock=lambda: sim.now,
            source=self.source,
            sink=self.sink,
            scorer=ThreadScorer(engine, metrics, self.executor),
            observers=[GaveUp(sim.gave_up)],
        )
        service = self.service
        settings = producer_config(service.config, service.max_in_flight)
        self.sink.configure(settings, written_topics(service.config))
        holder.append(self.service)


def undeliverable(metrics: Metrics) -> float:
    return sum(
        sample.value
        for metric in metrics.undeliverable.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


class Simulation:
    """One seed's cluster, schedule and checks.

    ``metrics``: one registry for every instance (a registry per instance costs as much as
    a third of a seed); None gives each instance its own. ``plain``: none of the optional
    faults, the brokers' default limits (named scenarios add what they test).
    """

    def __init__(
        self,
        seed: int,
        mode: str,
        trace: bool = False,
        metrics: Metrics | None = None,
        plain: bool = False,
        levels: bool = False,
    ) -> None:
        self.rng = rng = random.Random(seed)
        self.seed = seed
        self.mode = mode
        self.trace = trace
        self.metrics = metrics
        self.undeliverable_before = undeliverable(metrics) if metrics else 0.0
        self.faults = {name for name in OPTIONAL_FAULTS if rng.random() < 0.6}
        if plain:
            self.faults = set()
        if RAW_HEADERS is None:
            self.faults.discard("headers")  # names of any bytes need librdkafka's lists
        self.max_bytes = rng.choice((1536, 4096)) if "large_records" in self.faults else 1_000_000
        queue_kbytes = 1_048_576
        if "small_queue" in self.faults and self.max_bytes < 1_000_000:
            # Room for a few records, and always for the largest one alone.
            queue_kbytes = -(-self.max_bytes // 1024) * rng.choice((1, 2, 3))
        self.levels = levels
        self.config = config(mode, 0.7, self.max_bytes, queue_kbytes, levels)
        self.cluster = cluster = Cluster(rng, txn_timeout_steps=150)
        cluster.note = self.log
        cluster.on_visible = self._visible
        cluster.create_topic(INPUT, rng.randint(1, 3), is_input=True)
        for topic in (OUTPUT, ROUTED, DLQ):
            cluster.create_topic(topic, rng.randint(1, 3), self._topic_limit(topic))
        self.keys = [f"k{i}".encode() for i in range(rng.randint(1, 6))]
        self.now = 1000.0
        self.slots = rng.randint(1, 3)
        self.fresh_ids = rng.random() < 0.5  # a new transactional id per start
        self.live: dict[int, Instance] = {}
        self.instances: list[Instance] = []
        self.starts = 0
        self.leaving: list[tuple[int, str]] = []  # (step, member) killed, session not over
        self.events: list[Event] = []
        #: Every record written (visible to read_committed readers), by event number.
        self.outcomes: dict[int, list[Stored]] = defaultdict(list)
        #: Events whose output or dead letter (in some form) is written or given up.
        self.done: set[int] = set()
        self.given_up: list[Record] = []
        self.violations: list[str] = cluster.violations
        #: Per input partition and incarnation, the offset checked up to.
        self.checked: dict[tuple[TP, int], int] = defaultdict(int)

    def _topic_limit(self, topic: str) -> int:
        """Each output topic's max.message.bytes: the broker's default, or (small_topics)
        room for any record the producer takes alone, or less."""
        rng = self.rng
        if "small_topics" not in self.faults or rng.random() < 0.4:
            return 1_048_588
        if rng.random() < 0.5:
            return self.max_bytes + BATCH_OVERHEAD
        if topic == DLQ and rng.random() < 0.5:
            return rng.randint(300, 600)  # even the smallest dead letter may not fit
        return rng.randint(900, max(900, self.max_bytes))

    def log(self, text: str) -> None:
        if self.trace:
            print(f"[{self.cluster.step:5d}] {text}")

    def sleep(self, seconds: float) -> None:
        """A call of the service that blocks: time passes."""
        self.now += seconds

    def gave_up(self, record: Record) -> None:
        self.given_up.append(record)
        self.cluster.stats["given up (counted)"] += 1
        if primary(record) in ("output", "dead_letter"):
            self.done.add(event_number(record))

    def _visible(self, stored: Stored) -> None:
        record = stored.record
        if record is None:
            return
        number = event_number(record)
        self.outcomes[number].append(stored)
        if record.stage:
            self.cluster.stats[f"smaller form written (stage {record.stage})"] += 1
        if primary(record) in ("output", "dead_letter"):
            self.done.add(number)

    # -- actions ---------------------------------------------------------------------

    def produce(self, n: int) -> None:
        cluster, rng = self.cluster, self.rng
        topic = cluster.topics[INPUT]
        for _ in range(n):
            if not topic.exists:
                return
            number = len(self.events)
            key = None if rng.random() < 0.2 else rng.choice(self.keys)
            if "large_records" in self.faults and rng.random() < 0.02:
                key = b"K" * (self.max_bytes // 2)
            tp = (INPUT, partition_for(key, topic.partitions, rng))
            value, kind = event(rng, number, "large_records" in self.faults)
            headers = self._headers() if "headers" in self.faults else []
            stored = cluster.append(tp, key, value, None, headers, TS0 + number)
            self.events.append(
                Event(number, tp, topic.incarnation, stored.offset, key, headers, kind)
            )

    def _headers(self) -> WireHeaders:
        rng = self.rng
        if rng.random() < 0.6:
            return []
        names = HEADER_NAMES + NUL_HEADER_NAMES
        headers: WireHeaders = []
        for _ in range(rng.randint(1, 3)):
            value: bytes | None = rng.choice((None, b"", b"v", b"\xff\x00\x01", b"\xc3"))
            if "large_records" in self.faults and rng.random() < 0.1:
                value = b"h" * rng.randint(100, 2 * self.max_bytes)
            headers.append((rng.choice(names), value))
        return headers

    def add_event(
        self,
        tp: TP,
        key: bytes | None,
        value: bytes | None,
        kind: str = "output",
        headers: WireHeaders | None = None,
    ) -> Event:
        """One event of a named scenario."""
        number = len(self.events)
        stored = self.cluster.append(tp, key, value, None, headers or [], TS0 + number)
        incarnation = self.cluster.topics[tp[0]].incarnation
        event = Event(number, tp, incarnation, stored.offset, key, headers or [], kind)
        self.events.append(event)
        return event

    def start(self, slot: int) -> None:
        self.starts += 1
        txn_id = f"sim-{slot}-{self.starts}" if self.fresh_ids else f"sim-{slot}"
        instance = Instance(self, f"m{self.starts}", txn_id)
        self.log(f"start {instance.name} in slot {slot} ({txn_id})")
        self.live[slot] = instance
        self.instances.append(instance)
        self.guard(slot, instance.service.start)

    def guard(self, slot: int, action: Callable[[], object]) -> None:
        instance = self.live.get(slot)
        model_time(ModelTime(lambda: self.now))
        try:
            action()
        except ProcessKilled:
            assert instance is not None
            self.log(f"{instance.name} died inside a call")
            self.kill(slot)
        except Exception as exc:  # noqa: BLE001 - every raise is a finding
            name = instance.name if instance else "?"
            self.violations.append(f"{name} raised {type(exc).__name__}: {exc}")
            self.live.pop(slot, None)
        finally:
            model_time(time)

    def kill(self, slot: int) -> None:
        instance = self.live.pop(slot)
        self.log(f"SIGKILL {instance.name}")
        instance.sink.die()
        self.leaving.append((self.cluster.step + self.rng.randint(5, 60), instance.name))

    def terminate(self, slot: int) -> None:
        instance = self.live[slot]
        self.log(f"SIGTERM {instance.name}")
        self.guard(slot, instance.service.drain)
        if slot in self.live:
            self.guard(slot, instance.service.close)
        self.live.pop(slot, None)

    def turn(self, slot: int) -> None:
        self.guard(slot, self.live[slot].service.turn)

    def step(self, faults: bool) -> None:
        cluster = self.cluster
        cluster.step += 1
        self.now += STEP_S
        for due, member in list(self.leaving):
            if due <= cluster.step or not faults:
                self.leaving.remove((due, member))
                self.log(f"session of {member} timed out")
                cluster.leave(member)
        cluster.expire_transactions()

    def act(self) -> None:
        rng, cluster, faults = self.rng, self.cluster, self.faults
        roll = rng.random()
        slots = sorted(self.live)
        if roll < 0.55 and slots:
            self.turn(rng.choice(slots))
        elif roll < 0.75 and slots:
            self.live[rng.choice(slots)].executor.work(rng.randint(1, 2), rng)
        elif roll < 0.79 and len(self.live) < self.slots:
            self.start(rng.choice([s for s in range(self.slots) if s not in self.live]))
        elif roll < 0.805 and slots:
            self.kill(rng.choice(slots))
        elif roll < 0.815 and slots:
            self.terminate(rng.choice(slots))
        elif roll < 0.83 and slots:
            instance = self.live[rng.choice(slots)]
            if instance.source.member_id in cluster.members:
                self.log(f"session of {instance.name} lost")
                instance.source.lose()
        elif roll < 0.845:
            if "outage" in faults:
                cluster.outage = not cluster.outage
                if cluster.outage and not cluster.output_down:
                    cluster.down_since = cluster.step
                self.log(f"outage {'begins' if cluster.outage else 'ends'}")
        elif roll < 0.885:
            self.produce(rng.randint(1, 6))
        elif roll < 0.9 and slots:
            instance = self.live[rng.choice(slots)]
            block_at = rng.choice(BLOCK_LEVELS)
            self.log(f"SIGHUP {instance.name}: block at {block_at}")
            reload = config(self.mode, block_at, *self._sizes(), levels=self.levels)
            instance.service.request_reload(lambda: reload)
        elif roll < 0.92 and slots:
            instance = self.live[rng.choice(slots)]
            kind = rng.choice(["abortable", "unknown"])
            cluster.fail_next_txn[instance.sink.txn_id or ""] = kind
            if "lost_commit_response" in faults and rng.random() < 0.5:
                cluster.lose_next_commit_response.add(instance.name)
                kind += ", commit lands but reports failure"
            else:
                cluster.fail_next_commit.add(instance.name)
            self.log(f"next transaction/commit of {instance.name} fails ({kind})")
        elif roll < 0.935:
            if "output_outage" in faults:
                cluster.output_down = not cluster.output_down
                if cluster.output_down and not cluster.outage:
                    cluster.down_since = cluster.step
                self.log(f"output outage {'begins' if cluster.output_down else 'ends'}")
        elif roll < 0.943 and slots:
            if "kill_in_commit" in faults and self.mode == "exactly_once":
                instance = self.live[rng.choice(slots)]
                cluster.kill_in_commit.add(instance.sink.txn_id or "")
                self.log(f"{instance.name} will die inside its next commit_transaction")
        elif roll < 0.948:
            self.delete_or_recreate(rng.choice((INPUT, OUTPUT, ROUTED, DLQ)))
        elif roll < 0.953:
            if "retention" in faults:
                self.retention()
        elif roll < 0.96 and slots and "engine_hang" in faults:
            instance = self.live[rng.choice(slots)]
            hang = rng.uniform(0.2, 1.5)
            instance.executor.hung_until = self.now + hang
            self.log(f"engine of {instance.name} hangs for {hang:.2f}s")

    def _sizes(self) -> tuple[int, int]:
        producer = self.config.kafka.producer_extra
        return int(producer["message.max.bytes"]), int(producer["queue.buffering.max.kbytes"])

    def delete_or_recreate(self, name: str) -> None:
        cluster = self.cluster
        if "delete_topic" not in self.faults:
            return
        if cluster.topics[name].exists:
            incarnation = cluster.topics[name].incarnation
            for event in self.events:
                if (
                    event.tp[0] == name
                    and event.incarnation == incarnation
                    and event.offset >= cluster.committed.get(event.tp, 0)
                ):
                    event.status = "deleted"  # not finished: it goes with its topic
            cluster.delete_topic(name)
        elif cluster.can_recreate(name):
            cluster.recreate_topic(name)

    def retention(self) -> None:
        cluster = self.cluster
        if not cluster.input_partitions:
            return
        tp = self.rng.choice(cluster.input_partitions)
        log = cluster.logs[tp]
        start = self.rng.randint(log.start, log.end)
        incarnation = cluster.topics[tp[0]].incarnation
        committed = cluster.committed.get(tp, 0)
        for event in self.events:
            same = event.tp == tp and event.incarnation == incarnation
            if same and committed <= event.offset < start:
                event.status = "expired"  # not finished: retention took it first
        cluster.retain(tp, start)

    # -- checks ----------------------------------------------------------------------

    def check_commits(self) -> None:
        """Committed offsets never pass an event without its output, dead letter or
        give-up (events that retention or a deletion took first aside)."""
        cluster = self.cluster
        for tp in cluster.input_partitions:
            log = cluster.logs[tp]
            where = (tp, cluster.topics[tp[0]].incarnation)
            committed = min(cluster.committed.get(tp, 0), log.end)
            for offset in range(self.checked[where], committed):
                number = (log.records[offset].timestamp or 0) - TS0
                if number not in self.done and self.events[number].status == "live":
                    self.violations.append(f"{tp} committed to {committed} past {offset} unwritten")
                    return
            self.checked[where] = max(self.checked[where], committed)

    def check_bounds(self) -> None:
        """What an instance holds is bounded by its configuration, whatever the faults:

        - events read and not yet written: at most ``HELD`` batches' worth (the backlog
          and the open batch, up to 3 batches, and ``max_pending_batches`` with the engine);
        - events written and not acknowledged: the loop pauses at ``max_in_flight``, and
          what it held then is written after: ``max_in_flight + HELD`` at most;
        - records in the producer: that many events' records (copies of a replayed
          partition's records included), and bytes: each at most ``message.max.bytes``
          (produce() refuses larger ones).
        """
        held = (MAX_PENDING + 3) * MAX_BATCH
        for instance in self.live.values():
            service = instance.service
            queued = len(service.intake)
            if queued > 3 * MAX_BATCH or len(service.pending) > MAX_PENDING:
                self.violations.append(f"{instance.name} holds {queued} queued events")
            in_flight = service.checkpoint.in_flight()
            if in_flight > service.max_in_flight + held:
                self.violations.append(f"{instance.name} has {in_flight} events in flight")
            sink = instance.sink
            records = (service.max_in_flight + held) * RECORDS_PER_EVENT
            if sink.peak_records > records:
                self.violations.append(
                    f"{instance.name} queued {sink.peak_records} records in its producer, over "
                    f"(max_in_flight + {held}) x {RECORDS_PER_EVENT} = {records}"
                )
            bound = records * sink.max_bytes
            if sink.peak_bytes > bound:
                self.violations.append(
                    f"{instance.name} queued {sink.peak_bytes} bytes in its producer, over "
                    f"(max_in_flight + {held}) x {RECORDS_PER_EVENT} records x "
                    f"message.max.bytes = {bound}"
                )
            sink.peak_records = sink.peak_bytes = 0
            self.check_engine(instance)

    def check_engine(self, instance: Instance) -> None:
        """The liveness measure is what the model engine did; /healthz follows it."""
        service = instance.service
        truth = instance.executor.stalled()
        measured = service.engine_stalled_s()
        if abs(measured - truth) > 1e-6:
            self.violations.append(
                f"{instance.name}: engine stalled {measured:.3f}s by the service, "
                f"{truth:.3f}s by the model engine"
            )
            return
        if measured < ENGINE_TIMEOUT_S / 2:
            return  # healthy() cannot blame the engine (the measure is what it compares)
        ok, why = service.healthy()
        blames_engine = not ok and "engine" in why
        if blames_engine:
            self.cluster.stats["unhealthy: engine stalled"] += 1
        if blames_engine != (measured > ENGINE_TIMEOUT_S) and (ok or blames_engine):
            self.violations.append(f"{instance.name}: healthy() is {ok, why} at {truth:.3f}s")

    def finished(self) -> bool:
        cluster = self.cluster
        return all(
            cluster.committed.get(tp, 0) >= cluster.end(tp)
            or cluster.logs[tp].start >= cluster.end(tp)
            for tp in cluster.input_partitions
        )

    def check_routes(self) -> None:
        """Every output whose lane routes has its copy (exactly one under exactly_once).

        Under at_least_once an attempt may land in part (its output, not its copy) and the
        replay decide otherwise (after a reload): one complete attempt is enough there.
        """
        for event in self.events:
            if event.status != "live":
                continue
            records = [s.record for s in self.outcomes.get(event.number, []) if s.record]
            outputs = [r for r in records if r.kind == "output"]
            routed = [r for r in records if primary(r) == "route"]
            routed_up = [r for r in self.given_up if event_number(r) == event.number]
            routed_up = [r for r in routed_up if primary(r) == "route"]
            wants = []
            for output in outputs:
                stored = next(s for s in self.outcomes[event.number] if s.record is output)
                assert stored.value is not None
                scored = json.loads(stored.value)
                score_a = scored["scores"][scored["labels"].index("a")]
                blocks = score_a >= BLOCK_AT[scored["settings_version"]]
                if scored["decision"] != ("block" if blocks else "allow"):
                    self.violations.append(f"{event.number} decided {scored} against its version")
                    return
                wants.append(1 if blocks else 0)
            if not wants:
                continue
            got = len(routed) + (1 if routed_up else 0)
            want = min(wants) if self.mode == "at_least_once" else max(wants)
            if got < want or (self.mode == "exactly_once" and len(routed) > want):
                self.violations.append(f"event {event.number} routed {got} times, want {want}")
                return

    def check_end(self) -> None:
        self.check_routes()
        self.check_substitutes()
        self.check_headers()
        self.check_key_order()
        given_up = {event_number(r): r for r in self.given_up if primary(r) != "route"}
        if self.metrics is not None:
            counted = undeliverable(self.metrics) - self.undeliverable_before
        else:
            counted = sum(undeliverable(i.service.metrics) for i in self.instances)
        if counted != len(self.given_up):
            self.violations.append(f"{len(self.given_up)} events given up, {counted} counted")
        for event in self.events:
            if event.status != "live":
                continue
            records = [s.record for s in self.outcomes.get(event.number, []) if s.record]
            primaries = [r for r in records if primary(r) in ("output", "dead_letter")]
            where = f"event {event.number} ({event.tp}@{event.offset})"
            if not primaries and event.number not in given_up:
                self.violations.append(f"lost {where}")
            elif self.mode == "exactly_once" and len(primaries) > 1:
                kinds = [(r.kind, r.stage) for r in primaries]
                self.violations.append(f"duplicated {where}: {kinds}")
            else:
                forms = primaries or [given_up[event.number]]
                if event.kind not in {primary(r) for r in forms}:
                    found = [(r.kind, r.stage, primary(r)) for r in forms]
                    self.violations.append(f"{where} written as {found}, expected {event.kind}")
        if not self.finished():
            cluster = self.cluster
            stalled = {
                tp: (cluster.committed.get(tp, 0), cluster.end(tp))
                for tp in cluster.input_partitions
            }
            self.violations.append(f"stalled: committed/end {stalled}")

    def check_substitutes(self) -> None:
        """A smaller form is written (or an event given up) only where the form before it
        was refused for good; and only where that record could not be written alone."""
        refusals = self.cluster.refusals
        written = [s.record for stored in self.outcomes.values() for s in stored if s.record]
        given_up = {id(record) for record in self.given_up}
        for record in written + self.given_up:
            stage = record.stage + (1 if id(record) in given_up else 0)
            if id(record) in given_up and record.stage != LAST_STAGE:
                self.violations.append(
                    f"event {event_number(record)} given up at stage {record.stage}, "
                    f"before its last smaller form (stage {LAST_STAGE})"
                )
                return
            if stage == 0:
                continue
            ts = record.source.timestamp or 0
            alone = refusals.get((ts, primary(record), stage - 1))
            if alone is None:
                self.violations.append(
                    f"event {event_number(record)}: stage {stage} of its {primary(record)} "
                    "with no refusal of the stage before"
                )
                return
            if not alone:
                self.violations.append(
                    f"event {event_number(record)}: its {primary(record)} (stage {stage - 1}) "
                    "was replaced though it fits its topic alone: refused with its batch"
                )
                return

    def check_headers(self) -> None:
        """The input's headers, names escaped where not writable, values byte for byte, on
        every record written for the event but the last smaller form."""
        for event in self.events:
            if not event.headers:
                continue
            want: WireHeaders = []
            escaped = 0
            for name, value in event.headers:
                if _writable(name):
                    want.append((name, value))
                else:
                    escaped += 1
                    text = name.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
                    want.append((text.encode(), value))
            if escaped:
                want.append((ESCAPED_NAMES_HEADER.encode(), str(escaped).encode()))
            for stored in self.outcomes.get(event.number, []):
                assert stored.record is not None
                if stored.record.stage >= 3:
                    continue
                if stored.headers[: len(want)] != want:
                    self.violations.append(
                        f"event {event.number}: headers {event.headers} written as "
                        f"{stored.headers[: len(want)]}"
                    )
                    return

    def check_key_order(self) -> None:
        """Per key, each event's first output comes after those of the events before it in
        the input (a replay may repeat events, never put one ahead). Outputs only: whether
        an event has a routed copy depends on the settings of the attempt that wrote it."""
        logs = [(tp, log) for tp, log in self.cluster.logs.items()]
        logs += [(tp, log) for tp, _incarnation, log in self.cluster.retired]
        for tp, log in logs:
            if tp[0] != OUTPUT:
                continue
            last: dict[tuple[bytes, int], int] = {}
            seen: set[int] = set()
            for stored in log.records:
                if stored.state != "committed" or stored.record is None:
                    continue
                event = self.events[event_number(stored.record)]
                if event.key is None or event.number in seen:
                    continue
                seen.add(event.number)
                key = (event.key, event.incarnation)
                if last.get(key, -1) > event.offset:
                    self.violations.append(
                        f"{tp}: first output of {event.tp}@{event.offset} (key {event.key!r}) "
                        f"after that of offset {last[key]}"
                    )
                    return
                last[key] = event.offset

    # -- the whole run ---------------------------------------------------------------

    def run(self, steps: int) -> list[str]:
        self.produce(self.rng.randint(5, 40))
        self.start(0)
        for _ in range(steps):
            self.step(faults=True)
            self.act()
            self.check_commits()
            self.check_bounds()
            if self.violations:
                return self.violations
        self.settle()
        return self.violations

    def settle(self) -> None:
        """The faults stop: the instances (at least one) run until everything is done."""
        cluster = self.cluster
        cluster.outage = cluster.output_down = False
        cluster.kill_in_commit.clear()
        self.log("faults stop")
        for instance in self.live.values():
            instance.executor.hung_until = 0.0
        if not self.live:
            self.start(0)
        for _ in range(SETTLE_STEPS):
            self.step(faults=False)
            for name, topic in cluster.topics.items():
                if not topic.exists and cluster.can_recreate(name):
                    cluster.recreate_topic(name)
            for slot in sorted(self.live):
                self.turn(slot)
                if slot in self.live:
                    self.live[slot].executor.work(4)
            self.check_commits()
            self.check_bounds()
            if self.violations or (self.finished() and self._all_exist()):
                break
        self.check_end()

    def _all_exist(self) -> bool:
        return all(topic.exists for topic in self.cluster.topics.values())


#: The registry every seeded schedule's instances share (see Simulation).
SHARED_METRICS = Metrics()


def run_seed(
    seed: int, mode: str, steps: int = 200, trace: bool = False, levels: bool = False
) -> list[str]:
    """One seeded schedule."""
    return Simulation(seed, mode, trace, SHARED_METRICS, levels=levels).run(steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--mode", default="exactly_once")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--levels", action="store_true", help="two priority levels")
    args = parser.parse_args()
    violations = run_seed(args.seed, args.mode, args.steps, args.trace, args.levels)
    print("\n".join(violations) or "no violation")
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
