"""Start-up check: can this process reach, authenticate with and use its Kafka cluster?

librdkafka retries a refused login or a failed TLS handshake forever, quietly, so a wrong
password would look like an idle consumer. :func:`check_kafka` runs before the service
starts: it asks the cluster for its metadata with the service's own client settings and
fails at once, naming the bootstrap servers, the security protocol, the SASL mechanism
and user (never the password) and librdkafka's error, when authentication or TLS fails.
An unreachable cluster is retried until the deadline (a broker may still be starting).
It then checks that every input, output, dead-letter and route topic exists.

:func:`check_model_hub` does the same for the model: a ModelScope id needs ModelScope's
hub, and ModelScope retries an unreachable hub for about half a minute before it gives
up, so an offline start would look hung. One TCP connection with a short timeout tells.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from stream_classifier.config import EngineConfig, KafkaConfig, ServiceConfig
from stream_classifier.engine.base import EngineError

#: Errors that waiting will not fix: wrong credentials, wrong mechanism, TLS trust.
FATAL_CODES = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
DEFAULT_TIMEOUT_S = 30.0
#: One metadata request's wait; errors are collected between attempts.
ATTEMPT_S = 1.0


#: ModelScope's hub, unless its own variable MODELSCOPE_ENDPOINT names another.
MODELSCOPE_ENDPOINT = "https://modelscope.cn"
HUB_TIMEOUT_S = 2.0


class PreflightError(Exception):
    """Kafka cannot be used with this configuration; the message says why."""


class _Collector(logging.Logger):
    """Receives librdkafka's log lines (instead of stderr) so that they can be summarised."""

    def __init__(self) -> None:
        super().__init__("stream_classifier.preflight.librdkafka")
        self.lines: list[str] = []

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        self.lines.append(str(msg) % args if args else str(msg))


def check_kafka(config: ServiceConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise PreflightError unless the cluster answers and every configured topic exists."""
    topics = _metadata_topics(config.kafka, timeout_s)
    wanted = {
        name for t in config.topics for name in (t.input, t.output, t.dead_letter, *t.route_topics)
    }
    missing = sorted(wanted - topics)
    if missing:
        raise PreflightError(
            f"{_where(config.kafka)}: topic(s) missing: {', '.join(missing)} "
            "(create them first; the service does not create topics)"
        )


def _metadata_topics(kafka: KafkaConfig, timeout_s: float) -> set[str]:
    outcome = _ask_metadata(kafka, timeout_s)
    # Raised here, not where the client lives: a traceback that kept the client's frame
    # alive would keep its threads reconnecting for as long as the exception is held.
    if isinstance(outcome, str):
        raise PreflightError(outcome)
    return outcome


def _ask_metadata(kafka: KafkaConfig, timeout_s: float) -> set[str] | str:
    """The cluster's topic names, or why they could not be had."""
    errors: list[KafkaError] = []
    settings: dict[str, Any] = {**kafka.client_config()}
    settings.update({"error_cb": errors.append, "logger": _Collector()})
    admin = AdminClient(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return set(admin.list_topics(timeout=ATTEMPT_S).topics)
        except KafkaException as exc:
            errors.append(exc.args[0])
        admin.poll(0)  # serves error_cb
        fatal = [e for e in errors if e.code() in FATAL_CODES]
        if fatal:
            return f"{_where(kafka)}: {_describe(fatal[-1])}"
        if time.monotonic() >= deadline:
            return f"{_where(kafka)}: no answer within {timeout_s:.0f}s: {_describe(_best(errors))}"


def _best(errors: list[KafkaError]) -> KafkaError:
    """The most telling error: a connection-level one rather than the generic summary."""
    generic = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT}
    specific = [e for e in errors if e.code() not in generic and "metadata" not in e.str()]
    return (specific or errors)[-1]


def _describe(error: KafkaError) -> str:
    return f"{error.str()} ({error.name()})"


def _where(kafka: KafkaConfig) -> str:
    parts = [f"bootstrap {kafka.bootstrap_servers}", f"security.protocol {kafka.security_protocol}"]
    if kafka.sasl_mechanism is not None:
        parts.append(f"sasl.mechanism {kafka.sasl_mechanism} as user {kafka.sasl_username!r}")
    return "cannot use Kafka (" + ", ".join(parts) + ")"


def check_model_hub(engine: EngineConfig, timeout_s: float = HUB_TIMEOUT_S) -> None:
    """Raise EngineError at once when the model is a ModelScope id and the hub is unreachable.

    Directories, the embedding engine's packaged model and malformed names are left to the
    engine, which reports them itself. Behind an HTTP(S) proxy the hub is not probed
    (the proxy, not this machine, decides what is reachable).
    """
    model = engine.model
    path = Path(model).expanduser()
    if engine.kind != "nli" or path.is_dir() or path.is_absolute() or model.startswith("."):
        return
    if model.count("/") != 1:
        return
    # ModelScope's own variable, read here because its hub is what is being probed.
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT") or MODELSCOPE_ENDPOINT
    url = urllib.parse.urlsplit(endpoint if "//" in endpoint else f"https://{endpoint}")
    if url.hostname is None or urllib.request.getproxies().get(url.scheme):
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EngineError(
            f"cannot fetch model {model!r} from ModelScope ({url.hostname}:{port} is "
            f"unreachable: {reason}). Without network access, download it elsewhere and set "
            "engine.model (env STREAM_CLASSIFIER_ENGINE__MODEL) to the absolute path of a "
            "directory holding config.json, vocab.txt and pytorch_model.bin"
        ) from exc
