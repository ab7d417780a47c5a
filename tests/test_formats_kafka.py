"""Schema Registry formats on the real broker and a real registry (Apicurio, started by
deploy/registry/registry-local): Avro and JSON Schema events in Confluent's wire format
are read and scored, outputs written in the topic's format under ``<topic>-value``,
values that cannot decode dead-lettered with their reason, and a registry outage ridden
out: the events wait, in order, and none is lost or dead-lettered.

The engine is :class:`keyword_engine.KeywordEngine` ("kill" scores violence high).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CCOMPAT_PATH, RunningService, service_config
from kafka_helpers import (
    create_topics,
    produce,
    read_all,
    read_to_end,
    unique,
    wait_drained,
    wait_until,
)
from keyword_engine import KeywordEngine
from registry_helpers import Relay, avro_values, client, read_avro

from stream_classifier.assemble import build_service
from stream_classifier.cli import EXIT_REGISTRY
from stream_classifier.formats import ready_formats

pytestmark = pytest.mark.kafka

HEADER = "stream-classifier."

POST = {
    "type": "record",
    "name": "Post",
    "namespace": "tests",
    "fields": [{"name": "id", "type": "string"}, {"name": "text", "type": "string"}],
}
#: A second version of the input schema, registered during the outage (a new schema id).
POST_V2 = {**POST, "fields": [*POST["fields"], {"name": "lang", "type": "string", "default": "en"}]}
TEXTS = ["I will kill you", "see you at noon", "kill the lights", "lovely weather"]


def topics(bootstrap: str, fmt: str) -> dict[str, Any]:
    names = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, names.values())
    return {
        **names,
        "labels": ["violence", "harmless"],
        "multi_label": True,
        "input_format": fmt,
        "output_format": fmt,
    }


def posts(prefix: str, texts: list[str] = TEXTS) -> list[dict[str, str]]:
    return [{"id": f"{prefix}{i}", "text": text} for i, text in enumerate(texts)]


@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
def test_avro_events_are_scored_into_avro_outputs_and_undecodable_ones_dead_lettered(
    bootstrap: str, registry_url: str, mode: str
) -> None:
    topic = topics(bootstrap, "avro")
    config = service_config(
        bootstrap,
        [topic],
        processing={"guarantee": mode},
        schema_registry={"url": registry_url},
    )
    good = avro_values(registry_url, topic["input"], POST, posts("e"))
    unknown_id = b"\x00" + (2**31 - 7).to_bytes(4, "big") + good[0][5:]
    values = [good[0], b'{"text": "json on an avro topic"}', good[1], unknown_id, *good[2:]]
    produce(bootstrap, topic["input"], values)
    service = build_service(config, KeywordEngine(), formats=ready_formats(config))
    with RunningService(service):
        written = read_all(bootstrap, topic["output"], len(good))
        dead = read_all(bootstrap, topic["dead_letter"], 2)
        wait_drained(bootstrap, config.kafka.group_id, topic["input"])
    events = [read_avro(registry_url, topic["output"], r.value) for r in written]
    assert [e["id"] for e in events] == ["e0", "e1", "e2", "e3"], "every good event, in order"
    assert [e["top_label"] for e in events] == ["violence", "harmless", "violence", "harmless"]
    assert events[0]["source"]["topic"] == topic["input"] and events[0]["multi_label"] is True
    reasons = [(r.header(HEADER + "source.offset"), r.header(HEADER + "error.code")) for r in dead]
    assert reasons == [(b"1", b"wire_format"), (b"3", b"schema_unknown")]
    assert [r.value for r in dead] == [values[1], values[3]], "dead letters keep the input's bytes"
    subject = client(registry_url).get_latest_version(topic["output"] + "-value")
    assert subject.schema.schema_type == "AVRO"
    assert {int.from_bytes(r.value[1:5], "big") for r in written if r.value} == {subject.schema_id}


def test_json_schema_events_are_validated_and_outputs_written_under_their_subject(
    bootstrap: str, registry_url: str
) -> None:
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    topic = topics(bootstrap, "json_schema")
    config = service_config(bootstrap, [topic], schema_registry={"url": registry_url})
    schema = {
        "type": "object",
        "properties": {"id": {"type": "string"}, "text": {"type": "string"}},
        "required": ["id", "text"],
    }
    writer = JSONSerializer(json.dumps(schema), client(registry_url), conf={"validate": False})
    ctx = SerializationContext(topic["input"], MessageField.VALUE)
    values = [writer(p, ctx) for p in posts("j", TEXTS[:2])] + [writer({"id": "no text"}, ctx)]
    produce(bootstrap, topic["input"], values)
    service = build_service(config, KeywordEngine(), formats=ready_formats(config))
    with RunningService(service):
        written = read_all(bootstrap, topic["output"], 2)
        dead = read_all(bootstrap, topic["dead_letter"], 1)
        wait_drained(bootstrap, config.kafka.group_id, topic["input"])
    assert [r.value is not None and r.value[0] for r in written] == [0, 0]
    assert [json.loads(r.value[5:])["id"] for r in written if r.value] == ["j0", "j1"]
    assert dead[0].header(HEADER + "error.code") == b"schema_decode_failed"
    registered = client(registry_url).get_latest_version(topic["output"] + "-value")
    assert registered.schema.schema_type == "JSON"


@pytest.fixture
def relay(registry_port: int) -> Iterator[Relay]:
    relay = Relay(registry_port)
    yield relay
    relay.close()


@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
def test_a_registry_outage_holds_the_events_in_order_and_loses_none(
    bootstrap: str, registry_url: str, relay: Relay, mode: str
) -> None:
    topic = topics(bootstrap, "avro")
    through_relay = relay.url(CCOMPAT_PATH)
    config = service_config(
        bootstrap,
        [topic],
        processing={"guarantee": mode},
        schema_registry={"url": through_relay, "timeout_s": 2},
    )
    produce(bootstrap, topic["input"], avro_values(registry_url, topic["input"], POST, posts("a")))
    service = build_service(config, KeywordEngine(), formats=ready_formats(config))
    failures = service.metrics.registry_failures
    with RunningService(service):
        read_all(bootstrap, topic["output"], len(TEXTS))
        relay.cut()
        # A new schema version: its id is not cached, so these need the registry.
        later = avro_values(registry_url, topic["input"], POST_V2, posts("b"))
        produce(bootstrap, topic["input"], later)
        wait_until(lambda: failures._value.get() >= 3, 60, "three failed attempts")
        assert service.partitions.paused, "the held partition is paused"
        relay.restore()
        written = read_all(bootstrap, topic["output"], 2 * len(TEXTS))
        wait_drained(bootstrap, config.kafka.group_id, topic["input"])
    ids = [read_avro(registry_url, topic["output"], r.value)["id"] for r in written]
    assert ids == [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)], "in order, once"
    assert service.metrics.dead_letters.labels(topic["input"], "schema_unknown")._value.get() == 0
    assert read_to_end(bootstrap, topic["dead_letter"]) == [], "nothing dead-lettered"


def test_run_stops_at_start_when_the_url_is_not_a_registry_api(
    bootstrap: str, registry_port: int, tmp_path: Path, tiny_model: Path
) -> None:
    topic = topics(bootstrap, "avro")
    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": unique("group")},
        "engine": {"model": str(tiny_model), "device": "cpu"},
        "metrics": {"enabled": False},
        # Apicurio's own API root, not its Confluent-compatible one: every GET is a 404.
        "schema_registry": {"url": f"http://127.0.0.1:{registry_port}/apis/nothing"},
        "topics": [topic],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.run(
        [sys.executable, "-m", "stream_classifier.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert process.returncode == EXIT_REGISTRY, process.stderr
    assert "schema registry: not a Schema Registry API" in process.stderr
