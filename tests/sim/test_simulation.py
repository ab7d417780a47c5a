"""The service loop against the in-memory Kafka model: seeded schedules and named scenarios.

A failing seed prints the command that replays it with a trace.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from sim.kafka_model import Txn
from sim.simulation import (
    CONFIGS,
    DLQ,
    ENGINE_TIMEOUT_S,
    INPUT,
    MODES,
    OUTPUT,
    RELOADS,
    SHARED_METRICS,
    Instance,
    Simulation,
    config,
    event_number,
)

from stream_classifier.config import MetricsConfig
from stream_classifier.headers import ESCAPED_NAMES_HEADER, HEADER_PREFIX, UNREADABLE_HEADER
from stream_classifier.reload import restart_needed, settings_version
from stream_classifier.sink import SinkError, producer_config

#: Schedules per guarantee: 5,000 in `make test`, 50,000 with --long; SIM_SEEDS=N runs N.
SEEDS, LONG_SEEDS = 5_000, 50_000
#: Seeds per test item (pytest-timeout's 600 s holds one on a loaded machine).
CHUNK = 2_500
#: What the schedules must have made happen, in a chunk of at least COVERAGE_SEEDS seeds
#: (a change that stops a fault from coming up fails here, not silently).
COVERAGE_SEEDS = 2_000
COVERED = {
    "produce refused: over message.max.bytes",
    "produce refused: queue full",
    "produce refused: unknown topic",
    "delivery refused: over the topic's max.message.bytes",
    "delivery failed: unknown topic",
    "delivery timed out",
    "fetch offset out of range, reset",
    "seek refused (_STATE)",
    "retention",
    "topic deleted (input)",
    "topic deleted (output)",
    "consumed with headers",
    "smaller form written (stage 1)",
    "smaller form written (stage 2)",
    "smaller form written (stage 3)",
    "given up (counted)",
    "unhealthy: engine stalled",
}
COVERED_BY_MODE = {
    "at_least_once": {
        "commit landed, reported failed",
        "landed, unreported (killed)",
        "timed out in flight, written",
    },
    "exactly_once": {
        "killed inside commit_transaction",
        "purged by abort_transaction",
        "transaction failed: a record failed delivery",
    },
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seeds" in metafunc.fixturenames:
        default = LONG_SEEDS if metafunc.config.getoption("--long") else SEEDS
        total = int(os.environ.get("SIM_SEEDS") or default)
        chunks = [range(start, min(start + CHUNK, total)) for start in range(0, total, CHUNK)]
        metafunc.parametrize("seeds", chunks, ids=[f"{r.start}-{r.stop}" for r in chunks])


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


def run_schedules(mode: str, seeds: range, levels: bool = False) -> Counter[str]:
    """Run the seeded schedules; fail with a replay line per failing seed (at most five);
    what the schedules made happen, counted."""
    failures = {}
    stats: Counter[str] = Counter()
    for seed in seeds:
        sim = Simulation(seed, mode, metrics=SHARED_METRICS, levels=levels)
        violations = sim.run(200)
        stats.update(sim.cluster.stats)
        if violations:
            failures[seed] = violations[:3]
            if len(failures) == 5:
                break
    flag = " --levels" if levels else ""
    replay = [
        f"python tests/sim/simulation.py --seed {seed} --mode {mode}{flag} --trace: {found}"
        for seed, found in failures.items()
    ]
    assert not failures, "\n".join(replay)
    return stats


@pytest.mark.parametrize("mode", MODES)
def test_seeded_schedules_keep_every_invariant(mode: str, seeds: range) -> None:
    stats = run_schedules(mode, seeds)
    if len(seeds) >= COVERAGE_SEEDS:
        missing = (COVERED | COVERED_BY_MODE[mode]) - set(stats)
        assert not missing, f"never came up in {len(seeds)} schedules: {sorted(missing)}"


#: Schedules per guarantee with two priority levels (SIM_LEVEL_SEEDS=N runs N).
LEVEL_SEEDS = 1_000


@pytest.mark.parametrize("mode", MODES)
def test_seeded_schedules_with_priority_levels_keep_every_invariant(mode: str) -> None:
    """The same faults with batches composed by priority level (stream_classifier/priorities.py)."""
    run_schedules(mode, range(int(os.environ.get("SIM_LEVEL_SEEDS") or LEVEL_SEEDS)), levels=True)


# -- named scenarios: each was a defect of the earlier loop ----------------------------


def scenario(
    mode: str,
    seed: int = 7,
    events: int = 24,
    partitions: int = 2,
    max_bytes: int = 1_000_000,
    queue_kbytes: int = 1_048_576,
) -> Simulation:
    """No random faults, the brokers' default limits; what the test changes on top."""
    sim = Simulation(seed, mode, plain=True)
    sim.cluster.resize(INPUT, partitions)
    sim.max_bytes = max_bytes
    sim.config = config(mode, 0.7, max_bytes, queue_kbytes)
    sim.slots = 3
    sim.produce(events)
    return sim


