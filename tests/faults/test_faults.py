"""Faults on the real broker, in both delivery modes: nothing lost, no duplicate under EOS.

Each test runs `stream-classifier run` processes against its own topics, injects one
fault, and counts what an independent read_committed consumer sees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KAFKA_LOCAL
from kafka_helpers import committed, create_topics, read_to_end

from faults.harness import POISONED_SERVICE, FaultRun, busy_loops, free_port

pytestmark = pytest.mark.kafka


def test_sigkill_three_times_mid_run(
    bootstrap: str, mode: str, events: int, tmp_path: Path
) -> None:
    run = FaultRun(bootstrap, mode, tmp_path)
    run.produce(events)
    for fraction in (0.15, 0.4, 0.65):
        process = run.start()
        run.wait_scored(int(events * fraction))
        run.kill(process)
    run.start()
    run.wait_drained()
    assert run.terminate_all() == [-9, -9, -9, 0]
    run.assert_guarantee(run.count("SIGKILL x3"))


def test_sigterm_drains_and_commits_what_it_processed(
    bootstrap: str, mode: str, events: int, tmp_path: Path
) -> None:
    run = FaultRun(bootstrap, mode, tmp_path, partitions=1)
    run.produce(events)
    process = run.start()
    run.wait_scored(events // 4)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, run.logs()
    assert time.monotonic() - started < 25  # within shutdown_timeout_s (20 s) + exit
    counts_at_stop = run.count("SIGTERM (at stop)", record=False)
    # Committed equals processed: every event below the offset has its output, none above.
    assert (
        counts_at_stop.outputs + counts_at_stop.dead_letters - counts_at_stop.duplicated
        == committed_offset(run)
    ), run.logs()
    run.start()
    run.wait_drained()
    assert run.terminate_all()[-1] == 0
    run.assert_guarantee(run.count("SIGTERM, drained, restarted"))


def committed_offset(run: FaultRun) -> int:
    return committed(run.bootstrap, run.group, run.input)[0]


def test_flood_of_malformed_events(bootstrap: str, mode: str, tmp_path: Path) -> None:
    run = FaultRun(bootstrap, mode, tmp_path)
    run.produce(5_000, bad_every=2)  # half malformed
    run.produce(500, bad_every=500)
    run.start()
    run.wait_drained()
    assert run.terminate_all() == [0]
    counts = run.count("5,000 malformed mixed in")
    assert counts.dead_letters >= 2_500
    run.assert_guarantee(counts)


def test_scale_out_to_three_then_one_killed(
    bootstrap: str, mode: str, events: int, tmp_path: Path
) -> None:
    scale_out_then_kill(scale_out_run(bootstrap, mode, tmp_path), events, "")


def scale_out_run(bootstrap: str, mode: str, tmp_path: Path) -> FaultRun:
    """The killed instance's id is not started again, so its open transaction (if it was
    killed inside one) lasts until its timeout: 15 s here, not the default 60 s."""
    return FaultRun(
        bootstrap,
        mode,
        tmp_path,
        partitions=6,
        transaction_timeout_ms=15_000,
        delivery_timeout_ms=10_000,
    )


def scale_out_then_kill(run: FaultRun, events: int, note: str) -> None:
    run.scale_out_and_kill_first(events)
    run.wait_drained(timeout=300)
    assert run.terminate_all()[1:] == [0, 0]
    run.assert_guarantee(run.count(f"scale 1->3, one killed{note}"))


@pytest.fixture
def loaded() -> Iterator[None]:
    """Two busy loops beside the test."""
    with busy_loops():
        yield


def test_scale_out_with_a_kill_while_two_busy_loops_load_the_cpu(
    bootstrap: str,
    mode: str,
    events: int,
    tmp_path: Path,
    loaded: None,
    request: pytest.FixtureRequest,
) -> None:
    repeats = 10 if request.config.getoption("--long") else 1
    for attempt in range(repeats):
        run_dir = tmp_path / f"run-{attempt}"
        run_dir.mkdir()
        run = scale_out_run(bootstrap, mode, run_dir)
        scale_out_then_kill(run, events, f", 2 busy loops (run {attempt + 1}/{repeats})")


def test_poison_events_are_dead_lettered_and_the_stream_goes_on(
    bootstrap: str, mode: str, tmp_path: Path
) -> None:
    run = FaultRun(bootstrap, mode, tmp_path)
    run.produce(600, poison_every=50)
    process = run.start(script=POISONED_SERVICE)
    run.wait_drained()
    assert process.poll() is None, f"the service stopped on a poison event\n{run.logs()}"
    assert run.terminate_all() == [0]
    run.assert_guarantee(run.count("poison events (the engine raises on 1 in 50)"))
    poison = sum(b"POISON" in value for value in run.values)
    codes = Counter(
        r.headers["stream-classifier.error.code"] for r in read_to_end(bootstrap, run.dead_letter)
    )
    assert poison > 0 and codes[b"engine_failed"] == poison, codes


def test_sigkill_with_a_new_transactional_id_at_every_restart(
    bootstrap: str, events: int, tmp_path: Path
) -> None:
    """What a Kubernetes Deployment does: each new pod has a new name, so a new id."""
    run = FaultRun(
        bootstrap,
        "exactly_once",
        tmp_path,
        transaction_timeout_ms=15_000,
        delivery_timeout_ms=10_000,
    )
    run.produce(events)
    for pod, fraction in enumerate((0.15, 0.4, 0.65)):
        process = run.start(STREAM_CLASSIFIER_PROCESSING__TRANSACTIONAL_ID=f"{run.group}-pod{pod}")
        run.wait_scored(int(events * fraction))
        run.kill(process)
    run.start(STREAM_CLASSIFIER_PROCESSING__TRANSACTIONAL_ID=f"{run.group}-pod3")
    run.wait_drained(timeout=300)
    assert run.terminate_all() == [-9, -9, -9, 0]
    run.assert_guarantee(run.count("SIGKILL x3, a new transactional id each restart"))


def test_output_topic_missing_stops_at_start_and_recovers_when_created(
    bootstrap: str, mode: str, tmp_path: Path
) -> None:
    run = FaultRun(bootstrap, mode, tmp_path, partitions=1, create_output=False)
    run.produce(300)
    process = run.start()
    assert process.wait(120) == 4, run.logs()  # EXIT_KAFKA: the preflight names the topic
    assert run.output in run.logs()
    assert committed_offset(run) == -1001  # nothing committed
    create_topics(bootstrap, [run.output])
    run.start()
    run.wait_drained()
    assert run.terminate_all() == [4, 0]
    run.assert_guarantee(run.count("output topic missing, then created"))


@pytest.fixture
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A broker of this test's own, so stopping it disturbs no other test."""
    port = str(free_port_pair())
    env = {
        **os.environ,
        "KAFKA_PORT": port,
        "KAFKA_LOCAL_DIR": str(tmp_path_factory.mktemp("broker")),
    }
    subprocess.run([str(KAFKA_LOCAL), "start"], check=True, env=env)
    try:
        yield env
    finally:
        subprocess.run([str(KAFKA_LOCAL), "stop"], check=False, env=env)


