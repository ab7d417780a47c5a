"""Values in a Schema Registry's formats: Avro and JSON Schema in Confluent's wire format.

A topic's ``input_format`` and ``output_format`` are ``json`` (the service's own: UTF-8
JSON, decoded in :mod:`~stream_classifier.messages`), ``avro`` or ``json_schema``. The last
two go through confluent-kafka's own serializers and a Confluent-compatible registry, with
subjects named by the topic-name strategy (``<topic>-value``).

What can go wrong with a value, and what becomes of it:

- it is not in the wire format, its schema id is unknown to the registry, or it does not
  decode with (or validate against) its schema: :class:`ValueProblem`, a dead letter;
- the registry cannot answer now (down, timing out, a 5xx, refused credentials):
  :class:`RegistryUnavailable`. The event is not dead-lettered: its partition waits, in
  order, until the registry answers (the intake holds it, like an output outage).

Output schemas are registered (or, with ``register_output_schemas: false``, looked up) at
start and on a reload, for every topic written in a registry format, so that writing an
output never waits on the registry: the serializers cache the schema id per subject.
"""

from __future__ import annotations

import json
import logging
import time
import types
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from stream_classifier.config import REGISTRY_FORMATS, SchemaRegistryConfig, ServiceConfig
from stream_classifier.messages import ScoredEvent, ShadowResult, SourceRef

log = logging.getLogger(__name__)

#: Confluent's wire format: this byte, the schema id (4 bytes, big-endian), the value.
WIRE_MAGIC = 0
WIRE_HEADER_BYTES = 5
#: The registry's error code for a schema id it does not know (Confluent's API).
SCHEMA_NOT_FOUND = 40403
#: HTTP statuses that mean "not now" rather than "never".
_TRANSIENT_STATUS = {401, 403, 408, 429}

#: Writes a scored event as the value of a record for the topic named.
Encode = Callable[[ScoredEvent, str], bytes]


class ValueProblem(Exception):
    """This value can never be decoded: its event is dead-lettered with ``code``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RegistryUnavailable(Exception):
    """The registry could not answer now; ask again later."""


class FormatError(Exception):
    """The service cannot start (or reload) with these formats: the reason names the topic."""


def json_value(event: ScoredEvent, topic: str) -> bytes:
    return event.model_dump_json().encode()


# -- the output schemas ------------------------------------------------------------------


def avro_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The Avro record schema of a pydantic model (the types the message models use:
    str, int, float, bool, lists, nested models, unions and optionals)."""
    fields: list[dict[str, Any]] = []
    for name, info in model.model_fields.items():
        field: dict[str, Any] = {"name": name, "type": _avro_type(info.annotation)}
        if isinstance(field["type"], list) and field["type"][0] == "null":
            field["default"] = None
        if info.description:
            field["doc"] = info.description
        fields.append(field)
    return {
        "type": "record",
        "name": model.__name__,
        "namespace": "stream_classifier",
        "doc": (model.__doc__ or "").strip(),
        "fields": fields,
    }


_AVRO_PRIMITIVES: dict[Any, str] = {str: "string", int: "long", float: "double", bool: "boolean"}


