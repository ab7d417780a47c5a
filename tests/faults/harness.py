"""Fault-suite harness: service processes, an outside producer, and independent counts.

Every run records one row (fault, mode, events in, outputs, dead letters, lost,
duplicated) in the session report that ``tests/faults/conftest.py`` prints and writes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import KafkaError, KafkaException
from conftest import TINY_MODEL
from kafka_helpers import (
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
        **processing: Any,
    ) -> None:
        self.bootstrap = bootstrap
        self.mode = mode
        self.partitions = partitions
        self.tmp_path = tmp_path
        self.input, self.output, self.dead_letter = unique("in"), unique("out"), unique("dlq")
        self.group = unique("group")
        topics = [self.input, self.dead_letter] + ([self.output] if create_output else [])
        #: With ``routed``, the topic's one (default) lane routes every scored event here.
        self.routed = unique("routed") if routed else None
        topics += [self.routed] if self.routed else []
        create_topics(bootstrap, topics, partitions)
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
        config = {
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "group_id": self.group,
                "extra": {"allow.auto.create.topics": False},
                # A killed member's partitions move after 6 s, not librdkafka's 45 s.
                "consumer_extra": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
            },
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
        codes = []
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            codes.append(process.wait(timeout))
        return codes

    def whole_logs(self) -> str:
        """Every service log of this run, whole (``logs`` keeps only their ends)."""
        return "".join(p.read_text(errors="replace") for p in self.tmp_path.glob("service-*.log"))

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:]
            for p in sorted(self.tmp_path.glob("service-*.log"))
        )

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
            lambda: self.scored_count() >= at_least, timeout, f"{at_least} outputs\n{self.logs()}"
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
            if exc.args[0].code() != KafkaError._TIMED_OUT:
                raise
            return False
        return inputs == end_offsets(self.bootstrap, self.input, self.partitions) and all(
            end_offsets(self.bootstrap, topic, self.partitions)
            == end_offsets(self.bootstrap, topic, self.partitions, "read_uncommitted")
            for topic in (self.output, self.dead_letter, self.routed)
            if topic is not None
        )

    def wait_drained(self, timeout: float | None = None) -> None:
        timeout = max(timeout or 180, len(self.values) / 20)
        what = "all offsets committed and no transaction open on the outputs"
        wait_until(self.drained, timeout, f"{what}\n{self.logs()}")

    # -- counting ------------------------------------------------------------------------

    def count(self, fault: str, record: bool = True) -> Counts:
        """Read everything back with an independent read_committed consumer and compare."""
        inputs = read_to_end(self.bootstrap, self.input)
        outputs = read_to_end(self.bootstrap, self.output)
        dead = read_to_end(self.bootstrap, self.dead_letter)
        scored = Counter(
            (json.loads(r.value)["source"]["partition"], json.loads(r.value)["source"]["offset"])
            for r in outputs
        )
        rejected = Counter(
            (
                int(r.headers["stream-classifier.source.partition"]),
                int(r.headers["stream-classifier.source.offset"]),
            )
            for r in dead
        )
        expected_bad = {(r.partition, r.offset) for r in inputs if dead_letter_expected(r.value)}
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


def _source(value: bytes | None) -> tuple[int, int]:
    source = json.loads(value or b"{}")["source"]
    return int(source["partition"]), int(source["offset"])
