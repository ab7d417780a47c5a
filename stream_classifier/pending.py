"""Micro-batches handed to the engine, in submission order, until they are written."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

from stream_classifier.batcher import Batch
from stream_classifier.offsets import TopicPartition
from stream_classifier.scoring import Outcome, Scorer


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


class PendingBatches:
    """At most ``limit`` batches wait for the engine; their results are taken in order."""

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

    def unfinished(self) -> int:
        """Batches the engine has not returned yet."""
        return sum(1 for s in self._queue if not s.future.done())

    def submit(self, batch: Batch, epochs: dict[TopicPartition, int]) -> None:
        future = self.scorer.submit(batch.requests)
        future.add_done_callback(self._engine_returned)
        self._queue.append(Submitted(batch, future, self._generation, epochs, self._clock()))

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

    def wait_for_head(self, timeout: float) -> bool:
        """With the engine full and its oldest batch unfinished, wait for that batch up
        to ``timeout``; False (at once) otherwise."""
        if self.has_room():
            return False
        head = self._queue[0].future
        if head.done():
            return False
        with contextlib.suppress(TimeoutError, CancelledError):
            head.exception(timeout=timeout)
        return True

    def take_finished(
        self, wait: bool, writable: Callable[[], bool], deadline: float | None = None
    ) -> tuple[Submitted, list[Outcome]] | None:
        """The oldest batch's results once it is done and ``writable()``; discarded
        batches are dropped on the way. ``wait``: wait for it (until ``deadline``, then
        TimeoutError). An engine error propagates from here."""
        while self._queue:
            head = self._queue[0]
            if not head.future.done():
                if not wait:
                    return None
                left = None if deadline is None else max(0.0, deadline - self._clock())
                head.future.exception(timeout=left)  # raises TimeoutError at the deadline
            current = head.generation == self._generation
            if current and not writable():
                return None
            self._queue.popleft()
            outcomes = head.future.result()
            if current:
                return head, outcomes
        return None
