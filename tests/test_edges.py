"""What a production cluster has at its edges, on the real broker: record size limits,
header names in any bytes, an output that cannot be written while the input can be read,
an output topic deleted mid-run, a hung engine, ``seek`` right after assignment and
``auto.offset.reset=latest`` with a partition changing hands before its first commit."""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningService, service_config
from kafka_helpers import (
    Record,
    alter_topic,
    c_api_produce,
    committed,
    create_topics,
    delete_topics,
    produce,
    read_all,
    read_to_end,
    unique,
    wait_drained,
    wait_until,
)

from stream_classifier.assemble import build_service
from stream_classifier.config import EngineConfig, ServiceConfig
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.engine.nli import NliEngine
from stream_classifier.headers import ESCAPED_NAMES_HEADER, HEADER_PREFIX
from stream_classifier.source import KafkaSource, consumer_config

pytestmark = pytest.mark.kafka

MODES = ["at_least_once", "exactly_once"]
CODE = HEADER_PREFIX + "error.code"


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> NliEngine:
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), max_batch_tokens=4096)


def make_topics(bootstrap: str, partitions: int = 1) -> dict[str, Any]:
    names = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, names.values(), partitions)
    return {**names, "labels": ["spam", "insult"]}


def event(i: int, **extra: Any) -> bytes:
    return json.dumps({"id": f"e{i}", "text": f"message number {i}", **extra}).encode()


def ids(records: Sequence[Record]) -> list[str]:
    return [json.loads(r.value or b"{}")["id"] for r in records]


def drained(bootstrap: str, config: ServiceConfig, partitions: int = 1) -> None:
    topic = config.topics[0].input
    wait_drained(bootstrap, config.kafka.group_id, topic, partitions, timeout=120)


# -- record size limits ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_records_over_the_producers_limit_become_dead_letters_and_the_stream_goes_on(
    bootstrap: str, engine: NliEngine, mode: str
) -> None:
    """A default producer can write an input just under 1 MB whose dead letter (input plus
    our headers) or scored output (a ~1 MB id repeated) is over message.max.bytes."""
    topics = make_topics(bootstrap)
    config = service_config(bootstrap, [topics], processing={"guarantee": mode})
    near_limit = 999_700  # what a default producer (message.max.bytes 1,000,000) writes
    bad = b"{" + b"x" * near_limit  # malformed: its dead letter is input + headers
    huge_id = event(1, id="i" * near_limit)  # valid: its output repeats the id, and more
    produce(bootstrap, topics["input"], [event(0), bad, huge_id, event(3)])

    with RunningService(build_service(config, engine)):
        outputs = read_all(bootstrap, topics["output"], 2, timeout=90)
        letters = read_all(bootstrap, topics["dead_letter"], 2, timeout=90)
        drained(bootstrap, config)

    assert ids(outputs) == ["e0", "e3"]
    by_offset = {int(r.headers[HEADER_PREFIX + "source.offset"] or b""): r for r in letters}
    assert sorted(by_offset) == [1, 2]
    for offset, original in ((1, bad), (2, huge_id)):
        letter = by_offset[offset]
        assert letter.headers[CODE] == b"output_too_large"
        assert letter.headers[HEADER_PREFIX + "original.size"] is not None
        assert int(letter.headers[HEADER_PREFIX + "original.size"] or b"") > len(original)
        assert (letter.headers[HEADER_PREFIX + "value"] or b"").startswith(b"cut to ")
        assert letter.value is not None and original.startswith(letter.value)
    assert by_offset[1].headers[HEADER_PREFIX + "original.topic"] == topics["dead_letter"].encode()
    assert by_offset[2].headers[HEADER_PREFIX + "original.topic"] == topics["output"].encode()


@pytest.mark.parametrize("mode", MODES)
def test_topics_with_a_smaller_max_message_bytes_get_smaller_dead_letters(
    bootstrap: str, engine: NliEngine, mode: str
) -> None:
    """The broker refuses an output over the output topic's max.message.bytes, then the
    dead letter over the dead-letter topic's: the value is dropped, the healthy events in
    the batch and after it get out, and exactly_once does not abort forever."""
    topics = make_topics(bootstrap)
    alter_topic(bootstrap, topics["output"], max_message_bytes="2000")
    alter_topic(bootstrap, topics["dead_letter"], max_message_bytes="1500")
    config = service_config(
        bootstrap, [topics], processing={"guarantee": mode, "max_batch_messages": 8}
    )
    values = [event(i) for i in range(10)]
    values[4] = event(4, id="long-" * 600)  # a 3,000-byte id: output ~3.3 kB
    produce(bootstrap, topics["input"], values)

    with RunningService(build_service(config, engine)):
        outputs = read_all(bootstrap, topics["output"], 9, timeout=90)
        letters = read_all(bootstrap, topics["dead_letter"], 1, timeout=90)
        drained(bootstrap, config)

    assert ids(outputs) == [f"e{i}" for i in range(10) if i != 4]
    assert len(letters) == 1
    letter = letters[0]
    assert letter.headers[CODE] == b"output_too_large"
    assert letter.headers[HEADER_PREFIX + "source.offset"] == b"4"
    assert letter.value is None
    assert (letter.headers[HEADER_PREFIX + "value"] or b"").startswith(b"dropped")


