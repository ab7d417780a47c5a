"""Priority levels: a live topic's events ahead of a bulk topic's backlog, no level starved.

A topic's ``priority`` (0-9, higher first) puts its events in that level's queue. With one
level (the default) the intake batches events in the order they were read, as it always
did. With several, the level that is *live* is the highest one this instance reads from
(it owns partitions of one of its topics, or holds events of it), and every micro-batch
is composed when the engine has room for it (:func:`allocate`):

- the live level's ready events first, up to ``max_batch_messages``;
- each lower level with events ready gets at least ``priority_min_share`` of a batch, so
  that a live topic at full rate cannot starve a bulk one;
- lower levels hold at most ``priority_batch_messages`` events of one batch, and a batch
  of lower levels alone is handed to the engine only while at most one batch is
  unfinished: a live event waits behind at most about two such small batches, not
  behind ``max_pending_batches`` full ones. An instance that owns no partition of a
  higher level batches its lower ones at full size.

Lower levels' partitions are paused once a batch's worth of their events is in hand and
resumed at half of it. Pausing also drops what librdkafka fetched ahead for them, which
would otherwise sit in the consumer's one queue in front of the live topic's records.

A partition belongs to one topic, hence to one level: each batch still takes a prefix of
each partition's events in hand, in order, so a batch's offsets commit exactly what it
wrote.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass

from stream_classifier.batcher import Item, topic_partition
from stream_classifier.engine.base import Prepared
from stream_classifier.messages import ClassifyRequest, Rejection
from stream_classifier.offsets import TopicPartition


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


def allocate(
    ready: dict[int, int], live: int, full: int, lower_cap: int, min_share: float
) -> dict[int, int]:
    """How many ready events of each level (highest first in ``ready``) the next batch
    takes: each lower level with events ready its share of ``full`` first (the promise
    against starvation, even beyond ``lower_cap``), then the live level up to ``full``,
    then lower levels, highest first, up to ``lower_cap`` in all."""
    lower = [p for p, n in ready.items() if p < live and n > 0]
    take = dict.fromkeys(ready, 0)
    if lower and min_share > 0:
        share = max(1, math.ceil(min_share * full))
        share = min(share, max(1, full // (len(lower) + 1)))  # the live level keeps room
        for p in lower:
            take[p] = min(ready[p], share)
    room = full - sum(take.values())
    take[live] = min(ready.get(live, 0), max(0, room))
    for p in lower:
        lower_room = lower_cap - sum(take[q] for q in lower)
        room = full - sum(take.values())
        take[p] += max(0, min(ready[p] - take[p], lower_room, room))
    return take


def held_levels(
    levels: Iterable[Level], live: Level | None, batch: int, engine_full: bool
) -> set[int]:
    """The levels whose partitions to pause now: a lower level once a batch of its events
    is in hand (until half of that is left), the live one as with one level (the engine
    full and a batch in hand)."""
    held: set[int] = set()
    for level in levels:
        if live is not None and level.priority < live.priority:
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
