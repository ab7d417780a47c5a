"""Start-up check: can this process reach, authenticate with and use its Kafka cluster?

librdkafka retries a refused login or a failed TLS handshake forever, quietly, so a wrong
password would look like an idle consumer. :func:`check_kafka` runs before the service
starts: it asks the cluster for its metadata with the service's own client settings and
fails at once, naming the bootstrap servers, the security protocol, the SASL mechanism
and user (never the password) and librdkafka's error, when authentication or TLS fails.
An unreachable cluster is retried until the deadline (a broker may still be starting).
It then checks that every input, output, dead-letter and route topic exists.

With an authorizer on the cluster, a missing ACL is just as quiet: the consumer logs
"Topic authorization failed" at every fetch, the producer's records fail one by one, and
the first transaction fails only after the model has loaded. So the check also asks the
cluster which operations the service's principal may perform and fails at once, naming
every missing permission as operation and resource ("READ on group g", "WRITE on topic
out"); :func:`required_permissions` is the list, docs/OPERATIONS.md ("Kafka ACLs") the
same list for operators:

- topics and the group: the cluster's own answer (``include_authorized_operations`` on
  describe_topics and describe_consumer_groups): read-only, nothing is created or joined;
- exactly_once's transactional id: no request reports what may be done with an id, so a
  producer with that id asks for a producer id with a transaction timeout no broker
  accepts. The broker checks WRITE on the id first and the timeout second, and refuses
  the timeout before it touches the id's state, so the answer tells whether the id is
  allowed without fencing the producer that holds it (SIGHUP reloads run this check
  while the service's own producer is in a transaction).

Idempotent writes need no ACL of their own: since Kafka 3.0 (KIP-679) a producer that may
WRITE to any topic may also get an idempotent producer id; IDEMPOTENT_WRITE on the
cluster is only the older alternative.

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicCollection
from confluent_kafka.admin import AdminClient

from stream_classifier.config import EngineConfig, KafkaConfig, ServiceConfig
from stream_classifier.engine.base import EngineError

log = logging.getLogger(__name__)

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
#: The transactional-id probe's transaction timeout: the largest librdkafka accepts, above
#: any broker's transaction.max.timeout.ms (default 15 minutes) unless that is set to the
#: same 24.8 days, where the probe would take the id like the service's producer does.
PROBE_TRANSACTION_TIMEOUT_MS = 2**31 - 1


#: ModelScope's hub, unless its own variable MODELSCOPE_ENDPOINT names another.
MODELSCOPE_ENDPOINT = "https://modelscope.cn"
HUB_TIMEOUT_S = 2.0


class PreflightError(Exception):
    """Kafka cannot be used with this configuration; the message says why."""


@dataclass(frozen=True)
class Permission:
    """One ACL the service's principal needs: an operation on a resource.

    ``operation`` is Kafka's name (``READ``, ``WRITE``), ``resource`` its resource type as
    an operator writes it (``topic``, ``group``, ``transactional id``). READ and WRITE
    each imply DESCRIBE, which the clients also use.
    """

    operation: str
    resource: str
    name: str

    def __str__(self) -> str:
        return f"{self.operation} on {self.resource} {self.name}"


def required_permissions(config: ServiceConfig) -> list[Permission]:
    """Every ACL the service needs with this configuration, in the order of
    docs/OPERATIONS.md: the group, the input topics, the topics written (outputs,
    dead-letter and route topics), and under exactly_once the transactional id."""
    needed = [Permission("READ", "group", config.kafka.group_id)]
    read = _unique(t.input for t in config.topics)
    written = _unique(n for t in config.topics for n in (t.output, t.dead_letter, *t.route_topics))
    needed += [Permission("READ", "topic", name) for name in read]
    needed += [Permission("WRITE", "topic", name) for name in written]
    if config.processing.guarantee == "exactly_once":
        needed.append(Permission("WRITE", "transactional id", transactional_id(config)))
    return needed


def transactional_id(config: ServiceConfig) -> str:
    """The id the exactly_once producer uses (:meth:`ServiceConfig.transactional_id`)."""
    return config.transactional_id()


class _Collector(logging.Logger):
    """Receives librdkafka's log lines (instead of stderr) so that they can be summarised."""

    def __init__(self) -> None:
        super().__init__("stream_classifier.preflight.librdkafka")
        self.lines: list[str] = []

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        self.lines.append(str(msg) % args if args else str(msg))


