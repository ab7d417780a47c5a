"""The producer side: the :class:`Sink` port and its Kafka adapter.

Delivery callbacks never raise: they hand each record and its outcome to the
``on_delivery`` function given at construction, and only for records of the current
producer (a replaced producer's late reports are ignored). A record ``produce()`` cannot
queue is answered the same way, as the call's return value; only a fatal error raises.

Every error is classified once, by code, in :mod:`stream_classifier.kafka_errors`
(ride out, dead-letter, fatal): librdkafka's ``retriable()`` flag is never set on these
errors and decides nothing. Transactional calls end in one of three outcomes the
checkpoint acts on: done, :class:`TransactionFailed` (abort or replace the producer, then
redo the events) and :class:`SinkError` (fatal: fenced, misconfigured, not authorized).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource

from stream_classifier.config import ServiceConfig
from stream_classifier.headers import Headers
from stream_classifier.kafka_errors import Verdict, verdict_of
from stream_classifier.messages import Envelope, SourceRef
from stream_classifier.offsets import TopicPartition as TP

log = logging.getLogger(__name__)


class SinkError(Exception):
    """The producer cannot go on (fenced, fatal error, permanent delivery failure)."""


class TransactionFailed(Exception):
    """The open transaction did not commit; its events must be redone.

    ``abortable``: ``abort()`` ends it cleanly. Otherwise its outcome is unknown (a
    timeout, a hung call, a lost coordinator) and only a new producer with the same
    transactional id, which fences this one and settles the transaction, is safe.
    """

    def __init__(self, message: str, abortable: bool) -> None:
        super().__init__(message)
        self.abortable = abortable


class CallCut(TransactionFailed):
    """A transactional call still blocked at its bound: given up, its outcome unknown."""

    def __init__(self, message: str) -> None:
        super().__init__(message, abortable=False)


@dataclass(frozen=True)
class Record:
    """One record to write, and the input event it is written for."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp: int
    source: SourceRef
    kind: str  # "output", "dead_letter" or "route"
    #: An output's decision lane (counted once the output is durably written).
    decision: str | None = None
    #: The input event, and where its dead letters go: what a refused record is replaced
    #: with is built from them (stream_classifier.records.smaller).
    envelope: Envelope | None = field(default=None, repr=False, compare=False)
    dead_letter_topic: str | None = None
    #: A dead letter's code.
    code: str | None = None
    #: 0 as built; 1-3 for the smaller forms of a refused record, ``first`` the original.
    stage: int = 0
    first: Record | None = field(default=None, repr=False, compare=False)
    #: An output whose event a shadow policy decided too, and the shadow's lane.
    shadowed: bool = False
    shadow_decision: str | None = None

    def size(self) -> int:
        """Bytes of key, value and headers (the record format's framing aside)."""
        headers = sum(len(name) + len(value or b"") for name, value in self.headers)
        return len(self.key or b"") + len(self.value or b"") + headers


@dataclass(frozen=True)
class DeliveryFailure:
    reason: str
    verdict: Verdict
    #: librdkafka's error code (KafkaError.*).
    code: int = 0

    @classmethod
    def of(cls, error: KafkaError) -> DeliveryFailure:
        return cls(f"{error.str()} ({error.name()})", verdict_of(error), error.code())


DeliveryCallback = Callable[[Record, DeliveryFailure | None], None]


class Sink(Protocol):
    """What the service needs from a producer."""

    def start(self) -> None: ...
    def restart(self) -> None: ...
    def produce(
        self, record: Record, abandoned: Callable[[], bool] = lambda: False
    ) -> DeliveryFailure | None: ...
    def poll(self, timeout: float) -> None: ...
    def flush(self, timeout: float) -> int: ...
    def begin(self) -> None: ...
    def commit(self, offsets: dict[TP, int], group_metadata: object) -> None: ...
    def commit_in_background(self, offsets: dict[TP, int], group_metadata: object) -> None: ...
    def commit_landed(self, timeout: float) -> bool: ...
    def abort(self) -> None: ...
    def close(self, timeout: float) -> int: ...