def run_turns(sim: Simulation, turns: int, slots: list[int] | None = None) -> None:
    for _ in range(turns):
        sim.step(faults=True)
        for slot in slots if slots is not None else sorted(sim.live):
            sim.turn(slot)
            if slot in sim.live:
                sim.live[slot].executor.work(1)
        sim.check_commits()
        sim.check_bounds()
        assert not sim.violations, sim.violations


def finish(sim: Simulation) -> None:
    sim.settle()
    assert sim.violations == []


@pytest.mark.parametrize("mode", MODES)
def test_revoke_and_reassign_inside_one_consume_with_messages_in_hand(mode: str) -> None:
    """Defect 1: a message read before the revoke used to re-register its partition."""
    sim = scenario(mode)
    sim.start(0)
    run_turns(sim, 3)
    source = sim.live[0].source
    owned = sorted(source.owned)
    # The next consume() returns messages fetched before the callbacks, then revokes
    # every partition and assigns them again (committed offsets are lower than positions).
    source.pending += [("revoke", owned), ("assign", owned)]
    sim.cluster.rng.random = lambda: 0.0  # type: ignore[method-assign]  # prefetch first
    sim.turn(0)
    del sim.cluster.rng.random
    assert not sim.violations, sim.violations
    finish(sim)


def test_unstable_committed_offset_delays_the_rewind_instead_of_guessing() -> None:
    """Defect 2: an offset unstable under another member's open transaction is no answer."""
    sim = scenario("exactly_once", partitions=1)
    sim.start(0)
    run_turns(sim, 6)
    # A killed member's transaction holds offsets of our partition: unstable until it ends.
    zombie = sim.cluster.open_txns.setdefault("zombie", Txn("zombie", 1, sim.cluster.step))
    zombie.offsets[("in", 0)] = 3
    sim.cluster.fail_next_txn[sim.live[0].sink.txn_id or ""] = "abortable"
    run_turns(sim, 100)  # past the back-off: the rewind is tried, and must wait
    service = sim.live[0].service
    rewinding = set(service.partitions.rewinding)
    assert rewinding == {("in", 0)}, "rewound while the offset was unstable"
    sim.cluster.end_txn(zombie, commit=False)
    finish(sim)


@pytest.mark.parametrize("mode", MODES)
def test_outage_far_longer_than_the_delivery_timeout_is_ridden_out(mode: str) -> None:
    """Defect 3: at_least_once exited on an outage longer than delivery.timeout.ms."""
    sim = scenario(mode, events=40)
    sim.start(0)
    run_turns(sim, 2)
    sim.cluster.outage = True
    run_turns(sim, 400)  # 13 delivery time-outs of the model
    assert 0 in sim.live, "the service stopped during the outage"
    held = sim.live[0].service
    assert held.checkpoint.in_flight() <= held.max_in_flight
    finish(sim)


def test_losing_the_group_replaces_the_producer_from_the_loop_not_the_callback() -> None:
    """Defect 4: init_transactions ran inside the lost callback, on the Kafka thread."""
    sim = scenario("exactly_once")
    sim.start(0)
    run_turns(sim, 4)
    instance = sim.live[0]
    starts: list[str] = []
    real_start = instance.sink.start

    def counting_start() -> None:
        starts.append("in callback" if instance.service.rebalances.change.lost else "in loop")
        real_start()

    instance.sink.start = counting_start  # type: ignore[method-assign]
    instance.source.lose()
    for _ in range(100):  # a transaction committing meanwhile fails and backs off first
        run_turns(sim, 1)
        if starts:
            break
    assert starts == ["in loop"]
    finish(sim)