def free_port_pair() -> int:
    while True:
        port = free_port()
        try:
            with __import__("socket").socket() as sock:
                sock.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def test_broker_down_past_the_delivery_timeout_then_scale_out_and_a_kill(
    private_broker: dict[str, str],
    mode: str,
    events: int,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """An outage longer than delivery.timeout.ms (30 s): ridden out, then a rebalance."""
    outage_s = 120 if request.config.getoption("--long") else 40
    bootstrap = f"127.0.0.1:{private_broker['KAFKA_PORT']}"
    run = FaultRun(bootstrap, mode, tmp_path, partitions=6)
    run.produce(events)
    first = run.start()
    run.wait_scored(events // 4)
    broker_outage(run, first, private_broker, outage_s)
    run.start(slot=1)
    run.start(slot=2)
    run.wait_scored(events // 2, timeout=300)
    run.kill(first)
    run.produce(events // 2)
    run.wait_drained(timeout=300)
    assert run.terminate_all()[1:] == [0, 0]
    run.assert_guarantee(run.count(f"broker down {outage_s} s, then scale 1->3, one killed"))


def broker_outage(
    run: FaultRun, process: subprocess.Popen[bytes], broker: dict[str, str], seconds: float
) -> None:
    """The broker crashes (SIGKILL) and is back after ``seconds``. Not a clean stop: on
    one node, Kafka's controlled shutdown can complete a transaction without writing its
    markers, and the next transaction of the same producer commits those records again:
    duplicates the service cannot prevent (docs/RELIABILITY.md)."""
    subprocess.run([str(KAFKA_LOCAL), "kill"], check=True, env=broker)
    outage_end = time.monotonic() + seconds
    while time.monotonic() < outage_end:  # the outage itself: the service must ride it out
        assert process.poll() is None, f"service exited while the broker was down\n{run.logs()}"
        time.sleep(0.5)
    subprocess.run([str(KAFKA_LOCAL), "start"], check=True, env=broker)


def test_broker_down_fifteen_seconds_mid_run(
    private_broker: dict[str, str], mode: str, events: int, tmp_path: Path
) -> None:
    bootstrap = f"127.0.0.1:{private_broker['KAFKA_PORT']}"
    run = FaultRun(bootstrap, mode, tmp_path)
    run.produce(events)
    process = run.start()
    run.wait_scored(events // 4)
    broker_outage(run, process, private_broker, 15)
    run.wait_drained(timeout=240)
    assert process.poll() is None, run.logs()
    assert run.terminate_all() == [0]
    run.assert_guarantee(run.count("broker down 15 s"))


def test_sighup_reload_mid_stream_with_every_event_routed(
    bootstrap: str, mode: str, events: int, tmp_path: Path
) -> None:
    run = FaultRun(bootstrap, mode, tmp_path, routed=True)
    run.produce(events)
    process = run.start()
    run.wait_scored(events // 3)
    run.change_topic_settings(labels=["spam", "abuse", "safe"], hypothesis_template="about {}")
    process.send_signal(signal.SIGHUP)
    run.produce(events // 2)
    run.wait_drained()
    assert process.poll() is None, run.logs()
    assert run.terminate_all() == [0]
    run.assert_guarantee(run.count("SIGHUP reload mid-stream, every event routed"))
    run.assert_routed()
    outputs = [r.json_value() for r in read_to_end(bootstrap, run.output)]
    by_version = Counter(o["settings_version"] for o in outputs)
    assert len(by_version) == 2, by_version  # before and after the reload
    assert {len(o["labels"]) for o in outputs} == {4, 3}
    assert "configuration reloaded" in run.whole_logs()
