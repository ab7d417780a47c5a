"""The service end to end on the real broker, with the tiny real StructBERT checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kafka_helpers
import pytest
from conftest import RunningService, service_config
from kafka_helpers import committed, create_topics, produce, read_all, unique

from stream_classifier.assemble import build_service
from stream_classifier.config import EngineConfig, ServiceConfig
from stream_classifier.engine.nli import NliEngine
from stream_classifier.headers import HEADER_PREFIX

pytestmark = pytest.mark.kafka

LABELS = ["价格问题", "服务态度", "物流配送"]


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> NliEngine:
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), max_batch_tokens=4096)


def topic_set(partitions: int = 1, **options: Any) -> dict[str, Any]:
    names = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    return {**names, "labels": LABELS, "partitions": partitions, **options}


def setup(bootstrap: str, topics: dict[str, Any], **sections: Any) -> ServiceConfig:
    partitions = topics.pop("partitions")
    create_topics(bootstrap, [topics["input"]], partitions)
    create_topics(bootstrap, [topics["output"], topics["dead_letter"]], partitions)
    return service_config(bootstrap, [topics], **sections)


def events(n: int) -> list[bytes]:
    return [
        json.dumps(
            {"id": f"evt-{i}", "text": f"第{i}个快递太慢了，客服态度也不好"}, ensure_ascii=False
        ).encode()
        for i in range(n)
    ]


def wait_drained(bootstrap: str, config: ServiceConfig, partitions: int = 1) -> None:
    kafka_helpers.wait_drained(bootstrap, config.kafka.group_id, config.topics[0].input, partitions)


def test_every_event_gets_one_output_with_key_source_and_headers(
    bootstrap: str, engine: NliEngine
) -> None:
    config = setup(bootstrap, topic_set(partitions=2), processing={"max_batch_messages": 16})
    topic = config.topics[0]
    n = 60
    keys = [f"user-{i % 7}".encode() for i in range(n)]
    produce(bootstrap, topic.input, events(n), keys=keys, headers=[("trace", b"abc")])
    inputs = {(r.partition, r.offset): r for r in read_all(bootstrap, topic.input, n)}

    with RunningService(build_service(config, engine)):
        outputs = read_all(bootstrap, topic.output, n)
        wait_drained(bootstrap, config, partitions=2)

    assert len(outputs) == n
    seen = set()
    for record in outputs:
        body = record.json_value()
        source = body["source"]
        original = inputs[(source["partition"], source["offset"])]
        seen.add((source["partition"], source["offset"]))
        assert source["topic"] == topic.input
        assert record.key == original.key
        assert record.partition == original.partition  # same key → same partition
        assert record.timestamp == original.timestamp == source["timestamp"]
        assert record.headers["trace"] == b"abc"
        assert record.headers[HEADER_PREFIX + "model"] == engine.model_id.encode()
        assert body["id"] == original.json_value()["id"]
        assert sorted(body["labels"]) == sorted(LABELS)
        assert body["scores"] == sorted(body["scores"], reverse=True)
        assert sum(body["scores"]) == pytest.approx(1.0, abs=1e-6)
        assert body["top_label"] == body["labels"][0]
    assert seen == set(inputs)


def test_outputs_equal_the_engine_scoring_each_text_alone(
    bootstrap: str, engine: NliEngine
) -> None:
    config = setup(bootstrap, topic_set(multi_label=True), processing={"max_batch_messages": 32})
    topic = config.topics[0]
    texts = ["价格太贵了", "快递三天还没到", "客服很耐心", "质量一般般" * 30]
    produce(bootstrap, topic.input, [json.dumps({"text": t}).encode() for t in texts])
    with RunningService(build_service(config, engine)):
        outputs = read_all(bootstrap, topic.output, len(texts))
    by_offset = {r.json_value()["source"]["offset"]: r.json_value() for r in outputs}
    for offset, text in enumerate(texts):
        alone = engine.classify([engine.prepare(text, LABELS, "{}", True)])[0]
        assert by_offset[offset]["labels"] == list(alone.labels)
        assert by_offset[offset]["scores"] == pytest.approx(list(alone.scores), abs=1e-6)
        assert by_offset[offset]["multi_label"] is True


def test_malformed_events_go_to_dead_letter_with_reason_and_offsets_advance(
    bootstrap: str, engine: NliEngine
) -> None:
    config = setup(bootstrap, topic_set())
    topic = config.topics[0]
    bad = {
        b"\xff\xfe\xfd": "not_utf8",
        b"{oops": "not_json",
        b'{"comment": "no text"}': "text_missing",
        b'{"text": ""}': "text_empty",
        b'{"text": "hi", "labels": ["a"]}': "labels_forbidden",
    }
    values = [*bad, *events(3)]
    produce(bootstrap, topic.input, values, keys=[f"k{i}".encode() for i in range(len(values))])

    with RunningService(build_service(config, engine)):
        dead = read_all(bootstrap, topic.dead_letter, len(bad))
        outputs = read_all(bootstrap, topic.output, 3)
        wait_drained(bootstrap, config)

    assert len(outputs) == 3
    assert {
        record.value: record.header(HEADER_PREFIX + "error.code").decode() for record in dead
    } == bad
    for record in dead:
        offset = int(record.header(HEADER_PREFIX + "source.offset"))
        assert record.key == f"k{offset}".encode()
        assert record.headers[HEADER_PREFIX + "source.topic"] == topic.input.encode()
        assert record.headers[HEADER_PREFIX + "error.message"]


def test_restarted_service_resumes_at_committed_offset_without_gap(
    bootstrap: str, engine: NliEngine
) -> None:
    config = setup(bootstrap, topic_set())
    topic = config.topics[0]
    produce(bootstrap, topic.input, events(20))
    with RunningService(build_service(config, engine)):
        read_all(bootstrap, topic.output, 20)
        wait_drained(bootstrap, config)

    produce(bootstrap, topic.input, events(15))
    with RunningService(build_service(config, engine)):
        outputs = read_all(bootstrap, topic.output, 35)
        wait_drained(bootstrap, config)

    offsets = sorted(r.json_value()["source"]["offset"] for r in outputs)
    assert offsets == list(range(35))  # nothing skipped, nothing scored twice
    assert committed(bootstrap, config.kafka.group_id, topic.input) == {0: 35}


def test_lone_event_is_flushed_by_the_time_bound(bootstrap: str, engine: NliEngine) -> None:
    config = setup(
        bootstrap,
        topic_set(),
        processing={"max_batch_messages": 1000, "max_batch_wait_ms": 50},
    )
    topic = config.topics[0]
    with RunningService(build_service(config, engine)):
        produce(bootstrap, topic.input, events(1))
        outputs = read_all(bootstrap, topic.output, 1, timeout=30)
    assert len(outputs) == 1
    assert outputs[0].json_value()["latency_ms"] < 30_000


def test_undeliverable_output_holds_the_commit_and_recovers_when_the_topic_appears(
    bootstrap: str, engine: NliEngine
) -> None:
    topics = topic_set()
    topics["output"] = unique("missing")  # never created; auto-creation is off for it below
    create_topics(bootstrap, [topics["input"], topics["dead_letter"]])
    topics.pop("partitions")
    config = service_config(
        bootstrap,
        [topics],
        kafka={
            "extra": {"allow.auto.create.topics": False, "topic.metadata.refresh.interval.ms": 1000}
        },
        processing={"delivery_timeout_ms": 3000},
    )
    produce(bootstrap, topics["input"], [b"{bad json", *events(3)])
    service = build_service(config, engine)
    runner = RunningService(service)
    with runner:
        from kafka_helpers import wait_until

        wait_until(lambda: not service.healthy()[0], 60, "/healthz to report the re-sending")
        assert runner.error is None, "the service stopped on a failing output"
        # The dead letter at offset 0 may be committed; the undelivered outputs at 1.. never.
        assert committed(bootstrap, config.kafka.group_id, topics["input"])[0] in (-1001, 1)
        create_topics(bootstrap, [topics["output"]])
        wait_until(
            lambda: committed(bootstrap, config.kafka.group_id, topics["input"])[0] == 4,
            120,
            "every event committed once the output topic exists",
        )
    assert len(read_all(bootstrap, topics["output"], 3, timeout=10)) == 3


def test_consumer_lag_metric_follows_librdkafka_statistics(
    bootstrap: str, engine: NliEngine
) -> None:
    from kafka_helpers import wait_until

    config = setup(bootstrap, topic_set())
    config = config.model_copy(
        update={"metrics": config.metrics.model_copy(update={"enabled": True})}
    )
    topic = config.topics[0]
    produce(bootstrap, topic.input, events(40))
    service = build_service(config, engine)
    lag = service.metrics.consumer_lag

    def lag_sample() -> float | None:
        for metric in lag.collect():
            for sample in metric.samples:
                if sample.labels == {"topic": topic.input, "partition": "0"}:
                    return float(sample.value)
        return None

    with RunningService(service):
        wait_drained(bootstrap, config)
        wait_until(lambda: lag_sample() == 0.0, 30, "the lag gauge to report 0 once drained")


def test_preflight_names_a_missing_route_topic(bootstrap: str) -> None:
    from stream_classifier.preflight import PreflightError, check_kafka

    names = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, list(names.values()))
    route = unique("review")
    lanes = [{"name": "all", "route": route}]
    config = service_config(bootstrap, [{**names, "labels": ["spam", "ok"], "lanes": lanes}])
    with pytest.raises(PreflightError, match=route):
        check_kafka(config, timeout_s=20)