def _avro_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        ordered = [m for m in members if m is type(None)] + [
            m for m in members if m is not type(None)
        ]
        return ["null" if m is type(None) else _avro_type(m) for m in ordered]
    if origin is list:
        (item,) = typing.get_args(annotation)
        return {"type": "array", "items": _avro_type(item)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return avro_schema(annotation)
    if annotation in _AVRO_PRIMITIVES:
        return _AVRO_PRIMITIVES[annotation]
    raise TypeError(f"no Avro type for {annotation!r}")


def output_schema_text(fmt: str) -> str:
    """The scored event's schema in a registry format, as registered (the serializers
    strip a trailing newline)."""
    if fmt == "avro":
        return json.dumps(avro_schema(ScoredEvent), indent=2, ensure_ascii=False)
    from stream_classifier.schemas import schema_text

    return schema_text(ScoredEvent).strip()


def sample_event() -> ScoredEvent:
    """A scored event with every optional part set, serialized once per output topic at
    start: it registers the schema and proves the schema takes the model."""
    return ScoredEvent(
        id="sample",
        source=SourceRef(topic="t", partition=0, offset=0, timestamp=0),
        labels=["a"],
        scores=[1.0],
        top_label="a",
        multi_label=False,
        model="m",
        latency_ms=0.0,
        flagged=["a"],
        decision="allow",
        settings_version="0",
        windows=1,
        windows_truncated=False,
        shadow=ShadowResult(decision="allow", flagged=[], settings_version="0"),
    )


# -- the registry ----------------------------------------------------------------------


class Registry:
    """A registry client with a reader per input format and a writer per output topic."""

    def __init__(self, config: SchemaRegistryConfig, client: Any = None) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer
        from confluent_kafka.schema_registry.json_schema import JSONDeserializer

        self.client = client or SchemaRegistryClient(config.client_config())
        self.register = config.register_output_schemas
        self._readers: dict[str, Callable[..., Any]] = {
            "avro": AvroDeserializer(self.client),
            "json_schema": JSONDeserializer(None, schema_registry_client=self.client),
        }
        self._writers: dict[str, Callable[..., Any]] = {}

    def read(self, value: bytes, topic: str, fmt: str) -> Any:
        """The decoded value (a dict for a record, a str for a string schema...)."""
        from confluent_kafka.serialization import MessageField, SerializationContext

        if len(value) < WIRE_HEADER_BYTES or value[0] != WIRE_MAGIC:
            first = f"0x{value[0]:02x}" if value else "nothing"
            raise ValueProblem(
                "wire_format",
                f"value is not in the Schema Registry wire format: {len(value)} bytes, "
                f"first {first} (expected 0x00 and a 4-byte schema id)",
            )
        schema_id = int.from_bytes(value[1:WIRE_HEADER_BYTES], "big")
        try:
            return self._readers[fmt](value, SerializationContext(topic, MessageField.VALUE))
        except Exception as exc:  # noqa: BLE001 - classified: never, or not now
            raise _read_failure(exc, schema_id, fmt) from exc

    def check(self) -> None:
        """The URL is a registry's API root: a wrong path would make every schema id
        "unknown", and every event a dead letter."""
        try:
            self.client.get_subjects()
        except Exception as exc:  # noqa: BLE001 - classified below
            if _transient(exc):
                raise RegistryUnavailable(f"registry: {exc}") from exc
            raise FormatError(f"not a Schema Registry API (GET /subjects: {exc})") from exc

    def prepare(self, topic: str, fmt: str) -> None:
        """Register (or look up) the output schema under ``<topic>-value``, once."""
        if topic in self._writers:
            return
        writer = self._writer(fmt)
        try:
            _serialize(writer, sample_event(), topic)
        except Exception as exc:  # noqa: BLE001 - classified below
            if _transient(exc):
                raise RegistryUnavailable(f"registry: {exc}") from exc
            how = "register" if self.register else "find (register_output_schemas is false)"
            raise FormatError(
                f"output topic {topic}: cannot {how} its {fmt} schema under subject "
                f"{topic}-value: {exc}"
            ) from exc
        self._writers[topic] = writer

    def write(self, event: ScoredEvent, topic: str) -> bytes:
        return _serialize(self._writers[topic], event, topic)

    def _writer(self, fmt: str) -> Callable[..., Any]:
        from confluent_kafka.schema_registry.avro import AvroSerializer
        from confluent_kafka.schema_registry.json_schema import JSONSerializer

        conf = {"auto.register.schemas": self.register}
        schema = output_schema_text(fmt)
        writer: Callable[..., Any]
        if fmt == "avro":
            writer = AvroSerializer(self.client, schema, conf=conf)
        else:
            writer = JSONSerializer(schema, self.client, conf=conf)
        return writer


def _serialize(writer: Callable[..., Any], event: ScoredEvent, topic: str) -> bytes:
    from confluent_kafka.serialization import MessageField, SerializationContext

    value = writer(event.model_dump(mode="json"), SerializationContext(topic, MessageField.VALUE))
    assert isinstance(value, bytes)
    return value


def _transient(exc: BaseException) -> bool:
    """Whether a registry call failed for now (ask again) rather than for good."""
    from confluent_kafka.schema_registry.common._httpx_compat import httpx
    from confluent_kafka.schema_registry.error import OAuthTokenError, SchemaRegistryError

    if isinstance(exc, SchemaRegistryError):
        status = exc.http_status_code
        return status >= 500 or status in _TRANSIENT_STATUS
    return isinstance(exc, httpx.TransportError | OSError | OAuthTokenError)


def _read_failure(exc: Exception, schema_id: int, fmt: str) -> Exception:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    if _transient(exc):
        return RegistryUnavailable(f"registry: {type(exc).__name__}: {exc}")
    if isinstance(exc, SchemaRegistryError) and (
        exc.error_code == SCHEMA_NOT_FOUND or exc.http_status_code == 404
    ):
        return ValueProblem("schema_unknown", f"schema id {schema_id}: {exc.error_message}")
    return ValueProblem(
        "schema_decode_failed",
        f"value does not decode as {fmt} with schema id {schema_id}: {type(exc).__name__}: {exc}",
    )


# -- every topic's formats -------------------------------------------------------------


class Formats:
    """How each topic's values are read and written; the registry's client where a topic
    needs one (built at start: a configuration without registry formats never makes one)."""

    def __init__(self, config: ServiceConfig, registry: Registry | None = None) -> None:
        self.registry = registry
        needed = any(topic.uses_registry for topic in config.topics)
        if registry is None and needed and config.schema_registry is not None:
            self.registry = Registry(config.schema_registry)
        self._output_format: dict[str, str] = {}
        self._checked = False
        #: The last event written as JSON, and its value (its routed copies reuse it).
        self._last_event: ScoredEvent | None = None
        self._last_json = b""
        self.use(config)

    def use(self, config: ServiceConfig) -> None:
        """The topics' formats after a reload (:meth:`prepare` first: routes may be new)."""
        self._output_format = {
            written: topic.output_format
            for topic in config.topics
            for written in (topic.output, *topic.route_topics)
        }

    def prepare(self, config: ServiceConfig) -> None:
        """Register (or find) the output schema of every topic written in a registry
        format; FormatError for one that cannot be, RegistryUnavailable when the registry
        does not answer."""
        if self.registry is not None and not self._checked:
            self.registry.check()
            self._checked = True
        for topic in config.topics:
            if topic.output_format not in REGISTRY_FORMATS:
                continue
            assert self.registry is not None
            for written in (topic.output, *topic.route_topics):
                self.registry.prepare(written, topic.output_format)

    def problems(self, config: ServiceConfig) -> list[str]:
        """Why a reloaded configuration's output schemas cannot be used (empty: they can)."""
        try:
            self.prepare(config)
        except (FormatError, RegistryUnavailable) as exc:
            return [str(exc)]
        return []

    def read(self, value: bytes, topic: str, fmt: str) -> Any:
        assert self.registry is not None, "a registry format without a registry"
        return self.registry.read(value, topic, fmt)

    def encode(self, event: ScoredEvent, topic: str) -> bytes:
        """The value of ``event`` for a record to ``topic``, in that topic's format (a
        JSON value is serialized once per event, however many routed copies it has)."""
        if self._output_format.get(topic, "json") == "json":
            if event is not self._last_event:
                self._last_event, self._last_json = event, json_value(event, topic)
            return self._last_json
        assert self.registry is not None
        return self.registry.write(event, topic)


def ready_formats(
    config: ServiceConfig,
    timeout_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    registry: Registry | None = None,
) -> Formats:
    """The start's formats, every output schema registered (or found). The registry is
    waited for up to ``timeout_s``, as a broker is; FormatError when it does not answer in
    time, or refuses a schema for good (the message names the topic)."""
    formats = Formats(config, registry)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            formats.prepare(config)
            return formats
        except RegistryUnavailable as exc:
            if time.monotonic() >= deadline:
                url = config.schema_registry.url if config.schema_registry else "?"
                raise FormatError(f"{url}: no answer within {timeout_s:.0f}s: {exc}") from exc
            log.warning("schema registry not answering yet (%s); retrying", exc)
            sleep(1.0)
