"""Schema Registry formats without a registry process: confluent-kafka's own in-memory
registry client stands in for it (tests/test_formats_kafka.py runs the real one)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import (
    MockSchemaRegistryClient,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.common._httpx_compat import httpx
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from test_loop_parts import Clock

from stream_classifier.config import ConfigError, SchemaRegistryConfig, ServiceConfig, load_config
from stream_classifier.formats import (
    FormatError,
    Formats,
    Registry,
    RegistryUnavailable,
    avro_schema,
    output_schema_text,
    ready_formats,
    sample_event,
)
from stream_classifier.intake import Intake
from stream_classifier.messages import ClassifyRequest, Envelope, Rejection, ScoredEvent, SourceRef
from stream_classifier.preparing import InlinePreparer
from stream_classifier.schemas import schema_text

POST = {
    "type": "record",
    "name": "Post",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "text", "type": "string"},
        {"name": "meta", "type": {"type": "map", "values": "string"}, "default": {}},
    ],
}
POST_JSON_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "text": {"type": "string"}},
    "required": ["text"],
}
REGISTRY = {"url": "http://registry.invalid:8081"}


def config(register: bool = True, **topic: Any) -> ServiceConfig:
    settings = {"input": "in", "output": "out", "dead_letter": "dlq", "labels": ["a", "b"]}
    registry = {**REGISTRY, "register_output_schemas": register}
    return ServiceConfig(topics=[{**settings, **topic}], schema_registry=registry)


def registry(client: Any = None, register: bool = True) -> Registry:
    settings = SchemaRegistryConfig(**REGISTRY, register_output_schemas=register)
    return Registry(settings, client or MockSchemaRegistryClient({"url": "mock://"}))


def avro_value(
    client: Any, topic: str, value: dict[str, Any], schema: dict[str, Any] = POST
) -> bytes:
    writer = AvroSerializer(client, json.dumps(schema))
    encoded = writer(value, SerializationContext(topic, MessageField.VALUE))
    assert isinstance(encoded, bytes)
    return encoded


def envelope(value: bytes | None, offset: int = 0, partition: int = 0) -> Envelope:
    source = SourceRef(topic="in", partition=partition, offset=offset)
    return Envelope(source, None, value, [], 0.0)


def decode(formats: Formats, value: bytes, **topic: Any) -> ClassifyRequest | Rejection:
    from stream_classifier.messages import decode_event

    return decode_event(envelope(value), config(**topic).topics[0], formats.read)


# -- configuration ------------------------------------------------------------------------


def test_a_registry_format_needs_a_registry(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "topics:\n  - {input: in, output: out, dead_letter: dlq, labels: [a], input_format: avro}\n"
    )
    with pytest.raises(ConfigError, match="schema_registry is required: topics in"):
        load_config(path)


def test_one_output_topic_in_two_formats_is_refused() -> None:
    topics = [
        {"input": "a", "output": "out", "dead_letter": "dlq", "labels": ["x"]},
        {
            "input": "b",
            "output": "out",
            "dead_letter": "dlq",
            "labels": ["x"],
            "output_format": "avro",
        },
    ]
    with pytest.raises(ValueError, match="out"):
        ServiceConfig(topics=topics, schema_registry=REGISTRY)


def test_a_format_change_needs_a_restart() -> None:
    from stream_classifier.reload import restart_needed

    assert (
        restart_needed(config(), config(output_format="avro")) == "topic in: output_format changed"
    )


# -- the output schema -------------------------------------------------------------------


def test_the_avro_schema_takes_every_field_of_a_scored_event() -> None:
    schema = avro_schema(ScoredEvent)
    assert [f["name"] for f in schema["fields"]] == list(ScoredEvent.model_fields)
    parsed = fastavro.parse_schema(schema)
    event = sample_event().model_dump(mode="json")
    out = fastavro.schemaless_reader(_io(fastavro.schemaless_writer, parsed, event), parsed, None)
    assert out == event
    bare = ScoredEvent(**{**event, "id": 7, "flagged": None, "shadow": None, "windows": None})
    bare_dict = bare.model_dump(mode="json")
    assert (
        fastavro.schemaless_reader(_io(fastavro.schemaless_writer, parsed, bare_dict), parsed, None)
        == bare_dict
    )


def _io(write: Callable[..., None], schema: Any, record: dict[str, Any]) -> Any:
    import io

    buffer = io.BytesIO()
    write(buffer, schema, record)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("fmt", ["avro", "json_schema"])
def test_outputs_are_written_in_the_wire_format_under_the_topic_subject(fmt: str) -> None:
    client = MockSchemaRegistryClient({"url": "mock://"})
    cfg = config(output_format=fmt)
    formats = Formats(cfg, registry(client))
    formats.prepare(cfg)
    value = formats.encode(sample_event(), "out")
    assert value[0] == 0
    registered = client.get_latest_version("out-value")
    assert int.from_bytes(value[1:5], "big") == registered.schema_id
    if fmt == "avro":
        read = AvroDeserializer(client)(value, SerializationContext("out", MessageField.VALUE))
        assert read == sample_event().model_dump(mode="json")
    else:
        assert json.loads(value[5:]) == sample_event().model_dump(mode="json")
        assert json.loads(registered.schema.schema_str or "") == json.loads(
            schema_text(ScoredEvent)
        )


def test_json_topics_need_no_registry() -> None:
    plain = ServiceConfig(
        topics=[{"input": "in", "output": "out", "dead_letter": "d", "labels": ["a"]}]
    )
    formats = ready_formats(plain)
    assert formats.registry is None
    assert json.loads(formats.encode(sample_event(), "out"))["id"] == "sample"


def test_an_output_schema_that_must_exist_and_does_not_stops_the_start() -> None:
    cfg = config(register=False, output_format="avro")
    client = MockSchemaRegistryClient({"url": "mock://"})
    with pytest.raises(FormatError, match="output topic out: cannot find"):
        ready_formats(cfg, registry=registry(client, register=False))
    client.register_schema("out-value", Schema(output_schema_text("avro"), "AVRO"))
    assert ready_formats(cfg, registry=registry(client, register=False)).registry is not None


# -- reading inputs ------------------------------------------------------------------------


def test_an_avro_event_is_read_at_its_text_field() -> None:
    reg = registry()
    formats = Formats(config(input_format="avro"), reg)
    value = avro_value(reg.client, "in", {"id": "e1", "text": "hello", "meta": {"k": "v"}})
    decoded = decode(formats, value, input_format="avro")
    assert isinstance(decoded, ClassifyRequest)
    assert (decoded.text, decoded.event_id) == ("hello", "e1")


def test_an_avro_string_is_the_text_of_a_value_topic() -> None:
    reg = registry()
    formats = Formats(config(input_format="avro", text_field="$value"), reg)
    value = avro_value(reg.client, "in", "plain words", schema="string")  # type: ignore[arg-type]
    decoded = decode(formats, value, input_format="avro", text_field="$value")
    assert isinstance(decoded, ClassifyRequest) and decoded.text == "plain words"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b'{"text": "json on an avro topic"}', "wire_format"),
        (b"\x00\x00\x00", "wire_format"),
        (b"", "wire_format"),
        (b"\x00\x00\x00\x03\xe7" + b"\x02a", "schema_unknown"),
    ],
)
def test_a_value_that_is_not_in_the_wire_format_or_has_no_schema_is_a_dead_letter(
    value: bytes, code: str
) -> None:
    formats = Formats(config(input_format="avro"), registry())
    decoded = decode(formats, value, input_format="avro")
    assert isinstance(decoded, Rejection) and decoded.code == code, decoded


def test_a_value_that_does_not_decode_with_its_schema_is_a_dead_letter() -> None:
    reg = registry()
    formats = Formats(config(input_format="avro"), reg)
    good = avro_value(reg.client, "in", {"id": "e1", "text": "hello"})
    for bad in (good[:6], good[:5] + b"\xff" * 12):
        decoded = decode(formats, bad, input_format="avro")
        assert isinstance(decoded, Rejection) and decoded.code == "schema_decode_failed", bad


def test_a_json_schema_event_that_breaks_its_schema_is_a_dead_letter() -> None:
    reg = registry()
    formats = Formats(config(input_format="json_schema"), reg)
    writer = JSONSerializer(json.dumps(POST_JSON_SCHEMA), reg.client, conf={"validate": False})
    ctx = SerializationContext("in", MessageField.VALUE)
    good = writer({"id": "e", "text": "hello"}, ctx)
    bad = writer({"id": "e", "body": "no text"}, ctx)
    assert isinstance(decode(formats, good, input_format="json_schema"), ClassifyRequest)
    rejected = decode(formats, bad, input_format="json_schema")
    assert isinstance(rejected, Rejection) and rejected.code == "schema_decode_failed"


class DownClient(MockSchemaRegistryClient):
    """A registry that does not answer (connection refused), or answers with ``status``."""

    def __init__(self, status: int | None = None) -> None:
        super().__init__({"url": "mock://"})
        self.status = status
        self.down = True

    def get_schema(self, schema_id: int, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            if self.status is None:
                raise httpx.ConnectError("connection refused")
            raise SchemaRegistryError(self.status, -1, "unavailable")
        return super().get_schema(schema_id, *args, **kwargs)


@pytest.mark.parametrize("status", [None, 503, 500, 429, 401])
def test_a_registry_that_cannot_answer_now_is_not_a_dead_letter(status: int | None) -> None:
    client = DownClient(status)
    reg = registry(client)
    value = avro_value(MockSchemaRegistryClient({"url": "mock://"}), "in", {"id": "e", "text": "t"})
    with pytest.raises(RegistryUnavailable):
        decode(Formats(config(input_format="avro"), reg), value, input_format="avro")


# -- the intake holds a partition while the registry is away --------------------------------


def test_events_wait_for_the_registry_in_their_partitions_order() -> None:
    from keyword_engine import KeywordEngine

    client = DownClient()
    client.down = False
    values = [avro_value(client, "in", {"id": f"e{i}", "text": f"text {i}"}) for i in range(5)]
    client.down = True
    cfg = config(input_format="avro", labels=["violence", "harmless"])
    clock = Clock()
    failures: list[int] = []
    intake = Intake(
        cfg,
        InlinePreparer(KeywordEngine()),
        clock,
        Formats(cfg, registry(client)),
        lambda: failures.append(1),
    )
    intake.accept(envelope(values[0], 0, partition=0))
    intake.accept(envelope(values[1], 1, partition=0))
    assert intake.registry_hold.partitions == {("in", 0)} and len(intake.registry_hold) == 2
    assert len(intake) == 0, "nothing dead-lettered, nothing batched"
    intake.retry_held()  # within the back-off: the registry is not asked
    assert len(failures) == 1
    clock.now += 1.0
    intake.retry_held()  # asked, still down
    assert len(failures) == 2 and len(intake.registry_hold) == 2
    intake.accept(envelope(values[2], 2, partition=0))  # behind the held ones
    client.down = False
    intake.accept(envelope(values[3], 0, partition=1))  # another partition is not held
    assert intake.registry_hold.partitions == {("in", 0)}
    clock.now += 10.0
    intake.retry_held()
    assert intake.registry_hold.partitions == set()
    intake.accept(envelope(values[4], 3, partition=0))
    intake.preparer.flush()
    intake.fill()
    batch = intake.take_due(engine_idle=True)
    assert batch is not None
    order = [(i.envelope.source.partition, i.envelope.source.offset) for i in batch.items]
    assert order == [(1, 0), (0, 0), (0, 1), (0, 2), (0, 3)]
    assert all(isinstance(item, ClassifyRequest) for item in batch.items)


def test_a_revoked_partition_forgets_its_held_events() -> None:
    from keyword_engine import KeywordEngine

    cfg = config(input_format="avro")
    intake = Intake(
        cfg, InlinePreparer(KeywordEngine()), Clock(), Formats(cfg, registry(DownClient()))
    )
    value = avro_value(MockSchemaRegistryClient({"url": "mock://"}), "in", {"id": "e", "text": "t"})
    intake.accept(envelope(value, 0))
    assert intake.drop({("in", 0)}) == 1
    assert intake.registry_hold.partitions == set()


class LateClient(MockSchemaRegistryClient):
    """A registry that refuses connections ``down_for`` times, then answers."""

    def __init__(self, down_for: int) -> None:
        super().__init__({"url": "mock://"})
        self.down_for = down_for

    def get_subjects(self, *args: Any, **kwargs: Any) -> list[str]:
        if self.down_for > 0:
            self.down_for -= 1
            raise httpx.ConnectError("connection refused")
        return list(super().get_subjects(*args, **kwargs))


def test_the_start_waits_for_a_registry_that_is_not_up_yet() -> None:
    cfg = config(output_format="avro")
    slept: list[float] = []
    formats = ready_formats(cfg, sleep=slept.append, registry=registry(LateClient(2)))
    assert len(slept) == 2
    assert formats.encode(sample_event(), "out")[0] == 0


def test_the_start_gives_up_on_a_registry_that_never_answers() -> None:
    cfg = config(output_format="avro")
    with pytest.raises(FormatError, match="no answer within 0s"):
        ready_formats(cfg, timeout_s=0, sleep=lambda _: None, registry=registry(LateClient(99)))