@pytest.mark.parametrize("mode", MODES)
def test_poison_events_are_dead_lettered_and_the_stream_goes_on(mode: str) -> None:
    """Defect 5: an engine exception stopped the service (a crash loop on restart)."""
    sim = scenario(mode, events=0)
    for i in range(30):
        text = f"POISON {i}" if i % 7 == 3 else f"event {i}"
        kind = "dead_letter" if "POISON" in text else "output"
        sim.add_event(("in", i % 2), None, f'{{"text": "{text}"}}'.encode(), kind)
    sim.start(0)
    finish(sim)
    codes = [
        dict(s.record.headers).get("stream-classifier.error.code")
        for s in sim.cluster.visible("dlq")
        if s.record is not None
    ]
    assert codes and set(codes) == {b"engine_failed"}


# -- metrics and edges (defects 6 and 7) ----------------------------------------------


def counter_total(counter: Any) -> float:
    samples = (s for m in counter.collect() for s in m.samples if s.name.endswith("_total"))
    return float(sum(s.value for s in samples))


def test_events_produced_counts_only_committed_transactions() -> None:
    sim = scenario("exactly_once", events=30, partitions=1)
    sim.start(0)
    for _ in range(3):
        sim.cluster.fail_next_txn[sim.live[0].sink.txn_id or ""] = "abortable"
        run_turns(sim, 30)
    finish(sim)
    metrics = sim.live[0].service.metrics
    assert counter_total(metrics.transactions) > 3  # aborted ones included
    assert counter_total(metrics.produced) == len(sim.cluster.visible("out"))
    assert metrics.in_flight._value.get() == 0


def test_consumer_lag_series_go_with_their_partition() -> None:
    sim = scenario("at_least_once", partitions=2)
    sim.start(0)
    run_turns(sim, 2)
    service = sim.live[0].service
    stats = {"topics": {"in": {"partitions": {"0": {"consumer_lag": 5}, "1": {"consumer_lag": 7}}}}}
    service._on_stats(json.dumps(stats))
    service.rebalances.revoked([("in", 1)])
    service.rebalances.apply()
    service._on_stats(json.dumps(stats))  # a late report still names the revoked partition
    series = {
        s.labels["partition"] for m in service.metrics.consumer_lag.collect() for s in m.samples
    }
    assert series == {"0"}


def test_a_failed_start_still_closes_what_it_opened() -> None:
    sim = scenario("at_least_once")
    instance = Instance(sim, "m1", "sim-0")

    def refuse() -> None:
        raise SinkError("no producer")

    instance.sink.start = refuse  # type: ignore[method-assign]
    with pytest.raises(SinkError):
        instance.service.run(threading.Event())
    assert instance.source.closed


def test_shutdown_timeout_bounds_the_whole_drain() -> None:
    sim = scenario("at_least_once", events=12, partitions=1)
    base = CONFIGS["at_least_once"]
    processing = base.processing.model_copy(update={"shutdown_timeout_s": 0.3})
    instance = Instance(sim, "m1", "sim-0", base.model_copy(update={"processing": processing}))
    sim.live[0] = instance
    instance.service.start()
    instance.executor.submit = lambda fn, *args: Future()  # type: ignore[method-assign]
    for _ in range(4):  # batches handed to an engine that never answers
        sim.step(faults=True)
        sim.turn(0)
    assert instance.service.pending
    started = time.monotonic()
    instance.service.drain()
    assert time.monotonic() - started < 2.0


def test_default_transactional_ids_differ_for_two_processes_on_one_host() -> None:
    def txn_id(port: int) -> str:
        config = CONFIGS["exactly_once"].model_copy(
            update={"metrics": MetricsConfig(enabled=True, port=port)}
        )
        return str(producer_config(config, 1)["transactional.id"])

    assert txn_id(9108) != txn_id(9109)
    assert txn_id(9108) == txn_id(9108)  # stable across restarts: it fences the old one


