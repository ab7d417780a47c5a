"""What becomes of output records: built from a batch's outcomes, handed to the
checkpoint, and counted once written (or given up), never when built, since a batch redone
after an aborted transaction is built twice."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from stream_classifier.batcher import Batch
from stream_classifier.checkpoint import AtLeastOnce, Checkpoint
from stream_classifier.config import ServiceConfig, TopicConfig
from stream_classifier.exactly_once import ExactlyOnce
from stream_classifier.formats import Encode, json_value
from stream_classifier.metrics import Metrics
from stream_classifier.records import records_for, smaller
from stream_classifier.scoring import Outcome
from stream_classifier.sink import DeliveryFailure, Record, Sink
from stream_classifier.source import Source

log = logging.getLogger(__name__)


class Observer:
    """Told of every record once it is durably written, and of every event given up
    (benchmarks count records; the simulation checks give-ups)."""

    def written(self, record: Record) -> None:
        """The record is acknowledged (at_least_once) or its transaction committed."""

    def given_up(self, record: Record) -> None:
        """No form of this record could be written; its event's offset advances."""


class Outputs:
    """Records of scored batches, and their metrics once the cluster has them."""

    def __init__(
        self,
        metrics: Metrics,
        model_id: str,
        observers: Sequence[Observer],
        priorities: dict[str, int] | None = None,
        encode: Encode = json_value,
    ) -> None:
        self.metrics = metrics
        self.model_id = model_id
        #: Writes a scored event in its target topic's format.
        self.encode = encode
        self.observers = tuple(observers)
        #: Each input topic's priority level, the label of its latency.
        self.priorities = priorities or {}

    def build(
        self,
        batch: Batch,
        outcomes: dict[int, Outcome],
        topic_of: Callable[[str], TopicConfig],
    ) -> list[Record]:
        """Every record of the batch's events (``outcomes`` by ``id`` of each request)."""
        records: list[Record] = []
        for item in batch.items:
            topic = topic_of(item.envelope.source.topic)
            built = records_for(item, outcomes.get(id(item)), topic, self.model_id, self.encode)
            for record in built:
                if record.kind == "dead_letter":
                    self.metrics.dead_letters.labels(topic.input, record.code or "").inc()
            records += built
        return records

    def smaller(self, record: Record, failure: DeliveryFailure, max_bytes: int) -> Record | None:
        """The next smaller form of a record refused for good (its first is a dead letter)."""
        replacement = smaller(record, failure, max_bytes)
        if replacement is not None and replacement.stage == 1:
            source = record.source.topic
            self.metrics.dead_letters.labels(source, replacement.code or "").inc()
        return replacement

    def written(self, record: Record) -> None:
        if record.kind == "output":
            self.metrics.produced.labels(record.source.topic).inc()
            if record.decision is not None:
                self.metrics.decisions.labels(record.source.topic, record.decision).inc()
            if record.shadowed:
                live, shadow = record.decision or "", record.shadow_decision or ""
                self.metrics.shadow_decisions.labels(record.source.topic, live, shadow).inc()
        if record.source.timestamp:
            age = time.time() - record.source.timestamp / 1e3
            level = str(self.priorities.get(record.source.topic, 0))
            self.metrics.end_to_end_seconds.labels(level).observe(max(0.0, age))
        for observer in self.observers:
            observer.written(record)

    def committed(self, records: list[Record]) -> None:
        """exactly_once: a transaction committed; its records are now visible."""
        self.metrics.transactions.labels("committed").inc()
        for record in records:
            self.written(record)

    def given_up(self, record: Record, failure: DeliveryFailure) -> None:
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
        for observer in self.observers:
            observer.given_up(record)


def make_checkpoint(
    config: ServiceConfig,
    source: Source,
    sink: Sink,
    clock: Callable[[], float],
    outputs: Outputs,
    max_bytes: int,
) -> Checkpoint:
    """The checkpoint of the configured guarantee, reporting to ``outputs``."""
    earliest = config.kafka.auto_offset_reset == "earliest"

    def replace(record: Record, failure: DeliveryFailure) -> Record | None:
        return outputs.smaller(record, failure, max_bytes)

    if config.processing.guarantee == "exactly_once":
        return ExactlyOnce(
            source, sink, clock, earliest, outputs.committed, replace, outputs.given_up
        )
    commits = outputs.metrics.commits
    return AtLeastOnce(
        source,
        sink,
        config.processing.commit_interval_ms / 1000.0,
        clock,
        earliest,
        outputs.written,
        lambda ok: commits.labels("ok" if ok else "failed").inc(),
        replace,
        outputs.given_up,
    )
