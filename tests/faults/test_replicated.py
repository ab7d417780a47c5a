"""Brokers bounced in rotation under a running service, on a replicated cluster.

Modelled on Kafka's own transactions system test (tests/kafkatest/tests/core/
transactions_test.py): three brokers, every topic replicated three times with
min.insync.replicas 2 (the internal ones too), brokers hard-bounced (SIGKILL) or
clean-bounced (SIGTERM, a controlled shutdown) one after another, so partition leaders,
the group coordinator and the transaction coordinator all move while the service writes.
Input arrives at a steady rate for the whole run; the outputs are then counted (nothing
lost, no duplicate under exactly_once), their per-key order checked, and the longest wait
between two new outputs recorded in the fault report, beside the longest wait of the
input itself (a hard-killed broker stalls every acks=all write of the cluster, the
upstream producer's too, until the controller fences it).

The service runs with the product's client defaults (not the 6 s session the other
fault tests use to move a killed member's partitions quickly): what a user gets.

The cluster is ``deploy/kafka/kafka-cluster`` (ports 9492-9497); a session fixture starts
it when it is not running, and stops it at the end if it started it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from kafka_helpers import delete_topics, read_to_end

from faults.harness import (
    REPORT,
    Bouncer,
    Cluster,
    Counts,
    FaultRun,
    GroupProbe,
    OutputClock,
    PacedInput,
    TransactionProbe,
    busy_loops,
    coordinator_partition,
    create_replicated_topics,
    dead_letter_source,
    input_key,
    java_string_hash,
    key_order_held,
    longest_waits,
    output_source,
)

pytestmark = pytest.mark.kafka

#: Input events a run (at least; the input goes on until every node was bounced) and
#: their rate: 100 s of input or more.
EVENTS = 3000
RATE = 30.0
#: The longest one bounce may take: restart, back in sync, leaders back (under two busy
#: loops a restart took up to 60 s here).
BOUNCE_LIMIT_S = 240
#: Every node bounced at least once, so every coordinator moved at least once.
MIN_BOUNCES = 3
#: The librdkafka defaults the product keeps: the harness's 6 s session is taken out.
PRODUCT_DEFAULTS: dict[str, Any] = {
    "consumer_extra": {"session.timeout.ms": None, "heartbeat.interval.ms": None}
}
#: The harness's batch settings (FaultRun): micro-batches of 64, two pending on a CPU.
BATCH, PENDING = 64, 2
#: What one bounce can leave in flight for at_least_once to redo: events read and not
#: yet acknowledged (at most ``max_batch_messages x (max_pending_batches + 2)`` before
#: the service pauses) plus those queued or being scored (as many again).
IN_FLIGHT_BOUND = 2 * BATCH * (PENDING + 2)
#: The longest wait between two new outputs a run may see (issue 18): 15 s, or the
#: cluster's own longest wait plus the service's share where the cluster itself stalled
#: longer. The cluster's wait is the input's (``input_stall_s``), and under exactly_once
#: also that of a probe committing transactions at the service's transaction coordinator
#: (``transaction_stall_s``: a coordinator moving back to a restarted node and loading its
#: log holds every transaction there, which the non-transactional input does not see), and
#: in both guarantees that of a probe committing offsets at the service's group
#: coordinator (``group_stall_s``: a coordinator that does not answer for longer than the
#: 45 s session costs the member its partitions until it answers again).
#: Input, outputs and probe share their replicas partition by partition
#: (``create_replicated_topics``), so these are the cluster's waits on the replica sets the
#: outputs are written to. A hard-killed broker holds every acks=all write to its
#: partitions (the upstream producer's too) until the controller fences it
#: (``broker.session.timeout.ms``, 9 s; 8-14 s measured here), and an exactly_once
#: transaction that touched one of them ends only after that, then is redone: the share.
#: It is the same whether busy loops run beside the test or not (``make test`` must pass
#: with two): a default run under two measured 9.6 s, its new producer's
#: ``init_transactions`` answered ``CONCURRENT_TRANSACTIONS`` for 8 s after the cluster
#: had recovered. A hung transactional call (45 s before issue 18) fails it.
#: docs/RELIABILITY.md, "A replicated cluster".
GAP_LIMIT_S = 15.0
SERVICE_SHARE_S = 12.0


def bounced_run(
    cluster: Cluster,
    mode: str,
    hard: bool,
    tmp_path: Path,
    fault: str,
    events: int = EVENTS,
    rate: float = RATE,
    kafka: dict[str, Any] | None = None,
    **processing: Any,
) -> dict[str, Any]:
    """One service, input at ``rate`` (``events`` at least, and on until every node was
    bounced), brokers bounced in rotation meanwhile; then drained and counted. Returns
    the report row (also appended to the fault report); the run's timeline (bounces,
    waits between outputs and between inputs) is written to ``tmp_path/timeline.json``."""
    cluster.ensure_whole()
    kafka = PRODUCT_DEFAULTS if kafka is None else kafka
    run = FaultRun(cluster.bootstrap, mode, tmp_path, replicas=3, kafka=kafka, **processing)
    clock = OutputClock(cluster.bootstrap, run.output)
    clock.start()
    # The input's own waits, to tell a stalled service from a stalled cluster.
    input_clock = OutputClock(cluster.bootstrap, run.input, key_of=input_key)
    input_clock.start()
    # exactly_once: the cluster's own wait for transactions at the service's coordinator.
    probe = transaction_probe(cluster, run) if mode == "exactly_once" else None
    # Both: the cluster's own wait at the service's group coordinator.
    group_probe = GroupProbe(cluster.bootstrap, run.input, like=run.group)
    group_probe.start()
    bouncer = Bouncer(cluster, hard)
    # The input flows until every node was bounced (or the bouncer failed).
    paced = PacedInput(
        run, events, rate, until=lambda: bouncer.bounces >= MIN_BOUNCES or not bouncer.is_alive()
    )
    try:
        run.start()
        paced.start()
        run.wait_scored(1)
        bouncer.start()
        paced.finish(timeout=events / rate + MIN_BOUNCES * BOUNCE_LIMIT_S)
        bouncer.finish()
        run.wait_drained(timeout=300, brokers=lambda: cluster_side(cluster, run, mode))
    finally:
        paced.stop()
        bouncer.stop()
        clock.finish()
        input_clock.finish()
        if probe is not None:
            probe.finish()
        group_probe.finish()
        (tmp_path / "timeline.json").write_text(
            json.dumps(
                {
                    "bounces": [asdict(event) for event in bouncer.events],
                    "gaps": clock.gaps(10),
                    "input_gaps": input_clock.gaps(10),
                    "transaction_gaps": probe.gaps(10) if probe else [],
                    "group_gaps": group_probe.gaps(10),
                    "by_partition": {
                        p: {
                            "acked": longest_waits(paced.acked, 3, p),
                            "input": input_clock.gaps(3, p),
                            "output": clock.gaps(3, p),
                        }
                        for p in range(run.partitions)
                    },
                },
                indent=1,
            ),
            encoding="utf-8",
        )
    assert run.terminate_all() == [0], run.logs()
    topics = [run.input, run.output, run.dead_letter, *([f"{run.output}-probe"] if probe else [])]
    try:
        row, counts = counted(run, fault, clock, input_clock, (probe, group_probe), bouncer)
    finally:
        # Each run leaves the cluster as it found it: partitions left behind are loaded
        # again at every restart, and restarts (hence the stalls) grow run by run.
        delete_topics(cluster.bootstrap, topics)
    run.assert_guarantee(counts)
    assert row["order_held"], f"per-key order broken\n{run.logs()}"
    assert counts.duplicated <= bouncer.bounces * IN_FLIGHT_BOUND, f"{row}\n{run.logs()}"
    stall = max(row["input_stall_s"], row["group_stall_s"], row.get("transaction_stall_s", 0.0))
    limit = max(GAP_LIMIT_S, stall + SERVICE_SHARE_S)
    assert row["longest_gap_s"] <= limit, f"{row}: over {limit:.1f}s, see {tmp_path}/timeline.json"
    return row


def cluster_side(cluster: Cluster, run: FaultRun, mode: str) -> str:
    """What the brokers say of the service's transactional id (exactly_once), shown when
    the drain times out: a coordinator that answers ``CONCURRENT_TRANSACTIONS`` for good
    holds a transaction it never completes, and only its side names why."""
    if mode != "exactly_once":
        return ""
    return cluster.transaction_state(f"{run.group}-0") + "\n"


def counted(
    run: FaultRun,
    fault: str,
    clock: OutputClock,
    input_clock: OutputClock,
    probes: tuple[TransactionProbe | None, GroupProbe],
    bouncer: Bouncer,
) -> tuple[dict[str, Any], Counts]:
    """What was read back, counted, and the run's report row (appended to the report)."""
    # The input is what the topic holds: an idempotent producer can still write an event
    # twice across a bounce (a retry after its epoch was bumped), and each copy is an
    # input event the service must score. Nothing sent may be missing from it.
    input_records = read_to_end(run.bootstrap, run.input)
    inputs = [r.value or b"" for r in input_records]
    assert set(inputs) == set(run.values), "the input producer lost events"
    input_duplicated = len(inputs) - len(run.values)
    run.values = inputs
    counts = run.count(fault, record=False)
    outputs = read_to_end(run.bootstrap, run.output)
    dead = read_to_end(run.bootstrap, run.dead_letter)
    # A clock that missed what was read back would report gaps too short to fail on.
    assert outputs and clock.saw_all(outputs), "the output clock missed outputs"
    assert input_clock.saw_all(input_records), "the input clock missed inputs"
    order = key_order_held(outputs, output_source) and key_order_held(dead, dead_letter_source)
    probe, group_probe = probes
    longest, input_stall, group_stall = (
        (c.gaps(1) or [(0.0, 0.0)])[0][0] for c in (clock, input_clock, group_probe)
    )
    transaction_stall = (probe.gaps(1) or [(0.0, 0.0)])[0][0] if probe else 0.0
    row = {
        **asdict(counts),
        "order_held": order,
        "longest_gap_s": round(longest, 1),
        "input_stall_s": round(input_stall, 1),
        "group_stall_s": round(group_stall, 1),
        **({"transaction_stall_s": round(transaction_stall, 1)} if probe else {}),
        "bounces": bouncer.bounces,
        "input_duplicated": input_duplicated,
    }
    REPORT.append(row)
    return row, counts