def test_offset_commits_are_counted_by_result() -> None:
    sim = scenario("at_least_once", events=20, partitions=1)
    sim.start(0)
    sim.cluster.fail_next_commit.add(sim.live[0].name)
    finish(sim)
    commits = sim.live[0].service.metrics.commits
    assert commits.labels("ok")._value.get() >= 1
    assert commits.labels("failed")._value.get() == 1


# -- reloads (SIGHUP) ---------------------------------------------------------------


def outputs(sim: Simulation) -> list[dict[str, Any]]:
    return [json.loads(s.value or b"{}") for s in sim.cluster.visible("out")]


@pytest.mark.parametrize("mode", MODES)
def test_reload_mid_stream_applies_to_events_read_after_it(mode: str) -> None:
    sim = scenario(mode, events=40, partitions=2)
    sim.start(0)
    run_turns(sim, 6)
    service = sim.live[0].service
    service.request_reload(lambda: RELOADS[mode][0.5])
    sim.produce(40)
    finish(sim)  # the settle checks each decision against its own settings version
    versions = {o["settings_version"] for o in outputs(sim)}
    assert versions == {settings_version(c.topics[0]) for c in (CONFIGS[mode], RELOADS[mode][0.5])}
    assert service.metrics.reloads.labels("applied")._value.get() == 1


def test_reload_that_needs_a_restart_is_refused_and_the_settings_stay() -> None:
    sim = scenario("at_least_once")
    sim.start(0)
    service = sim.live[0].service
    moved = CONFIGS["at_least_once"].topics[0].model_copy(update={"output": "elsewhere"})
    service.request_reload(lambda: CONFIGS["at_least_once"].model_copy(update={"topics": [moved]}))
    run_turns(sim, 2)

    def invalid() -> Any:
        raise ValueError("topics.0.lanes: bad")

    service.request_reload(invalid)
    run_turns(sim, 2)
    assert service.metrics.reloads.labels("refused")._value.get() == 1
    assert service.metrics.reloads.labels("invalid")._value.get() == 1
    finish(sim)
    assert {o["settings_version"] for o in outputs(sim)} == {
        settings_version(CONFIGS["at_least_once"].topics[0])
    }


def test_restart_needed_names_what_changed() -> None:
    running = CONFIGS["exactly_once"]
    assert restart_needed(running, RELOADS["exactly_once"][0.9]) is None
    engine = running.engine.model_copy(update={"device": "cuda"})
    assert restart_needed(running, running.model_copy(update={"engine": engine})) == (
        "the engine section changed"
    )
    assert "added ['new']" in str(
        restart_needed(
            running,
            running.model_copy(
                update={
                    "topics": [
                        *running.topics,
                        running.topics[0].model_copy(update={"input": "new"}),
                    ]
                }
            ),
        )
    )


@pytest.mark.parametrize("mode", MODES)
def test_fetch_position_moved_back_without_a_rebalance_is_not_taken_twice(mode: str) -> None:
    """Seen on the broker (--long, loaded scale-out): after a pause right at assignment,
    librdkafka fetched a partition again from its committed offset; the loop registered
    offset 0 after 130 and stopped (at_least_once), or would write events twice."""
    sim = scenario(mode, events=40, partitions=1)
    sim.start(0)
    run_turns(sim, 8)
    source = sim.live[0].source
    assert source.position[("in", 0)], "nothing consumed yet"
    source.position[("in", 0)] = None  # back to the committed offset, no callback
    finish(sim)


# -- records the cluster refuses, and other faults of issue 18 --------------------------


def written(sim: Simulation, number: int) -> list[tuple[str, int, str | None]]:
    """(kind, stage, code) of every record written for an event."""
    return [
        (s.record.kind, s.record.stage, s.record.code)
        for s in sim.outcomes.get(number, [])
        if s.record is not None
    ]


def big_event(sim: Simulation, id_chars: int, key: bytes | None = b"big") -> int:
    value = json.dumps({"id": "x" * id_chars, "text": "a big output"}).encode()
    return sim.add_event((INPUT, 0), key, value).number


