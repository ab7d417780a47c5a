"""The producer side: scored events to the output topic, rejects to the dead-letter topic.

Outputs keep the input's key (so partitioning and per-key order survive), copy its headers
and add ours, and keep its timestamp. Delivery callbacks never raise: they report each
acknowledged source offset to ``on_delivered`` and remember the first permanent failure,
which the next :meth:`KafkaSink.check` raises.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from stream_classifier.messages import HEADER_PREFIX, Envelope, Headers, SourceRef

log = logging.getLogger(__name__)

DeliveredCallback = Callable[[SourceRef, str], None]


class SinkError(Exception):
    """An output could not be delivered; nothing at or after its offset may be committed."""


class TransactionAborted(Exception):
    """The transaction failed in a way that needs an abort: redo its events."""


class ProducerHung(TransactionAborted):
    """A transactional call blocked past its timeout (librdkafka #5456, #5511).

    The producer cannot be used any more, not even to abort: replace it with
    :meth:`KafkaSink.restart` (whose new producer fences it) and redo the events.
    """


class KafkaSink:
    def __init__(self, producer_config: dict[str, Any], on_delivered: DeliveredCallback) -> None:
        self._config = producer_config
        self._on_delivered = on_delivered
        self._producer: Producer | None = None
        self._failure: SinkError | None = None
        self._lock = threading.Lock()
        #: Producers replaced by :meth:`restart`, kept so that destroying one cannot block.
        self._retired: list[Producer] = []

    def start(self) -> None:
        self._producer = Producer(self._config)
        if "transactional.id" in self._config:
            # Fences an earlier incarnation with the same id and aborts what it left open.
            self._call(lambda: self.producer.init_transactions(30.0), "init_transactions", 30.0)

    def restart(self) -> None:
        """A fresh transactional producer (same id) after the cluster lost track of us.

        librdkafka can keep a stale group-coordinator entry after an outage, and then
        ``send_offsets_to_transaction`` blocks past its timeout (librdkafka issues #5456,
        #5511). A new producer looks the coordinators up again and fences the old one.
        Call it only between transactions.
        """
        with self._lock:
            self._failure = None
        for _attempt in range(RESTART_ATTEMPTS):
            if self._producer is not None:
                self._retired.append(self._producer)
            try:
                self.start()
                return
            except ProducerHung as exc:
                log.warning("new transactional producer hung too (%s), trying another", exc)
        raise SinkError(f"no transactional producer could start in {RESTART_ATTEMPTS} tries")

    # -- transactions (exactly-once) -----------------------------------------------------

    def begin(self) -> None:
        self._call(self.producer.begin_transaction, "begin_transaction", 1.0)

    def commit(self, offsets: list[TopicPartition], group_metadata: object) -> None:
        """Add the consumed offsets to the transaction and commit it."""
        if offsets:
            self._call(
                lambda: self.producer.send_offsets_to_transaction(offsets, group_metadata, 30.0),
                "send_offsets_to_transaction",
                30.0,
            )
        self._call(lambda: self.producer.commit_transaction(60.0), "commit_transaction", 60.0)
        self.check()

    def abort(self) -> None:
        self._call(lambda: self.producer.abort_transaction(60.0), "abort_transaction", 60.0)
        with self._lock:
            self._failure = None  # the aborted records' failures died with them

    def _call(self, operation: Callable[[], object], name: str, timeout: float) -> None:
        """Run a transactional call: retry what is retriable, classify the rest."""
        for _attempt in range(10):
            try:
                _within_deadline(operation, name, timeout + HANG_MARGIN_S)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.retriable():
                    log.warning("%s: %s, retrying", name, error.str())
                    continue
                if error.txn_requires_abort():
                    raise TransactionAborted(f"{name}: {error.str()}") from exc
                raise SinkError(f"{name} failed: {error.str()} (fatal={error.fatal()})") from exc
        raise SinkError(f"{name} still failing after 10 retriable errors")

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("sink not started")
        return self._producer

    def send_output(self, topic: str, envelope: Envelope, value: bytes, headers: Headers) -> None:
        self._produce(topic, envelope, value, envelope.headers + headers, kind="output")

    def send_dead_letter(self, topic: str, envelope: Envelope, headers: Headers) -> None:
        self._produce(topic, envelope, envelope.value, envelope.headers + headers, kind="dlq")

    def _produce(
        self, topic: str, envelope: Envelope, value: bytes | None, headers: Headers, kind: str
    ) -> None:
        self.check()
        timestamp = envelope.source.timestamp or 0
        callback = self._callback(envelope.source, kind)
        while True:
            try:
                self.producer.produce(
                    topic,
                    value=value,
                    key=envelope.key,
                    headers=headers,
                    timestamp=timestamp,
                    on_delivery=callback,
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room, then retry.
                self.producer.poll(0.1)
                self.check()

    def _callback(self, source: SourceRef, kind: str) -> Callable[[KafkaError | None, Any], None]:
        def on_delivery(error: KafkaError | None, _message: Any) -> None:
            if error is None:
                self._on_delivered(source, kind)
                return
            with self._lock:
                if self._failure is None:
                    self._failure = SinkError(
                        f"could not deliver the {kind} record for {source.topic}"
                        f"[{source.partition}]@{source.offset}: {error.str()} "
                        f"({error.name()}, retriable={error.retriable()})"
                    )
            log.error("delivery failed: %s", error.str())

        return on_delivery

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery callbacks."""
        self.producer.poll(timeout)

    def flush(self, timeout: float) -> None:
        """Wait for every outstanding record; raise if one failed or time ran out."""
        remaining = self.producer.flush(timeout)
        self.check()
        if remaining:
            raise SinkError(f"{remaining} records still undelivered after {timeout:.0f}s")

    def check(self) -> None:
        if self._failure is not None:
            raise self._failure

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def close(self, timeout: float) -> int:
        """Flush what can be flushed; return how many records were left undelivered."""
        if self._producer is None:
            return 0
        try:
            return int(self._producer.flush(timeout))
        except KafkaException:
            return -1


def our_headers(model: str, truncated: bool) -> Headers:
    headers: Headers = [(HEADER_PREFIX + "model", model.encode())]
    if truncated:
        headers.append((HEADER_PREFIX + "text-truncated", b"true"))
    return headers


#: How long past its own timeout a transactional call may block before this producer is
#: given up (a known librdkafka hang): the service then starts a new one with the same
#: transactional.id, which fences this one, and redoes the uncommitted events.
HANG_MARGIN_S = 15.0
RESTART_ATTEMPTS = 5


def _within_deadline(operation: Callable[[], object], name: str, deadline: float) -> None:
    """Run ``operation`` in a helper thread; raise ProducerHung if it outlives ``deadline``."""
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
        raise ProducerHung(f"{name} still blocked after {deadline:.0f}s (librdkafka #5456)")
    if outcome and outcome[0] is not None:
        raise outcome[0]
