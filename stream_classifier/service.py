"""The processing loop: source → decode → batcher → engine → sink, and what to commit.

Two threads. The Kafka thread (the caller of :meth:`Service.run`) owns the consumer and
the producer: each turn it applies what the rebalance callbacks recorded, consumes once,
hands events to the :mod:`~stream_classifier.intake` (decoded, tokenizing, batched),
submits due batches to the engine (:mod:`~stream_classifier.pending`), writes finished
ones through the :mod:`~stream_classifier.checkpoint` (which alone decides what is
committed), and never waits on the model, so the group membership survives a slow
engine. The engine thread scores one batch at a time, in submission order. At most
``max_pending_batches`` batches wait for it, and at most :attr:`Service.max_in_flight`
events wait for their acknowledgements; beyond either, the partitions are paused (the
loop keeps polling), which bounds memory for any input rate and any outage length.

Any exception about one event's content (decoding, tokenizing, scoring, serialising)
turns that event into a dead letter; only failures of the service itself stop it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from stream_classifier.batcher import Batch
from stream_classifier.checkpoint import Checkpoint
from stream_classifier.config import ServiceConfig
from stream_classifier.engine.base import Engine
from stream_classifier.engine.windows import window_problems
from stream_classifier.formats import Formats
from stream_classifier.intake import Intake
from stream_classifier.messages import Envelope, KafkaMessage
from stream_classifier.metrics import Metrics
from stream_classifier.offsets import TopicPartition
from stream_classifier.outputs import Observer, Outputs, make_checkpoint
from stream_classifier.partitions import Partitions
from stream_classifier.pending import PendingBatches, Submitted
from stream_classifier.preparing import InlinePreparer, Preparer
from stream_classifier.priorities import Ahead
from stream_classifier.rebalances import Rebalances
from stream_classifier.reload import reloaded
from stream_classifier.scoring import Outcome, Scorer, ThreadScorer
from stream_classifier.sink import DeliveryFailure, KafkaSink, Record, Sink, producer_config
from stream_classifier.source import KafkaSource, Source, service_consumer_config

log = logging.getLogger(__name__)

#: Longest single wait on the consumer, so stop requests and timers are seen promptly.
POLL_SLICE_S = 0.1
#: The loop counts as stalled (unhealthy) when a turn has not started for this long.
STALL_S = 60.0
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


class ServiceError(Exception):
    """The service stopped because it could not go on without losing events."""


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
        formats: Formats | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics or Metrics()
        self._clock = clock
        processing = config.processing
        #: Events written and not yet acknowledged, at most (beyond: pause).
        self.max_in_flight = processing.max_batch_messages * (processing.max_pending_batches + 2)
        #: Each topic's value formats (and the schema registry's client, where needed).
        self.formats = formats or Formats(config)
        self.intake = Intake(
            config,
            preparer or InlinePreparer(engine),
            clock,
            self.formats,
            self.metrics.registry_failures.inc,
        )
        self.pending = PendingBatches(
            scorer or ThreadScorer(engine, self.metrics), processing.max_pending_batches, clock
        )
        on_stats = self._on_stats if config.metrics.enabled else None
        topics = [topic.input for topic in config.topics]
        self.source: Source = source or KafkaSource(
            service_consumer_config(config, on_stats), topics
        )
        settings = producer_config(config, self.max_in_flight)
        self.sink: Sink = sink or KafkaSink(settings, self._on_delivery, written_topics(config))
        priorities = {topic.input: topic.priority for topic in config.topics}
        self.outputs = Outputs(
            self.metrics, engine.model_id, observers, priorities, self.formats.encode
        )
        max_bytes = int(settings.get("message.max.bytes", MESSAGE_MAX_BYTES))
        self.checkpoint: Checkpoint = make_checkpoint(
            config, self.source, self.sink, clock, self.outputs, max_bytes
        )
        self.partitions = Partitions()
        #: A reload asked for (SIGHUP): how to read the new configuration.
        self._reload: Callable[[], ServiceConfig] | None = None
        self.rebalances = Rebalances(
            self.partitions, self.checkpoint, self.intake, self.metrics, lambda: self.closing
        )
        self._last_turn = clock()
        #: A write that the checkpoint accepted did not commit; rewind before the next.
        self._undone = False
        self._started = False
        self.closing = False

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
        """How long work has waited on the engine with nothing coming back (0: idle)."""
        return self.pending.stalled_s()

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
        self.source.start(self.rebalances)
        self._started = True

    def turn(self) -> None:
        """One pass: rebalance, rewind, pause/resume, consume once, batch, write, commit."""
        self._last_turn = self._clock()
        self._reload_due()
        self.intake.retry_held()
        self._take_replays()
        self._rewind_due()
        self._apply_pause()
        timeout = max(0.0, min(POLL_SLICE_S, self.intake.time_left(self._ahead())))
        if self.pending or self.intake:
            timeout = min(timeout, 0.005)
        if self.intake.preparer.deferred():
            timeout = 0.0  # tokenizing left to do (a lower level's, a chunk a turn)
        elif self._waiting_on_engine():
            timeout = 0.0  # waited on the engine instead: consume() only serves callbacks
        messages = self.source.consume(self.intake.room(), timeout)
        self.rebalances.apply()  # callbacks served inside consume() come first
        if self.intake.prioritised:
            self.intake.own({topic for topic, _ in self.partitions.assigned})
        self._take_replays()  # a revoke's flush inside consume() may have asked for some
        received_at = time.monotonic()
        for message in messages:
            self._take(message, received_at)
        self.intake.preparer.flush()  # tokenize what this consume() returned (see preparing)
        self._fill_batches()
        self._write_scored(wait=False)
        self.checkpoint.turn()
        self._rewind_if_undone()
        self._update_gauges()

    def _waiting_on_engine(self) -> bool:
        """When nothing in hand can move until a batch comes back, wait for one rather
        than turn at once: while the engine stage is full and every partition is paused
        (up to ``POLL_SLICE_S``), and with levels while the stage is full whatever is
        paused (events that arrive meanwhile wait in the consumer's queue, as they would
        in the intake) or until something in hand is due (:meth:`Intake.engine_wait_s`).
        Each turn takes the interpreter lock from the engine thread, which waits for it
        at its next op; turning without these waits cost a CPU engine most of its rate
        beside a live topic (docs/PERFORMANCE.md). With one level the loop reads on while
        partitions are open: what it reads is batched and due by the time there is room.
        """
        levels = self.intake.prioritised
        if not self.pending.has_room() and (levels or self.partitions.holding_all()):
            return self.pending.wait_for_engine(POLL_SLICE_S)
        wait_s = self.intake.engine_wait_s(self._ahead())
        return wait_s > 0 and self.pending.wait_for_engine(wait_s)

    def _ahead(self) -> Ahead:
        return self.pending.ahead(self.intake.live_priority())

    def _take(self, message: KafkaMessage, received_at: float) -> None:
        tp = (message.topic() or "", message.partition() or 0)
        offset = message.offset()
        assert offset is not None
        if not self.partitions.take(tp, offset):
            return
        self.checkpoint.consumed(tp, offset)
        self.metrics.consumed.labels(tp[0]).inc()
        self.intake.accept(Envelope.of(message, received_at))

    def _fill_batches(self) -> None:
        """Hand the open batch to the engine, while it has room, once the batch is due or
        the engine has nothing to do."""
        while True:
            self.intake.fill()
            if not self.pending.has_room():
                return
            batch = self.intake.take_due(not self.pending, self._ahead())
            if batch is None:
                return
            self._submit(batch)

    def _submit(self, batch: Batch) -> None:
        if batch.items:
            epochs = {tp: self.partitions.epoch(tp) for tp in batch.next_offsets()}
            self.pending.submit(batch, epochs)

    # -- backpressure --------------------------------------------------------------------

    def _apply_pause(self) -> None:
        """Pause what must not be fetched now, resume the rest; settle new partitions.
        Everything while the output cannot take more; else what the intake holds enough
        of (with one priority level: everything, once the engine is full as well)."""
        assigned = self.partitions.assigned
        if self.checkpoint.in_flight() >= self.max_in_flight or not self.checkpoint.can_write():
            held = set(assigned)
        else:
            levels = self.intake.held(engine_full=not self.pending.has_room())
            held = (
                {tp for tp in assigned if self.intake.priority(tp[0]) in levels}
                if levels
                else set()
            )
            held |= self.intake.registry_hold.partitions
        change = self.partitions.pause_change(held)
        if change is None:
            return  # nothing to change (most turns)
        # At saturation this is every batch: not logged. An outage of the output is logged
        # by the checkpoint, once when it starts and once when it ends.
        self.source.pause(change.pause)
        self.source.resume(change.resume)
        self.metrics.paused_partitions.set(len(self.partitions.paused))

    # -- writing results -----------------------------------------------------------------

    def _write_scored(self, wait: bool, deadline: float | None = None) -> None:
        """Write finished batches, oldest first (all of them if ``wait``, until deadline),
        each once the previous write has its outcome; rewind if one did not commit."""
        while True:
            finished = self.pending.take_finished(
                wait, lambda: self._writable(wait, deadline), deadline
            )
            if finished is None:
                break
            self._write(*finished)
        self._rewind_if_undone()

    def _writable(self, wait: bool, deadline: float | None) -> bool:
        """The last write has its outcome (waited for if ``wait``), it committed, and the
        output takes more."""
        left = 0.0
        if wait:
            left = POLL_SLICE_S if deadline is None else max(0.0, deadline - self._clock())
        if not self.checkpoint.settled(left):
            return False
        self._undone = self._undone or self.checkpoint.undone()
        return not self._undone and self.checkpoint.can_write()

    def _rewind_if_undone(self) -> None:
        """A write accepted earlier did not commit: read everything uncommitted again."""
        if self._undone or self.checkpoint.undone():
            self._undone = False
            self._start_rewind()

    def _write(self, submitted: Submitted, outcomes: list[Outcome]) -> None:
        released = [
            tp for tp, epoch in submitted.epochs.items() if not self.partitions.current(tp, epoch)
        ]
        owned = submitted.batch.without(released)
        if not owned.items:
            return
        by_request = dict(zip((id(r) for r in submitted.batch.requests), outcomes, strict=True))
        records = self.outputs.build(owned, by_request, self.intake.topic)
        if not self.checkpoint.write(records, owned.next_offsets()):
            self._start_rewind()

    def _on_delivery(self, record: Record, failure: DeliveryFailure | None) -> None:
        self.checkpoint.on_delivery(record, failure)

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
        new = reloaded(self.config, load, self.metrics, self._reload_problems)
        if new is not None:
            self.config = new
            self.intake.use(new)
            self.formats.use(new)

    def _reload_problems(self, config: ServiceConfig) -> list[str]:
        """What the running engine and registry cannot do with a reloaded configuration:
        windows that do not fit the model, a new route whose output schema cannot be
        registered."""
        return window_problems(config.topics, self.engine) + self.formats.problems(config)

    # -- rewinds -------------------------------------------------------------------------

    def _start_rewind(self) -> None:
        """Forget everything not committed; read it again from the committed offsets."""
        self.metrics.transactions.labels("aborted").inc()
        self.pending.discard()
        self.intake.clear()
        self.partitions.rewind(self.partitions.assigned)

    def _take_replays(self) -> None:
        """Partitions whose records failed: drop what is queued of them, read them again
        from the offset the checkpoint gives (the end of their acknowledged prefix)."""
        replays = self.checkpoint.replays()
        if not replays:
            return
        self.rebalances.drop_queued(set(replays))
        for tp, offset in replays.items():
            self.partitions.rewind([tp], offset)
        log.debug("replaying %s", replays)

    def _rewind_due(self) -> None:
        rewinding = self.partitions.rewinding
        if not rewinding or not self.checkpoint.settled(0.0) or not self.checkpoint.can_write():
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
        log.info(
            "stopping: finishing %d queued events and %d batches",
            len(self.intake),
            len(self.pending),
        )
        self.source.pause(sorted(self.partitions.assigned))
        for batch in self.intake.remaining(lambda: max(0.0, deadline - self._clock())):
            self._submit(batch)
        if self.intake:
            log.warning("shutdown deadline reached with events not tokenized")
        try:
            self._write_scored(wait=True, deadline=deadline)
        except TimeoutError:
            log.warning("shutdown deadline reached with batches unscored: they will be redone")
        if not self.checkpoint.finish(max(0.0, deadline - self._clock())):
            log.warning("shutdown deadline reached before every output was acknowledged")

    def close(self) -> None:
        self.closing = True  # close() revokes the assignment: nothing left to finish
        self.pending.scorer.shutdown()
        self.intake.preparer.shutdown()
        self.source.close()  # both are no-ops for a client that never started
        left = self.sink.close(timeout=5.0)
        if left:
            log.warning("%d records left undelivered at close", left)

    # -- gauges and statistics -----------------------------------------------------------

    def _update_gauges(self) -> None:
        queued = len(self.intake) + self.pending.events()
        self.metrics.in_flight.set(queued + self.checkpoint.in_flight())
        self.metrics.engine_stalled_seconds.set(self.engine_stalled_s())

    def _on_stats(self, stats_json: str) -> None:
        self.metrics.record_lag(stats_json, self.partitions.assigned, self.outputs.priorities)