@pytest.mark.parametrize("mode", MODES)
def test_output_too_large_for_the_producer_becomes_a_dead_letter_cut_to_fit(mode: str) -> None:
    sim = scenario(mode, events=3, partitions=1, max_bytes=2048)
    big = big_event(sim, 5000)
    sim.produce(3)
    sim.start(0)
    finish(sim)
    assert written(sim, big) == [("dead_letter", 1, "output_too_large")]
    (stored,) = sim.outcomes[big]
    headers = dict(stored.headers)
    assert headers[HEADER_PREFIX.encode() + b"original.topic"] == OUTPUT.encode()
    event_value = sim.cluster.logs[(INPUT, 0)].records[sim.events[big].offset].value
    assert stored.value and event_value and event_value.startswith(stored.value)
    assert len(stored.value) < len(event_value)
    assert sim.cluster.stats["produce refused: over message.max.bytes"] >= 1


def output_over_its_topic_limit(mode: str, compression: str) -> tuple[Simulation, int]:
    """Six events and one whose output is over the output topic's max.message.bytes
    (1,500, set before start), run to the end; the simulation and that event."""
    sim = scenario(mode, events=6, partitions=1)
    kafka = sim.config.kafka
    producer = {**kafka.producer_extra, "compression.type": compression}
    kafka = kafka.model_copy(update={"producer_extra": producer})
    sim.config = sim.config.model_copy(update={"kafka": kafka})  # config() is cached
    sim.cluster.resize(OUTPUT, 1, max_message_bytes=1500)
    big = big_event(sim, 3000)
    sim.produce(6)
    sim.start(0)
    finish(sim)
    return sim, big


@pytest.mark.parametrize("mode", MODES)
def test_topic_smaller_than_a_compressed_record_refuses_it_on_delivery(mode: str) -> None:
    """With compression the topic's max.message.bytes applies to compressed batches, so
    the producer leaves it to the broker: the refusal is reported asynchronously; under
    exactly_once it fails the transaction's commit, which is redone with the smaller form
    and nothing else twice."""
    sim, big = output_over_its_topic_limit(mode, compression="lz4")
    assert written(sim, big) == [("dead_letter", 1, "output_too_large")]
    assert sim.cluster.stats["delivery refused: over the topic's max.message.bytes"] >= 1
    if mode == "exactly_once":
        transactions = sim.live[0].service.metrics.transactions
        assert transactions.labels("aborted")._value.get() >= 1


@pytest.mark.parametrize("mode", MODES)
def test_topic_limit_read_at_start_dead_letters_the_record_before_sending(mode: str) -> None:
    """A record over its topic's max.message.bytes as read at start is refused before it
    is sent: its dead letter takes its place in the same batch, and exactly_once aborts
    nothing (an abort per refused form had stalled the stream under load)."""
    sim, big = output_over_its_topic_limit(mode, compression="none")
    assert written(sim, big) == [("dead_letter", 1, "output_too_large")]
    stats = sim.cluster.stats
    assert stats["produce refused: over the topic's max.message.bytes read at start"] >= 1
    assert stats["delivery refused: over the topic's max.message.bytes"] == 0
    if mode == "exactly_once":
        transactions = sim.live[0].service.metrics.transactions
        assert transactions.labels("aborted")._value.get() == 0


@pytest.mark.parametrize("mode", MODES)
def test_event_no_form_of_which_fits_is_given_up_counted_and_passed(mode: str) -> None:
    sim = scenario(mode, events=0, partitions=1, max_bytes=2048)
    sim.cluster.resize(DLQ, 1, max_message_bytes=300)  # not even the smallest dead letter
    big = big_event(sim, 5000)
    for i in range(4):
        sim.add_event((INPUT, 0), b"k", json.dumps({"text": f"e {i}"}).encode())
    sim.start(0)
    finish(sim)
    assert written(sim, big) == []
    assert [event_number(r) for r in sim.given_up] == [big] * len(sim.given_up)
    assert counter_total(sim.live[0].service.metrics.undeliverable) == len(sim.given_up) >= 1
    assert sim.cluster.committed[(INPUT, 0)] == sim.cluster.end((INPUT, 0))


