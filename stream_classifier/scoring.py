"""The engine stage: the thread that owns the model and scores micro-batches in order.

The service hands each micro-batch's requests to a :class:`Scorer` and gets a future of
one :data:`Outcome` per request: its scores, or why the engine could not score it. When
the engine raises on a batch, the batch is split down to the requests it raises on (a
poison event), which become dead letters while the rest are scored; an
:class:`~stream_classifier.engine.base.EngineError` (the device itself failed) still stops
the service, since dead-lettering every event would not be isolating anything.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Protocol

from stream_classifier.engine.base import Engine, EngineError, Scores
from stream_classifier.messages import ClassifyRequest
from stream_classifier.metrics import Metrics

#: What the engine stage returns per request: its scores, or why scoring it failed.
Outcome = Scores | str


class Scorer(Protocol):
    def submit(self, requests: list[ClassifyRequest]) -> Future[list[Outcome]]: ...
    def shutdown(self) -> None: ...


def score_isolating(engine: Engine, requests: list[ClassifyRequest]) -> list[Outcome]:
    """Score; when the engine raises, split down to the requests it raises on."""
    try:
        return list(engine.classify([request.prepared for request in requests]))
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - isolated below, reported per event
        if len(requests) == 1:
            return [f"{type(exc).__name__}: {exc}"]
    half = len(requests) // 2
    return score_isolating(engine, requests[:half]) + score_isolating(engine, requests[half:])


class ThreadScorer:
    """One worker (a thread unless another executor is given), one batch at a time."""

    def __init__(self, engine: Engine, metrics: Metrics, executor: Executor | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="engine")

    def submit(self, requests: list[ClassifyRequest]) -> Future[list[Outcome]]:
        return self._executor.submit(self.score, requests)

    def score(self, requests: list[ClassifyRequest]) -> list[Outcome]:
        if not requests:
            return []
        started = time.monotonic()
        outcomes = score_isolating(self.engine, requests)
        self._record_batch(requests, time.monotonic() - started)
        return outcomes

    def _record_batch(self, requests: list[ClassifyRequest], seconds: float) -> None:
        self.metrics.batch_messages.observe(len(requests))
        self.metrics.batch_pairs.observe(sum(len(r.labels) for r in requests))
        self.metrics.batch_tokens.observe(sum(r.prepared.tokens for r in requests))
        self.metrics.engine_seconds.observe(seconds)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