# -- header names in any bytes ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_header_names_in_any_bytes_pass_through_and_never_stop_the_stream(
    bootstrap: str, engine: NliEngine, mode: str
) -> None:
    topics = make_topics(bootstrap)
    config = service_config(bootstrap, [topics], processing={"guarantee": mode})
    headers: list[tuple[bytes, bytes | None]] = [
        (b"\xff\xfe-name", b"\x00\x01binary"),
        (b"trace", b"abc"),
        (b"", b"empty name"),
        (b"no-value", None),
        (b"nul\x00name", b"v"),
    ]
    c_api_produce(bootstrap, topics["input"], event(0), headers, key=b"k")
    c_api_produce(bootstrap, topics["input"], b"{malformed", headers)
    produce(bootstrap, topics["input"], [event(2)])

    with RunningService(build_service(config, engine)):
        outputs = read_all(bootstrap, topics["output"], 2, timeout=60)
        letters = read_all(bootstrap, topics["dead_letter"], 1, timeout=60)
        drained(bootstrap, config)

    assert ids(outputs) == ["e0", "e2"]
    for record in (outputs[0], letters[0]):
        assert record.headers["\\xff\\xfe-name"] == b"\x00\x01binary"
        assert record.headers["trace"] == b"abc"
        assert record.headers[""] == b"empty name"
        assert record.headers["no-value"] is None
        assert record.headers["nul\\x00name"] == b"v"
        assert record.headers[ESCAPED_NAMES_HEADER] == b"2"
    assert outputs[0].key == b"k"
    assert letters[0].headers[CODE] == b"not_json"


# -- the output away while the input is readable ----------------------------------------------


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING, logger="stream_classifier")
    yield caplog


def first_outputs_in_key_order(outputs: Sequence[Record], inputs: int, keys: int) -> None:
    """Per key, each event's first output comes after the first outputs of every earlier
    event of that key (a replay may repeat events, never reorder them)."""
    seen: dict[bytes | None, list[int]] = defaultdict(list)
    first: set[int] = set()
    for record in outputs:
        n = int(ids([record])[0][1:])
        if n not in first:
            first.add(n)
            seen[record.key].append(n)
    assert first == set(range(inputs)), f"missing {sorted(set(range(inputs)) - first)}"
    for key, order in seen.items():
        assert order == sorted(order), f"key {key!r} out of order: {order}"
    assert len(seen) == keys