def check_kafka(config: ServiceConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise PreflightError unless the cluster answers, every configured topic exists and
    the service's principal holds every permission in :func:`required_permissions`.

    Every missing topic and permission is named in one message, so that one round of
    fixes is enough. Where the cluster cannot answer a permission question in time (not a
    refusal: a coordinator still loading, say), that question is logged and left to the
    clients, which stop the service with the same authorization error should it be one.
    """
    problem = _survey(config, timeout_s)
    # Raised here, not where the clients live: a traceback that kept a client's frame
    # alive would keep its threads reconnecting for as long as the exception is held.
    if problem is not None:
        raise PreflightError(problem)


def _survey(config: ServiceConfig, timeout_s: float) -> str | None:
    """Why the service cannot use Kafka, or None."""
    kafka = config.kafka
    deadline = time.monotonic() + timeout_s
    errors: list[KafkaError] = []
    settings = _settings(kafka)
    settings["error_cb"] = errors.append
    admin = AdminClient(settings)
    reached = _reach(admin, errors, kafka, timeout_s)
    if reached is not None:
        return reached
    needed = required_permissions(config)
    topics = sorted({p.name for p in needed if p.resource == "topic"})
    granted, missing, unseen = _topic_operations(admin, topics, deadline)
    group = config.kafka.group_id
    granted["group", group] = _group_operations(admin, group, deadline)

    def holds(permission: Permission) -> bool:
        if permission.resource == "transactional id":
            return _transactional_id_allowed(kafka, permission.name, deadline)
        operations = granted.get((permission.resource, permission.name))
        return operations is None or permission.operation in operations  # None: no answer

    lacking = [permission for permission in needed if not holds(permission)]
    problems: list[str] = []
    if missing:
        problems.append(
            f"topic(s) missing: {', '.join(missing)} "
            "(create them first; the service does not create topics)"
        )
    if lacking:
        hidden = ", ".join(p.name for p in lacking if p.name in unseen)
        if hidden:
            hidden = f"; whether {hidden} exist(s), Kafka tells only a principal allowed to see it"
        problems.append(
            f"missing permission(s): {', '.join(str(p) for p in lacking)} (grant them as ACLs "
            "to the service's principal; docs/OPERATIONS.md, 'Kafka ACLs', lists what each "
            f"guarantee needs{hidden})"
        )
    return f"{_where(kafka)}: {'; '.join(problems)}" if problems else None


def _settings(kafka: KafkaConfig) -> dict[str, Any]:
    return {**kafka.client_config(), "logger": _Collector()}


def _reach(
    admin: AdminClient, errors: list[KafkaError], kafka: KafkaConfig, timeout_s: float
) -> str | None:
    """None once the cluster answers a metadata request, else why it could not be had."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=ATTEMPT_S)
            return None
        except KafkaException as exc:
            errors.append(exc.args[0])
        admin.poll(0)  # serves error_cb
        fatal = [e for e in errors if e.code() in FATAL_CODES]
        if fatal:
            return f"{_where(kafka)}: {_describe(fatal[-1])}"
        if time.monotonic() >= deadline:
            return f"{_where(kafka)}: no answer within {timeout_s:.0f}s: {_describe(_best(errors))}"


def _topic_operations(
    admin: AdminClient, topics: list[str], deadline: float
) -> tuple[dict[tuple[str, str], frozenset[str] | None], list[str], list[str]]:
    """({("topic", name): operations allowed}, topics missing, topics not describable).

    A topic the principal may not describe answers TOPIC_AUTHORIZATION_FAILED whether it
    exists or not (Kafka does not tell), so only a describable one can be found missing.
    """
    futures = admin.describe_topics(
        TopicCollection(topics), include_authorized_operations=True, request_timeout=_left(deadline)
    )
    granted: dict[tuple[str, str], frozenset[str] | None] = {}
    missing: list[str] = []
    unseen: list[str] = []
    for name in topics:
        try:
            granted["topic", name] = _names(futures[name].result().authorized_operations)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                missing.append(name)
            elif error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                granted["topic", name] = frozenset()
                unseen.append(name)
            else:
                _unanswered(f"the permissions on topic {name}", error)
    return granted, missing, unseen


#: Answers of a group coordinator that is moving or still loading (on a new cluster the
#: first request also creates the offsets topic): asked again until the deadline.
_COORDINATOR_BUSY = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    }
)
RETRY_S = 0.2


def _group_operations(admin: AdminClient, group: str, deadline: float) -> frozenset[str] | None:
    """The operations allowed on the consumer group (empty: none; None: no answer).

    Describing a group that does not exist yet answers too (state DEAD), with the
    operations its ACLs would allow; nothing is joined or created.
    """
    while True:
        future = admin.describe_consumer_groups(
            [group], include_authorized_operations=True, request_timeout=_left(deadline)
        )[group]
        try:
            return _names(future.result().authorized_operations)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                return frozenset()
            if error.code() not in _COORDINATOR_BUSY or time.monotonic() >= deadline:
                _unanswered(f"the permissions on group {group}", error)
                return None
        time.sleep(RETRY_S)


def _transactional_id_allowed(kafka: KafkaConfig, txn_id: str, deadline: float) -> bool:
    """False only when the broker refuses WRITE on the transactional id (see the module's
    docstring for why the probe never fences the id's current producer)."""
    settings = {
        **kafka.producer_client_config(),
        "logger": _Collector(),
        "enable.idempotence": True,
        "transactional.id": txn_id,
        "transaction.timeout.ms": PROBE_TRANSACTION_TIMEOUT_MS,
    }
    try:
        Producer(settings).init_transactions(_left(deadline))
    except KafkaException as exc:
        error: KafkaError = exc.args[0]
        if error.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
            return False
        if error.code() != KafkaError.INVALID_TRANSACTION_TIMEOUT:  # that one means allowed
            _unanswered(f"WRITE on transactional id {txn_id}", error)
    return True


def _unanswered(question: str, error: KafkaError) -> None:
    log.warning(
        "start-up check: could not check %s (%s); the Kafka clients will stop the service "
        "if it is missing",
        question,
        _describe(error),
    )


def _names(operations: Iterable[Any] | None) -> frozenset[str] | None:
    """AclOperation names; None where the broker did not say (then nothing is assumed)."""
    return None if operations is None else frozenset(op.name for op in operations)


def _left(deadline: float) -> float:
    """What is left of the deadline, and at least one attempt's worth."""
    return max(ATTEMPT_S, deadline - time.monotonic())


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


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
