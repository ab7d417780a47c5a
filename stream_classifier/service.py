"""The processing loop: source → decode → batcher → engine → sink, and what to commit.

Two threads. The Kafka thread (the caller of :meth:`Service.run`) owns the consumer and
the producer: it polls, decodes, batches, produces and commits, and never blocks on the
model, so the group membership survives a slow engine. The engine thread scores one batch
at a time, in submission order. At most ``max_pending_batches`` batches wait for it; when
they and the open batch are full, the Kafka thread pauses its partitions and keeps polling,
and resumes them once the engine catches up. That bounds memory for any input rate.

Guarantees:

- ``at_least_once``: outputs and dead letters are produced with delivery reports; a
  partition's offset is committed only up to the last contiguous event the broker
  acknowledged. A crash replays what was not committed (duplicates, never a loss).
- ``exactly_once``: each scored batch is one Kafka transaction holding its outputs, its
  dead letters and the batch's consumed offsets. An abortable error aborts it and rewinds
  the partitions to their committed offsets; a fatal one stops the process.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TopicPartition as KafkaTopicPartition

from stream_classifier.batcher import Batch, Item, MicroBatcher, topic_partition
from stream_classifier.config import ServiceConfig
from stream_classifier.engine.base import Engine, Scores
from stream_classifier.messages import (
    ClassifyRequest,
    Envelope,
    KafkaMessage,
    Rejection,
    ScoredEvent,
    SourceRef,
    decode_event,
)
from stream_classifier.metrics import Metrics
from stream_classifier.offsets import OffsetTracker, TopicPartition
from stream_classifier.sink import KafkaSink, ProducerHung, TransactionAborted, our_headers
from stream_classifier.source import KafkaSource, consumer_config

log = logging.getLogger(__name__)

#: Longest single wait on the consumer, so stop requests and timers are seen promptly.
POLL_SLICE_S = 0.1
#: exactly_once: /healthz fails after this many aborted transactions in a row.
UNHEALTHY_ABORTS = 3
#: exactly_once: longest pause between retries of an aborted transaction.
ABORT_BACKOFF_MAX_S = 5.0
#: librdkafka statistics (consumer lag) interval when metrics are on.
STATS_INTERVAL_MS = 5000


class ServiceError(Exception):
    """The service stopped because it could not go on without losing events."""


@dataclass
class Scored:
    """A batch handed to the engine; ``generation`` discards it after a rewind."""

    batch: Batch
    future: Future[list[Scores]]
    generation: int


class Service:
    def __init__(
        self,
        config: ServiceConfig,
        engine: Engine,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.exactly_once = config.processing.guarantee == "exactly_once"
        self._clock = clock
        processing = config.processing
        self.batcher = MicroBatcher(
            processing.max_batch_messages,
            processing.max_batch_tokens,
            processing.max_batch_wait_ms,
            clock,
        )
        self.tracker = OffsetTracker()
        self._topics = {topic.input: topic for topic in config.topics}
        self.source = KafkaSource(
            self._consumer_config(),
            list(self._topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.sink = KafkaSink(self._producer_config(), self._on_delivered)
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._scoring: deque[Scored] = deque()
        self._backlog: deque[Item] = deque()
        self._generation = 0
        self._paused = False
        self._assigned: set[TopicPartition] = set()
        #: The first offset read from each partition since it was assigned (rewind target
        #: when the group has no committed offset yet).
        self._first_offsets: dict[TopicPartition, int] = {}
        self._last_commit = clock()
        self._last_turn = clock()
        self._started = False
        self.closing = False
        #: exactly_once: transactions aborted in a row (a failing output makes it grow).
        self._aborts_in_a_row = 0

    # -- client settings -----------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        kafka = self.config.kafka
        config = consumer_config(kafka.client_config(), kafka.group_id, kafka.auto_offset_reset)
        if self.config.metrics.enabled:
            config["statistics.interval.ms"] = STATS_INTERVAL_MS
            config["stats_cb"] = self._on_stats
        return config

    def _producer_config(self) -> dict[str, Any]:
        processing = self.config.processing
        config: dict[str, Any] = {
            **self.config.kafka.client_config(),
            "acks": "all",
            # No duplicates or reordering from the producer's own retries.
            "enable.idempotence": True,
            "linger.ms": 5,
            "delivery.timeout.ms": processing.delivery_timeout_ms,
        }
        if self.exactly_once:
            config["transactional.id"] = processing.transactional_id or (
                f"{self.config.kafka.group_id}-{socket.gethostname()}"
            )
            config["transaction.timeout.ms"] = processing.transaction_timeout_ms
        return config

    # -- health --------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        if self.sink.failed:
            return False, "output delivery failed"
        if self._aborts_in_a_row >= UNHEALTHY_ABORTS:
            return False, f"{self._aborts_in_a_row} transactions aborted in a row"
        stalled = self._clock() - self._last_turn
        if self._started and stalled > 60.0:
            return False, f"processing loop has not turned for {stalled:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        if not self._assigned:
            return False, "no partitions assigned"
        return True, f"{len(self._assigned)} partitions assigned"

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then drain and commit; raise on failure."""
        self.sink.start()
        self.source.start()
        self._started = True
        try:
            while not stop.is_set():
                self._turn()
            self._drain()
        finally:
            self._engine_thread.shutdown(wait=True, cancel_futures=True)
            self.closing = True  # close() revokes the assignment: nothing left to finish
            self.source.close()
            left = self.sink.close(timeout=5.0)
            if left:
                log.warning("%d records left undelivered at close", left)

    def _turn(self) -> None:
        self._last_turn = self._clock()
        self._apply_backpressure()
        timeout = max(0.0, min(POLL_SLICE_S, self.batcher.time_left()))
        if self._scoring:
            timeout = min(timeout, 0.005)
        received_at = time.monotonic()
        for message in self.source.consume(self._room(), timeout):
            self._backlog.append(self._accept(message, received_at))
        self._fill_batches()
        self._write_scored(wait=False)
        self.sink.poll(0)
        self.sink.check()
        if not self.exactly_once:
            self._commit(force=False)

    def _room(self) -> int:
        """How many events to fetch now (at least 1: consume() also serves the group)."""
        queued = len(self._backlog) + len(self.batcher)
        return max(1, self.config.processing.max_batch_messages - queued)

    def _accept(self, message: KafkaMessage, received_at: float) -> Item:
        envelope = Envelope.of(message, received_at)
        source = envelope.source
        self._first_offsets.setdefault((source.topic, source.partition), source.offset)
        if not self.exactly_once:
            self.tracker.register((source.topic, source.partition), source.offset)
        self.metrics.consumed.labels(source.topic).inc()
        self.metrics.in_flight.inc()
        topic = self._topics[source.topic]
        decoded = decode_event(envelope, topic)
        if isinstance(decoded, Rejection):
            return decoded
        try:
            decoded.prepared = self.engine.prepare(
                decoded.text, decoded.labels, topic.hypothesis_template, topic.multi_label
            )
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the stream
            return Rejection(envelope, "prepare_failed", f"{type(exc).__name__}: {exc}")
        return decoded

    def _fill_batches(self) -> None:
        """Move the backlog into batches; hand due batches to the engine while it has room."""
        while True:
            while self._backlog and self.batcher.fits(self._backlog[0]):
                self.batcher.add(self._backlog.popleft())
            ready = self.batcher.is_due() or bool(self._backlog)
            if not ready or len(self._scoring) >= self.config.processing.max_pending_batches:
                return
            self._submit(self.batcher.take())

    def _submit(self, batch: Batch) -> None:
        if not batch.items:
            return
        requests = batch.requests
        future = self._engine_thread.submit(self._score, requests)
        self._scoring.append(Scored(batch, future, self._generation))

    def _score(self, requests: list[ClassifyRequest]) -> list[Scores]:
        if not requests:
            return []
        started = time.monotonic()
        results = self.engine.classify([request.prepared for request in requests])
        self._record_batch(requests, time.monotonic() - started)
        return results

    def _apply_backpressure(self) -> None:
        processing = self.config.processing
        full = (
            len(self._scoring) >= processing.max_pending_batches
            and len(self._backlog) + len(self.batcher) >= processing.max_batch_messages
        )
        if full and not self._paused:
            log.info("engine busy: pausing %d partitions", len(self._assigned))
            self._paused = True
        elif self._paused and len(self._scoring) < processing.max_pending_batches:
            log.info("engine caught up: resuming partitions")
            self._paused = False
            self.source.resume_all()
        if self._paused:
            self.source.pause_all()  # also covers partitions assigned while paused
        self.metrics.paused_partitions.set(len(self._assigned) if self._paused else 0)

    # -- writing results -----------------------------------------------------------------

    def _write_scored(self, wait: bool) -> None:
        """Produce the outputs of finished batches, oldest first (all of them if ``wait``)."""
        while self._scoring and (wait or self._scoring[0].future.done()):
            scored = self._scoring.popleft()
            results = scored.future.result()  # an engine failure propagates from here
            if scored.generation != self._generation:
                continue  # rewound after it was submitted: its events will be read again
            self._write(scored.batch, results)

    def _write(self, batch: Batch, results: list[Scores]) -> None:
        scores = dict(zip((id(r) for r in batch.requests), results, strict=True))
        owned = batch.without(tp for tp in batch.next_offsets() if tp not in self._assigned)
        if not owned.items:
            return
        now = time.monotonic()
        if self.exactly_once:
            self.sink.begin()
        for item in owned.items:
            if isinstance(item, Rejection):
                self._dead_letter(item)
            else:
                self._output(item, scores[id(item)], now)
        if self.exactly_once:
            self._commit_transaction(owned)

    def _output(self, request: ClassifyRequest, scores: Scores, now: float) -> None:
        value = self._scored(request, scores, now).model_dump_json().encode()
        headers = our_headers(self.engine.model_id, request.text_truncated)
        self.sink.send_output(request.topic.output, request.envelope, value, headers)

    def _dead_letter(self, rejection: Rejection) -> None:
        topic = self._topics[rejection.envelope.source.topic]
        log.debug("dead letter %s: %s", rejection.code, rejection.reason)
        self.metrics.dead_letters.labels(topic.input, rejection.code).inc()
        self.sink.send_dead_letter(
            topic.dead_letter, rejection.envelope, rejection.context().headers()
        )

    def _scored(self, request: ClassifyRequest, scores: Scores, now: float) -> ScoredEvent:
        return ScoredEvent(
            id=request.event_id,
            source=request.envelope.source,
            labels=list(scores.labels),
            scores=list(scores.scores),
            top_label=scores.top_label,
            multi_label=request.topic.multi_label,
            model=self.engine.model_id,
            latency_ms=round((now - request.envelope.received_at) * 1000.0, 3),
        )

    def _record_batch(self, requests: list[ClassifyRequest], seconds: float) -> None:
        self.metrics.batch_messages.observe(len(requests))
        self.metrics.batch_pairs.observe(sum(len(r.labels) for r in requests))
        self.metrics.batch_tokens.observe(sum(r.prepared.tokens for r in requests))
        self.metrics.engine_seconds.observe(seconds)

    def _on_delivered(self, source: SourceRef, kind: str) -> None:
        if not self.exactly_once:
            self.tracker.mark_done((source.topic, source.partition), source.offset)
            self.metrics.in_flight.dec()
        if kind == "output":
            self.metrics.produced.labels(source.topic).inc()
        if source.timestamp:
            self.metrics.end_to_end_seconds.observe(max(0.0, time.time() - source.timestamp / 1e3))

    # -- commits -------------------------------------------------------------------------

    def _commit(self, force: bool) -> None:
        """At-least-once: commit what the broker acknowledged, at most once an interval."""
        interval = self.config.processing.commit_interval_ms / 1000.0
        if not force and self._clock() - self._last_commit < interval:
            return
        self._last_commit = self._clock()
        offsets = self.tracker.to_commit()
        if not offsets:
            return
        ok = self.source.commit(offsets)
        self.metrics.commits.labels("ok" if ok else "failed").inc()
        if ok:
            self.tracker.committed(offsets)

    def _commit_transaction(self, batch: Batch) -> None:
        """Exactly-once: the batch's outputs and its consumed offsets commit together."""
        offsets = [
            KafkaTopicPartition(topic, partition, offset)
            for (topic, partition), offset in batch.next_offsets().items()
        ]
        try:
            self.sink.commit(offsets, self.source.consumer.consumer_group_metadata())
        except TransactionAborted as exc:
            log.warning("transaction aborted (%s): rewinding to the committed offsets", exc)
            self.metrics.transactions.labels("aborted").inc()
            if isinstance(exc, ProducerHung):
                self.sink.restart()  # the new producer fences the hung one and aborts its work
            else:
                self.sink.abort()
            self._rewind()
            self._aborts_in_a_row += 1
            # Back off so a permanent failure (a missing topic) retries slowly, not hot.
            time.sleep(min(ABORT_BACKOFF_MAX_S, 0.1 * 2**self._aborts_in_a_row))
            return
        self._aborts_in_a_row = 0
        self.metrics.transactions.labels("committed").inc()
        self.metrics.in_flight.dec(len(batch))

    def _rewind(self) -> None:
        """Forget everything not committed and read it again from the committed offsets."""
        self._generation += 1
        self._backlog.clear()
        self.batcher.take()
        self.metrics.in_flight.set(0)
        self.source.seek_to_committed(sorted(self._assigned), self._first_offsets)

    def _finish_in_hand(self, timeout: float) -> None:
        """Score and write everything consumed so far; wait for acknowledgements; commit."""
        while self._backlog or len(self.batcher):
            while self._backlog and self.batcher.fits(self._backlog[0]):
                self.batcher.add(self._backlog.popleft())
            self._submit(self.batcher.take())
        self._write_scored(wait=True)
        self.sink.flush(timeout)
        if not self.exactly_once:
            self._commit(force=True)

    def _drain(self) -> None:
        queued = len(self._backlog) + len(self.batcher)
        log.info("stopping: finishing %d queued events and %d batches", queued, len(self._scoring))
        self._finish_in_hand(self.config.processing.shutdown_timeout_s)

    # -- rebalances (called from inside consume()) ----------------------------------------

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        self._assigned.update(partitions)
        self.metrics.assigned_partitions.set(len(self._assigned))
        log.info("assigned %s", partitions)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Finish the batches already scoring, drop the rest of these partitions, commit."""
        if self.closing:  # close() after the drain: everything is finished already
            self._release(partitions)
            return
        log.info("revoked %s: finishing the batches in hand", partitions)
        if not self.sink.failed:
            self._write_scored(wait=True)
            self.sink.flush(self.config.processing.shutdown_timeout_s)
            if not self.exactly_once:
                self._commit(force=True)
        self._release(partitions)

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        log.warning("lost %s: dropping their queued events (they will be read again)", partitions)
        self._release(partitions)
        if self.exactly_once:
            # Batches already scoring may hold events of the lost partitions; once those come
            # back their committed offsets are read again, so no old result may be written.
            self._rewind()
            # Losing the group means the cluster was unreachable: start the transactional
            # producer afresh rather than trust its cached coordinators (see sink.restart).
            self.sink.restart()

    def _release(self, partitions: list[TopicPartition]) -> None:
        gone = set(partitions)
        dropped = self.batcher.drop(gone)
        kept = [item for item in self._backlog if topic_partition(item) not in gone]
        dropped += len(self._backlog) - len(kept)
        self._backlog = deque(kept)
        if not self.exactly_once:
            self.metrics.in_flight.dec(sum(self.tracker.in_flight(tp) for tp in partitions))
            self.tracker.forget(partitions)
        self._assigned.difference_update(partitions)
        for tp in partitions:
            self._first_offsets.pop(tp, None)
        self.metrics.assigned_partitions.set(len(self._assigned))
        if dropped:
            log.info("dropped %d queued events of released partitions", dropped)

    # -- statistics ----------------------------------------------------------------------

    def _on_stats(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        for topic, topic_stats in stats.get("topics", {}).items():
            for partition, p in topic_stats.get("partitions", {}).items():
                lag = p.get("consumer_lag", -1)
                if int(partition) >= 0 and lag >= 0:
                    self.metrics.consumer_lag.labels(topic, partition).set(lag)
