from __future__ import annotations

import json

import pytest

from stream_classifier.config import TopicConfig
from stream_classifier.headers import HEADER_PREFIX
from stream_classifier.messages import (
    ClassifyRequest,
    Envelope,
    Rejection,
    SourceRef,
    decode_event,
)

TOPIC = TopicConfig(
    input="in", output="out", dead_letter="dlq", labels=["spam", "ok"], max_text_chars=20
)


def envelope(value: bytes | None, offset: int = 7) -> Envelope:
    return Envelope(SourceRef(topic="in", partition=2, offset=offset), b"k", value, [], 0.0)


def decode(value: bytes | None, topic: TopicConfig = TOPIC) -> ClassifyRequest | Rejection:
    return decode_event(envelope(value), topic)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"\xff\xfe", "not_utf8"),
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'{"body": "x"}', "text_missing"),
        (b'{"text": 5}', "text_not_string"),
        (b'{"text": "   "}', "text_empty"),
        (b'{"text": "hi", "labels": ["a"]}', "labels_forbidden"),
        (None, "empty_value"),
    ],
)
def test_decode_event_bad_input_becomes_rejection_with_code(value: bytes | None, code: str) -> None:
    result = decode(value)
    assert isinstance(result, Rejection)
    assert result.code == code
    assert result.reason


def test_decode_event_valid_event_keeps_id_and_topic_labels() -> None:
    result = decode(json.dumps({"text": "buy now", "id": "evt-1", "extra": 1}).encode())
    assert isinstance(result, ClassifyRequest)
    assert (result.text, result.event_id, result.labels) == ("buy now", "evt-1", ("spam", "ok"))


def test_decode_event_without_id_uses_source_coordinates() -> None:
    result = decode(b'{"text": "hello"}')
    assert isinstance(result, ClassifyRequest)
    assert result.event_id == "in:2:7"


def test_decode_event_dotted_text_field_and_plain_text_payload() -> None:
    nested = TOPIC.model_copy(update={"text_field": "body.text"})
    result = decode(b'{"body": {"text": "hello"}}', nested)
    assert isinstance(result, ClassifyRequest) and result.text == "hello"
    plain = TOPIC.model_copy(update={"text_field": "$value"})
    result = decode("直接的文本".encode(), plain)
    assert isinstance(result, ClassifyRequest) and result.text == "直接的文本"


def test_decode_event_too_long_text_truncates_or_rejects_per_topic() -> None:
    value = json.dumps({"text": "x" * 25}).encode()
    truncated = decode(value)
    assert isinstance(truncated, ClassifyRequest)
    assert truncated.text == "x" * 20 and truncated.text_truncated
    rejecting = TOPIC.model_copy(update={"on_too_long": "reject"})
    rejected = decode(value, rejecting)
    assert isinstance(rejected, Rejection) and rejected.code == "text_too_long"


def test_decode_event_message_labels_where_allowed_and_limited() -> None:
    allowing = TOPIC.model_copy(update={"allow_message_labels": True, "max_labels": 2})
    ok = decode(b'{"text": "t", "labels": ["x", "y"]}', allowing)
    assert isinstance(ok, ClassifyRequest) and ok.labels == ("x", "y")
    too_many = decode(b'{"text": "t", "labels": ["x", "y", "z"]}', allowing)
    assert isinstance(too_many, Rejection) and too_many.code == "too_many_labels"
    duplicated = decode(b'{"text": "t", "labels": ["x", "x"]}', allowing)
    assert isinstance(duplicated, Rejection) and duplicated.code == "labels_invalid"


def test_dead_letter_headers_carry_reason_and_source() -> None:
    rejection = decode(b"{oops")
    assert isinstance(rejection, Rejection)
    headers = dict(rejection.context().headers())
    assert headers[HEADER_PREFIX + "error.code"] == b"not_json"
    assert headers[HEADER_PREFIX + "source.topic"] == b"in"
    assert headers[HEADER_PREFIX + "source.partition"] == b"2"
    assert headers[HEADER_PREFIX + "source.offset"] == b"7"


def test_json_nested_100000_deep_is_rejected_not_raised() -> None:
    rejection = decode(b"[" * 100_000 + b"]" * 100_000)
    assert isinstance(rejection, Rejection)
    assert rejection.code == "not_json"


def test_dead_letter_headers_survive_a_lone_surrogate_in_the_reason() -> None:
    rejection = Rejection(envelope(b"x"), "engine_failed", "TypeError: bad label '\ud800'")
    headers = dict(rejection.context().headers())
    assert headers[HEADER_PREFIX + "error.message"] == b"TypeError: bad label '\\ud800'"
