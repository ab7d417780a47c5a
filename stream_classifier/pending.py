"""Micro-batches handed to the engine, until they are written.

A partition's batches are written in the order they were submitted. A batch that shares
no partition with an earlier one still waiting may be written first: with priority levels
(a partition belongs to one level) a live batch that overtook bulk pieces on the device
does not wait for the bulk batch submitted before it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

from stream_classifier.batcher import Batch
from stream_classifier.offsets import TopicPartition
from stream_classifier.priorities import Ahead
from stream_classifier.scoring import Outcome, Scorer, priority_of


@dataclass
class Submitted:
    """A batch with the engine.

    ``generation`` discards it after a rewind; ``epochs`` (each partition's assignment
    epoch at submission) discards the events of a partition released meanwhile, even
    if it was assigned again since: those are read again from the committed offset.
    """

    batch: Batch
    future: Future[list[Outcome]]
    generation: int
    epochs: dict[TopicPartition, int]
    submitted_at: float = 0.0
    #: The batch's level (:func:`priority_of`): the engine stage returns higher ones first.
    priority: int = 0


class PendingBatches:
    """At most ``limit`` batches wait for the engine; their results are taken in order
    within each partition."""

    def __init__(self, scorer: Scorer, limit: int, clock: Callable[[], float]) -> None:
        self.scorer = scorer
        self._limit = limit
        self._clock = clock
        self._queue: deque[Submitted] = deque()
        self._generation = 0
        #: When the engine last returned a batch (its liveness).
        self._returned_at = clock()

    def __len__(self) -> int:
        return len(self._queue)

    def has_room(self) -> bool:
        return len(self._queue) < self._limit

    def ahead(self, live: int | None) -> Ahead:
        """The unfinished batches a new one would wait behind (``live``: the live level,
        None with one level). Where the stage overtakes, a live batch waits for the
        pieces on the device, not for lower levels' batches, so it counts live ones only,
        and a lower level's batch counts the lower ones: two bulk batches can then be in
        the stage, the next one's pieces ready when one ends, so the device does not wait
        for the loop between them."""
        levels = [s.priority for s in self._queue if not s.future.done()]
        if live is None or not self.scorer.overtakes:
            return Ahead(len(levels), len(levels))
        above = sum(1 for priority in levels if priority >= live)
        return Ahead(lower=len(levels) - above, live=above)

    def submit(self, batch: Batch, epochs: dict[TopicPartition, int]) -> None:
        future = self.scorer.submit(batch.requests)
        future.add_done_callback(self._engine_returned)
        self._queue.append(
            Submitted(
                batch,
                future,
                self._generation,
                epochs,
                self._clock(),
                priority_of(batch.requests),
            )
        )

    def _engine_returned(self, _future: Future[list[Outcome]]) -> None:
        self._returned_at = self._clock()  # on the engine thread: one assignment

    def discard(self) -> None:
        """Results of every batch submitted so far are dropped (a rewind reads them again)."""
        self._generation += 1

    def events(self) -> int:
        """Events in batches whose results will be written."""
        return sum(len(s.batch) for s in self._queue if s.generation == self._generation)

    def stalled_s(self) -> float:
        """How long work has waited on the engine with nothing coming back (0: idle).

        A hung kernel or a wedged driver keeps the loop turning (every partition paused),
        so the loop's own liveness cannot see it: this can.
        """
        waiting = [s.submitted_at for s in list(self._queue) if not s.future.done()]
        if not waiting:
            return 0.0
        return max(0.0, self._clock() - max(waiting[0], self._returned_at))

    def wait_for_engine(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the batch the engine stage returns first: the oldest
        of the highest level in it (a live batch overtakes bulk pieces; within a level
        batches come back in order). False (at once) when it has nothing to return."""
        unfinished = [s for s in self._queue if not s.future.done()]
        if not unfinished:
            return False
        first = max(unfinished, key=lambda s: s.priority)  # the oldest among equals
        with contextlib.suppress(TimeoutError, CancelledError):
            first.future.exception(timeout=timeout)
        return True

    def take_finished(
        self, wait: bool, writable: Callable[[], bool], deadline: float | None = None
    ) -> tuple[Submitted, list[Outcome]] | None:
        """The first finished batch that no earlier one holds back (:meth:`_next`), once
        ``writable()``; finished discarded batches are dropped on the way. ``wait``: wait
        for one (until ``deadline``, then TimeoutError). An engine error propagates from
        here."""
        while True:
            self._drop_discarded()
            found = self._next()
            if found is None:
                current = [s for s in self._queue if s.generation == self._generation]
                if not wait or not current:
                    return None
                left = None if deadline is None else max(0.0, deadline - self._clock())
                current[0].future.exception(timeout=left)  # TimeoutError at the deadline
                continue
            if not writable():
                return None
            self._queue.remove(found)
            return found, found.future.result()

    def _drop_discarded(self) -> None:
        for submitted in [s for s in self._queue if s.generation != self._generation]:
            if submitted.future.done():
                self._queue.remove(submitted)

    def _next(self) -> Submitted | None:
        """The oldest finished batch of this generation sharing no partition with an
        earlier one of it not taken yet (whose events come first in those partitions)."""
        earlier: set[TopicPartition] = set()
        for submitted in self._queue:
            if submitted.generation != self._generation:
                continue  # never written: holds nothing back
            partitions = set(submitted.epochs)
            if submitted.future.done() and not partitions & earlier:
                return submitted
            earlier |= partitions
        return None
