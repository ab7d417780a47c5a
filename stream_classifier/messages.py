"""Message contracts: what comes in, what goes out, and what goes to the dead-letter topic.

The pydantic models here are the source of the JSON Schemas in ``schemas/``.
:func:`decode_event` turns raw Kafka bytes into a :class:`ClassifyRequest`, or into a
:class:`Rejection` that names why the event cannot be classified.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from stream_classifier.config import TopicConfig
from stream_classifier.headers import HEADER_PREFIX, Headers, read_headers

PLAIN_TEXT_FIELD = "$value"


class KafkaMessage(Protocol):
    """The part of ``confluent_kafka.Message`` the service reads (tests can fake it)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(
        self,
    ) -> dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None: ...
    def timestamp(self) -> tuple[int, int]: ...


class InputEvent(BaseModel):
    """An input event on a topic whose ``text_field`` is ``text`` (other paths: same idea).

    Fields not listed here pass through untouched and are ignored.
    """

    model_config = ConfigDict(extra="allow", title="stream-classifier input event")

    text: str = Field(min_length=1, description="The text to classify (at the topic's text_field).")
    id: str | int | None = Field(
        None, description="Copied to the output; the source offset if absent."
    )
    labels: list[str] | None = Field(
        None,
        description="Labels for this event only; accepted only where the topic sets "
        "allow_message_labels, at most max_labels.",
    )


class SourceRef(BaseModel):
    """Where an event was read from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    partition: int
    offset: int
    timestamp: int | None = Field(None, description="The input's timestamp, ms since the epoch.")


class ShadowResult(BaseModel):
    """A shadow policy's outcome for one event, beside the live one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    decision: str | None = Field(description="The shadow's decision lane (null: no lanes).")
    flagged: list[str] | None = Field(
        description="Labels at or over the shadow's thresholds (null: it sets none)."
    )
    settings_version: str = Field(description="A digest of the shadow's settings.")


class ScoredEvent(BaseModel):
    """One output event per input event, on the topic's output topic, with the input's key."""

    model_config = ConfigDict(extra="forbid", title="stream-classifier scored event")

    id: str | int = Field(description="The input's id, or '<topic>:<partition>:<offset>'.")
    source: SourceRef
    labels: list[str] = Field(description="All labels, highest score first.")
    scores: list[float] = Field(description="One score per label, same order as labels.")
    top_label: str
    multi_label: bool = Field(
        description="False: scores sum to 1 (for a text read in several windows, each is "
        "the label's highest share in any window). True: each is an independent entailment "
        "probability (for a text read in windows, its highest in any window)."
    )
    model: str
    latency_ms: float = Field(description="From the service receiving the event to its score.")
    flagged: list[str] | None = Field(
        None,
        description="Labels at or over their threshold, highest score first; null where "
        "the topic sets no thresholds.",
    )
    decision: str | None = Field(
        None,
        description="The first of the topic's decision lanes whose condition holds (e.g. "
        "block, review, allow); null where the topic defines no lanes.",
    )
    settings_version: str | None = Field(
        None,
        description="Which version of the topic's settings (labels, template, thresholds, "
        "lanes...) scored the event: a digest of them, changed by a reload.",
    )
    windows: int | None = Field(
        None,
        description="How many token windows of the text were scored, on a topic with "
        "on_too_long: windows (1: the text fits one window and scored as it is); null on "
        "other topics.",
    )
    windows_truncated: bool | None = Field(
        None,
        description="On a topic with on_too_long: windows, whether text was left unread "
        "because it needed more than max_windows windows; null on other topics.",
    )
    shadow: ShadowResult | None = Field(
        None,
        description="What the topic's shadow policy decided (acted on by nobody); null "
        "where the topic has none, or its shadow could not be evaluated for this event.",
    )


