from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from stream_classifier.config import ConfigError, EngineConfig, KafkaConfig, load_config

VALID: dict[str, Any] = {
    "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
    "engine": {"kind": "nli", "model": "/models/structbert"},
    "topics": [
        {
            "input": "comments",
            "output": "comments.scored",
            "dead_letter": "comments.dlq",
            "labels": ["价格问题", "服务态度"],
        }
    ],
}


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def with_topic(**changes: object) -> dict[str, Any]:
    return {**VALID, "topics": [{**VALID["topics"][0], **changes}]}


def test_load_config_valid_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    assert config.topics[0].hypothesis_template == "{}"
    assert config.processing.max_batch_messages == 256
    assert config.processing.guarantee == "at_least_once"


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({**VALID, "engine": {"kind": "gpt"}}, "engine.kind", "'nli' or 'embedding'"),
        (with_topic(labels=[]), "topics.0.labels", "at least 1 item"),
        (with_topic(labels=["a", " "]), "topics.0.labels", "must not be empty"),
        (with_topic(labels=["a", "b", "a"]), "topics.0.labels", "duplicate labels: a"),
        (with_topic(output="comments"), "topics.0", "output topic must differ"),
        (with_topic(hypothesis_template="about"), "topics.0.hypothesis_template", "'{}'"),
        ({**VALID, "processing": {"max_batch_tokens": 100}}, "(top level)", "max_batch_tokens"),
        ({**VALID, "kafka": {"bootstrap_server": "x"}}, "kafka.bootstrap_server", "unknown field"),
        ({**VALID, "topicz": []}, "topicz", "unknown field"),
        (with_topic(labels=["a", "b", "c"], max_labels=2), "topics.0", "max_labels is 2"),
    ],
)
def test_load_config_bad_field_names_field_and_reason(
    tmp_path: Path, data: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data))
    message = str(caught.value)
    line = next((ln for ln in message.splitlines() if ln.strip().startswith(field + ":")), None)
    assert line is not None, message
    assert reason in line, message


def test_load_config_batch_tokens_error_names_env_var(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="STREAM_CLASSIFIER_PROCESSING__MAX_BATCH_TOKENS"):
        load_config(write(tmp_path, {**VALID, "processing": {"max_batch_tokens": 100}}))


def test_load_config_environment_overrides_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = {**VALID, "processing": {"max_batch_wait_ms": 50, "max_batch_messages": 8}}
    monkeypatch.setenv("STREAM_CLASSIFIER_PROCESSING__MAX_BATCH_WAIT_MS", "5")
    monkeypatch.setenv("STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS", "broker:9093")
    config = load_config(write(tmp_path, data))
    assert config.processing.max_batch_wait_ms == 5
    assert config.processing.max_batch_messages == 8  # the file's value survives
    assert config.kafka.bootstrap_servers == "broker:9093"


def test_load_config_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_validate_config_cli_exits_2_with_reason(tmp_path: Path) -> None:
    path = write(tmp_path, with_topic(hypothesis_template="no slot"))
    result = subprocess.run(
        [sys.executable, "-m", "stream_classifier.cli", "validate-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "topics.0.hypothesis_template" in result.stderr


def test_run_with_bad_config_exits_before_touching_kafka(tmp_path: Path) -> None:
    # The bootstrap address points nowhere: a config error must come first, and fast.
    data = {**with_topic(labels=[]), "kafka": {"bootstrap_servers": "127.0.0.1:1"}}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_classifier.cli",
            "run",
            "--config",
            str(write(tmp_path, data)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "topics.0.labels" in result.stderr


class _LibrdkafkaLog(logging.Logger):
    """Collects a client's librdkafka log lines (CONFWARN among them)."""

    def __init__(self) -> None:
        super().__init__("test.librdkafka")
        self.lines: list[str] = []

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        self.lines.append(str(msg) % args if args else str(msg))


def _confwarns(client: type, settings: Mapping[str, object]) -> list[str]:
    log = _LibrdkafkaLog()
    instance = client({**settings, "logger": log})
    instance.poll(0)
    if hasattr(instance, "close"):
        instance.close()
    return [line for line in log.lines if "CONFWARN" in line]


def test_kafka_consumer_and_producer_settings_reach_only_their_client() -> None:
    from confluent_kafka import Consumer, Producer

    from stream_classifier.source import consumer_config

    kafka = KafkaConfig(
        bootstrap_servers="127.0.0.1:1",
        extra={"socket.keepalive.enable": True, "session.timeout.ms": 45000},
        consumer_extra={
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "bootstrap.servers": "ignored:1",  # the explicit field wins
        },
        producer_extra={"linger.ms": 7, "compression.type": "lz4"},
    )
    consumer = kafka.consumer_client_config()
    producer = kafka.producer_client_config()
    common = kafka.client_config()
    assert consumer["session.timeout.ms"] == 6000  # consumer_extra wins over extra
    assert consumer["bootstrap.servers"] == producer["bootstrap.servers"] == "127.0.0.1:1"
    assert consumer["socket.keepalive.enable"] is producer["socket.keepalive.enable"] is True
    assert "linger.ms" not in consumer and "heartbeat.interval.ms" not in producer
    assert producer["linger.ms"] == 7 and "linger.ms" not in common

    split = KafkaConfig(
        bootstrap_servers="127.0.0.1:1",
        consumer_extra={"session.timeout.ms": 6000, "max.poll.interval.ms": 6000},
        producer_extra={"linger.ms": 7},
    )
    group = consumer_config(split.consumer_client_config(), "g", "earliest")
    assert _confwarns(Consumer, group) == []
    assert _confwarns(Producer, split.producer_client_config()) == []
    # The same keys all in `extra` (the old way) warn in the producer: the check can fail.
    together = KafkaConfig(bootstrap_servers="127.0.0.1:1", extra={"session.timeout.ms": 6000})
    assert any("session.timeout.ms" in w for w in _confwarns(Producer, together.client_config()))


@pytest.mark.parametrize("field", ["extra", "consumer_extra", "producer_extra"])
def test_kafka_extra_settings_refuse_secrets(field: str) -> None:
    with pytest.raises(ValidationError, match="secrets don't go in extra"):
        KafkaConfig(**{field: {"sasl.password": "hunter2"}})


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("fp16", "float16"),
        ("FP16", "float16"),
        ("half", "float16"),
        ("bf16", "bfloat16"),
        ("fp32", "float32"),
        ("float", "float32"),
        ("Float16", "float16"),
        ("auto", "auto"),
    ],
)
def test_dtype_takes_the_names_people_type(typed: str, meant: str) -> None:
    assert EngineConfig(dtype=typed).dtype == meant


def test_an_unknown_dtype_is_refused_with_the_field() -> None:
    with pytest.raises(ValidationError, match="dtype"):
        EngineConfig(dtype="int8")
