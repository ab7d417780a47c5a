"""The processing loop: source → decode → batcher → engine → sink, and what to commit.

Two threads. The Kafka thread (the caller of :meth:`Service.run`) owns the consumer and
the producer: each turn it applies what the rebalance callbacks recorded, consumes once,
decodes, batches, writes finished batches through the :mod:`~stream_classifier.checkpoint`
(which alone decides what is committed), and never waits on the model, so the group
membership survives a slow engine. The engine thread scores one batch at a time, in
submission order. At most ``max_pending_batches`` batches wait for it, and at most
:attr:`Service.max_in_flight` events wait for their acknowledgements; beyond either, the
partitions are paused (the loop keeps polling), which bounds memory for any input rate and
any outage length.

Any exception about one event's content (decoding, tokenizing, scoring, serialising)
turns that event into a dead letter; only failures of the service itself stop it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from stream_classifier.batcher import Batch, Item, MicroBatcher, topic_partition
from stream_classifier.checkpoint import AtLeastOnce, Checkpoint, ExactlyOnce
from stream_classifier.config import ServiceConfig, TopicConfig
from stream_classifier.engine.base import Engine, Prepared
from stream_classifier.messages import (
    ClassifyRequest,
    Envelope,
    KafkaMessage,
    Rejection,
    decode_event,
)
from stream_classifier.metrics import Metrics
from stream_classifier.offsets import TopicPartition
from stream_classifier.partitions import Partitions
from stream_classifier.preparing import InlinePreparer, Preparer
from stream_classifier.records import records_for, smaller
from stream_classifier.reload import restart_needed, settings_version
from stream_classifier.scoring import Outcome, Scorer, ThreadScorer
from stream_classifier.sink import DeliveryFailure, KafkaSink, Record, Sink, producer_config
from stream_classifier.source import KafkaSource, Source, consumer_config

log = logging.getLogger(__name__)

#: Longest single wait on the consumer, so stop requests and timers are seen promptly.
POLL_SLICE_S = 0.1
#: The loop counts as stalled (unhealthy) when a turn has not started for this long.
STALL_S = 60.0
#: How long a revoke callback may wait for acknowledgements before committing.
REVOKE_FLUSH_S = 5.0
#: librdkafka statistics (consumer lag) interval when metrics are on.
STATS_INTERVAL_MS = 5000
#: librdkafka's default ``message.max.bytes`` (the producer's record size limit).
MESSAGE_MAX_BYTES = 1_000_000


def written_topics(config: ServiceConfig) -> list[str]:
    """Every topic the service writes: outputs, dead letters and the lanes' routes."""
    return sorted(
        {
            t
            for topic in config.topics
            for t in (topic.output, topic.dead_letter, *topic.route_topics)
        }
    )


class Observer(Protocol):
    """Told of every record once it is durably written (benchmarks count them)."""

    def written(self, record: Record) -> None: ...


class ServiceError(Exception):
    """The service stopped because it could not go on without losing events."""


@dataclass
class Scoring:
    """A batch handed to the engine.

    ``generation`` discards it after a rewind; ``epochs`` (each partition's assignment
    epoch at submission) discards the events of a partition released meanwhile, even
    if it was assigned again since: those are read again from the committed offset.
    """

    batch: Batch
    future: Future[list[Outcome]]
    generation: int
    epochs: dict[TopicPartition, int]
    submitted_at: float = 0.0


@dataclass
class Waiting:
    """A consumed event in the backlog; ``prepared`` until its tokenizing is done."""

    item: Item
    prepared: Future[Prepared] | None = None


@dataclass
class Rebalance:
    """What the callbacks saw during one consume(), applied by the loop afterwards."""

    assigned: list[TopicPartition] = field(default_factory=list)
    released: list[TopicPartition] = field(default_factory=list)
    lost: bool = False