@pytest.mark.parametrize("mode", MODES)
def test_an_output_deleted_mid_run_is_ridden_out_in_order_and_logged_twice(
    bootstrap: str, engine: NliEngine, mode: str, warnings: pytest.LogCaptureFixture
) -> None:
    """The output topic deleted (auto-creation off) while the input stays readable: every
    write fails until it is back. Nothing is lost, per-key order holds, exactly_once
    writes nothing twice, and the outage is logged once when it starts and once at its end.

    (Raising min.insync.replicas above the replication factor does not refuse writes on a
    one-node Kafka 4.4 cluster: acks=all still succeeds there.)"""
    topics = make_topics(bootstrap, partitions=2)
    config = service_config(
        bootstrap,
        [topics],
        processing={"guarantee": mode, "delivery_timeout_ms": 2000, "max_batch_messages": 8},
        kafka={
            "extra": {"allow.auto.create.topics": False, "topic.metadata.refresh.interval.ms": 500},
            "producer_extra": {"topic.metadata.propagation.max.ms": 1000},
        },
    )
    n, keys = 40, 4
    key_of = [f"user-{i % keys}".encode() for i in range(n)]
    produce(bootstrap, topics["input"], [event(i) for i in range(n // 2)], key_of[: n // 2])
    runner = RunningService(build_service(config, engine))
    with runner:
        before = read_all(bootstrap, topics["output"], n // 2, timeout=60)
        drained(bootstrap, config, partitions=2)
        delete_topics(bootstrap, [topics["output"]])
        produce(bootstrap, topics["input"], [event(i) for i in range(n // 2, n)], key_of[n // 2 :])
        wait_until(lambda: not runner.service.healthy()[0], 90, "/healthz to report the outage")
        assert runner.error is None, "the service stopped on a deleted output topic"
        create_topics(bootstrap, [topics["output"]], partitions=2)
        drained(bootstrap, config, partitions=2)
        after = read_to_end(bootstrap, topics["output"])

    first_outputs_in_key_order(before + after, n, keys)
    if mode == "exactly_once":
        assert len(after) == n // 2, "exactly_once wrote an event twice"
    messages = [r.getMessage() for r in warnings.records]
    assert sum(m.startswith("output not writable:") for m in messages) == 1, messages
    assert sum("output writable again after" in m for m in messages) == 1, messages
    assert not any("pausing" in m for m in messages)


# -- a hung engine -------------------------------------------------------------------------


class HangingEngine:
    """The tiny engine, whose classify blocks until released (a wedged device)."""

    def __init__(self, engine: NliEngine) -> None:
        self._engine = engine
        self.model_id = engine.model_id
        self.release = threading.Event()

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        return self._engine.prepare(text, labels, template, multi_label)

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        self.release.wait(120)
        return self._engine.classify(batch)

    def warmup(self) -> None:
        pass


def test_a_hung_engine_turns_healthz_red_and_recovers(bootstrap: str, engine: NliEngine) -> None:
    topics = make_topics(bootstrap)
    config = service_config(bootstrap, [topics], processing={"engine_timeout_s": 2})
    hanging = HangingEngine(engine)
    service = build_service(config, hanging)
    produce(bootstrap, topics["input"], [event(0)])
    with RunningService(service):
        wait_until(lambda: not service.healthy()[0], 60, "/healthz to report the hung engine")
        assert "engine has returned nothing" in service.healthy()[1]
        assert service.engine_stalled_s() > 2
        hanging.release.set()
        read_all(bootstrap, topics["output"], 1, timeout=60)
        wait_until(lambda: service.healthy()[0], 30, "/healthz to recover")
        assert service.engine_stalled_s() == 0


# -- seek and auto.offset.reset=latest --------------------------------------------------------


class Assignments:
    def __init__(self) -> None:
        self.partitions: list[tuple[str, int]] = []

    def assigned(self, partitions: list[tuple[str, int]]) -> None:
        self.partitions += partitions

    def revoked(self, partitions: list[tuple[str, int]]) -> None:
        pass

    def lost(self, partitions: list[tuple[str, int]]) -> None:
        pass


def test_seek_right_after_assignment_never_raises_and_takes_effect_later(bootstrap: str) -> None:
    """librdkafka may answer a seek on a partition assigned in the last consume() with
    _STATE before its fetcher starts: the source says so instead of raising."""
    topic = unique("in")
    create_topics(bootstrap, [topic])
    produce(bootstrap, topic, [event(i) for i in range(5)])
    group = unique("group")
    source = KafkaSource(
        consumer_config({"bootstrap.servers": bootstrap}, group, "latest"), [topic]
    )
    listener = Assignments()
    source.start(listener)
    try:
        wait_until(
            lambda: bool(source.consume(1, 0.2)) or bool(listener.partitions),
            60,
            "the assignment",
        )
        tp = (topic, 0)
        seeks = [source.seek(tp, 2)]  # may be refused: fetcher not started yet
        got: list[int] = []

        def read_from_two() -> bool:
            if not seeks[-1]:
                seeks.append(source.seek(tp, 2))
            got.extend(m.offset() or 0 for m in source.consume(10, 0.2))
            return bool(got)

        wait_until(read_from_two, 60, "the seek to take effect")
        assert got[0] == 2
    finally:
        source.close()


def test_latest_partition_changing_hands_before_its_first_commit_loses_nothing(
    bootstrap: str, engine: NliEngine
) -> None:
    """Under auto.offset.reset=latest a partition with nothing committed starts at the end
    for its next owner: the first owner commits where it began reading at once, so events
    it read but never finished are read again by the next owner."""
    topics = make_topics(bootstrap)
    config = service_config(
        bootstrap,
        [topics],
        kafka={"auto_offset_reset": "latest"},
        processing={"shutdown_timeout_s": 1},
    )
    hanging = HangingEngine(engine)
    first = build_service(config, hanging)
    produced = [0]

    def consumed() -> float:
        return float(first.metrics.consumed.labels(topics["input"])._value.get())

    def one_more_read() -> bool:
        produce(bootstrap, topics["input"], [event(produced[0])])
        produced[0] += 1
        return consumed() >= 3

    runner = RunningService(first)
    with runner:
        # Where "latest" puts the first owner is only known once it fetches: publish until
        # it has read some events (the last ones published).
        wait_until(one_more_read, 60, "the first owner to read events")
        pinned: list[int | None] = [None]

        def pin() -> int | None:
            offset = committed(bootstrap, config.kafka.group_id, topics["input"])[0]
            pinned[0] = offset if offset >= 0 else None  # -1001: nothing committed
            return pinned[0]

        wait_until(lambda: pin() is not None, 30, "the first owner to commit where it began")
        start = pinned[0]
        assert start is not None
        # The pin is where it began: it reads every event from there, and none before.
        wait_until(
            lambda: consumed() == produced[0] - start,
            30,
            lambda: f"{produced[0] - start} events read from {start}, not {consumed()}",
        )
        runner.stop_event.set()  # SIGTERM: its drain gives up on the hung batch
        wait_until(lambda: first.closing, 30, "the first owner to give up and close")
        hanging.release.set()  # lets close() end; the late scores are not written
    with RunningService(build_service(config, engine)):
        drained(bootstrap, config)
        outputs = read_to_end(bootstrap, topics["output"])
    assert sorted(set(ids(outputs)), key=lambda i: int(i[1:])) == [
        f"e{i}" for i in range(start, produced[0])
    ]
