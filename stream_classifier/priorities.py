"""Priority levels: a live topic's events ahead of a bulk topic's backlog, no level starved.

A topic's ``priority`` (0-9, higher first) puts its events in that level's queue. With one
level (the default) the intake batches events in the order they were read, as it always
did. With several, the level that is *live* is the highest one this instance reads from
(it owns partitions of one of its topics, or holds events of it), and every micro-batch
is composed when the engine has room for it (:func:`allocate`):

- the live level's ready events, up to ``max_batch_messages``, and nothing else: a
  batch of live events is as quick as it would be alone;
- when the live level has none ready, lower levels' events, highest first, at most
  ``priority_batch_messages`` of them, and only while at most one batch is unfinished:
  a live event waits behind at most about two such small batches, not behind
  ``max_pending_batches`` full ones. An instance that owns no partition of a higher
  level batches its lower ones at full size;
- no starvation: a lower level with events ready whose share of the events batched
  lately (:data:`SHARE_DECAY`) is under ``priority_min_share`` gets the next batch, even
  if the live level has events ready.

While levels compete, each level's partitions are paused once a batch's worth of its
events is in hand and resumed at half of it. Pausing also drops what librdkafka fetched
ahead for them, which would otherwise sit in the consumer's one queue in front of the
other levels' records (a bulk backlog in front of live events, or a live flood in front
of the bulk records that the share promises).

A partition belongs to one topic, hence to one level: each batch still takes a prefix of
each partition's events in hand, in order, so a batch's offsets commit exactly what it
wrote.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple

from stream_classifier.batcher import Item, topic_partition
from stream_classifier.engine.base import Prepared
from stream_classifier.messages import ClassifyRequest, Rejection
from stream_classifier.offsets import TopicPartition

#: What is left of a level's count of batched events after each batch: the share that
#: ``priority_min_share`` promises is measured over roughly the last ten batches.
SHARE_DECAY = 0.9


class Ahead(NamedTuple):
    """Batches the engine stage has not returned that a new batch would wait behind: one
    of a lower level behind ``lower`` of them, one of the live level behind ``live``.
    Where the stage overtakes (a higher level's batch launches before lower levels'
    pieces not yet launched), each counts its own kind; otherwise both count all."""

    lower: int = 0
    live: int = 0


@dataclass
class Waiting:
    """A consumed event in hand; ``prepared`` until its tokenizing is done."""

    item: Item
    prepared: Future[Prepared] | None = None
    #: When it was read (the service's clock): a batch is due this long after its oldest.
    arrived: float = 0.0
    #: The tokenizing of what its shadow policy scores itself, if anything.
    shadow: Future[Prepared] | None = None


class Level:
    """One priority level's events in hand, in the order they were read."""

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.queue: deque[Waiting] = deque()
        #: How many at the head are tokenized (a prefix: a batch takes only those).
        self.ready = 0
        #: This instance owns partitions of one of the level's topics.
        self.owned = False
        #: Paused as a lower level (hysteresis: held from a batch, resumed at half).
        self.held = False
        #: Events batched lately, decayed by :data:`SHARE_DECAY` each batch.
        self.recent = 0.0

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, waiting: Waiting) -> None:
        self.queue.append(waiting)

    def advance(self) -> int:
        """How many at the head are ready now (resolving finished tokenizing on the way)."""
        while self.ready < len(self.queue) and ready(self.queue[self.ready]) is not None:
            self.ready += 1
        return self.ready

    def pop(self, count: int) -> list[Item]:
        assert count <= self.ready, "only tokenized events leave a level"
        self.ready -= count
        return [self.queue.popleft().item for _ in range(count)]

    def drop(self, partitions: set[TopicPartition]) -> int:
        kept = [w for w in self.queue if topic_partition(w.item) not in partitions]
        dropped = len(self.queue) - len(kept)
        self.queue = deque(kept)
        self.ready = 0
        return dropped

    def clear(self) -> None:
        self.queue.clear()
        self.ready = 0


def live_level(levels: Iterable[Level]) -> Level | None:
    """The highest level this instance owns partitions of, or holds events of."""
    for level in levels:  # highest first
        if level.owned or level.queue:
            return level
    return None


def starved(levels: Iterable[Level], live: int, min_share: float) -> bool:
    """Has a lower level with events ready had less than ``min_share`` of the events
    batched lately (each level's count decays by :data:`SHARE_DECAY` a batch)?"""
    levels = list(levels)
    total = sum(level.recent for level in levels)
    return any(
        level.priority < live and level.ready > 0 and level.recent < min_share * total
        for level in levels
    )


def allocate(
    ready: dict[int, int], live: int, full: int, lower_cap: int, hungry: bool
) -> dict[int, int]:
    """How many ready events of each level (highest first in ``ready``) the next batch
    takes: the live level's, up to ``full``, unless it has none or a lower level is
    ``hungry`` (starved); else lower levels', highest first, up to ``lower_cap``. A batch
    holding live events holds nothing else, so that it is as quick as one alone."""
    take = dict.fromkeys(ready, 0)
    if ready.get(live, 0) > 0 and not hungry:
        take[live] = min(ready[live], full)
        return take
    room = lower_cap
    for p, count in ready.items():
        if p < live:
            take[p] = min(count, room)
            room -= take[p]
    if not any(take.values()) and ready.get(live, 0) > 0:
        take[live] = min(ready[live], full)
    return take


def held_levels(
    levels: Iterable[Level], live: Level | None, batch: int, engine_full: bool
) -> set[int]:
    """The levels whose partitions to pause now. While levels compete (this instance
    owns, or holds events of, a level below the live one), each is paused once a batch
    of its events is in hand and resumed when half of that is left: what librdkafka
    fetched ahead for a paused level is dropped, so the others' records come through
    its one queue. Otherwise as with one level: once the engine is full and a batch is
    in hand."""
    levels = list(levels)
    competing = live is not None and any(
        level.priority < live.priority and (level.owned or level.queue) for level in levels
    )
    held: set[int] = set()
    for level in levels:
        if competing:
            level.held = len(level) >= (batch // 2 if level.held else batch)
        else:
            level.held = engine_full and len(level) >= batch
        if level.held:
            held.add(level.priority)
    return held


def ready(waiting: Waiting, timeout: float | None = 0.0) -> Item | None:
    """The event once tokenized (None while not yet, within ``timeout``); a failed
    tokenizing makes it a rejection."""
    future = waiting.prepared
    if future is None:
        return waiting.item
    if waiting.shadow is not None and not _settled(waiting.shadow, timeout):
        return None
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
        if waiting.shadow is not None:
            _shadow_prepared(waiting.item, waiting.shadow)
    waiting.prepared = waiting.shadow = None
    return waiting.item


def _settled(future: Future[Prepared], timeout: float | None) -> bool:
    try:
        future.exception(timeout)
    except TimeoutError:
        return False
    return True


def _shadow_prepared(request: ClassifyRequest, future: Future[Prepared]) -> None:
    """The shadow's own tokenizing, done: a failure leaves the event without a shadow."""
    try:
        request.shadow.prepared = future.result(0)
    except Exception as exc:  # noqa: BLE001 - the shadow must never touch the live side
        request.shadow.failed = f"{type(exc).__name__}: {exc}"