def test_producer_queue_full_is_ridden_out_in_order() -> None:
    sim = scenario("at_least_once", events=0, partitions=1, max_bytes=2048, queue_kbytes=2)
    for i in range(20):
        sim.add_event((INPUT, 0), b"k", json.dumps({"id": "x" * 600, "text": f"e {i}"}).encode())
    sim.start(0)
    sim.cluster.output_down = True
    run_turns(sim, 60)
    assert sim.cluster.stats["produce refused: queue full"] >= 1
    sim.cluster.output_down = False
    finish(sim)  # per-key order of first outputs among the checks


#: The turns a retry during an output outage may read the input for before holding it again.
RETRY_TURNS = 5


@pytest.mark.parametrize("mode", MODES)
def test_output_outage_keeps_the_input_readable_and_memory_bounded(mode: str) -> None:
    sim = scenario(mode, events=80, partitions=2)
    sim.start(0)
    run_turns(sim, 2)
    sim.cluster.output_down = True
    service = sim.live[0].service
    held = ""
    for _ in range(150):
        run_turns(sim, 1)  # check_bounds: events held and producer bytes, every turn
        held += "H" if service.partitions.holding_all() else "."
    # Held, but for the few turns of each retry (the input resumed, a transaction or a
    # delivery tried, failed, and everything paused again).
    assert max(len(run) for run in held.split("H")) <= RETRY_TURNS, held
    assert held.count("H") >= 0.85 * len(held), held
    assert sim.cluster.committed.get((INPUT, 0), 0) < sim.cluster.end((INPUT, 0))
    sim.cluster.output_down = False
    finish(sim)


def test_killed_inside_commit_transaction_the_next_owner_waits_for_its_offsets() -> None:
    """send_offsets_to_transaction went through, then the process died: its offsets are
    pending until the transaction times out; the new owner (another transactional id)
    must neither read from a guessed offset nor write anything twice."""
    sim = scenario("exactly_once", events=30, partitions=1)
    sim.fresh_ids = True
    sim.start(0)
    sim.cluster.kill_in_commit.add(sim.live[0].sink.txn_id or "")
    run_turns(sim, 10)
    assert not sim.live, "the instance did not die in commit_transaction"
    assert sim.cluster.unstable((INPUT, 0))
    sim.leaving.clear()
    sim.cluster.leave("m1")
    sim.start(1)
    run_turns(sim, 100)
    assert sim.cluster.unstable((INPUT, 0))
    assert not sim.live[1].source.position.get((INPUT, 0)), "read while the offset was unstable"
    finish(sim)  # the transaction times out; every event once


def test_commit_that_lands_but_reports_failure_is_retried_not_rewound() -> None:
    sim = scenario("at_least_once", events=20, partitions=1)
    sim.start(0)
    sim.cluster.lose_next_commit_response.add(sim.live[0].name)
    finish(sim)  # committed offsets never move back (checked on every commit)
    commits = sim.live[0].service.metrics.commits
    assert commits.labels("failed")._value.get() == 1
    assert sim.cluster.stats["commit landed, reported failed"] == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("topic", [OUTPUT, DLQ])
def test_output_topic_deleted_and_created_again(mode: str, topic: str) -> None:
    sim = scenario(mode, events=0, partitions=1)
    sim.faults.add("delete_topic")
    for i in range(20):
        value = b"{bad" if i % 3 == 0 else json.dumps({"text": f"e {i}"}).encode()
        sim.add_event((INPUT, 0), b"k", value, "dead_letter" if i % 3 == 0 else "output")
    sim.start(0)
    run_turns(sim, 3)
    sim.delete_or_recreate(topic)
    run_turns(sim, 60)
    assert (
        sim.cluster.stats["produce refused: unknown topic"]
        + sim.cluster.stats["delivery failed: unknown topic"]
    )
    sim.delete_or_recreate(topic)
    finish(sim)


@pytest.mark.parametrize("mode", MODES)
def test_input_topic_deleted_and_created_again_is_read_from_its_start(mode: str) -> None:
    sim = scenario(mode, events=20, partitions=2)
    sim.faults.add("delete_topic")
    sim.start(0)
    run_turns(sim, 6)
    sim.delete_or_recreate(INPUT)
    run_turns(sim, 10)
    assert not sim.live[0].service.assigned_partitions
    sim.delete_or_recreate(INPUT)
    sim.produce(20)
    finish(sim)
    cluster = sim.cluster
    assert cluster.topics[INPUT].incarnation == 1
    assert all(cluster.committed.get(tp, 0) == cluster.end(tp) for tp in cluster.input_partitions)


