"""Fault-suite harness: service processes, an outside producer, and independent counts.

Every run records one row (fault, mode, events in, outputs, dead letters, lost,
duplicated) in the session report that ``tests/faults/conftest.py`` prints and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from conftest import TINY_MODEL
from kafka_helpers import (
    NOT_YET,
    Record,
    TopicReader,
    committed,
    create_topics,
    end_offsets,
    produce,
    read_to_end,
    unique,
    wait_until,
)

BAD_EVENT = b"{malformed"
#: Every service process any run started (conftest kills what a failed test left running).
STARTED: list[subprocess.Popen[bytes]] = []
POISONED_SERVICE = Path(__file__).with_name("poisoned_service.py")


def dead_letter_expected(value: bytes) -> bool:
    """Malformed, or poison for the poisoned engine: either must come out dead-lettered."""
    return value == BAD_EVENT or b"POISON" in value


REPORT: list[dict[str, Any]] = []


@dataclass
class Counts:
    fault: str
    mode: str
    events_in: int
    outputs: int
    dead_letters: int
    lost: int
    duplicated: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: faulthandler's line above each thread's stack.
DUMP_MARK = "(most recent call first)"


class FaultRun:
    """One input topic with its output and dead-letter topics, and the processes on it."""

    def __init__(
        self,
        bootstrap: str,
        mode: str,
        tmp_path: Path,
        partitions: int = 3,
        create_output: bool = True,
        routed: bool = False,
        replicas: int = 1,
        kafka: dict[str, Any] | None = None,
        **processing: Any,
    ) -> None:
        """``replicas``: the topics' replication factor (3 on the replicated cluster);
        ``kafka``: settings merged into the config's ``kafka`` section (its ``extra``,
        ``consumer_extra`` and ``producer_extra`` dicts key by key; None removes a key)."""
        self.bootstrap = bootstrap
        self._kafka = kafka or {}
        self.mode = mode
        self.partitions = partitions
        self.tmp_path = tmp_path
        self.input, self.output, self.dead_letter = unique("in"), unique("out"), unique("dlq")
        self.group = unique("group")
        topics = [self.input, self.dead_letter] + ([self.output] if create_output else [])
        #: With ``routed``, the topic's one (default) lane routes every scored event here.
        self.routed = unique("routed") if routed else None
        topics += [self.routed] if self.routed else []
        if replicas == 1:
            create_topics(bootstrap, topics, partitions)
        else:
            create_replicated_topics(bootstrap, topics, partitions, replicas)
        self.values: list[bytes] = []
        self._output_reader: TopicReader | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self.config_path = tmp_path / "config.yaml"
        self._processing = processing
        self.topic_settings: dict[str, Any] = {
            "labels": ["spam", "harassment", "self-harm", "safe"]
        }
        if self.routed:
            self.topic_settings["lanes"] = [{"name": "all", "route": self.routed}]
        self._write_config(processing)

    def change_topic_settings(self, **settings: Any) -> None:
        """Rewrite the config file's topic settings (what SIGHUP then reloads)."""
        self.topic_settings.update(settings)
        self._write_config(self._processing)

    def _write_config(self, processing: dict[str, Any]) -> None:
        kafka: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "group_id": self.group,
            "extra": {"allow.auto.create.topics": False},
            # A killed member's partitions move after 6 s, not librdkafka's 45 s.
            "consumer_extra": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        }
        for key, value in self._kafka.items():
            if isinstance(value, dict) and isinstance(kafka.get(key), dict):
                merged = {**kafka[key], **value}
                kafka[key] = {name: v for name, v in merged.items() if v is not None}
            else:
                kafka[key] = value
        config = {
            "kafka": kafka,
            "processing": {
                "guarantee": self.mode,
                "max_batch_messages": 64,
                "max_batch_wait_ms": 10,
                "commit_interval_ms": 200,
                "shutdown_timeout_s": 20,
                **processing,
            },
            "engine": {"kind": "nli", "model": str(TINY_MODEL), "device": "cpu"},
            "metrics": {"enabled": False},
            "topics": [
                {
                    "input": self.input,
                    "output": self.output,
                    "dead_letter": self.dead_letter,
                    **self.topic_settings,
                }
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")

    # -- processes -----------------------------------------------------------------------

    def start(
        self, slot: int = 0, script: Path | None = None, **env: str
    ) -> subprocess.Popen[bytes]:
        index = len(self.processes)
        log = (self.tmp_path / f"service-{index}.log").open("ab")
        process_env = {
            **os.environ,
            # Stable per instance: a restart takes the killed one's id and fences it.
            "STREAM_CLASSIFIER_PROCESSING__TRANSACTIONAL_ID": f"{self.group}-{slot}",
            **env,
        }
        process = subprocess.Popen(
            [
                sys.executable,
                *([str(script)] if script else ["-m", "stream_classifier.cli"]),
                "run",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=process_env,
        )
        self.processes.append(process)
        STARTED.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    def scale_out_and_kill_first(self, events: int) -> None:
        """One instance scores a fifth of ``events``, two more join, and once half are
        scored the first is SIGKILLed (its slot is never started again); then half as many
        events again arrive."""
        self.produce(events)
        first = self.start()
        self.wait_scored(events // 5)
        self.start(slot=1)
        self.start(slot=2)
        self.wait_scored(events // 2)
        self.kill(first)
        self.produce(events // 2)

    def terminate_all(self, timeout: float = 60) -> list[int]:
        """SIGTERM every process still running, once it can take it (see
        :meth:`wait_stoppable`); their exit codes, in start order."""
        codes = []
        for index, process in enumerate(self.processes):
            if process.poll() is None:
                self.wait_stoppable(index, process)
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            codes.append(process.wait(timeout))
        return codes

    def wait_stoppable(self, index: int, process: subprocess.Popen[bytes]) -> None:
        """Wait until the process has its SIGTERM handler: it logs the imports step after
        installing it. A SIGTERM in the interpreter's first second, before ``run`` starts,
        ends it by the signal (-15) with nothing read: what a test that expects a clean
        exit must not send (a drained run can finish while the last process starts)."""
        log = self.tmp_path / f"service-{index}.log"

        def stoppable() -> bool:
            return process.poll() is not None or STOPPABLE in log.read_text(errors="replace")

        wait_until(stoppable, 120, lambda: f"service {index} ready for SIGTERM\n{self.state()}")

    def log_of(self, index: int) -> str:
        path = self.tmp_path / f"service-{index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def whole_logs(self) -> str:
        """Every service log of this run, whole (``logs`` keeps only their ends)."""
        return "".join(p.read_text(errors="replace") for p in self.tmp_path.glob("service-*.log"))

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-tail:]
            for p in sorted(self.tmp_path.glob("service-*.log"))
        )

    def state(self) -> str:
        """What the services are doing when a wait times out: each one's exit code, or the
        stack of each of its threads (SIGUSR1: the service's faulthandler dumps them into
        its log), then the ends of the logs."""
        # Only a process past its imports step has the handler (SIGUSR1 would kill it).
        running = [
            p
            for i, p in enumerate(self.processes)
            if p.poll() is None and STOPPABLE in self.log_of(i)
        ]
        before = self.whole_logs().count(DUMP_MARK)
        for process in running:
            process.send_signal(signal.SIGUSR1)

        def dumped() -> bool:  # at least one thread's stack from each running process
            return self.whole_logs().count(DUMP_MARK) >= before + len(running)

        with contextlib.suppress(AssertionError):  # one that cannot dump: its log shows it
            wait_until(dumped, 10, "thread stacks")
        codes = ", ".join(
            f"service {i}: {'running' if p.returncode is None else f'exited {p.returncode}'}"
            for i, p in enumerate(self.processes)
        )
        return f"{codes}\n{self.logs(tail=12000)}"

    # -- events --------------------------------------------------------------------------

    def produce(self, n: int, bad_every: int = 10, poison_every: int = 0) -> None:
        start = len(self.values)

        def text(i: int) -> str:
            poison = poison_every and i % poison_every == poison_every // 3
            return f"event {i}: {'POISON' if poison else 'cheap pills here'}"

        values = [
            BAD_EVENT
            if (start + i) % bad_every == bad_every // 2
            else json.dumps({"id": start + i, "text": text(start + i)}).encode()
            for i in range(n)
        ]
        self.values += values
        produce(
            self.bootstrap, self.input, values, keys=[str(start + i).encode() for i in range(n)]
        )

    def scored_count(self) -> int:
        if self._output_reader is None:
            self._output_reader = TopicReader(self.bootstrap, self.output)
        self._output_reader.poll(0.2)
        return len(self._output_reader.records)

    def wait_scored(self, at_least: int, timeout: float | None = None) -> None:
        # At least 20 events a second, however loaded the machine (--long runs 20,000).
        timeout = max(timeout or 120, at_least / 20)
        wait_until(
            lambda: self.scored_count() >= at_least,
            timeout,
            lambda: f"{at_least} outputs\n{self.state()}",
        )

    def drained(self) -> bool:
        """Every input offset committed, and no transaction left open on what the service
        writes. A killed instance's open transaction stays open until the coordinator
        aborts it at its transaction timeout (unless a restart with its transactional id
        fences it first); until then read_committed readers stop before it, also before
        the outputs that other instances committed after it."""
        try:
            inputs = committed(self.bootstrap, self.group, self.input, self.partitions)
        except KafkaException as exc:  # offsets in that open transaction: unstable till then
            if exc.args[0].code() not in NOT_YET:  # or the group coordinator moving
                raise
            return False
        try:
            return inputs == end_offsets(self.bootstrap, self.input, self.partitions) and all(
                end_offsets(self.bootstrap, topic, self.partitions)
                == end_offsets(self.bootstrap, topic, self.partitions, "read_uncommitted")
                for topic in (self.output, self.dead_letter, self.routed)
                if topic is not None
            )
        except KafkaException as exc:  # a leader moving (replicated cluster): not yet
            if exc.args[0].code() not in NOT_YET:
                raise
            return False

    def wait_drained(
        self, timeout: float | None = None, brokers: Callable[[], str] = lambda: ""
    ) -> None:
        """Wait until :meth:`drained`; at the time-out, say what the services and
        ``brokers()`` (the cluster's side, e.g. :meth:`Cluster.transaction_state`) show."""
        timeout = max(timeout or 180, len(self.values) / 20)
        what = "all offsets committed and no transaction open on the outputs"
        wait_until(self.drained, timeout, lambda: f"{what}\n{brokers()}{self.state()}")

    # -- counting ------------------------------------------------------------------------

    def count(self, fault: str, record: bool = True) -> Counts:
        """Read everything back with an independent read_committed consumer and compare."""
        inputs = read_to_end(self.bootstrap, self.input)
        outputs = read_to_end(self.bootstrap, self.output)
        dead = read_to_end(self.bootstrap, self.dead_letter)
        scored = Counter(
            (r.json_value()["source"]["partition"], r.json_value()["source"]["offset"])
            for r in outputs
        )
        rejected = Counter(
            (
                int(r.header("stream-classifier.source.partition")),
                int(r.header("stream-classifier.source.offset")),
            )
            for r in dead
        )
        expected_bad = {
            (r.partition, r.offset) for r in inputs if dead_letter_expected(r.value or b"")
        }
        expected_good = {(r.partition, r.offset) for r in inputs} - expected_bad
        missing = sorted((expected_good - set(scored)) | (expected_bad - set(rejected)))
        self.missing = missing
        lost = len(missing)
        duplicated = sum(c - 1 for c in scored.values()) + sum(c - 1 for c in rejected.values())
        counts = Counts(fault, self.mode, len(inputs), len(outputs), len(dead), lost, duplicated)
        if record:
            REPORT.append(asdict(counts))
        return counts

    def assert_routed(self) -> None:
        """Every output has its routed copy: once under exactly_once, at least once else."""
        assert self.routed is not None
        outputs = Counter(_source(r.value) for r in read_to_end(self.bootstrap, self.output))
        copies = Counter(_source(r.value) for r in read_to_end(self.bootstrap, self.routed))
        assert set(copies) == set(outputs), "routed copies and outputs differ"
        if self.mode == "exactly_once":
            assert max(copies.values()) == 1, "a routed copy written twice"

    def assert_guarantee(self, counts: Counts) -> None:
        assert "CONFWARN" not in self.whole_logs(), "a client setting given to the wrong client"
        assert counts.events_in == len(self.values)
        assert counts.lost == 0, f"{counts} missing {self.missing[:40]}\n{self.logs()}"
        if self.mode == "exactly_once":
            assert counts.duplicated == 0, f"{counts}\n{self.logs()}"


#: Logged by ``run`` once its SIGTERM handler is in place (stream_classifier/cli.py).
STOPPABLE = "start-up: imports took"


def _source(value: bytes | None) -> tuple[int, int]:
    source = json.loads(value or b"{}")["source"]
    return int(source["partition"]), int(source["offset"])


# -- a replicated cluster (tests/faults/test_replicated.py) ------------------------------

KAFKA_CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "kafka-cluster"
#: The cluster's node ids (deploy/kafka/kafka-cluster).
NODES = (1, 2, 3)


def create_replicated_topics(
    bootstrap: str, names: list[str], partitions: int, replicas: int
) -> None:
    """Every topic with the same replicas per partition (partition p led by node p mod 3
    first): the input's own stalls then measure the cluster's stalls on the very replica
    sets the outputs of the same keys are written to (same key, same partition)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    layout = [[NODES[(p + i) % len(NODES)] for i in range(replicas)] for p in range(partitions)]
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replica_assignment=layout) for name in names]
    )
    for future in futures.values():
        try:
            future.result(timeout=60)
        except KafkaException as exc:
            # The names are new to this run: "already exists" is the admin client's own
            # request, retried after a controller that moved had created the topic (seen
            # right after a node restart under load). ready() checks the layout.
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise

    def ready() -> bool:  # listed, every partition with a leader and its full ISR
        topics = admin.list_topics(timeout=10).topics
        return all(
            name in topics
            and len(topics[name].partitions) == partitions
            and all(
                p.leader >= 0 and len(p.isrs) == replicas for p in topics[name].partitions.values()
            )
            for name in names
        )

    wait_until(ready, 60, f"{names} listed with {replicas} replicas in sync")


#: Broker log lines of a transaction coordinator that leave a transaction stuck, if ever
#: seen (Kafka's TransactionMarkerRequestCompletionHandler and TransactionMetadata).
STUCK_TRANSACTION = ("Uncaught error in request completion", "this should not happen")


def per_node(grepped: str) -> list[tuple[str, list[str]]]:
    """``kafka-cluster grep``'s output as (its ``== node N`` line, the lines under it)."""
    sections: list[tuple[str, list[str]]] = []
    for line in grepped.splitlines():
        if line.startswith("== node "):
            sections.append((line, []))
        elif sections:
            sections[-1][1].append(line)
    return sections


def collapse_repeats(lines: list[str]) -> list[str]:
    """Log lines with each message (its time stamp aside) shown once, where it first
    appeared, with its count and first and last times: markers retried every few
    milliseconds would otherwise fill a failure's report with a few messages."""
    seen: dict[str, list[Any]] = {}  # message: [first time, last time, count]
    for line in lines:
        stamp, _, message = line.partition("] ") if line.startswith("[") else ("", "", line)
        if message in seen and stamp:
            seen[message][1:] = [stamp, seen[message][2] + 1]
        else:
            seen.setdefault(message, [stamp, stamp, 1])
    shown = []
    for message, (first, last, count) in seen.items():
        if not first:
            shown.append(message)
        elif count == 1:
            shown.append(f"{first}] {message}")
        else:
            shown.append(f"{first} .. {last[1:]}] (x{count}) {message}")
    return shown


class Cluster:
    """The three KRaft nodes of ``deploy/kafka/kafka-cluster`` and their bounces."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.bootstrap = self.cli("bootstrap").strip()
        self._admin = AdminClient({"bootstrap.servers": self.bootstrap})

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(KAFKA_CLUSTER), *args], env=self.env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"kafka-cluster {' '.join(args)}: {done.stderr[-3000:]}"
        return done.stdout

    def kill(self, node: int) -> None:
        self.cli("kill", str(node))

    def term(self, node: int) -> None:
        self.cli("term", str(node))

    def start(self, node: int) -> None:
        self.cli("start", str(node))

    def unhealthy(self) -> str | None:
        """Why the cluster is not whole now: a broker missing (down or fenced), or a
        partition without a leader or with a replica out of sync. None when whole."""
        try:
            metadata = self._admin.list_topics(timeout=10)
        except KafkaException as exc:
            return f"metadata: {exc}"
        if sorted(metadata.brokers) != list(NODES):
            return f"brokers {sorted(metadata.brokers)}"
        short = [
            f"{name}[{p.id}] isr {p.isrs} of {p.replicas}"
            for name, topic in metadata.topics.items()
            for p in topic.partitions.values()
            if p.leader < 0 or len(p.isrs) < len(p.replicas)
        ]
        if short:
            return f"under-replicated: {short[:5]}"
        # Leaders back on their preferred replicas (kafka-cluster checks every 5 s), so
        # that no leader moves after the bouncing stops.
        moved = [
            f"{name}[{p.id}] led by {p.leader}, not {p.replicas[0]}"
            for name, topic in metadata.topics.items()
            for p in topic.partitions.values()
            if p.replicas and p.leader != p.replicas[0]
        ]
        return f"leaders not yet preferred: {moved[:5]}" if moved else None

    def transaction_state(self, transactional_id: str) -> str:
        """The coordinator's view of one transactional id: Kafka's ``kafka-transactions
        describe`` and the brokers' log lines that name it (what a transaction the
        coordinator never completes is read from; the client only sees
        ``CONCURRENT_TRANSACTIONS``)."""
        describe = ("transactions", "describe", "--transactional-id", transactional_id)
        parts = [
            (f"transactions describe of {transactional_id}", describe),
            (f"broker log lines naming {transactional_id}", ("grep", transactional_id, "400")),
            # A marker response the coordinator could not handle, or a state transition
            # that failed: lines that leave a transaction stuck without naming its id.
            *((f"broker log lines with {t!r}", ("grep", t, "10")) for t in STUCK_TRANSACTION),
        ]
        shown = []
        for title, args in parts:
            done = subprocess.run(
                [str(KAFKA_CLUSTER), *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            lines = "".join(
                f"{node}\n" + "".join(f"{line}\n" for line in collapse_repeats(tail)[-20:])
                for node, tail in per_node(done.stdout)
            )
            shown.append(f"-- {title}:\n{lines or done.stdout}{done.stderr[-2000:]}")
        return "\n".join(shown)

    def ensure_whole(self) -> None:
        """Start whatever node is down (a test that failed mid-bounce), wait until whole."""
        if self.unhealthy() is not None:
            self.cli("start")
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 180) -> None:
        try:
            wait_until(lambda: self.unhealthy() is None, timeout, "a whole cluster")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.unhealthy()}") from None


@dataclass
class BounceEvent:
    at: float  # time.time()
    node: int
    what: str  # "SIGKILL" | "SIGTERM" | "serving" | "whole"


class Bouncer(threading.Thread):
    """Bounces the brokers one at a time, in rotation, until stopped: SIGKILL (hard) or
    SIGTERM (clean, a controlled shutdown), restart at once, wait until every partition
    is fully replicated again, then ``pause_s`` before the next node. As Kafka's own
    transactions system test bounces them (tests/kafkatest/tests/core/transactions_test.py),
    but for the whole run and without waiting out the broker session after a kill."""

    def __init__(self, cluster: Cluster, hard: bool, pause_s: float = 10.0) -> None:
        super().__init__(name="bouncer", daemon=True)
        self.cluster = cluster
        self.hard = hard
        self.pause_s = pause_s
        self.events: list[BounceEvent] = []
        self.bounces = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            node = 0
            while not self._halt.wait(self.pause_s):
                target = NODES[node % len(NODES)]
                node += 1
                self._note(target, "SIGKILL" if self.hard else "SIGTERM")
                (self.cluster.kill if self.hard else self.cluster.term)(target)
                self.cluster.start(target)
                self._note(target, "serving")
                self.cluster.wait_healthy()
                self._note(target, "whole")
                self.bounces += 1
        except BaseException as exc:  # noqa: BLE001 - raised in the test by finish()
            self.error = exc

    def _note(self, node: int, what: str) -> None:
        self.events.append(BounceEvent(time.time(), node, what))

    def stop(self, timeout: float = 300) -> None:
        """Stop after the bounce in progress (the cluster is whole again when it returns)."""
        self._halt.set()
        if self.ident is not None:
            self.join(timeout)

    def finish(self, timeout: float = 300) -> None:
        """:meth:`stop`, and raise what went wrong with a bounce."""
        self.stop(timeout)
        assert not self.is_alive(), "the bouncer did not finish its last bounce"
        if self.error is not None:
            raise self.error


class PacedInput(threading.Thread):
    """Produces ``run``'s next events at ``rate`` a second (one malformed in ten), at least
    ``n`` of them and on until ``until()`` is true (the bounces done: the input flows for
    the whole run, however slowly the brokers restart), keyed over ``keys`` keys so that
    each key has many events in order, with an idempotent producer that rides out the
    bounces. Each event is added to ``run.values`` as it is produced."""

    def __init__(
        self,
        run: FaultRun,
        n: int,
        rate: float,
        until: Callable[[], bool] = lambda: True,
        keys: int = 60,
    ) -> None:
        super().__init__(name="paced-input", daemon=True)
        self.values = run.values
        self.topic = run.input
        self.bootstrap = run.bootstrap
        self.n = n
        self.rate = rate
        self.until = until
        self.keys = keys
        self.errors: list[str] = []
        #: (time.time() acknowledged, (partition, offset)) of each event.
        self.acked: list[tuple[float, tuple[int, int]]] = []
        self.left = -1
        self._halt = threading.Event()

    def run(self) -> None:
        producer = Producer(
            {"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5}
        )

        def report(err: object, msg: Any) -> None:
            if err is not None:
                self.errors.append(str(err))
            else:
                self.acked.append((time.time(), (msg.partition(), msg.offset())))

        began = time.monotonic()
        sent = 0
        while not self._halt.is_set() and (sent < self.n or not self.until()):
            # Paced by the clock: a stalled produce() is caught up, not drifted.
            self._halt.wait(max(0.0, began + sent / self.rate - time.monotonic()))
            i = len(self.values)
            value = (
                BAD_EVENT
                if i % 10 == 5
                else json.dumps({"id": i, "text": f"event {i}: cheap pills"}).encode()
            )
            self.values.append(value)
            producer.produce(
                self.topic, value=value, key=f"key-{i % self.keys}".encode(), on_delivery=report
            )
            producer.poll(0)
            sent += 1
        self.left = producer.flush(300)

    def finish(self, timeout: float) -> None:
        """Wait for the input to end by itself; past ``timeout`` it is stopped, and fails."""
        self.join(timeout)
        late = self.is_alive()
        self.stop()
        assert not late, f"input still flowing after {timeout:.0f}s"
        assert self.left == 0 and not self.errors, (self.left, self.errors[:5])

    def stop(self) -> None:
        """Stop producing (what was produced is still flushed) and wait for the flush."""
        self._halt.set()
        if self.ident is not None:
            self.join(330)


class OutputClock(threading.Thread):
    """Reads the output topic (read_committed) while the run goes on and notes when each
    event's first output became visible: the gaps users see between outputs. (With
    ``key_of=input_key`` it watches the input topic the same way.)"""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        key_of: Callable[[Record], tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(name=f"clock-{topic}", daemon=True)
        self._reader = TopicReader(bootstrap, topic)
        self._key_of = key_of or output_source
        #: (time.time() it was seen, (partition, offset) of its input), first copies only.
        self.seen: list[tuple[float, tuple[int, int]]] = []
        self._sources: set[tuple[int, int]] = set()
        self._halt = threading.Event()
        self._catch_up_until = math.inf

    def run(self) -> None:
        while not (self._halt.is_set() and self._caught_up()):
            before = len(self._reader.records)
            self._reader.poll(0.1)
            now = time.time()
            for record in self._reader.records[before:]:
                source = self._key_of(record)
                if source not in self._sources:
                    self._sources.add(source)
                    self.seen.append((now, source))

    def _caught_up(self) -> bool:
        """At every partition's end, or past the catch-up deadline (``finish``)."""
        return time.monotonic() >= self._catch_up_until or self._reader.caught_up()

    def finish(self, catch_up: float = 60.0) -> None:
        """Stop once it has read to the end (what the drain saw committed), within
        ``catch_up`` seconds: else :meth:`saw_all` would miss the last outputs."""
        self._catch_up_until = time.monotonic() + catch_up
        self._halt.set()
        self.join(catch_up + 60)
        if not self.is_alive():  # closed under a running read, it would raise there
            self._reader.close()

    def saw_all(self, records: list[Record]) -> bool:
        """Did it see the first copy of each of ``records`` (read back at the end) while the
        run went on? A clock that saw nothing reports no gap at all."""
        return {self._key_of(record) for record in records} <= self._sources

    def gaps(self, top: int = 5, partition: int | None = None) -> list[tuple[float, float]]:
        """The ``top`` longest waits between new outputs (of one partition of their input,
        if given): (seconds, time.time() it began)."""
        return longest_waits(self.seen, top, partition)


#: Partitions of the replicated cluster's internal topics (``deploy/kafka/kafka-cluster``:
#: ``transaction.state.log.num.partitions``), which decide each id's coordinator.
COORDINATOR_PARTITIONS = 3


def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode()`` (over UTF-16 code units, in 32-bit arithmetic)."""
    value = 0
    units = text.encode("utf-16-be")
    for i in range(0, len(units), 2):
        value = (31 * value + int.from_bytes(units[i : i + 2], "big")) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def coordinator_partition(key: str, partitions: int = COORDINATOR_PARTITIONS) -> int:
    """The internal-topic partition whose leader coordinates ``key`` (a transactional or
    group id): Kafka's ``Utils.abs(key.hashCode()) % partitions``."""
    hashed = java_string_hash(key)
    return (0 if hashed == -(1 << 31) else abs(hashed)) % partitions


def same_coordinator(like: str) -> str:
    """An id (``like-probe-N``) whose coordinator is ``like``'s: the same partition of the
    internal topic, hence the same broker, wherever its leadership moves."""
    wanted = coordinator_partition(like)
    return next(
        f"{like}-probe-{n}"
        for n in range(1000)
        if coordinator_partition(f"{like}-probe-{n}") == wanted
    )


class CoordinatorProbe(threading.Thread):
    """Does one small thing at a coordinator every ``interval`` and notes when each ended:
    the cluster's own stall for that coordinator, which the input producer does not see."""

    def __init__(self, name: str, interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self._interval = interval
        #: (time.time() it ended, (0, n)): the shape :func:`longest_waits` reads.
        self.committed: list[tuple[float, tuple[int, int]]] = []
        self._halt = threading.Event()

    def _noted(self) -> None:
        self.committed.append((time.time(), (0, len(self.committed))))

    def finish(self) -> None:
        self._halt.set()
        self.join(60)

    def gaps(self, top: int = 5) -> list[tuple[float, float]]:
        """The ``top`` longest waits between commits: (seconds, time.time() it began)."""
        return longest_waits(self.committed, top)


class TransactionProbe(CoordinatorProbe):
    """Commits a small transaction every ``interval`` (one record to each partition of
    ``topic``) under a transactional id that has the same coordinator as ``like``: the
    cluster's own stall for transactions. The input producer is not transactional, so it
    does not see a transaction coordinator moving (loading its log on a restarted node),
    which holds every transaction there."""

    def __init__(
        self, bootstrap: str, topic: str, partitions: int, like: str, interval: float = 0.1
    ) -> None:
        super().__init__("transaction-probe", interval)
        self.transactional_id = same_coordinator(like)
        self._servers = bootstrap
        self._topic = topic
        self._partitions = partitions

    def _producer(self) -> Producer:
        producer = Producer(
            {
                "bootstrap.servers": self._servers,
                "transactional.id": self.transactional_id,
                "reconnect.backoff.max.ms": 1000,
            }
        )
        producer.init_transactions(30)
        return producer

    def run(self) -> None:
        producer: Producer | None = None
        while not self._halt.is_set():
            try:
                producer = producer or self._producer()
                producer.begin_transaction()
                for partition in range(self._partitions):
                    producer.produce(self._topic, value=b"probe", partition=partition)
                producer.commit_transaction(30)
                self._noted()
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if producer is not None and error.txn_requires_abort():
                    try:
                        producer.abort_transaction(30)
                    except KafkaException:
                        producer = None
                elif not error.retriable():
                    producer = None  # fenced, fatal or unknown state: start afresh
            self._halt.wait(self._interval)


class GroupProbe(CoordinatorProbe):
    """Commits an offset every ``interval`` for a group (with no members) that has the same
    coordinator as the group ``like``: the cluster's own stall for that group coordinator.
    A coordinator that cannot answer for longer than the session (killed, or loading its
    partition on a slow restart) costs a member its partitions; the input producer does
    not talk to it at all."""

    def __init__(self, bootstrap: str, topic: str, like: str, interval: float = 0.1) -> None:
        super().__init__("group-probe", interval)
        self.group = same_coordinator(like)
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": self.group,
                "enable.auto.commit": False,
                "reconnect.backoff.max.ms": 1000,
            }
        )
        self._topic = topic

    def run(self) -> None:
        offset = 0
        while not self._halt.is_set():
            offset += 1
            try:
                self._consumer.commit(
                    offsets=[TopicPartition(self._topic, 0, offset)], asynchronous=False
                )
                self._noted()
            except KafkaException:
                pass  # the coordinator away or loading: the wait this probe measures
            self._halt.wait(self._interval)

    def finish(self) -> None:
        super().finish()
        if not self.is_alive():
            self._consumer.close()


def longest_waits(
    seen: list[tuple[float, tuple[int, int]]], top: int, partition: int | None = None
) -> list[tuple[float, float]]:
    times = [t for t, (p, _) in seen if partition is None or p == partition]
    waits = sorted(((b - a, a) for a, b in zip(times, times[1:], strict=False)), reverse=True)
    return waits[:top]


def key_order_held(records: list[Record], source_of: Callable[[Record], tuple[int, int]]) -> bool:
    """Per key, the first copies of the records come in the order of their inputs (a
    duplicate, allowed under at_least_once, repeats an earlier one and is skipped)."""
    last: dict[bytes | None, int] = {}
    seen: set[tuple[int, int]] = set()
    for record in records:  # one key is on one partition, read in offset order
        source = source_of(record)
        if source in seen:
            continue
        seen.add(source)
        if source[1] <= last.get(record.key, -1):
            return False
        last[record.key] = source[1]
    return True


def dead_letter_source(record: Record) -> tuple[int, int]:
    headers = record.headers
    return (
        int(headers["stream-classifier.source.partition"] or b"-1"),
        int(headers["stream-classifier.source.offset"] or b"-1"),
    )


def output_source(record: Record) -> tuple[int, int]:
    return _source(record.value)


def input_key(record: Record) -> tuple[int, int]:
    return record.partition, record.offset


@contextmanager
def busy_loops(count: int = 2) -> Iterator[None]:
    """Processes spinning on the CPU beside a test, as on a loaded CI node."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
