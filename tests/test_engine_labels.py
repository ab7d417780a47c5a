"""Per-event labels are bounded in length before they reach the engine.

Each distinct hypothesis is tokenized (NLI) or embedded (embedding engine) and cached, so a
producer sending 10,000-character labels costs CPU and cache memory; a topic's
``max_label_chars`` (default 200) sends such an event to the dead-letter topic instead.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from stream_classifier.config import TopicConfig
from stream_classifier.messages import (
    ClassifyRequest,
    Envelope,
    Rejection,
    SourceRef,
    decode_event,
)


def topic(**overrides: object) -> TopicConfig:
    fields: dict[str, object] = {
        "input": "in",
        "output": "out",
        "dead_letter": "dlq",
        "labels": ["spam", "ok"],
        "allow_message_labels": True,
        **overrides,
    }
    return TopicConfig.model_validate(fields)


def decode(labels: list[str], config: TopicConfig) -> ClassifyRequest | Rejection:
    value = json.dumps({"text": "hello", "labels": labels}).encode()
    envelope = Envelope(SourceRef(topic="in", partition=0, offset=3), None, value, [], 0.0)
    return decode_event(envelope, config)


def test_a_message_label_longer_than_max_label_chars_goes_to_the_dead_letter_topic() -> None:
    config = topic()
    assert config.max_label_chars == 200
    rejected = decode(["billing", "x" * 201], config)
    assert isinstance(rejected, Rejection)
    assert rejected.code == "label_too_long"
    assert "201" in rejected.reason and "200" in rejected.reason
    headers = dict(rejected.context().headers())
    assert headers["stream-classifier.error.code"] == b"label_too_long"


def test_labels_up_to_max_label_chars_are_accepted_and_the_limit_is_configurable() -> None:
    accepted = decode(["billing", "é" * 200], topic())
    assert isinstance(accepted, ClassifyRequest)
    assert accepted.labels == ("billing", "é" * 200)
    # surrounding blanks are stripped before counting, as they are before scoring
    assert isinstance(decode([" " + "y" * 200 + " "], topic()), ClassifyRequest)
    assert isinstance(decode(["abcdef"], topic(max_label_chars=5)), Rejection)
    assert isinstance(decode(["x" * 5000], topic(max_label_chars=5000)), ClassifyRequest)


def test_max_label_chars_must_be_positive() -> None:
    assert topic(max_label_chars=1).max_label_chars == 1
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        topic(max_label_chars=0)