@pytest.mark.parametrize("mode", MODES)
def test_retention_past_the_committed_offset_resets_to_the_log_start(mode: str) -> None:
    sim = scenario(mode, events=30, partitions=1)
    sim.start(0)
    run_turns(sim, 4)
    sim.terminate(0)
    committed = sim.cluster.committed.get((INPUT, 0), 0)
    assert committed < 25
    sim.cluster.retain((INPUT, 0), 25)  # what the next owner would read first is gone
    for event in sim.events:
        if committed <= event.offset < 25:
            event.status = "expired"
    sim.start(1)
    finish(sim)
    assert sim.cluster.stats["fetch offset out of range, reset"] >= 1
    assert sim.cluster.committed[(INPUT, 0)] == 30


@pytest.mark.parametrize("mode", MODES)
def test_outputs_go_to_the_partition_of_their_key_in_input_order(mode: str) -> None:
    sim = scenario(mode, events=0, partitions=1)
    sim.cluster.resize(OUTPUT, 3)
    keys = [b"a", b"b", b"c", b"d", None]
    for i in range(40):
        sim.add_event((INPUT, 0), keys[i % 5], json.dumps({"text": f"e {i}"}).encode())
    sim.start(0)
    finish(sim)  # per-key order of first outputs among the checks
    partitions: dict[bytes | None, set[int]] = {}
    for (topic, partition), log in sim.cluster.logs.items():
        for stored in log.records if topic == OUTPUT else []:
            partitions.setdefault(stored.key, set()).add(partition)
    assert all(len(parts) == 1 for key, parts in partitions.items() if key is not None)
    assert len({p for parts in partitions.values() for p in parts}) > 1


@pytest.mark.parametrize("mode", MODES)
def test_header_names_of_any_bytes_reach_every_record(mode: str) -> None:
    sim = scenario(mode, events=0, partitions=1)
    headers = [(b"\xff\xferaw", b"\x00\x01"), (b"caf\xc3\xa9", None), (b"", b"")]
    good = sim.add_event((INPUT, 0), b"k", b'{"text": "fine"}', headers=headers).number
    bad = sim.add_event((INPUT, 0), b"k", b"{bad", "dead_letter", headers=headers).number
    sim.start(0)
    finish(sim)  # check_headers among the checks
    for number in (good, bad):
        assert sim.outcomes[number]
        for stored in sim.outcomes[number]:
            assert stored.headers[:4] == [
                (b"\\xff\\xferaw", b"\x00\x01"),
                (b"caf\xc3\xa9", None),
                (b"", b""),
                (ESCAPED_NAMES_HEADER.encode(), b"1"),
            ]


def test_engine_liveness_follows_a_hung_engine() -> None:
    sim = scenario("at_least_once", events=20, partitions=1)
    sim.start(0)
    instance = sim.live[0]
    service = instance.service
    instance.executor.hung_until = sim.now + 1000.0
    for _ in range(200):  # check_bounds compares the measure with the model engine
        run_turns(sim, 1)
        if instance.executor.stalled() > ENGINE_TIMEOUT_S:
            break
    assert service.engine_stalled_s() == instance.executor.stalled() > ENGINE_TIMEOUT_S
    ok, why = service.healthy()
    assert not ok and "engine" in why
    instance.executor.hung_until = 0.0
    run_turns(sim, 3)
    assert service.engine_stalled_s() == 0.0
    assert service.healthy() == (True, "ok")
    finish(sim)


# -- defects the simulation found, each fixed: the scenario that showed it --------------


def allowed(i: int) -> str:
    """A text the fake engine scores under every block threshold: one record, no route."""
    return next(t for j in range(1000) if zlib.crc32((t := f"e{i}-{j}").encode()) % 100 < 40)


