"""The start-up clock: steps in order and adding up, the summary line, the process's start
read from /proc (or now, where it cannot be), the engine's load steps on the tiny model,
and, through the broker, ``run``'s log carrying the summary at its first output."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL
from kafka_helpers import create_topics, produce, unique, wait_until

from stream_classifier import startup
from stream_classifier.assemble import FirstOutput, load_ready_engine
from stream_classifier.config import ServiceConfig
from stream_classifier.metrics import Metrics
from stream_classifier.startup import StartupClock, process_age, summary


class FakeTime:
    """A ``now()`` that moves only when told."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_steps_are_recorded_in_order_and_inner_steps_leave_the_outer_one() -> None:
    time = FakeTime()
    clock = StartupClock(origin=90.0, now=time)
    assert clock.milestone("python")  # origin..now: 10 s
    with clock.step("model_setup"):
        time.now += 1.0
        with clock.step("weights_read"):
            time.now += 3.0
        clock.record("graphs", 0.5)  # measured elsewhere, still inside the outer step
        time.now += 0.5
    time.now += 2.0
    assert clock.milestone("group_join")
    assert not clock.milestone("group_join")  # a later assignment is no start-up step
    assert list(clock.steps) == ["python", "model_setup", "weights_read", "graphs", "group_join"]
    assert clock.steps == {
        "python": 10.0,
        "model_setup": 1.0,
        "weights_read": 3.0,
        "graphs": 0.5,
        "group_join": 2.0,
    }


def test_a_step_named_twice_adds_up() -> None:
    time = FakeTime()
    clock = StartupClock(now=time)
    for seconds in (1.0, 2.0):
        with clock.step("imports"):
            time.now += seconds
    assert clock.steps == {"imports": 3.0}


def test_the_summary_names_every_part_and_the_rest() -> None:
    steps = {
        "python": 1.0,
        "imports": 2.0,
        "kafka_check": 0.25,
        "model_setup": 0.5,
        "tokenizer": 0.5,
        "weights_read": 3.0,
        "to_device": 1.0,
        "warmup": 2.0,
        "graphs": 1.5,
        "group_join": 3.0,
        "first_batch": 0.25,
    }
    line = summary(16.0, steps)
    assert line == (
        "first output 16.0 s after start: python+imports 3.00, kafka check 0.25, "
        "model load 5.00 (tokenizer 0.50, weights 3.00, CUDA init 0.00, to device 1.00, "
        "backend probes 0.00), warm-up 2.00, "
        "graphs 1.50, labels 0.00, service build 0.00, group join 3.00, "
        "first batch 0.25, other 1.00 (seconds)"
    )


def test_finish_logs_the_summary_once_and_watchers_see_each_step() -> None:
    time = FakeTime()
    clock = StartupClock(origin=99.0, now=time)
    seen: dict[str, float] = {}
    clock.milestone("python")
    clock.watch(seen.__setitem__)  # told of the steps so far, too
    time.now += 4.0
    line = clock.finish()
    assert line is not None and line.startswith("first output 5.0 s after start:")
    assert "first batch 4.00" in line
    assert clock.finish() is None and clock.total == 5.0
    assert seen == {"python": 1.0, "first_batch": 4.0}


