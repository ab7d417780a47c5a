"""The service loop against the in-memory Kafka model: seeded schedules and named scenarios.

A failing seed prints the command that replays it with a trace.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from sim.kafka_model import SimSource, Txn
from sim.simulation import CONFIGS, RELOADS, FakeEngine, Instance, Simulation, run_seed

from stream_classifier.config import MetricsConfig
from stream_classifier.reload import restart_needed, settings_version
from stream_classifier.service import Service
from stream_classifier.sink import SinkError

#: 5,000 schedules per guarantee in `make test`; SIM_SEEDS=N runs N (a longer hunt).
SEEDS = int(os.environ.get("SIM_SEEDS", "5000"))
MODES = ["at_least_once", "exactly_once"]


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("mode", MODES)
def test_seeded_schedules_keep_every_invariant(mode: str) -> None:
    failures = {}
    for seed in range(SEEDS):
        violations = run_seed(seed, mode)
        if violations:
            failures[seed] = violations[:3]
            if len(failures) == 5:
                break
    replay = [
        f"python tests/sim/simulation.py --seed {seed} --mode {mode} --trace: {found}"
        for seed, found in failures.items()
    ]
    assert not failures, "\n".join(replay)


# -- named scenarios: each was a defect of the earlier loop ----------------------------


def scenario(mode: str, seed: int = 7, events: int = 24, partitions: int = 2) -> Simulation:
    sim = Simulation(seed, mode)
    sim.cluster.logs = {("in", p): [] for p in range(partitions)}
    sim.cluster.input_partitions = sorted(sim.cluster.logs)
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
    source: SimSource = sim.live[0].source
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
        starts.append("in callback" if instance.service._rebalance.lost else "in loop")
        real_start()

    instance.sink.start = counting_start  # type: ignore[method-assign]
    instance.source.lose()
    run_turns(sim, 4)
    assert starts == ["in loop"]
    finish(sim)


@pytest.mark.parametrize("mode", MODES)
def test_poison_events_are_dead_lettered_and_the_stream_goes_on(mode: str) -> None:
    """Defect 5: an engine exception stopped the service (a crash loop on restart)."""
    sim = scenario(mode, events=0)
    for i in range(30):
        text = f"POISON {i}" if i % 7 == 3 else f"event {i}"
        stored = sim.cluster.append(("in", i % 2), None, f'{{"text": "{text}"}}'.encode(), None)
        sim.expected[(("in", i % 2), stored.offset)] = (
            "dead_letter" if "POISON" in text else "output"
        )
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
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


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
    service.revoked([("in", 1)])
    service._apply_rebalance()
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
    instance.executor.submit = lambda fn, *args: Future()  # type: ignore[method-assign,assignment]
    run_turns(sim, 4, slots=[0])  # batches handed to an engine that never answers
    assert instance.service._scoring
    started = time.monotonic()
    instance.service.drain()
    assert time.monotonic() - started < 2.0


def test_default_transactional_ids_differ_for_two_processes_on_one_host() -> None:
    def txn_id(port: int) -> str:
        config = CONFIGS["exactly_once"].model_copy(
            update={"metrics": MetricsConfig(enabled=True, port=port)}
        )
        return str(Service(config, FakeEngine())._producer_config()["transactional.id"])

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