def test_a_null_key_event_keeps_header_names_of_any_bytes() -> None:
    """headers.py checks the Message's layout against its key and value; for a null key
    (or a tombstone) the field is NULL. Compared with id(None) the check failed, the guarded
    path's confluent-kafka conversion raised on the name, and every header was replaced by
    stream-classifier.headers-unreadable."""
    sim = scenario("at_least_once", events=0, partitions=1)
    number = sim.add_event((INPUT, 0), None, b'{"text": "x"}', headers=[(b"\xff", b"v")]).number
    sim.start(0)
    sim.settle()
    (stored,) = sim.outcomes[number]
    assert stored.headers[0][0] != UNREADABLE_HEADER.encode()
    assert sim.violations == []


def test_a_header_name_with_a_nul_byte_is_written_whole() -> None:
    """confluent-kafka adds header names with rd_kafka_header_add(name, -1): strlen() cuts
    "a\\x00b" to "a". Names holding NUL are escaped like names that are not UTF-8."""
    sim = scenario("at_least_once", events=0, partitions=1)
    sim.add_event((INPUT, 0), b"k", b'{"text": "x"}', headers=[(b"a\x00b", b"v")])
    sim.start(0)
    finish(sim)


@pytest.mark.parametrize("mode", MODES)
def test_outputs_that_fit_their_topic_are_not_dead_lettered_with_their_batch(mode: str) -> None:
    """An output topic whose max.message.bytes is below the producer's message.max.bytes:
    the broker refuses a batch over it whole (librdkafka #488), so KafkaSink keeps
    batch.size under the smallest limit of the topics it writes; only a record too large
    alone is refused (check_substitutes: no smaller form of a record that fits alone)."""
    sim = scenario(mode, events=0, partitions=1, max_bytes=4096)
    sim.cluster.resize(OUTPUT, 1, max_message_bytes=1200)
    for i in range(30):
        sim.add_event((INPUT, 0), b"k", json.dumps({"id": "x" * 400, "text": f"{i}"}).encode())
    big = big_event(sim, 1500, key=b"k")
    sim.start(0)
    assert sim.live[0].sink.batch_size == 1200 - 1024
    finish(sim)
    assert written(sim, big) == [("dead_letter", 1, "output_too_large")]
    assert all(("output", 0, None) in written(sim, n) for n in range(30))
    assert not any(kind == "dead_letter" for n in range(30) for kind, _, _ in written(sim, n))


def test_records_timed_out_in_an_outage_keep_per_key_order() -> None:
    """at_least_once replays a partition from its acknowledged prefix when a record times
    out; records produced later were still in librdkafka's queue and, once the output was
    back, written before the replay: a later event's first output came before an earlier
    one's (the idempotent producer's gaps). The producer is now replaced at the first
    time-out and every partition with records outstanding replayed."""
    sim = scenario("at_least_once", events=0, partitions=1)
    sim.start(0)
    sim.cluster.output_down = True
    for i in range(12):
        sim.add_event((INPUT, 0), b"k", json.dumps({"text": f"e {i}"}).encode())
        run_turns(sim, 4)  # queued at different times: they time out one after another
    run_turns(sim, 8)
    sim.cluster.output_down = False
    finish(sim)


def test_a_record_waiting_for_room_when_its_partition_failed_keeps_per_key_order() -> None:
    """KafkaSink.produce waits for room in a full queue by serving delivery reports; when
    they reported time-outs, the checkpoint scheduled the partition's replay, and produce()
    then queued the record it was given all the same: written before the replay, its first
    output came before earlier events' (seed 1907 of the at_least_once schedules). It now
    gives the record back once the checkpoint has abandoned it."""
    for delay in range(20, 50):  # the later event arrives as the earlier ones time out
        sim = scenario(
            "at_least_once",
            events=0,
            partitions=1,
            max_bytes=2048,
            queue_kbytes=2,
        )
        sim.start(0)
        sim.cluster.output_down = True
        for i in range(2):  # two records fill the producer's queue
            value = json.dumps({"id": "x" * 600, "text": allowed(i)}).encode()
            sim.add_event((INPUT, 0), b"k", value)
        run_turns(sim, delay)
        value = json.dumps({"id": "x" * 600, "text": allowed(2)}).encode()
        sim.add_event((INPUT, 0), b"k", value)
        run_turns(sim, 8)  # the output is back before the replay, and the late record
        sim.cluster.output_down = False
        finish(sim)
