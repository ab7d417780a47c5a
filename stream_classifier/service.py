"""The processing loop: source → decode → batcher → engine → sink, and what to commit.

One thread runs the loop. It never stops polling the consumer for long (a batch is bounded
by tokens and messages, so ``max.poll.interval.ms`` is not at risk), serves the producer's
delivery reports, and commits the offsets whose outputs the broker acknowledged.

At-least-once: a crash between an acknowledged output and its commit replays the event on
restart (a duplicate), never loses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from stream_classifier.batcher import MicroBatcher
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
from stream_classifier.sink import KafkaSink, our_headers
from stream_classifier.source import KafkaSource, consumer_config

log = logging.getLogger(__name__)

#: Longest single wait on the consumer, so stop requests and timers are seen promptly.
POLL_SLICE_S = 0.1


class ServiceError(Exception):
    """The service stopped because it could not go on without losing events."""


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
        client = config.kafka.client_config()
        self.source = KafkaSource(
            consumer_config(client, config.kafka.group_id, config.kafka.auto_offset_reset),
            list(self._topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.sink = KafkaSink(
            producer_config(client, processing.delivery_timeout_ms), self._on_delivered
        )
        self._last_commit = clock()
        self._last_turn = clock()
        self._assigned: set[TopicPartition] = set()
        self._started = False

    # -- health --------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        if self.sink.failed:
            return False, "output delivery failed"
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
        """Consume until ``stop`` is set, then drain and commit; raise ServiceError on failure."""
        self.sink.start()
        self.source.start()
        self._started = True
        try:
            while not stop.is_set():
                self._turn()
            self._drain()
        finally:
            self.source.close()
            left = self.sink.close(timeout=5.0)
            if left:
                log.warning("%d records left undelivered at close", left)

    def _turn(self) -> None:
        self._last_turn = self._clock()
        timeout = max(0.0, min(POLL_SLICE_S, self.batcher.time_left()))
        room = max(1, self.config.processing.max_batch_messages - len(self.batcher))
        received_at = time.monotonic()
        for message in self.source.consume(room, timeout):
            self._accept(message, received_at)
        if self.batcher.is_due():
            self._process(self.batcher.take())
        self.sink.poll(0)
        self.sink.check()
        self._commit(force=False)

    def _accept(self, message: KafkaMessage, received_at: float) -> None:
        envelope = Envelope.of(message, received_at)
        source = envelope.source
        self.tracker.register((source.topic, source.partition), source.offset)
        self.metrics.consumed.labels(source.topic).inc()
        self.metrics.in_flight.inc()
        topic = self._topics[source.topic]
        decoded = decode_event(envelope, topic)
        if isinstance(decoded, Rejection):
            self._dead_letter(decoded)
            return
        try:
            decoded.prepared = self.engine.prepare(
                decoded.text, decoded.labels, topic.hypothesis_template, topic.multi_label
            )
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the stream
            self._dead_letter(Rejection(envelope, "prepare_failed", f"{type(exc).__name__}: {exc}"))
            return
        if not self.batcher.fits(decoded):
            self._process(self.batcher.take())
        self.batcher.add(decoded)

    def _dead_letter(self, rejection: Rejection) -> None:
        topic = self._topics[rejection.envelope.source.topic]
        log.info("dead letter %s: %s", rejection.code, rejection.reason)
        self.metrics.dead_letters.labels(topic.input, rejection.code).inc()
        self.sink.send_dead_letter(
            topic.dead_letter, rejection.envelope, rejection.context().headers()
        )

    def _process(self, batch: list[ClassifyRequest]) -> None:
        if not batch:
            return
        started = time.monotonic()
        results = self.engine.classify([request.prepared for request in batch])
        finished = time.monotonic()
        self._record_batch(batch, finished - started)
        for request, scores in zip(batch, results, strict=True):
            value = self._scored(request, scores, finished).model_dump_json().encode()
            headers = our_headers(self.engine.model_id, request.text_truncated)
            self.sink.send_output(request.topic.output, request.envelope, value, headers)

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

    def _record_batch(self, batch: list[ClassifyRequest], seconds: float) -> None:
        self.metrics.batch_messages.observe(len(batch))
        self.metrics.batch_pairs.observe(sum(len(r.labels) for r in batch))
        self.metrics.batch_tokens.observe(sum(r.prepared.tokens for r in batch))
        self.metrics.engine_seconds.observe(seconds)

    def _on_delivered(self, source: SourceRef, kind: str) -> None:
        self.tracker.mark_done((source.topic, source.partition), source.offset)
        self.metrics.in_flight.dec()
        if kind == "output":
            self.metrics.produced.labels(source.topic).inc()
        if source.timestamp:
            self.metrics.end_to_end_seconds.observe(max(0.0, time.time() - source.timestamp / 1e3))

    # -- commits -------------------------------------------------------------------------

    def _commit(self, force: bool) -> None:
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

    def _finish_in_hand(self, timeout: float) -> None:
        """Score what is batched, wait for every output's acknowledgement, commit."""
        self._process(self.batcher.take())
        self.sink.flush(timeout)
        self._commit(force=True)

    def _drain(self) -> None:
        log.info("stopping: finishing %d batched events", len(self.batcher))
        self._finish_in_hand(self.config.processing.shutdown_timeout_s)

    # -- rebalances (called from inside consume()) ----------------------------------------

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        self._assigned.update(partitions)
        self.metrics.assigned_partitions.set(len(self._assigned))
        log.info("assigned %s", partitions)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s: finishing their events before letting go", partitions)
        if not self.sink.failed:
            self._finish_in_hand(self.config.processing.shutdown_timeout_s)
        self._release(partitions)

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        log.warning("lost %s: dropping their batched events (they will be redelivered)", partitions)
        self._release(partitions)

    def _release(self, partitions: list[TopicPartition]) -> None:
        dropped = self.batcher.drop(partitions)
        self.metrics.in_flight.dec(sum(self.tracker.in_flight(tp) for tp in partitions))
        self.tracker.forget(partitions)
        self._assigned.difference_update(partitions)
        self.metrics.assigned_partitions.set(len(self._assigned))
        if dropped:
            log.info("dropped %d batched events of released partitions", len(dropped))


def producer_config(client: dict[str, Any], delivery_timeout_ms: int) -> dict[str, Any]:
    return {
        **client,
        "acks": "all",
        # No duplicates or reordering from the producer's own retries.
        "enable.idempotence": True,
        "linger.ms": 5,
        "delivery.timeout.ms": delivery_timeout_ms,
    }