class DeadLetterContext(BaseModel):
    """Why an event went to the dead-letter topic (sent as headers beside the original bytes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    message: str
    source: SourceRef

    def headers(self) -> Headers:
        return [
            (HEADER_PREFIX + "error.code", self.code.encode()),
            # The message may quote the event's own text, lone surrogates included.
            (HEADER_PREFIX + "error.message", self.message.encode("utf-8", "backslashreplace")),
            (HEADER_PREFIX + "source.topic", self.source.topic.encode()),
            (HEADER_PREFIX + "source.partition", str(self.source.partition).encode()),
            (HEADER_PREFIX + "source.offset", str(self.source.offset).encode()),
        ]


@dataclass(frozen=True)
class Envelope:
    """The Kafka side of one consumed event: where it came from and what to copy onward."""

    source: SourceRef
    key: bytes | None
    value: bytes | None
    headers: Headers
    received_at: float

    @classmethod
    def of(cls, message: KafkaMessage, received_at: float) -> Envelope:
        kind, ts = message.timestamp()
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        headers = read_headers(message)
        return cls(
            source=SourceRef(
                topic=topic, partition=partition, offset=offset, timestamp=ts if kind else None
            ),
            key=message.key(),
            value=message.value(),
            headers=headers,
            received_at=received_at,
        )


@dataclass
class ClassifyRequest:
    """A valid event, ready for the engine."""

    envelope: Envelope
    event_id: str | int
    text: str
    labels: tuple[str, ...]
    topic: TopicConfig
    text_truncated: bool = False
    #: The version of the topic settings it was read with (see stream_classifier.reload).
    settings_version: str | None = None
    #: Filled by the engine's ``prepare``: tokenized form and its token cost.
    prepared: Any = field(default=None, repr=False)
    #: The topic's shadow policy for this event (:class:`stream_classifier.shadow.Shadow`).
    shadow: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Rejection:
    """An event that goes to the dead-letter topic."""

    envelope: Envelope
    code: str
    reason: str

    def context(self) -> DeadLetterContext:
        return DeadLetterContext(code=self.code, message=self.reason, source=self.envelope.source)


#: Reads a value in a registry format: ``read(value, topic, format)`` returns the decoded
#: value, or raises (stream_classifier.formats: ValueProblem for a value that never will,
#: RegistryUnavailable for "not now", which the caller must let through).
ReadValue = Callable[[bytes, str, str], Any]


def decode_event(
    envelope: Envelope, topic: TopicConfig, read: ReadValue | None = None
) -> ClassifyRequest | Rejection:
    """Validate one event against its topic's contract; never raises for bad input (only
    ``read``'s "registry unavailable" passes through)."""

    def reject(code: str, reason: str) -> Rejection:
        return Rejection(envelope, code, reason)

    raw = envelope.value
    if raw is None:
        return reject("empty_value", "the message has no value (tombstone)")
    value = _value(raw, topic, read)
    if isinstance(value, Problem):
        return reject(value.code, value.reason)

    payload: dict[str, Any] = {}
    if topic.text_field == PLAIN_TEXT_FIELD:
        text: Any = value
    else:
        if not isinstance(value, dict):
            kind = "JSON" if topic.input_format == "json" else topic.input_format
            return reject("not_object", f"value is {kind} {type(value).__name__}, not an object")
        payload = value
        found, text = _lookup(payload, topic.text_field)
        if not found:
            return reject("text_missing", f"no text at field {topic.text_field!r}")
    if not isinstance(text, str):
        return reject(
            "text_not_string", f"field {topic.text_field!r} is {type(text).__name__}, not a string"
        )
    if not text.strip():
        return reject("text_empty", f"field {topic.text_field!r} is empty")

    truncated = len(text) > topic.max_text_chars
    if truncated and topic.on_too_long == "reject":
        return reject(
            "text_too_long",
            f"text has {len(text)} characters, the topic allows {topic.max_text_chars}",
        )
    labels = _labels_for(payload, topic)
    if isinstance(labels, Problem):
        return reject(labels.code, labels.reason)

    event_id = payload.get("id")
    if not isinstance(event_id, str | int) or isinstance(event_id, bool):
        source = envelope.source
        event_id = f"{source.topic}:{source.partition}:{source.offset}"
    return ClassifyRequest(
        envelope=envelope,
        event_id=event_id,
        text=text[: topic.max_text_chars],
        labels=labels,
        topic=topic,
        text_truncated=truncated,
    )


def _value(raw: bytes, topic: TopicConfig, read: ReadValue | None) -> Any:
    """The decoded value: a str for ``$value`` on a JSON topic, else what the format
    decodes to; a Problem (code, reason) when it does not decode."""
    if topic.input_format != "json":
        from stream_classifier.formats import ValueProblem

        assert read is not None, f"topic {topic.input}: {topic.input_format} needs a reader"
        try:
            return read(raw, topic.input, topic.input_format)
        except ValueProblem as problem:
            return Problem(problem.code, problem.reason)
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem("not_utf8", f"value is not UTF-8: {exc.reason} at byte {exc.start}")
    if topic.text_field == PLAIN_TEXT_FIELD:
        return decoded
    try:
        return json.loads(decoded)
    except json.JSONDecodeError as exc:
        return Problem("not_json", f"value is not JSON: {exc.msg} (char {exc.pos})")
    except RecursionError:
        return Problem("not_json", "value is JSON nested too deeply to decode")


def parse_labels(text: str) -> list[str]:
    """``"a, b，c"`` → ``["a", "b", "c"]``: ASCII or full-width commas, blanks dropped."""
    return [label.strip() for label in text.replace("，", ",").split(",") if label.strip()]


def _lookup(payload: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = payload
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


@dataclass(frozen=True)
class Problem:
    """Why an event is rejected: its value, or its labels (a dead letter's code, reason)."""

    code: str
    reason: str


def _labels_for(payload: dict[str, Any], topic: TopicConfig) -> tuple[str, ...] | Problem:
    """The event's own labels where the topic allows them, else the topic's labels."""
    if payload.get("labels") is None:
        return tuple(topic.labels)
    if not topic.allow_message_labels:
        return Problem(
            "labels_forbidden", f"topic {topic.input!r} does not accept per-event labels"
        )
    labels = payload["labels"]
    if not isinstance(labels, list) or not labels:
        return Problem("labels_invalid", "labels must be a non-empty list of strings")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        return Problem("labels_invalid", "labels must be non-empty strings")
    cleaned = tuple(label.strip() for label in labels)
    if len(set(cleaned)) != len(cleaned):
        return Problem("labels_invalid", "labels contain duplicates")
    if len(cleaned) > topic.max_labels:
        return Problem(
            "too_many_labels", f"{len(cleaned)} labels, the topic allows at most {topic.max_labels}"
        )
    longest = max(len(label) for label in cleaned)
    if longest > topic.max_label_chars:
        return Problem(
            "label_too_long",
            f"a label has {longest} characters, the topic allows at most {topic.max_label_chars}",
        )
    return cleaned
