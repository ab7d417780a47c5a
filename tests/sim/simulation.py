"""Seeded simulation of the real service loop over the in-memory Kafka model.

One seed draws a schedule: events (some malformed, some that crash the engine, some whose
output cannot be serialised), instances starting, turning, scoring, being killed, stopped,
timed out of the group, transactions failing with a known or unknown outcome, commits
refused, broker outages. Then the faults stop and the instances run until every partition
is committed to its end. Checked all along and at the end:

- committed offsets never pass an event without its committed output or dead letter;
- every input has one (exactly_once) or at least one (at_least_once) committed output or
  dead letter, of the right kind;
- every partition reaches its end once the faults stop (no stall);
- each instance holds a bounded number of events;
- no instance raises.

Replay one seed with its trace::

    python tests/sim/simulation.py --seed 1234 --mode exactly_once --trace
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kafka_model import TP, Cluster, SimSink, SimSource  # noqa: E402

from stream_classifier.config import ServiceConfig  # noqa: E402
from stream_classifier.engine.base import Prepared, Scores  # noqa: E402
from stream_classifier.metrics import Metrics  # noqa: E402
from stream_classifier.reload import settings_version  # noqa: E402
from stream_classifier.scoring import ThreadScorer  # noqa: E402
from stream_classifier.service import Service  # noqa: E402

INPUT, OUTPUT, DLQ, ROUTED = "in", "out", "dlq", "blocked"
MAX_BATCH = 4
SETTLE_STEPS = 4000
STEP_S = 0.01


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
    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        super().__init__()
        self._call = (fn, args)

    def run_now(self) -> None:
        if self.done():
            return
        fn, args = self._call
        try:
            self.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the service
            self.set_exception(exc)

    def result(self, timeout: float | None = None) -> Any:
        self.run_now()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.run_now()
        return super().exception(timeout)


class SimExecutor(Executor):
    """The engine thread, run when the schedule says (or when the service waits on it)."""

    def __init__(self) -> None:
        self.pending: list[LazyFuture] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = LazyFuture(fn, args)
        self.pending.append(future)
        return future

    def work(self, n: int) -> None:
        self.pending = [f for f in self.pending if not f.done()]
        for future in self.pending[:n]:
            future.run_now()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pending.clear()


def config(mode: str, block_at: float = 0.7) -> ServiceConfig:
    return ServiceConfig(
        kafka={"group_id": "sim"},
        processing={
            "guarantee": mode,
            "max_batch_messages": MAX_BATCH,
            "max_batch_wait_ms": 20,
            "commit_interval_ms": 50,
            "max_pending_batches": 2,
            "shutdown_timeout_s": 5,
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
            }
        ],
    )


CONFIGS = {mode: config(mode) for mode in ("at_least_once", "exactly_once")}
#: Reloads change the block lane's threshold; each version's threshold, to check against.
RELOADS = {
    mode: {block_at: config(mode, block_at) for block_at in (0.5, 0.6, 0.7, 0.8, 0.9)}
    for mode in CONFIGS
}
BLOCK_AT = {
    settings_version(cfg.topics[0]): block_at
    for configs in RELOADS.values()
    for block_at, cfg in configs.items()
}


def event(rng: random.Random, i: int) -> tuple[bytes, str]:
    """An input value and the kind of record it must produce."""
    roll = rng.random()
    if roll < 0.08:
        return b"{malformed", "dead_letter"
    if roll < 0.12:
        return json.dumps({"id": i, "text": f"POISON {i}"}).encode(), "dead_letter"
    if roll < 0.14:
        return b'{"id": "\\ud800", "text": "lone surrogate id"}', "dead_letter"
    if roll < 0.15:
        return b"[" * 50_000 + b"]" * 50_000, "dead_letter"
    return json.dumps({"id": i, "text": f"event {i}"}).encode(), "output"


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
            delivery_timeout_steps=30,
        )
        self.executor = SimExecutor()
        engine, metrics = FakeEngine(), Metrics()
        self.service = Service(
            config or CONFIGS[sim.mode],
            engine,
            metrics,
            clock=lambda: sim.now,
            source=self.source,
            sink=self.sink,
            scorer=ThreadScorer(engine, metrics, self.executor),
        )
        holder.append(self.service)


class Simulation:
    def __init__(self, seed: int, mode: str, trace: bool = False) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.mode = mode
        self.trace = trace
        partitions = self.rng.randint(1, 3)
        self.cluster = Cluster(self.rng, {INPUT: partitions}, txn_timeout_steps=150)
        self.cluster.note = self.log
        self.now = 1000.0
        self.slots = self.rng.randint(1, 3)
        self.fresh_ids = self.rng.random() < 0.5  # a new transactional id per start
        self.live: dict[int, Instance] = {}
        self.starts = 0
        self.leaving: list[tuple[int, str]] = []  # (step, member) killed, session not over
        self.expected: dict[tuple[TP, int], str] = {}
        self.violations: list[str] = []
        self.checked: dict[TP, int] = defaultdict(int)

    def log(self, text: str) -> None:
        if self.trace:
            print(f"[{self.cluster.step:5d}] {text}")

    # -- actions ---------------------------------------------------------------------

    def produce(self, n: int) -> None:
        for _ in range(n):
            tp = self.rng.choice(self.cluster.input_partitions)
            value, kind = event(self.rng, len(self.expected))
            stored = self.cluster.append(tp, str(len(self.expected)).encode(), value, None)
            self.expected[(tp, stored.offset)] = kind

    def start(self, slot: int) -> None:
        self.starts += 1
        txn_id = f"sim-{slot}-{self.starts}" if self.fresh_ids else f"sim-{slot}"
        instance = Instance(self, f"m{self.starts}", txn_id)
        self.log(f"start {instance.name} in slot {slot} ({txn_id})")
        self.live[slot] = instance
        self.guard(slot, instance.service.start)

    def guard(self, slot: int, action: Callable[[], object]) -> None:
        instance = self.live.get(slot)
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - every raise is a finding
            name = instance.name if instance else "?"
            self.violations.append(f"{name} raised {type(exc).__name__}: {exc}")
            self.live.pop(slot, None)

    def kill(self, slot: int) -> None:
        instance = self.live.pop(slot)
        self.log(f"SIGKILL {instance.name}")
        self.leaving.append((self.cluster.step + self.rng.randint(5, 60), instance.name))

    def terminate(self, slot: int) -> None:
        instance = self.live[slot]
        self.log(f"SIGTERM {instance.name}")
        self.guard(slot, instance.service.drain)
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
        rng, cluster = self.rng, self.cluster
        roll = rng.random()
        slots = sorted(self.live)
        if roll < 0.55 and slots:
            self.turn(rng.choice(slots))
        elif roll < 0.75 and slots:
            self.live[rng.choice(slots)].executor.work(rng.randint(1, 2))
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
            cluster.outage = not cluster.outage
            self.log(f"outage {'begins' if cluster.outage else 'ends'}")
        elif roll < 0.885:
            self.produce(rng.randint(1, 6))
        elif roll < 0.9 and slots:
            instance = self.live[rng.choice(slots)]
            block_at = rng.choice(sorted(RELOADS[self.mode]))
            self.log(f"SIGHUP {instance.name}: block at {block_at}")
            instance.service.request_reload(lambda: RELOADS[self.mode][block_at])
        elif roll < 0.92 and slots:
            instance = self.live[rng.choice(slots)]
            kind = rng.choice(["abortable", "unknown"])
            cluster.fail_next_txn[instance.sink.txn_id or ""] = kind
            cluster.fail_next_commit.add(instance.name)
            self.log(f"next transaction/commit of {instance.name} fails ({kind})")

    # -- checks ----------------------------------------------------------------------

    def check_commits(self) -> None:
        """Committed offsets never pass an event without its committed output."""
        done = self.written()
        for tp in self.cluster.input_partitions:
            committed = self.cluster.committed.get(tp, 0)
            for offset in range(self.checked[tp], committed):
                if (tp, offset) not in done:
                    self.violations.append(f"{tp} committed to {committed} past {offset} unwritten")
                    return
            self.checked[tp] = max(self.checked[tp], committed)

    def written(self) -> dict[tuple[TP, int], list[str]]:
        out: dict[tuple[TP, int], list[str]] = defaultdict(list)
        for topic in (OUTPUT, DLQ):
            for stored in self.cluster.visible(topic):
                assert stored.record is not None
                source = stored.record.source
                out[((source.topic, source.partition), source.offset)].append(stored.record.kind)
        return out

    def check_bounds(self) -> None:
        for instance in self.live.values():
            service = instance.service
            queued = len(service._backlog) + len(service.batcher)
            if queued > 3 * MAX_BATCH or len(service._scoring) > 2:
                self.violations.append(f"{instance.name} holds {queued} queued events")
            if service.checkpoint.in_flight() > service.max_in_flight + MAX_BATCH:
                self.violations.append(f"{instance.name} has too many events in flight")

    def finished(self) -> bool:
        cluster = self.cluster
        return all(
            cluster.committed.get(tp, 0) == cluster.end(tp) for tp in cluster.input_partitions
        )

    def check_routes(self) -> None:
        """Every output whose lane routes has its copy (exactly one under exactly_once)."""
        routed: dict[tuple[TP, int], int] = defaultdict(int)
        for stored in self.cluster.visible(ROUTED):
            assert stored.record is not None
            source = stored.record.source
            routed[((source.topic, source.partition), source.offset)] += 1
        for stored in self.cluster.visible(OUTPUT):
            assert stored.record is not None and stored.value is not None
            source = stored.record.source
            key = ((source.topic, source.partition), source.offset)
            scored = json.loads(stored.value)
            score_a = scored["scores"][scored["labels"].index("a")]
            blocks = score_a >= BLOCK_AT[scored["settings_version"]]
            if scored["decision"] != ("block" if blocks else "allow"):
                self.violations.append(f"{key} decided {scored} against its settings version")
                return
            want = 1 if blocks else 0
            got = routed.get(key, 0)
            if got < want or (self.mode == "exactly_once" and got != want):
                self.violations.append(f"{key} routed {got} times, expected {want}")
                return

    def check_end(self) -> None:
        self.check_routes()
        done = self.written()
        for event_key, kind in self.expected.items():
            kinds = done.get(event_key, [])
            if not kinds:
                self.violations.append(f"lost {event_key}")
            elif self.mode == "exactly_once" and len(kinds) > 1:
                self.violations.append(f"duplicated {event_key}: {kinds}")
            elif kind not in kinds:
                self.violations.append(f"{event_key} written as {kinds}, expected {kind}")
        if not self.finished():
            cluster = self.cluster
            stalled = {
                tp: (cluster.committed.get(tp, 0), cluster.end(tp))
                for tp in cluster.input_partitions
            }
            self.violations.append(f"stalled: committed/end {stalled}")

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
        self.cluster.outage = False
        self.log("faults stop")
        if not self.live:
            self.start(0)
        for _ in range(SETTLE_STEPS):
            self.step(faults=False)
            for slot in sorted(self.live):
                self.turn(slot)
                if slot in self.live:
                    self.live[slot].executor.work(4)
            self.check_commits()
            if self.violations or self.finished():
                break
        self.check_end()


def run_seed(seed: int, mode: str, steps: int = 200, trace: bool = False) -> list[str]:
    return Simulation(seed, mode, trace).run(steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--mode", default="exactly_once")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    violations = run_seed(args.seed, args.mode, args.steps, args.trace)
    print("\n".join(violations) or "no violation")
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