#: Each transactional call's own timeout, and how long past it a call may block before
#: the producer is given up as hung.
TXN_TIMEOUT_S = 30.0
HANG_MARGIN_S = 15.0
#: How long a producer may wait for its producer id before the log names a transaction
#: coordinator that holds one of its transactions for good as a possible cause. With the
#: brokers up the wait is short: the coordinator aborts a predecessor's open transaction
#: at once and completes the abort as soon as its partitions have leaders. An outage of
#: the cluster makes it long too; librdkafka's log tells the two apart.
STUCK_INIT_S = 180.0
#: ``send_offsets_to_transaction``'s whole bound, timeout and hang together. librdkafka
#: ignores that call's timeout (#5456) and blocks until some broker changes state when
#: the group coordinator it cached was killed and left the metadata (#5511): until the
#: killed broker is back, minutes on a slow restart. The hang also catches calls made
#: after the cluster has recovered, so the bound is short: past it the producer is
#: replaced, and the new one looks the coordinators up afresh; a healthy call takes
#: milliseconds (docs/RELIABILITY.md, "A replicated cluster"). Cutting a call that was
#: only slow (a coordinator moving) costs a replacement, whose ``init_transactions`` waits
#: on the same move and on the cut transaction's abort: so this is the first call's
#: bound, and each cut in a row triples the next one's (:func:`offsets_bound`).
OFFSETS_BOUND_S = 3.0
#: librdkafka's longest wait between connection attempts to a broker (its default
#: 10,000 ms); both clients, user settings win.
RECONNECT_BACKOFF_MAX_MS = 1000
#: How long ``produce()`` waits for room in a full queue before giving the record back.
QUEUE_FULL_S = 5.0


def offsets_bound(cuts: int) -> float:
    """The bound of a ``send_offsets_to_transaction`` after ``cuts`` such calls cut in a row.

    One cut is cheap when the call had hung on a dead coordinator. Cuts in a row mean the
    coordinators are moving slowly (a node restarting and loading them back), and there
    each cut costs most: the new producer's ``init_transactions`` waits for the cut
    transaction's abort (``CONCURRENT_TRANSACTIONS``) on top of the same move. So each
    cut in a row gives the next call three times as long, up to the other calls' bound.
    """
    longest = TXN_TIMEOUT_S + HANG_MARGIN_S
    return min(OFFSETS_BOUND_S * 3.0 ** min(cuts, 8), longest)  # no overflow in a long outage


def producer_config(config: ServiceConfig, max_in_flight: int) -> dict[str, Any]:
    """librdkafka settings of the service's producer (user settings first, ours win)."""
    processing = config.processing
    settings: dict[str, Any] = {
        "linger.ms": 5,
        # A killed coordinator's new address is tried within a second of the cluster
        # naming it, not after librdkafka's back-off of up to 10 s (the Java client's
        # default is 1 s): docs/RELIABILITY.md, "A replicated cluster".
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
        **config.kafka.producer_client_config(),
        "acks": "all",
        # No duplicates or reordering from the producer's own retries.
        "enable.idempotence": True,
        "delivery.timeout.ms": processing.delivery_timeout_ms,
        # Room for every record the service lets wait for an acknowledgement.
        "queue.buffering.max.messages": max(100_000, 4 * max_in_flight),
    }
    if processing.guarantee == "exactly_once":
        settings["transactional.id"] = config.transactional_id()
        settings["transaction.timeout.ms"] = processing.transaction_timeout_ms
    return settings


