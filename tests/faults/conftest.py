"""Fault suite options and its report (docs/RELIABILITY.md is made from it)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.harness import KAFKA_CLUSTER, REPORT, STARTED, Cluster

#: --long: 20,000 events a fault and ten loaded scale-outs outlast pytest-timeout's 600 s.
LONG_TIMEOUT_S = 7200
#: How long a node's start may take (test_replicated's BOUNCE_LIMIT_S for a whole bounce).
BOUNCE_START_S = 240


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        for item in items:
            if "faults" in item.nodeid:
                item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_S))


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """A test that failed half-way must not leave its services running into the next."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(30)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The three-node cluster of deploy/kafka/kafka-cluster (KAFKA_CLUSTER_PORT, default
    9492): started here when it is not running, and then stopped at the end. A node
    restarted under load may take minutes to load its logs: its start waits as long as
    a bounce may take (the script's own default is 120 s)."""
    env = {"KAFKA_START_TIMEOUT": str(BOUNCE_START_S), **os.environ}
    running = subprocess.run(
        [str(KAFKA_CLUSTER), "status"], env=env, capture_output=True, check=False
    )
    subprocess.run([str(KAFKA_CLUSTER), "start"], env=env, check=True)
    try:
        yield Cluster(env)
    finally:
        if running.returncode != 0:
            subprocess.run([str(KAFKA_CLUSTER), "stop"], env=env, check=False)


@pytest.fixture
def events(request: pytest.FixtureRequest) -> int:
    """Events per fault run: small enough for CI, 20,000 with --long."""
    return 20_000 if request.config.getoption("--long") else 1_500


@pytest.fixture(params=["at_least_once", "exactly_once"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    header = ["fault", "mode", "events_in", "outputs", "dead_letters", "lost", "duplicated"]
    # The replicated-cluster runs (test_replicated.py) also record these.
    extra = (
        "order_held",
        "longest_gap_s",
        "input_stall_s",
        "group_stall_s",
        "transaction_stall_s",
    )
    header += [key for key in extra if any(key in r for r in REPORT)]
    terminalreporter.section("fault suite counts")
    terminalreporter.write_line(" | ".join(header))
    for row in REPORT:
        terminalreporter.write_line(" | ".join(str(row.get(key, "")) for key in header))
    path = os.environ.get("FAULT_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2), encoding="utf-8")