def transaction_probe(cluster: Cluster, run: FaultRun) -> TransactionProbe:
    """A probe committing transactions at the coordinator of the service's transactional
    id (``FaultRun.start``'s slot 0) to a topic with the outputs' replicas, started."""
    topic = f"{run.output}-probe"
    create_replicated_topics(cluster.bootstrap, [topic], run.partitions, replicas=3)
    probe = TransactionProbe(cluster.bootstrap, topic, run.partitions, like=f"{run.group}-0")
    probe.start()
    return probe


#: --long: each bounce kind this many times per guarantee, two busy loops beside each run.
LONG_RUNS = 5


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The default run has one hard-bounce run per guarantee; ``--long`` has hard and
    clean bounces, :data:`LONG_RUNS` runs each (one test item per run, so that the report
    names each run and nothing is reported as skipped)."""
    if {"bounce", "attempt"} <= set(metafunc.fixturenames):
        long = metafunc.config.getoption("--long")
        bounces = ["hard", "clean"] if long else ["hard"]
        runs = LONG_RUNS if long else 1
        metafunc.parametrize(
            ("bounce", "attempt"),
            [(bounce, attempt) for bounce in bounces for attempt in range(runs)],
            ids=[
                f"{bounce}-{attempt + 1}of{runs}" for bounce in bounces for attempt in range(runs)
            ],
        )


@pytest.fixture
def load(request: pytest.FixtureRequest) -> Iterator[None]:
    """Two busy loops beside each run of ``--long`` (a loaded CI node), none by default."""
    if not request.config.getoption("--long"):
        yield
        return
    with busy_loops():
        yield


def test_brokers_bounced_in_rotation(
    cluster: Cluster,
    mode: str,
    bounce: str,
    attempt: int,
    tmp_path: Path,
    load: None,
    request: pytest.FixtureRequest,
) -> None:
    long = request.config.getoption("--long")
    runs = LONG_RUNS if long else 1
    signal = "SIGKILL" if bounce == "hard" else "SIGTERM"
    note = ", 2 busy loops" if long else ""
    fault = f"3 brokers, {signal} in rotation{note} (run {attempt + 1}/{runs})"
    bounced_run(cluster, mode, bounce == "hard", tmp_path, fault, kafka=debug_settings())


def debug_settings() -> dict[str, Any]:
    """The product's defaults, plus librdkafka's ``debug`` contexts named in
    ``REPLICATED_DEBUG`` (e.g. ``cgrp,eos``): what a gap is read from in the logs."""
    contexts = os.environ.get("REPLICATED_DEBUG")
    return {**PRODUCT_DEFAULTS, "extra": {"debug": contexts}} if contexts else PRODUCT_DEFAULTS


def test_the_coordinators_side_of_a_transactional_id_is_shown(cluster: Cluster) -> None:
    """What a drain that timed out prints for exactly_once (``cluster_side``): the
    coordinator's state of the id and the brokers' lines that name it, read from the
    cluster itself (a diagnosis that would only run on a failure must not rot unseen)."""
    topic = f"coordinator-side-{os.getpid()}"
    create_replicated_topics(cluster.bootstrap, [topic], 1, replicas=3)
    transactional_id = f"{topic}-tx"
    producer = Producer(
        {"bootstrap.servers": cluster.bootstrap, "transactional.id": transactional_id}
    )
    try:
        producer.init_transactions(60)
        producer.begin_transaction()
        producer.produce(topic, value=b"one")
        producer.commit_transaction(60)
        shown = cluster.transaction_state(transactional_id)
    finally:
        delete_topics(cluster.bootstrap, [topic])
    described = shown.split("-- broker log lines", 1)[0]
    assert transactional_id in described and "CompleteCommit" in described, shown
    assert all(f"== node {n}" in shown for n in (1, 2, 3)), shown


def test_coordinator_partition_is_kafkas() -> None:
    """The probe's coordinator is the service's only if the hash is Java's: known values
    of ``String.hashCode()`` (one is Integer.MIN_VALUE, which Kafka's abs maps to 0)."""
    assert java_string_hash("hello") == 99162322
    assert java_string_hash("中文") == 646394
    assert java_string_hash("polygenelubricants") == -(2**31)
    assert coordinator_partition("polygenelubricants") == 0
    assert coordinator_partition("hello", 50) == 99162322 % 50