class KafkaSink:
    """:class:`Sink` over one ``confluent_kafka.Producer`` (replaced on :meth:`restart`)."""

    def __init__(
        self,
        producer_config: dict[str, Any],
        on_delivery: DeliveryCallback,
        topics: list[str] | None = None,
    ) -> None:
        self._config = producer_config
        self._on_delivery = on_delivery
        self._topics = topics or []
        #: Each written topic's ``max.message.bytes``, read at the first start that can;
        #: the limits records are checked against before sending (none if compressed).
        self._limits: dict[str, int] = {}
        self._refuse_over: dict[str, int] = {}
        self._producer: Producer | None = None
        self._epoch = 0
        #: The current producer's init_transactions has not completed yet: since when,
        #: and whether the log was told it looks stuck.
        self._initializing = False
        self._init_began = 0.0
        self._stuck_told = False
        #: The transaction committing on a helper thread: the thread, then its outcome.
        self._committing: tuple[threading.Thread, list[BaseException | None]] | None = None
        #: ``send_offsets_to_transaction`` calls cut since the last commit, on any producer.
        self._offsets_cuts = 0

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("sink not started")
        return self._producer

    def start(self) -> None:
        """A producer; a transactional one fences its predecessors and settles their work."""
        self._epoch += 1
        if not self._limits and self._topics:
            self._limits = topic_limits(self._config, self._topics)
            # Compressed, a batch's size under the limit is the broker's to measure.
            compressed = self._config.get("compression.type", "none") != "none"
            self._refuse_over = {} if compressed else self._limits
        self._producer = Producer(batch_within_topic_limits(self._config, self._limits))
        self._initializing = "transactional.id" in self._config
        self._init_began, self._stuck_told = time.monotonic(), False
        self._init_transactions()

    def restart(self) -> None:
        """Retire the current producer (its late reports are ignored) and start another.

        A producer whose ``init_transactions`` has not completed is resumed instead (the
        call again, on the same producer, as librdkafka asks after a time-out): its
        request for a producer id goes on in the background, and completing after a new
        producer's would fence that one, which then fails for good (``_FENCED``).
        """
        if self._producer is not None and self._initializing:
            self._init_transactions()
            return
        old, self._producer = self._producer, None
        if old is not None:
            _retire(old)
        self.start()

    def _init_transactions(self) -> None:
        if not self._initializing:
            return
        producer = self.producer
        try:
            self._call(lambda: producer.init_transactions(TXN_TIMEOUT_S), "init_transactions")
        except TransactionFailed as exc:
            # A time-out (or a call still blocked) is resumed on this producer; any other
            # failure gets a new producer at the next attempt.
            cause = exc.__cause__
            if isinstance(cause, KafkaException) and not cause.args[0].retriable():
                self._initializing = False
            self._tell_if_stuck()
            raise
        self._initializing = False

    def _tell_if_stuck(self) -> None:
        """Name the likely cause, once, of an init that has lasted :data:`STUCK_INIT_S`:
        librdkafka retries its request for a producer id quietly and forever."""
        waited = time.monotonic() - self._init_began
        if self._stuck_told or waited < STUCK_INIT_S:
            return
        self._stuck_told = True
        log.error(
            "transactional id %r has had no producer id for %.0fs. If the brokers are up "
            "and librdkafka logs CONCURRENT_TRANSACTIONS all along, its transaction "
            "coordinator holds a transaction of this id that it does not complete, and no "
            "client can clear that: docs/OPERATIONS.md, 'A transaction the coordinator "
            "never completes'",
            self._config["transactional.id"],
            waited,
        )

    # -- records ---------------------------------------------------------------------------

    def produce(
        self, record: Record, abandoned: Callable[[], bool] = lambda: False
    ) -> DeliveryFailure | None:
        """Queue one record; a failure to queue it is returned (fatal ones raise).

        While the queue is full, delivery reports are served to make room; once
        ``abandoned()`` says the record is no longer wanted (a report put its partition
        in replay), it is given back instead of queued behind the replay.
        """
        too_large = self._over_topic_limit(record)
        if too_large is not None:
            return too_large
        callback = self._callback(record, self._epoch)
        deadline = time.monotonic() + QUEUE_FULL_S
        while True:
            try:
                self.producer.produce(
                    record.topic,
                    value=record.value,
                    key=record.key,
                    headers=record.headers,
                    timestamp=record.timestamp,
                    on_delivery=callback,
                )
                return None
            except BufferError:
                if time.monotonic() >= deadline:
                    return DeliveryFailure(
                        f"producer queue full for {QUEUE_FULL_S:.0f}s", Verdict.RIDE_OUT
                    )
                self.producer.poll(0.1)  # serve delivery reports to make room
                if abandoned():
                    return DeliveryFailure("its partition is replayed", Verdict.RIDE_OUT)
            except KafkaException as exc:
                failure = DeliveryFailure.of(exc.args[0])
                if failure.verdict is Verdict.FATAL:
                    raise SinkError(f"produce to {record.topic} failed: {failure.reason}") from exc
                return failure

    def _over_topic_limit(self, record: Record) -> DeliveryFailure | None:
        """The broker's refusal of a record over its topic's ``max.message.bytes``, known
        before it is sent.

        Refused by the broker, the record would fail its whole batch's transaction
        (exactly_once aborts, and redoes the batch with the record's dead letter); known
        here, the dead letter takes its place in the same transaction. Only records the
        broker is sure to refuse are caught (:func:`least_framed_size`); with compression
        the limit applies to compressed batches and is left to the broker.
        """
        limit = self._refuse_over.get(record.topic)
        if limit is None:
            return None
        framed = least_framed_size(record)
        if framed <= limit:
            return None
        reason = (
            f"{framed} bytes over {record.topic}'s max.message.bytes {limit} "
            "(MSG_SIZE_TOO_LARGE, found before sending)"
        )
        return DeliveryFailure(reason, Verdict.DEAD_LETTER, KafkaError.MSG_SIZE_TOO_LARGE)

    def _callback(self, record: Record, epoch: int) -> Callable[[KafkaError | None, Any], None]:
        def on_delivery(error: KafkaError | None, _message: Any) -> None:
            if epoch != self._epoch:
                return  # a replaced producer's report: its records are redone elsewhere
            if error is None:
                self._on_delivery(record, None)
                return
            self._on_delivery(record, DeliveryFailure.of(error))

        return on_delivery

    def poll(self, timeout: float) -> None:
        self.producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` for outstanding records; return how many are left."""
        return int(self.producer.flush(timeout))

    # -- transactions (exactly-once) -------------------------------------------------------

    def begin(self) -> None:
        self._call(self.producer.begin_transaction, "begin_transaction")

    def commit(self, offsets: dict[TP, int], group_metadata: object) -> None:
        """Add the consumed offsets to the open transaction and commit it."""
        producer = self.producer
        if offsets:
            parts = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            bound = offsets_bound(self._offsets_cuts)
            try:
                self._call(
                    lambda: producer.send_offsets_to_transaction(parts, group_metadata, bound),
                    "send_offsets_to_transaction",
                    bound=bound,
                )
            except CallCut:
                self._offsets_cuts += 1
                raise
        self._call(lambda: producer.commit_transaction(TXN_TIMEOUT_S), "commit_transaction")
        self._offsets_cuts = 0

    def commit_in_background(self, offsets: dict[TP, int], group_metadata: object) -> None:
        """:meth:`commit` on a helper thread, so that the loop goes on consuming and
        handing batches to the engine while the broker writes the markers. Nothing else
        may use the producer until :meth:`commit_landed` has returned True or raised."""
        assert self._committing is None, "a transaction is already committing"
        outcome: list[BaseException | None] = []

        def target() -> None:
            try:
                self.commit(offsets, group_metadata)
                outcome.append(None)
            except BaseException as exc:  # handed to the loop by commit_landed
                outcome.append(exc)

        thread = threading.Thread(target=target, name="transaction-commit", daemon=True)
        self._committing = (thread, outcome)
        thread.start()

    def commit_landed(self, timeout: float) -> bool:
        """Whether the background commit has committed (waiting up to ``timeout``):
        False while it is in flight; its failure is raised here, as :meth:`commit`'s."""
        assert self._committing is not None, "no transaction committing"
        thread, outcome = self._committing
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._committing = None
        if outcome[0] is not None:
            raise outcome[0]
        return True

    def abort(self) -> None:
        producer = self.producer
        self._call(lambda: producer.abort_transaction(TXN_TIMEOUT_S), "abort_transaction")

    def _call(
        self,
        operation: Callable[[], object],
        name: str,
        bound: float = TXN_TIMEOUT_S + HANG_MARGIN_S,
    ) -> None:
        """One transactional call, bounded in time, its failure classified."""
        try:
            _within_deadline(operation, name, bound)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if verdict_of(error) is Verdict.FATAL:
                raise SinkError(f"{name}: {error.str()} ({error.name()}, fatal)") from exc
            raise TransactionFailed(
                f"{name}: {error.str()}", abortable=error.txn_requires_abort()
            ) from exc

    def close(self, timeout: float) -> int:
        """Flush what can be flushed; return how many records were left undelivered."""
        if self._producer is None:
            return 0
        try:
            return int(self._producer.flush(timeout))
        except (KafkaException, SystemError):
            # A producer failed fatally (fenced, not authorized) raises SystemError from
            # flush in confluent-kafka: the error that stopped the service must stand.
            return -1


def _retire(producer: Producer) -> None:
    """Drop a replaced producer's queue and destroy it off the loop (destroy may block)."""
    try:
        producer.purge(in_queue=True, in_flight=True, blocking=False)
    except (KafkaException, RuntimeError) as exc:
        log.debug("purge of a retired producer failed: %s", exc)
    holder = [producer]
    threading.Thread(target=holder.clear, name="retired-producer", daemon=True).start()


def _within_deadline(operation: Callable[[], object], name: str, deadline: float) -> None:
    """Run ``operation`` in a helper thread; a call that outlives ``deadline`` has hung."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            operation()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            outcome.append(exc)

    worker = threading.Thread(target=target, name=f"txn-{name}", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise CallCut(f"{name} still blocked after {deadline:.0f}s (librdkafka #5456)")
    if outcome and outcome[0] is not None:
        raise outcome[0]


#: librdkafka's default ``batch.size``.
BATCH_SIZE = 1_000_000
#: Room for a record batch's own framing below a topic's ``max.message.bytes``.
BATCH_FRAMING = 1024


#: The least framing a record in a batch of its own has: the batch header (61 bytes) and
#: the record's seven one-byte varints (length, attributes, timestamp and offset deltas,
#: key and value lengths, header count); each header adds two (its name's and value's
#: lengths).
MIN_BATCH_FRAMING = 61 + 7
MIN_HEADER_FRAMING = 2


def least_framed_size(record: Record) -> int:
    """The least a record weighs against a topic's ``max.message.bytes``, sent alone."""
    return record.size() + MIN_BATCH_FRAMING + MIN_HEADER_FRAMING * len(record.headers)


def batch_within_topic_limits(config: dict[str, Any], limits: dict[str, int]) -> dict[str, Any]:
    """The producer settings with ``batch.size`` under the smallest ``max.message.bytes``
    of the topics it writes.

    A broker applies a topic's ``max.message.bytes`` to a whole record batch: a batch over
    it is refused as one, small records and all (MSG_SIZE_TOO_LARGE for each). Kept under
    the smallest limit, a refusal only ever concerns a record too large on its own (such
    a record is sent in a batch of its own), which is then dead-lettered. The limits are
    read at start; a topic limit lowered below it while running takes a restart.
    """
    if "batch.size" in config:
        return config
    limit = min(limits.values(), default=None)
    if limit is None or limit - BATCH_FRAMING >= BATCH_SIZE:
        return config
    log.info("batch.size %d: under the smallest max.message.bytes of %s", limit, sorted(limits))
    return {**config, "batch.size": max(1, limit - BATCH_FRAMING)}


def topic_limits(config: dict[str, Any], topics: list[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes``; empty where they cannot be read (no
    DESCRIBE_CONFIGS permission, say: the defaults then stand)."""
    client = {
        k: v for k, v in config.items() if k in _CLIENT_KEYS or k.startswith(_CLIENT_PREFIXES)
    }
    admin = AdminClient(client)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in sorted(set(topics))]
    limits: dict[str, int] = {}
    try:
        for resource, future in admin.describe_configs(resources, request_timeout=10).items():
            entry = future.result(timeout=15).get("max.message.bytes")
            if entry is not None and entry.value is not None:
                limits[resource.name] = int(entry.value)
    except (KafkaException, ValueError, TimeoutError) as exc:
        log.info("topic max.message.bytes not readable (%s): librdkafka's batch size stands", exc)
        return {}
    return limits


_CLIENT_KEYS = {"bootstrap.servers", "client.id", "security.protocol"}
_CLIENT_PREFIXES = ("sasl.", "ssl.")