def test_process_age_reads_proc_and_falls_back_to_now(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    # a command name with a space and a bracket: fields are counted after the last ')'
    rest = ["S"] + ["0"] * 18 + [str(50 * ticks)] + ["0"] * 10
    stat.write_text(f"123 (odd) name) {' '.join(rest)}\n", encoding="ascii")
    uptime = tmp_path / "uptime"
    uptime.write_text("62.50 100.00\n", encoding="ascii")
    assert process_age(stat, uptime) == pytest.approx(12.5)
    assert process_age(tmp_path / "missing", uptime) is None

    own = process_age()
    machine_up = float(Path("/proc/uptime").read_text(encoding="ascii").split()[0])
    assert own is not None and 0 < own <= machine_up  # this test process: however long ago
    time = FakeTime(1000.0)
    assert StartupClock.from_process_start(lambda: 12.5, time).origin == 987.5
    assert StartupClock.from_process_start(lambda: None, time).origin == 1000.0


def test_engine_loaders_report_only_to_an_active_clock() -> None:
    with startup.step("weights_read"):  # none active: nothing happens
        startup.record("graphs", 1.0)
    clock = StartupClock()
    with clock.active():
        startup.record("graphs", 1.0)
    startup.record("graphs", 5.0)
    assert clock.steps == {"graphs": 1.0}


def test_loading_the_tiny_model_records_its_steps(tiny_model: Path) -> None:
    config = ServiceConfig(
        engine={"model": str(tiny_model), "device": "cpu"},
        topics=[{"input": "in", "output": "out", "dead_letter": "dlq", "labels": ["a", "b"]}],
    )
    clock = StartupClock()
    load_ready_engine(config, Metrics(), clock)
    for name in ("imports", "model_setup", "weights_read", "to_device", "tokenizer", "warmup"):
        assert name in clock.steps, name
        assert clock.steps[name] >= 0.0
    order = list(clock.steps)
    assert order.index("imports") < order.index("weights_read") < order.index("warmup")


class WarmUps:
    """An engine that compiles later: which warm-up the service's load ran."""

    model_id = "warm-ups"

    def __init__(self) -> None:
        self.ran: list[str] = []

    def warmup(self) -> None:
        self.ran.append("warmup")

    def warmup_eagerly(self) -> None:
        self.ran.append("warmup_eagerly")

    def compile_in_background(self) -> None:
        self.ran.append("compile_in_background")


@pytest.mark.parametrize(
    ("in_background", "expected"), [(True, ["warmup_eagerly"]), (False, ["warmup"])]
)
def test_compile_in_background_picks_the_warm_up_the_service_loads_with(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, in_background: bool, expected: list[str]
) -> None:
    """true: the eager warm-up (the compile starts at the first output); false: the
    warm-up that compiles and waits, before anything is consumed."""
    engine = WarmUps()
    monkeypatch.setattr("stream_classifier.assemble.load_engine", lambda *args: engine)
    monkeypatch.setattr("stream_classifier.assemble.check_windows", lambda *args: None)
    config = ServiceConfig(
        engine={"model": str(tiny_model), "device": "cpu", "compile_in_background": in_background},
        topics=[{"input": "in", "output": "out", "dead_letter": "dlq", "labels": ["a", "b"]}],
    )
    load_ready_engine(config, Metrics(), StartupClock())
    assert engine.ran == expected


# -- through the broker --------------------------------------------------------------------

SUMMARY = re.compile(r"first output (\d+\.\d) s after start: (.*) \(seconds\)")
NAMED = [
    "python+imports",
    "kafka check",
    "model load",
    "tokenizer",
    "weights",
    "CUDA init",
    "to device",
    "backend probes",
    "warm-up",
    "graphs",
    "labels",
    "service build",
    "group join",
    "first batch",
    "other",
]


@pytest.fixture
def service_log(bootstrap: str, tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """`stream-classifier run` on the tiny model, its log in a file."""
    topics = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, topics.values())
    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": unique("group")},
        "processing": {"max_batch_wait_ms": 10, "commit_interval_ms": 200},
        "engine": {"kind": "nli", "model": str(TINY_MODEL), "device": "cpu"},
        "metrics": {"enabled": False},
        "topics": [{**topics, "labels": ["spam", "safe"]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_CLASSIFIER_")}
    command = [sys.executable, "-m", "stream_classifier.cli", "run", "--config", str(path)]
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    try:
        yield log, topics
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(60) == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise


@pytest.mark.kafka
def test_run_logs_each_step_and_the_summary_at_its_first_output(
    bootstrap: str, service_log: tuple[Path, dict[str, str]]
) -> None:
    log, topics = service_log
    wait_until(lambda: "start-up: group_join took" in log.read_text(), 120, "group joined")
    produce(bootstrap, topics["input"], [b'{"text": "win a free phone"}'])
    wait_until(lambda: SUMMARY.search(log.read_text()) is not None, 60, "the summary line")
    text = log.read_text()
    found = SUMMARY.search(text)
    assert found is not None
    total, parts = float(found.group(1)), found.group(2)
    assert total > 0
    for words in NAMED:
        assert re.search(rf"(^|[ (]){re.escape(words)} \d+\.\d\d", parts), (words, parts)
    first = text.index("stream-classifier ")
    assert "starting: config" in text[first : first + 200]
    assert re.search(r"loading nli model \S+ from \S+ on cpu", text)
    steps = ("python", "imports", "kafka_check", "weights_read", "warmup", "heap_freeze")
    for step in (*steps, "group_join"):
        assert f"start-up: {step} took" in text, step


class Cycle:
    """An object in a reference cycle: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_freeze_heap_frees_the_garbage_then_keeps_what_lives_out_of_later_collections() -> None:
    garbage = weakref.ref(Cycle())  # unreachable at once, but a cycle: not freed yet
    alive = Cycle()
    try:
        startup.freeze_heap()
        assert garbage() is None  # collected first, not frozen forever
        assert gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects())  # no collection walks it
    finally:
        gc.unfreeze()


class LaterCompiler:
    """An engine that compiles later: counts the calls that start its compile."""

    def __init__(self) -> None:
        self.started = 0

    def warmup_eagerly(self) -> None:
        pass

    def compile_in_background(self) -> None:
        self.started += 1


def test_the_engine_starts_compiling_at_the_first_output_and_only_then() -> None:
    clock = StartupClock()
    engine = LaterCompiler()
    first = FirstOutput(clock, Metrics(), engine)  # type: ignore[arg-type]
    assert engine.started == 0
    for _ in range(3):
        first.written(None)  # type: ignore[arg-type]
    assert engine.started == 1
    assert clock.total is not None
