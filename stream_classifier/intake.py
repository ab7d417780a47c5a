"""Events between the consumer and the engine: decoded, tokenizing, then micro-batched.

An event read from Kafka is decoded at once (a rejection becomes a dead letter in the
same batch, keeping its place in the partition's order) and handed to the prepare stage;
it joins a micro-batch once its tokenizing is done, oldest first. With topics of more
than one priority, each level has its own queue and batches are composed from them when
the engine has room (:mod:`~stream_classifier.priorities`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from stream_classifier.batcher import Batch, Item, MicroBatcher
from stream_classifier.config import ServiceConfig, TopicConfig
from stream_classifier.engine.base import Prepared
from stream_classifier.engine.windows import Windowing
from stream_classifier.formats import Formats, RegistryUnavailable
from stream_classifier.messages import ClassifyRequest, Envelope, Rejection, decode_event
from stream_classifier.offsets import TopicPartition
from stream_classifier.preparing import Preparer
from stream_classifier.priorities import (
    SHARE_DECAY,
    Ahead,
    Level,
    Waiting,
    allocate,
    held_levels,
    live_level,
    ready,
    starved,
)
from stream_classifier.registry_hold import RegistryHold
from stream_classifier.reload import settings_version
from stream_classifier.shadow import plan

#: With topics of more than one priority, the most events one turn reads. Taking an event
#: (decoding it, its envelope) is work on the Kafka thread; a read of a whole batch of a
#: bulk backlog kept a live event that arrived meanwhile from being read for as long
#: (docs/PERFORMANCE.md). A few turns read a batch all the same.
LEVELS_READ_PER_TURN = 256
#: An engine stage with nothing unfinished.
NOTHING_AHEAD = Ahead()


class Intake:
    """The events being tokenized, per priority level, and the batches made of them."""

    def __init__(
        self,
        config: ServiceConfig,
        preparer: Preparer,
        clock: Callable[[], float],
        formats: Formats | None = None,
        on_registry_failure: Callable[[], None] = lambda: None,
    ) -> None:
        processing = config.processing
        self.batcher = MicroBatcher(
            processing.max_batch_messages, processing.max_batch_wait_ms, clock
        )
        self.preparer = preparer
        self._clock = clock
        self._batch_messages = processing.max_batch_messages
        self._max_wait_s = processing.max_batch_wait_ms / 1000.0
        self._lower_batch = processing.lower_priority_batch()
        self._min_share = processing.priority_min_share
        #: Highest first. Priorities need a restart to change, so the levels stay.
        self.levels = [Level(p) for p in sorted({t.priority for t in config.topics}, reverse=True)]
        self._level_of: dict[int, Level] = {level.priority: level for level in self.levels}
        self._topics: dict[str, TopicConfig] = {}
        self.formats = formats or Formats(config)
        #: Events waiting for the schema registry, their partitions paused meanwhile.
        self.registry_hold = RegistryHold(clock, on_registry_failure)
        #: Each input topic's settings version, written into its outputs.
        self.versions: dict[str, str] = {}
        self.use(config)

    @property
    def prioritised(self) -> bool:
        return len(self.levels) > 1

    def use(self, config: ServiceConfig) -> None:
        """The topic settings for events read from now on (a reload)."""
        self._topics = {topic.input: topic for topic in config.topics}
        self.versions = {topic.input: settings_version(topic) for topic in config.topics}
        #: Each shadowed topic's shadow policy (its settings applied) and its version.
        self._shadows: dict[str, tuple[TopicConfig, str]] = {}
        for topic in config.topics:
            policy = topic.shadow_policy()
            if policy is not None:
                self._shadows[topic.input] = (policy, settings_version(policy))

    def topic(self, name: str) -> TopicConfig:
        return self._topics[name]

    def priority(self, topic: str) -> int:
        return self._topics[topic].priority

    def __len__(self) -> int:
        return sum(len(level) for level in self.levels) + len(self.batcher)

    def room(self) -> int:
        """How many events to fetch now (at least 1: consume() also serves the group).
        With levels: room for the emptiest level being fetched (each is paused once it
        holds a batch), at most :data:`LEVELS_READ_PER_TURN`."""
        if not self.prioritised:
            return max(1, self._batch_messages - len(self))
        fetched = [len(level) for level in self.levels if not level.held]
        room = max(1, self._batch_messages - min(fetched)) if fetched else 1
        return min(room, LEVELS_READ_PER_TURN)

    def own(self, topics: set[str]) -> None:
        """The input topics this instance owns partitions of now (after a rebalance)."""
        owned = {self._topics[name].priority for name in topics}
        for level in self.levels:
            level.owned = level.priority in owned

    def held(self, engine_full: bool) -> set[int]:
        """The priority levels whose partitions to pause (``engine_full``: the engine
        stage has no room for another batch)."""
        if not self.prioritised:
            level = self.levels[0]
            return {level.priority} if engine_full and len(self) >= self._batch_messages else set()
        live = live_level(self.levels)
        return held_levels(self.levels, live, self._batch_messages, engine_full)

    def accept(self, envelope: Envelope) -> None:
        """Decode one event and start tokenizing it; any failure about its content
        rejects it. An event whose schema the registry cannot give now is held, with its
        partition's later events (:mod:`~stream_classifier.registry_hold`)."""
        arrived = self._clock()
        if self.registry_hold.holds(envelope):
            self.registry_hold.add(envelope, arrived)
            return
        try:
            self._accept(envelope, arrived)
        except RegistryUnavailable as exc:
            self.registry_hold.start(envelope, arrived, str(exc))

    def retry_held(self) -> None:
        """Events held for the registry: decode them again, in order, when it is time."""
        self.registry_hold.retry(self._accept)

    def _accept(self, envelope: Envelope, arrived: float) -> None:
        topic = self._topics[envelope.source.topic]
        level = self._level_of[topic.priority]
        try:
            decoded = decode_event(envelope, topic, self.formats.read)
            if isinstance(decoded, Rejection):
                level.add(Waiting(decoded, None, arrived))
                return
            decoded.settings_version = self.versions[topic.input]
            windowing = Windowing.of(topic)
            later = self._later(level)
            prepared = self.preparer.submit(
                decoded.text,
                decoded.labels,
                topic.hypothesis_template,
                topic.multi_label,
                windowing,
                later,
            )
        except RegistryUnavailable:
            raise  # not about this event: it waits for the registry
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the stream
            reason = f"{type(exc).__name__}: {exc}"
            level.add(Waiting(Rejection(envelope, "prepare_failed", reason), None, arrived))
            return
        shadow = self._shadow(decoded, topic, windowing, later)
        level.add(Waiting(decoded, prepared, arrived, shadow))

    def _later(self, level: Level) -> bool:
        """May this level's tokenizing wait behind the live level's (a lower level's)?"""
        return self.prioritised and level is not live_level(self.levels)

    def _shadow(
        self,
        request: ClassifyRequest,
        topic: TopicConfig,
        windowing: Windowing | None,
        later: bool,
    ) -> Future[Prepared] | None:
        """Plan the event's shadow, if its topic has one; the tokenizing of what the
        shadow scores itself (None: nothing, or it failed: no shadow for this event)."""
        policy = self._shadows.get(topic.input)
        if policy is None:
            return None
        request.shadow = shadow = plan(*policy, topic, request.labels)
        if not shadow.extra:
            return None
        try:
            return self.preparer.submit(
                request.text,
                shadow.extra,
                shadow.policy.hypothesis_template,
                shadow.policy.multi_label,
                windowing,
                later,
            )
        except Exception as exc:  # noqa: BLE001 - the shadow must never touch the live side
            shadow.failed = f"{type(exc).__name__}: {exc}"
            return None

    def fill(self, timeout: float | None = 0.0) -> None:
        """One level: move tokenized events into the open batch, in order, until it is
        full (``timeout``: how long to wait for one tokenizing, None for ever). Several
        levels: nothing, batches are composed when taken."""
        if self.prioritised:
            return
        level = self.levels[0]
        while level.queue and not self.batcher.is_full():
            item = ready(level.queue[0], timeout)
            if item is None:
                return
            self.batcher.add(item)
            level.queue.popleft()

    def live_priority(self) -> int | None:
        """The live level's priority (None with one level, or none owned or in hand)."""
        live = live_level(self.levels) if self.prioritised else None
        return None if live is None else live.priority

    def time_left(self, ahead: Ahead = NOTHING_AHEAD) -> float:
        """Seconds until a batch is due by time (inf when nothing is waiting). With levels,
        only the work that could go now counts (``ahead``: the unfinished batches a new one
        would wait behind): lower levels' events wait for the engine, and the loop must not
        turn without waiting meanwhile, taking the interpreter from the engine's thread."""
        if not self.prioritised:
            return self.batcher.time_left()
        live = live_level(self.levels)
        gated = ahead.lower > 1 and live is not None
        heads = [
            level.queue[0].arrived
            for level in self.levels
            if level.queue and not (gated and live is not None and level.priority < live.priority)
        ]
        if not heads:
            return math.inf
        return min(heads) + self._max_wait_s - self._clock()

    def engine_wait_s(self, ahead: Ahead) -> float:
        """With levels, events in hand and two or more batches ahead of a lower level's or
        a live one (lower levels wait, a live batch waits to fill): how long the loop may
        wait for the engine to return a batch before any of them is due (at most
        ``max_batch_wait_ms``: a live event read after the wait joins the batch that goes
        then); 0 otherwise."""
        if not self.prioritised or not len(self) or max(ahead) <= 1:
            return 0.0
        return max(0.0, min(self.time_left(ahead), self._max_wait_s))

    def take_due(self, engine_idle: bool, ahead: Ahead = NOTHING_AHEAD) -> Batch | None:
        """The next batch once due (full, or waited ``max_batch_wait_ms``), or at once
        when the engine has nothing to do; ``ahead``: the unfinished batches a new one
        would wait behind (with levels, a batch of lower levels alone waits for at most
        one, and a live batch goes at once behind at most one)."""
        if not self.prioritised:
            if self.batcher.is_due() or (engine_idle and len(self.batcher) > 0):
                return self.batcher.take()
            return None
        return self._compose(engine_idle, ahead)

    def _compose(self, engine_idle: bool, ahead: Ahead) -> Batch | None:
        now = self._clock()
        live = live_level(self.levels)
        if live is None:
            return None
        counts = {level.priority: level.advance() for level in self.levels}
        hungry = starved(self.levels, live.priority, self._min_share)
        take = allocate(counts, live.priority, self._batch_messages, self._lower_batch, hungry)
        taken = sum(take.values())
        if not taken:
            return None
        has_live = take[live.priority] > 0
        if not has_live and ahead.lower > 1 and not hungry:
            return None  # a live event must not queue behind more than this one
        full = self._batch_messages if has_live else self._lower_batch
        oldest = min(level.queue[0].arrived for level in self.levels if take[level.priority])
        due = (
            taken >= full
            or engine_idle
            or hungry
            or now - oldest >= self._max_wait_s
            or (has_live and ahead.live <= 1)
        )
        if not due:
            return None
        items: list[Item] = []
        for level in self.levels:
            items += level.pop(take[level.priority])
            level.recent = level.recent * SHARE_DECAY + take[level.priority]
        return Batch(items)

    def remaining(self, deadline: Callable[[], float]) -> Iterator[Batch]:
        """Shutdown: every queued event in batches, highest level first, each tokenizing
        waited for up to the time ``deadline()`` leaves; stops early at the deadline."""
        self.preparer.flush(everything=True)
        while len(self):
            for level in self.levels:
                for waiting in level.queue:
                    if ready(waiting, deadline()) is None:
                        break
            for level in self.levels:
                while level.queue and level.queue[0].prepared is None:
                    if self.batcher.is_full():
                        break
                    self.batcher.add(level.queue.popleft().item)
                level.ready = 0
            if not len(self.batcher):
                return
            yield self.batcher.take()

    def drop(self, partitions: set[TopicPartition]) -> int:
        """Forget the events of these partitions; how many there were."""
        return (
            self.batcher.drop(partitions)
            + sum(level.drop(partitions) for level in self.levels)
            + self.registry_hold.drop(partitions)
        )

    def clear(self) -> None:
        self.registry_hold.clear()
        for level in self.levels:
            level.clear()
        self.batcher.take()
