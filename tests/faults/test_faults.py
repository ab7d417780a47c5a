"""Faults on the real broker, in both delivery modes: nothing lost, no duplicate under EOS.

Each test runs `stream-classifier run` processes against its own topics, injects one
fault, and counts what an independent read_committed consumer sees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KAFKA_LOCAL
from kafka_helpers import committed, create_topics

from faults.harness import FaultRun, free_port

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
    run = FaultRun(bootstrap, mode, tmp_path, partitions=6)
    run.produce(events)
    first = run.start()
    run.wait_scored(events // 5)
    run.start(slot=1)
    run.start(slot=2)
    run.wait_scored(events // 2)
    run.kill(first)
    run.produce(events // 2)
    run.wait_drained()
    assert run.terminate_all()[1:] == [0, 0]
    run.assert_guarantee(run.count("scale 1->3, one killed"))


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


def test_broker_down_fifteen_seconds_mid_run(
    private_broker: dict[str, str], mode: str, events: int, tmp_path: Path
) -> None:
    bootstrap = f"127.0.0.1:{private_broker['KAFKA_PORT']}"
    run = FaultRun(bootstrap, mode, tmp_path)
    run.produce(events)
    process = run.start()
    run.wait_scored(events // 4)
    subprocess.run([str(KAFKA_LOCAL), "stop"], check=True, env=private_broker)
    outage_end = time.monotonic() + 15
    while time.monotonic() < outage_end:  # the outage itself: the service must ride it out
        assert process.poll() is None, f"service exited while the broker was down\n{run.logs()}"
        time.sleep(0.5)
    subprocess.run([str(KAFKA_LOCAL), "start"], check=True, env=private_broker)
    run.wait_drained(timeout=240)
    assert process.poll() is None, run.logs()
    assert run.terminate_all() == [0]
    run.assert_guarantee(run.count("broker down 15 s"))
