"""Events between the consumer and the engine: decoded, tokenizing, then micro-batched.

An event read from Kafka is decoded at once (a rejection becomes a dead letter in the
same batch, keeping its place in the partition's order) and handed to the prepare stage;
it joins the open micro-batch once its tokenizing is done, oldest first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from stream_classifier.batcher import Batch, Item, MicroBatcher, topic_partition
from stream_classifier.config import ServiceConfig, TopicConfig
from stream_classifier.engine.base import Prepared
from stream_classifier.engine.windows import Windowing
from stream_classifier.messages import ClassifyRequest, Envelope, Rejection, decode_event
from stream_classifier.offsets import TopicPartition
from stream_classifier.preparing import Preparer
from stream_classifier.reload import settings_version


@dataclass
class Waiting:
    """A consumed event in the backlog; ``prepared`` until its tokenizing is done."""

    item: Item
    prepared: Future[Prepared] | None = None


class Intake:
    """The backlog of events being tokenized and the open micro-batch after it."""

    def __init__(
        self, config: ServiceConfig, preparer: Preparer, clock: Callable[[], float]
    ) -> None:
        processing = config.processing
        self.batcher = MicroBatcher(
            processing.max_batch_messages, processing.max_batch_wait_ms, clock
        )
        self.preparer = preparer
        self._batch_messages = processing.max_batch_messages
        self._backlog: deque[Waiting] = deque()
        self._topics: dict[str, TopicConfig] = {}
        #: Each input topic's settings version, written into its outputs.
        self.versions: dict[str, str] = {}
        self.use(config)

    def use(self, config: ServiceConfig) -> None:
        """The topic settings for events read from now on (a reload)."""
        self._topics = {topic.input: topic for topic in config.topics}
        self.versions = {topic.input: settings_version(topic) for topic in config.topics}

    def topic(self, name: str) -> TopicConfig:
        return self._topics[name]

    def __len__(self) -> int:
        return len(self._backlog) + len(self.batcher)

    def room(self) -> int:
        """How many events to fetch now (at least 1: consume() also serves the group)."""
        return max(1, self._batch_messages - len(self))

    def holds_a_batch(self) -> bool:
        """A whole micro-batch is waiting (with the engine full: stop fetching)."""
        return len(self) >= self._batch_messages

    def accept(self, envelope: Envelope) -> None:
        """Decode one event and start tokenizing it; any failure about its content
        rejects it."""
        topic = self._topics[envelope.source.topic]
        try:
            decoded = decode_event(envelope, topic)
            if isinstance(decoded, Rejection):
                self._backlog.append(Waiting(decoded))
                return
            decoded.settings_version = self.versions[topic.input]
            prepared = self.preparer.submit(
                decoded.text,
                decoded.labels,
                topic.hypothesis_template,
                topic.multi_label,
                Windowing.of(topic),
            )
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the stream
            reason = f"{type(exc).__name__}: {exc}"
            self._backlog.append(Waiting(Rejection(envelope, "prepare_failed", reason)))
            return
        self._backlog.append(Waiting(decoded, prepared))

    def fill(self, timeout: float | None = 0.0) -> None:
        """Move tokenized events into the open batch, in order, until it is full
        (``timeout``: how long to wait for one tokenizing, None for ever)."""
        while self._backlog and not self.batcher.is_full():
            item = _ready(self._backlog[0], timeout)
            if item is None:
                return
            self.batcher.add(item)
            self._backlog.popleft()

    def take_due(self, engine_idle: bool) -> Batch | None:
        """The open batch once due (full, or waited ``max_batch_wait_ms``), or at once
        when the engine has nothing to do."""
        if self.batcher.is_due() or (engine_idle and len(self.batcher) > 0):
            return self.batcher.take()
        return None

    def remaining(self, deadline: Callable[[], float]) -> Iterator[Batch]:
        """Shutdown: every queued event in batches, each tokenizing waited for up to the
        time ``deadline()`` leaves; stops early at the deadline."""
        self.preparer.flush()
        while len(self):
            for waiting in self._backlog:
                if _ready(waiting, deadline()) is None:
                    break
            while self._backlog and self._backlog[0].prepared is None:
                if self.batcher.is_full():
                    break
                self.batcher.add(self._backlog.popleft().item)
            if not len(self.batcher):
                return
            yield self.batcher.take()

    def drop(self, partitions: set[TopicPartition]) -> int:
        """Forget the events of these partitions; how many there were."""
        dropped = self.batcher.drop(partitions)
        kept = [w for w in self._backlog if topic_partition(w.item) not in partitions]
        dropped += len(self._backlog) - len(kept)
        self._backlog = deque(kept)
        return dropped

    def clear(self) -> None:
        self._backlog.clear()
        self.batcher.take()


def _ready(waiting: Waiting, timeout: float | None = 0.0) -> Item | None:
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
