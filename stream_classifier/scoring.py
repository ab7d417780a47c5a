"""The engine stage: the thread that owns the model and scores micro-batches in order.

The service hands each micro-batch's requests to a :class:`Scorer` and gets a future of
one :data:`Outcome` per request: its scores, or why the engine could not score it. When
the engine raises on a batch, the batch is split down to the requests it raises on (a
poison event), which become dead letters while the rest are scored; an
:class:`~stream_classifier.engine.base.EngineError` (the device itself failed) still stops
the service, since dead-lettering every event would not be isolating anything.

Two scorers: :class:`ThreadScorer` runs ``engine.classify`` one batch at a time;
:class:`PipelinedScorer` keeps two batches on the device through ``classify_async`` (the
next one is built and uploaded while the current one computes). :func:`make_scorer` picks
the pipelined one for an engine on a GPU that has ``classify_async``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, cast

from stream_classifier import shadow
from stream_classifier.engine.base import Engine, EngineError, Prepared, Scores
from stream_classifier.engine.capabilities import Capabilities
from stream_classifier.engine.windows import GatheredResult, expand, gather, window_count
from stream_classifier.messages import ClassifyRequest
from stream_classifier.metrics import Metrics
from stream_classifier.shadow import batch_of, split

log = logging.getLogger(__name__)

#: What the engine stage returns per request: its scores, or why scoring it failed.
Outcome = Scores | str


class Scorer(Protocol):
    def submit(self, requests: list[ClassifyRequest]) -> Future[list[Outcome]]: ...
    def shutdown(self) -> None: ...


def score_isolating(engine: Engine, requests: list[ClassifyRequest]) -> list[Outcome]:
    """Score; when the engine raises, split down to the requests it raises on. A request
    read in windows is scored as its windows, their scores aggregated (engine/windows.py)."""
    batch = batch_of(requests)
    try:
        return list(split(requests, gather(batch, engine.classify(expand(batch)))))
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - isolated below, reported per event
        if len(requests) == 1:
            return [f"{type(exc).__name__}: {exc}"]
    half = len(requests) // 2
    return score_isolating(engine, requests[:half]) + score_isolating(engine, requests[half:])


def record_batch(metrics: Metrics, requests: list[ClassifyRequest], seconds: float) -> None:
    """The batch metrics of one scored micro-batch."""
    metrics.batch_messages.observe(len(requests))
    live = sum(len(r.labels) * window_count(r.prepared) for r in requests)
    shadows = shadow.pairs(requests)
    metrics.batch_pairs.observe(live + sum(shadows.values()))
    for topic, pairs in shadows.items():
        metrics.shadow_pairs.labels(topic).inc(pairs)
    tokens = sum(r.prepared.tokens for r in requests) + shadow.tokens(requests)
    metrics.batch_tokens.observe(tokens)
    metrics.engine_seconds.observe(seconds)


class ThreadScorer:
    """One worker (a thread unless another executor is given), one batch at a time."""

    def __init__(self, engine: Engine, metrics: Metrics, executor: Executor | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._last_done = time.monotonic()

    def submit(self, requests: list[ClassifyRequest]) -> Future[list[Outcome]]:
        return self._executor.submit(self.score, requests)

    def score(self, requests: list[ClassifyRequest]) -> list[Outcome]:
        if not requests:
            return []
        started = time.monotonic()
        self.metrics.engine_idle_seconds.inc(max(0.0, started - self._last_done))
        try:
            outcomes = score_isolating(self.engine, requests)
        finally:
            self._last_done = time.monotonic()
        self._record_batch(requests, self._last_done - started)
        return outcomes

    def _record_batch(self, requests: list[ClassifyRequest], seconds: float) -> None:
        record_batch(self.metrics, requests, seconds)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class PendingResult(Protocol):
    """A micro-batch queued on the device; ``result()`` blocks until its scores are back."""

    def result(self) -> list[Scores]: ...


class AsyncEngine(Engine, Protocol):
    """An engine that queues a micro-batch and returns before the device is done with it.

    With ``hold_tail`` it may keep the batch's last, partial forward pass back to run with
    the next batch's first pairs; ``flush()`` queues what it kept.
    """

    def classify_async(
        self, batch: Sequence[Prepared], hold_tail: bool = False
    ) -> PendingResult: ...
    def flush(self) -> None: ...


def make_scorer(engine: Engine, metrics: Metrics, capabilities: Capabilities) -> Scorer:
    """A :class:`PipelinedScorer` for a pipelined engine on a GPU, else a
    :class:`ThreadScorer`. On a CPU ``classify_async`` computes everything before it
    returns, so there is nothing to overlap: the CPU keeps the one-batch-at-a-time stage."""
    if capabilities.cuda and capabilities.pipelined:
        return PipelinedScorer(cast(AsyncEngine, engine), metrics)
    return ThreadScorer(engine, metrics)


@dataclass(eq=False)
class _Job:
    """One submitted micro-batch, from submission until its future is resolved."""

    requests: list[ClassifyRequest]
    future: Future[list[Outcome]]
    started: float = 0.0
    outcomes: list[Outcome] | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass(eq=False)
class _Back:
    """The waiter's report: a launched batch's scores (or why ``result()`` raised)."""

    job: _Job
    scores: list[Scores] | None
    error: BaseException | None
    at: float


#: What the engine thread reads: a new batch, a finished one, or None (shut down).
_Message = _Job | _Back | None


class PipelinedScorer:
    """One engine thread that keeps ``depth`` micro-batches on the device.

    The engine thread alone calls the engine: it queues the next batch with
    ``classify_async`` while the one before it is still computing, so the device goes from
    one to the next without waiting for the host (the next batch's tensors are built and
    uploaded meanwhile). A second thread, the waiter, waits on each queued batch's
    ``result()`` (the device synchronisation and the scores' arithmetic) and resolves its
    future at once: the engine thread may be inside a launch that waits for room in the
    device's queue for a good part of a batch's time, and the service writes (and hands
    the next batch over) as soon as a future is resolved. Futures are resolved in
    submission order, by whichever thread finishes the oldest one.

    Failures are handled like :class:`ThreadScorer`'s: when ``classify_async`` or
    ``result()`` raises, that batch is scored again by :func:`score_isolating` on the engine
    thread (poison requests become failed outcomes); an ``EngineError`` fails the batch's
    future. ``engine_seconds`` is the time the batch had the device to itself: from when it
    was queued, or when the batch before it came back if later, until its scores are back;
    ``engine_idle_seconds`` the time with no batch on the device and none to launch.
    """

    def __init__(self, engine: AsyncEngine, metrics: Metrics, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.engine = engine
        self.metrics = metrics
        self.depth = depth
        self._inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._launched: queue.SimpleQueue[tuple[_Job, PendingResult] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        #: Submitted and not yet resolved, in submission order (under ``_resolving``).
        self._unresolved: deque[_Job] = deque()
        self._resolving = threading.Lock()
        self._last_back = 0.0  # the waiter's alone
        self._engine_thread = threading.Thread(target=self._run_engine, name="engine", daemon=True)
        self._waiter = threading.Thread(target=self._run_waiter, name="engine-wait", daemon=True)
        self._engine_thread.start()
        self._waiter.start()

    def submit(self, requests: list[ClassifyRequest]) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit a batch after shutdown")
            self._inbox.put(_Job(list(requests), future))
        return future

    def shutdown(self) -> None:
        """Finish the batches on the device, cancel those not started, stop both threads."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(None)  # after every submitted batch
        self._engine_thread.join()
        self._waiter.join()

    # -- the engine thread -----------------------------------------------------------------

    def _run_engine(self) -> None:
        waiting: deque[_Job] = deque()  # not on the device yet
        on_device = 0
        stopping = False
        while not stopping or on_device:
            message = self._next_message(idle=not waiting and not on_device and not stopping)
            if message is None:
                stopping = True
                for job in waiting:
                    job.future.cancel()
                    job.done = True
                waiting.clear()
            elif isinstance(message, _Job):
                with self._resolving:
                    self._unresolved.append(message)
                waiting.append(message)
            else:
                on_device -= 1
                self._came_back(message)
            while waiting and on_device < self.depth:
                if self._launch(waiting.popleft(), hold_tail=on_device > 0):
                    on_device += 1
            if on_device <= 1:
                self._flush()  # nothing ahead of the batch that holds a pass back
            self._settle()
        self._launched.put(None)

    def _next_message(self, idle: bool) -> _Message:
        """The inbox's next message; ``idle`` (nothing on the device, nothing to launch):
        the time until it comes is the engine's idle time."""
        if not idle:
            return self._inbox.get()
        started = time.monotonic()
        message = self._inbox.get()
        self.metrics.engine_idle_seconds.inc(time.monotonic() - started)
        return message

    def _launch(self, job: _Job, hold_tail: bool) -> bool:
        """Queue the batch on the device (True), or settle it here and now (False).

        ``hold_tail`` (a batch is still on the device ahead of this one): its last, partial
        pass may wait for the next batch's first pairs, so that every pass is full while
        the input is saturated. The next launch queues it, or :meth:`_flush` once the batch
        ahead has come back (the device still has this batch's other passes to run). Only
        the newest batch ever holds a pass back, and the batches ahead of it never wait
        for it.
        """
        job.done = not job.future.set_running_or_notify_cancel()
        job.started = time.monotonic()
        if job.done or not job.requests:
            job.outcomes, job.done = [], True
            return False
        try:
            prepared = batch_of(job.requests)
            launched = self.engine.classify_async(expand(prepared), hold_tail)
            pending = GatheredResult(prepared, launched)
        except EngineError as exc:
            job.error, job.done = exc, True
            return False
        except Exception:  # noqa: BLE001 - scored again request by request below
            self._isolate(job)
            return False
        except BaseException as exc:  # noqa: BLE001 - never leave a future unresolved
            job.error, job.done = exc, True
            return False
        self._launched.put((job, pending))
        return True

    def _flush(self) -> None:
        """Queue a pass the engine held back; a failure there fails that batch's result."""
        try:
            self.engine.flush()
        except Exception:  # noqa: BLE001 - reported through the held batch's result()
            log.debug("a held-back pass failed", exc_info=True)

    def _came_back(self, back: _Back) -> None:
        """A launched batch is off the device; the waiter settled it unless it failed."""
        job = back.job
        if back.error is None:
            return
        if isinstance(back.error, EngineError):
            job.error, job.done = back.error, True
        else:
            self._isolate(job)

    def _isolate(self, job: _Job) -> None:
        try:
            job.outcomes = score_isolating(self.engine, job.requests)
        except BaseException as exc:  # noqa: BLE001 - an EngineError, or worse: to the future
            job.error = exc
        else:
            self._record_batch(job.requests, time.monotonic() - job.started)
        job.done = True

    def _settle(self) -> None:
        """Resolve the futures of the finished jobs at the head, in submission order."""
        with self._resolving:
            while self._unresolved and self._unresolved[0].done:
                self._resolve(self._unresolved.popleft())

    def _resolve(self, job: _Job) -> None:
        if job.future.cancelled():
            return
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            assert job.outcomes is not None
            job.future.set_result(job.outcomes)

    def _record_batch(self, requests: list[ClassifyRequest], seconds: float) -> None:
        record_batch(self.metrics, requests, seconds)

    # -- the waiter ------------------------------------------------------------------------

    def _run_waiter(self) -> None:
        while (launched := self._launched.get()) is not None:
            job, pending = launched
            try:
                scores, error = pending.result(), None
            except BaseException as exc:  # noqa: BLE001 - reported to the engine thread
                scores, error = None, exc
            back = _Back(job, scores, error, time.monotonic())
            if error is None:
                self._scored(back)
            self._inbox.put(back)

    def _scored(self, back: _Back) -> None:
        job = back.job
        started = max(job.started, self._last_back)
        self._last_back = back.at
        assert back.scores is not None
        job.outcomes = list(split(job.requests, back.scores))
        self._record_batch(job.requests, back.at - started)
        job.done = True
        self._settle()