class Service:
    def __init__(
        self,
        config: ServiceConfig,
        engine: Engine,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        source: Source | None = None,
        sink: Sink | None = None,
        scorer: Scorer | None = None,
        preparer: Preparer | None = None,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.exactly_once = config.processing.guarantee == "exactly_once"
        self._clock = clock
        processing = config.processing
        self.batcher = MicroBatcher(
            processing.max_batch_messages, processing.max_batch_wait_ms, clock
        )
        #: Events written and not yet acknowledged, at most (beyond: pause).
        self.max_in_flight = processing.max_batch_messages * (processing.max_pending_batches + 2)
        self._topics: dict[str, TopicConfig] = {}
        self._versions: dict[str, str] = {}
        self._use_topics(config)
        #: A reload asked for (SIGHUP): how to read the new configuration.
        self._reload: Callable[[], ServiceConfig] | None = None
        self.source: Source = source or KafkaSource(self._consumer_config(), list(self._topics))
        self.sink: Sink = sink or KafkaSink(
            self._producer_config(), self._on_delivery, written_topics(config)
        )
        self.checkpoint: Checkpoint = self._make_checkpoint()
        self.scorer: Scorer = scorer or ThreadScorer(engine, self.metrics)
        self.preparer: Preparer = preparer or InlinePreparer(engine)
        self._scoring: deque[Scoring] = deque()
        self._backlog: deque[Waiting] = deque()
        self._generation = 0
        self.partitions = Partitions()
        #: When the engine last returned a batch (its liveness, see healthy()).
        self._engine_returned_at = clock()
        self._rebalance = Rebalance()
        self._last_turn = clock()
        self._started = False
        self.closing = False
        self._observers = tuple(observers)

    def _use_topics(self, config: ServiceConfig) -> None:
        self._topics = {topic.input: topic for topic in config.topics}
        self._versions = {topic.input: settings_version(topic) for topic in config.topics}

    def _make_checkpoint(self) -> Checkpoint:
        earliest = self.config.kafka.auto_offset_reset == "earliest"
        max_bytes = int(self._producer_config().get("message.max.bytes", MESSAGE_MAX_BYTES))

        def replace(record: Record, failure: DeliveryFailure) -> Record | None:
            replacement = smaller(record, failure, max_bytes)
            if replacement is not None and replacement.stage == 1:
                source = record.source.topic
                self.metrics.dead_letters.labels(source, replacement.code or "").inc()
            return replacement

        if self.exactly_once:
            return ExactlyOnce(
                self.source,
                self.sink,
                self._clock,
                earliest,
                self._on_committed,
                replace,
                self._on_given_up,
            )
        interval = self.config.processing.commit_interval_ms / 1000.0
        return AtLeastOnce(
            self.source,
            self.sink,
            interval,
            self._clock,
            earliest,
            self._on_written,
            lambda ok: self.metrics.commits.labels("ok" if ok else "failed").inc(),
            replace,
            self._on_given_up,
        )

    # -- client settings -----------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        kafka = self.config.kafka
        config = consumer_config(
            kafka.consumer_client_config(), kafka.group_id, kafka.auto_offset_reset
        )
        if self.config.metrics.enabled:
            config["statistics.interval.ms"] = STATS_INTERVAL_MS
            config["stats_cb"] = self._on_stats
        return config

    def _producer_config(self) -> dict[str, Any]:
        return producer_config(self.config, self.max_in_flight)

    # -- health --------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        ok, why = self.checkpoint.health()
        if not ok:
            return ok, why
        stalled = self._clock() - self._last_turn
        if self._started and stalled > STALL_S:
            return False, f"processing loop has not turned for {stalled:.0f}s"
        engine_stalled = self.engine_stalled_s()
        if engine_stalled > self.config.processing.engine_timeout_s:
            return False, f"the engine has returned nothing for {engine_stalled:.0f}s"
        return True, "ok"

    def engine_stalled_s(self) -> float:
        """How long work has waited on the engine with nothing coming back (0: idle).

        A hung kernel or a wedged driver keeps the loop turning (every partition paused),
        so the loop's own liveness cannot see it: this can.
        """
        waiting = [s.submitted_at for s in list(self._scoring) if not s.future.done()]
        if not waiting:
            return 0.0
        return max(0.0, self._clock() - max(waiting[0], self._engine_returned_at))

    @property
    def assigned_partitions(self) -> frozenset[TopicPartition]:
        return frozenset(self.partitions.assigned)

    def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        if not self.partitions.assigned:
            return False, "no partitions assigned"
        return True, f"{len(self.partitions.assigned)} partitions assigned"

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then drain and commit; raise on failure."""
        try:
            self.start()
            while not stop.is_set():
                self.turn()
            self.drain()
        finally:
            self.close()

    def start(self) -> None:
        self.checkpoint.start()
        self.source.start(self)
        self._started = True

    def turn(self) -> None:
        """One pass: rebalance, rewind, pause/resume, consume once, batch, write, commit."""
        self._last_turn = self._clock()
        self._reload_due()
        self._take_replays()
        self._rewind_due()
        self._apply_pause()
        timeout = max(0.0, min(POLL_SLICE_S, self.batcher.time_left()))
        if self._scoring or self._backlog:
            timeout = min(timeout, 0.005)
        if self._waiting_on_engine():
            timeout = 0.0  # waited on the engine instead: consume() only serves callbacks
        messages = self.source.consume(self._room(), timeout)
        self._apply_rebalance()  # callbacks served inside consume() come first
        self._take_replays()  # a revoke's flush inside consume() may have asked for some
        received_at = time.monotonic()
        for message in messages:
            self._take(message, received_at)
        self.preparer.flush()  # tokenize what this consume() returned, as one chunk
        self._fill_batches()
        self._write_scored(wait=False)
        self.checkpoint.turn()
        self._update_gauges()

    def _waiting_on_engine(self) -> bool:
        """When every partition is paused because the engine stage is full, nothing can
        arrive and nothing can move until the oldest batch is scored: wait for that (up to
        ``POLL_SLICE_S``) rather than turning every 5 ms. Each turn takes the interpreter
        lock back from the engine thread, which then waits for it at its next op (on an
        H100 this wait took the device from 82% to 88% busy, docs/PERFORMANCE.md)."""
        processing = self.config.processing
        if len(self._scoring) < processing.max_pending_batches:
            return False
        if not self.partitions.holding_all():
            return False
        head = self._scoring[0].future
        if head.done():
            return False
        with contextlib.suppress(TimeoutError, CancelledError):
            head.exception(timeout=POLL_SLICE_S)
        return True

    def _room(self) -> int:
        """How many events to fetch now (at least 1: consume() also serves the group)."""
        queued = len(self._backlog) + len(self.batcher)
        return max(1, self.config.processing.max_batch_messages - queued)

    def _take(self, message: KafkaMessage, received_at: float) -> None:
        tp = (message.topic() or "", message.partition() or 0)
        offset = message.offset()
        assert offset is not None
        if not self.partitions.take(tp, offset):
            return
        self.checkpoint.consumed(tp, offset)
        self.metrics.consumed.labels(tp[0]).inc()
        self._backlog.append(self._accept(Envelope.of(message, received_at)))

    def _accept(self, envelope: Envelope) -> Waiting:
        """Decode one event and start tokenizing it; any failure about its content rejects it."""
        topic = self._topics[envelope.source.topic]
        try:
            decoded = decode_event(envelope, topic)
            if isinstance(decoded, Rejection):
                return Waiting(decoded)
            decoded.settings_version = self._versions[topic.input]
            prepared = self.preparer.submit(
                decoded.text, decoded.labels, topic.hypothesis_template, topic.multi_label
            )
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the stream
            return Waiting(Rejection(envelope, "prepare_failed", f"{type(exc).__name__}: {exc}"))
        return Waiting(decoded, prepared)

    def _ready(self, waiting: Waiting, timeout: float | None = 0.0) -> Item | None:
        """The event once tokenized (None while not yet, within ``timeout``)."""
        future = waiting.prepared
        if future is None:
            return waiting.item
        try:
            prepared = future.result(timeout)
        except TimeoutError:
            return None
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the stream
            reason = f"{type(exc).__name__}: {exc}"
            waiting.item = Rejection(waiting.item.envelope, "prepare_failed", reason)
        else:
            assert isinstance(waiting.item, ClassifyRequest)
            waiting.item.prepared = prepared
        waiting.prepared = None
        return waiting.item

    def _fill_batches(self, timeout: float | None = 0.0) -> None:
        """Move tokenized events into the open batch; hand it to the engine, while the
        engine has room, once it is due (full, or waited ``max_batch_wait_ms``) or the
        engine has nothing to do (``timeout``: how long to wait for a tokenizing to finish,
        None for ever)."""
        while True:
            while self._backlog and not self.batcher.is_full():
                item = self._ready(self._backlog[0], timeout)
                if item is None:
                    break
                self.batcher.add(item)
                self._backlog.popleft()
            if len(self._scoring) >= self.config.processing.max_pending_batches:
                return
            idle = not self._scoring and len(self.batcher) > 0
            if not (idle or self.batcher.is_due()):
                return
            self._submit(self.batcher.take())

    def _submit(self, batch: Batch) -> None:
        if batch.items:
            future = self.scorer.submit(batch.requests)
            future.add_done_callback(self._engine_returned)
            epochs = {tp: self.partitions.epoch(tp) for tp in batch.next_offsets()}
            scoring = Scoring(batch, future, self._generation, epochs, self._clock())
            self._scoring.append(scoring)

    def _engine_returned(self, _future: Future[list[Outcome]]) -> None:
        self._engine_returned_at = self._clock()  # on the engine thread: one assignment

    # -- backpressure --------------------------------------------------------------------

    def _apply_pause(self) -> None:
        """Pause what must not be fetched now, resume the rest; settle new partitions."""
        processing = self.config.processing
        engine_full = (
            len(self._scoring) >= processing.max_pending_batches
            and len(self._backlog) + len(self.batcher) >= processing.max_batch_messages
        )
        hold = (
            engine_full
            or self.checkpoint.in_flight() >= self.max_in_flight
            or not self.checkpoint.can_write()
        )
        change = self.partitions.pause_change(hold)
        if change is None:
            return  # nothing to change (most turns)
        # At saturation this is every batch: not logged. An outage of the output is logged
        # by the checkpoint, once when it starts and once when it ends.
        self.source.pause(change.pause)
        self.source.resume(change.resume)
        self.metrics.paused_partitions.set(len(self.partitions.paused))

    # -- writing results -----------------------------------------------------------------

    def _write_scored(self, wait: bool, deadline: float | None = None) -> None:
        """Write finished batches, oldest first (all of them if ``wait``, until deadline)."""
        while self._scoring:
            head = self._scoring[0]
            if not head.future.done():
                if not wait:
                    return
                left = None if deadline is None else max(0.0, deadline - self._clock())
                head.future.exception(timeout=left)  # raises TimeoutError at the deadline
            if head.generation == self._generation and not self.checkpoint.can_write():
                return
            self._scoring.popleft()
            outcomes = head.future.result()  # an EngineError propagates from here
            if head.generation == self._generation:
                self._write(head, outcomes)

    def _write(self, scoring: Scoring, outcomes: list[Outcome]) -> None:
        batch = scoring.batch
        owned = batch.without(
            tp for tp, epoch in scoring.epochs.items() if not self.partitions.current(tp, epoch)
        )
        if not owned.items:
            return
        by_request = dict(zip((id(r) for r in batch.requests), outcomes, strict=True))
        records: list[Record] = []
        for item in owned.items:
            topic = self._topics[item.envelope.source.topic]
            built = records_for(item, by_request.get(id(item)), topic, self.engine.model_id)
            for record in built:
                if record.kind == "dead_letter":
                    self.metrics.dead_letters.labels(topic.input, record.code or "").inc()
            records += built
        if not self.checkpoint.write(records, owned.next_offsets()):
            self._start_rewind()

    # -- acknowledgements (delivery reports, committed transactions) ----------------------

    def _on_delivery(self, record: Record, failure: DeliveryFailure | None) -> None:
        self.checkpoint.on_delivery(record, failure)

    def _on_written(self, record: Record) -> None:
        """A record is durably written (at-least-once: acknowledged). Counted here, not
        when built: a batch redone after an aborted transaction is built twice."""
        if record.kind == "output":
            self.metrics.produced.labels(record.source.topic).inc()
            if record.decision is not None:
                self.metrics.decisions.labels(record.source.topic, record.decision).inc()
        if record.source.timestamp:
            age = time.time() - record.source.timestamp / 1e3
            self.metrics.end_to_end_seconds.observe(max(0.0, age))
        for observer in self._observers:
            observer.written(record)

    def _on_given_up(self, record: Record, failure: DeliveryFailure) -> None:
        """Not even the smallest dead letter could be written: the event is given up."""
        source = record.source
        log.error(
            "gave up %s[%d]@%d: no form of its %s record could be written to %s (%s)",
            source.topic,
            source.partition,
            source.offset,
            (record.first or record).kind,
            record.topic,
            failure.reason,
        )
        self.metrics.undeliverable.labels(source.topic).inc()

    def _on_committed(self, records: list[Record]) -> None:
        """exactly_once: a transaction committed; its records are now visible."""
        self.metrics.transactions.labels("committed").inc()
        for record in records:
            self._on_written(record)

    # -- reloads (SIGHUP) ----------------------------------------------------------------

    def request_reload(self, load: Callable[[], ServiceConfig]) -> None:
        """Ask the loop to re-read the topic settings with ``load`` at its next turn.

        Safe from a signal handler: it only records the request.
        """
        self._reload = load

    def _reload_due(self) -> None:
        load, self._reload = self._reload, None
        if load is None:
            return
        try:
            new = load()
        except Exception as exc:  # noqa: BLE001 - any invalid file: keep the running settings
            log.error("configuration reload rejected, keeping the running settings: %s", exc)
            self.metrics.reloads.labels("invalid").inc()
            return
        problem = restart_needed(self.config, new)
        if problem is not None:
            log.error("configuration reload refused (%s needs a restart)", problem)
            self.metrics.reloads.labels("refused").inc()
            return
        self.config = new
        self._use_topics(new)
        versions = ", ".join(f"{name} {version}" for name, version in self._versions.items())
        log.info("configuration reloaded: %s", versions)
        self.metrics.reloads.labels("applied").inc()

    # -- rewinds -------------------------------------------------------------------------

    def _start_rewind(self) -> None:
        """Forget everything not committed; read it again from the committed offsets."""
        self.metrics.transactions.labels("aborted").inc()
        self._generation += 1
        self._backlog.clear()
        self.batcher.take()
        self.partitions.rewind(self.partitions.assigned)

    def _take_replays(self) -> None:
        """Partitions whose records failed: drop what is queued of them, read them again
        from the offset the checkpoint gives (the end of their acknowledged prefix)."""
        replays = self.checkpoint.replays()
        if not replays:
            return
        self._drop_queued(set(replays))
        for tp, offset in replays.items():
            self.partitions.rewind([tp], offset)
        log.debug("replaying %s", replays)

    def _rewind_due(self) -> None:
        rewinding = self.partitions.rewinding
        if not rewinding or not self.checkpoint.can_write():
            return
        from_committed = sorted(tp for tp, offset in rewinding.items() if offset is None)
        targets = self.checkpoint.rewind_targets(from_committed)
        if targets is None:
            return  # not readable now (an outage, another member's open transaction)
        targets.update((tp, o) for tp, o in rewinding.items() if o is not None)
        for tp in list(rewinding):
            # No target: nothing to read again (latest, and nothing read yet).
            if tp in targets and not self.source.seek(tp, targets[tp]):
                continue  # not seekable yet (just assigned): next turn
            self.partitions.rewound(tp)

    # -- stopping ------------------------------------------------------------------------

    def drain(self) -> None:
        """SIGTERM: stop fetching, finish what was read, commit it, all within the deadline."""
        deadline = self._clock() + self.config.processing.shutdown_timeout_s
        queued = len(self._backlog) + len(self.batcher)
        log.info("stopping: finishing %d queued events and %d batches", queued, len(self._scoring))
        self.source.pause(sorted(self.partitions.assigned))
        self.preparer.flush()
        while self._backlog or len(self.batcher):
            left = max(0.0, deadline - self._clock())
            for waiting in self._backlog:
                if self._ready(waiting, left) is None:
                    break
            while self._backlog and self._backlog[0].prepared is None:
                if self.batcher.is_full():
                    break
                self.batcher.add(self._backlog.popleft().item)
            if not len(self.batcher):
                log.warning("shutdown deadline reached with events not tokenized")
                break
            self._submit(self.batcher.take())
        try:
            self._write_scored(wait=True, deadline=deadline)
        except TimeoutError:
            log.warning("shutdown deadline reached with batches unscored: they will be redone")
        if not self.checkpoint.finish(max(0.0, deadline - self._clock())):
            log.warning("shutdown deadline reached before every output was acknowledged")

    def close(self) -> None:
        self.closing = True  # close() revokes the assignment: nothing left to finish
        self.scorer.shutdown()
        self.preparer.shutdown()
        self.source.close()  # both are no-ops for a client that never started
        left = self.sink.close(timeout=5.0)
        if left:
            log.warning("%d records left undelivered at close", left)

    # -- rebalances: the callbacks record, the loop acts ---------------------------------

    def assigned(self, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", partitions)
        self.partitions.assign(partitions)
        self._rebalance.assigned += partitions

    def revoked(self, partitions: list[TopicPartition]) -> None:
        """The one thing that must happen inside the callback: commit what is finished."""
        log.info("revoked %s", partitions)
        if not self.closing:
            self.checkpoint.commit_revoked(partitions, REVOKE_FLUSH_S)
        self._forget(partitions)

    def lost(self, partitions: list[TopicPartition]) -> None:
        log.warning(
            "lost %s: their unfinished events will be read again by their owner", partitions
        )
        self._forget(partitions)
        self._rebalance.lost = True

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self.partitions.unassign(partitions)
        self._rebalance.released += partitions

    def _apply_rebalance(self) -> None:
        change = self._rebalance
        if not (change.assigned or change.released or change.lost):
            return  # no callback ran (most turns)
        self._rebalance = Rebalance()
        if change.released:
            self._release(change.released)
            # Revoked and assigned again within one consume(): what it returned for such a
            # partition may predate either callback, so drop it and read again.
            self.partitions.rewind(change.released)
        if change.assigned:
            self.checkpoint.assigned(change.assigned)
            self.partitions.settle(change.assigned)
        if change.lost and isinstance(self.checkpoint, ExactlyOnce):
            # Losing the group means the cluster was unreachable: start the transactional
            # producer afresh rather than trust its cached coordinators (librdkafka #5456).
            self.checkpoint.replace_producer()
        self.metrics.assigned_partitions.set(len(self.partitions.assigned))

    def _release(self, partitions: Iterable[TopicPartition]) -> None:
        gone = set(partitions)
        dropped = self._drop_queued(gone)
        self.checkpoint.released(gone)
        self.partitions.release(gone)
        for topic, partition in gone:
            self.metrics.forget_partition(topic, partition)
        if dropped:
            log.info("dropped %d queued events of released partitions", dropped)

    def _drop_queued(self, partitions: set[TopicPartition]) -> int:
        """Forget every event of these partitions not yet written; a new epoch discards
        those already with the engine (see :class:`Scoring`)."""
        dropped = self.batcher.drop(partitions)
        kept = [w for w in self._backlog if topic_partition(w.item) not in partitions]
        dropped += len(self._backlog) - len(kept)
        self._backlog = deque(kept)
        for tp in partitions:
            self.partitions.new_epoch(tp)
        return dropped

    # -- gauges and statistics -----------------------------------------------------------

    def _update_gauges(self) -> None:
        scoring = sum(len(s.batch) for s in self._scoring if s.generation == self._generation)
        queued = len(self._backlog) + len(self.batcher) + scoring
        self.metrics.in_flight.set(queued + self.checkpoint.in_flight())
        self.metrics.engine_stalled_seconds.set(self.engine_stalled_s())

    def _on_stats(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        for topic, topic_stats in stats.get("topics", {}).items():
            for partition, p in topic_stats.get("partitions", {}).items():
                lag = p.get("consumer_lag", -1)
                if (topic, int(partition)) in self.partitions.assigned and lag >= 0:
                    self.metrics.consumer_lag.labels(topic, partition).set(lag)
