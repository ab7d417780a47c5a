"""The engine stage: the thread that owns the model and scores micro-batches.

The service hands each micro-batch's requests to a :class:`Scorer` and gets a future of
one :data:`Outcome` per request: its scores, or why the engine could not score it. When
the engine raises on a batch, the batch is split down to the requests it raises on (a
poison event), which become dead letters while the rest are scored; an
:class:`~stream_classifier.engine.base.EngineError` (the device itself failed) still stops
the service, since dead-lettering every event would not be isolating anything.

Two scorers: :class:`ThreadScorer` runs ``engine.classify`` one batch at a time;
:class:`PipelinedScorer` keeps two batches on the device through ``classify_async`` (the
next one is built and uploaded while the current one computes). :func:`make_scorer` picks
the pipelined one for an engine on a GPU that has ``classify_async``, and, one piece deep,
for such an engine on a CPU with topics of more than one priority. With levels the
pipelined one takes lower levels' batches in pieces (:class:`Pieces`) that a higher
level's batch overtakes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
    #: A higher level's batch is launched before lower levels' pieces not yet launched.
    overtakes: bool

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

    overtakes = False

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


def make_scorer(
    engine: Engine, metrics: Metrics, capabilities: Capabilities, pieces: Pieces | None = None
) -> Scorer:
    """A :class:`PipelinedScorer` for a pipelined engine on a GPU, else a
    :class:`ThreadScorer`. ``pieces``: with topics of more than one priority, how the
    pipelined stage splits the lower levels' batches so that a live batch overtakes them.

    On a CPU ``classify_async`` computes everything before it returns, so there is nothing
    to overlap, and with one priority level the CPU keeps the one-batch-at-a-time stage.
    With levels it takes the pipelined stage one piece deep: each piece is computed on the
    engine thread, and a live batch submitted meanwhile is computed next, before the
    pieces left, instead of after the whole bulk batches queued before it."""
    if capabilities.pipelined and (capabilities.cuda or pieces is not None):
        depth = 2 if capabilities.cuda else 1
        return PipelinedScorer(cast(AsyncEngine, engine), metrics, depth, pieces)
    return ThreadScorer(engine, metrics)


@dataclass(frozen=True)
class Pieces:
    """Overtaking on the device, for topics of more than one priority.

    A batch whose topics are all below ``top`` goes to the device in pieces of at most
    ``tokens`` tokens each, launched one at a time like batches; a batch of a higher
    level submitted meanwhile is launched before the pieces left. So a live event waits
    for the pieces already on the device (at most ``depth``), not for whole bulk batches.
    """

    top: int
    tokens: int

    def split(self, requests: list[ClassifyRequest]) -> list[list[int]]:
        """The positions of ``requests`` in pieces: one piece, in order, when of the top
        level; below it, widest first and cut at ``tokens``. Sorted, a piece's pairs have
        similar widths, so that a CPU's padded passes over it are few and full, rather than
        one event's pairs each (a pass has a fixed cost)."""
        if priority_of(requests) >= self.top:
            return [list(range(len(requests)))]
        widest_first = sorted(range(len(requests)), key=lambda i: -width(requests[i]))
        return cut_at([request_tokens(r) for r in requests], widest_first, self.tokens)


def cut_at(costs: Sequence[int], order: Iterable[int], tokens: int) -> list[list[int]]:
    """Positions taken in ``order``, cut into pieces of at most ``tokens`` (``costs[i]``
    each; one position over it alone is a piece of its own)."""
    pieces: list[list[int]] = [[]]
    size = 0
    for position in order:
        cost = costs[position]
        if pieces[-1] and size + cost > tokens:
            pieces.append([])
            size = 0
        pieces[-1].append(position)
        size += cost
    return pieces


def priority_of(requests: Sequence[ClassifyRequest]) -> int:
    """A batch's level: its highest topic priority (a batch holds one level, or lower
    levels only)."""
    return max((r.topic.priority for r in requests), default=0)


def width(request: ClassifyRequest) -> float:
    """A request's tokens per pair (0: not prepared)."""
    prepared = request.prepared
    return prepared.tokens / max(1, len(prepared.labels)) if prepared is not None else 0.0


def request_tokens(request: ClassifyRequest) -> int:
    """What one request puts through the model: its pairs' tokens and its shadow's."""
    own = request.prepared.tokens if request.prepared is not None else 0
    shadow = request.shadow
    extra = shadow.prepared.tokens if shadow is not None and shadow.prepared else 0
    return int(own + extra)


@dataclass(eq=False)
class _Job:
    """One submitted micro-batch, from submission until its future is resolved."""

    requests: list[ClassifyRequest]
    future: Future[list[Outcome]]
    priority: int = 0
    #: Each piece's outcomes, as they come back (None: not yet).
    parts: list[list[Outcome] | None] = field(default_factory=list)
    #: The position in ``requests`` of each outcome in ``parts``, read piece by piece.
    order: list[int] = field(default_factory=list)
    #: Time the job's pieces had the device to themselves (``engine_seconds``).
    seconds: float = 0.0
    launched: bool = False
    done: bool = False


@dataclass(eq=False)
class _Piece:
    """A job's requests (all of them, or one consecutive piece), as launched."""

    job: _Job
    index: int
    requests: list[ClassifyRequest]
    started: float = 0.0


@dataclass(eq=False)
class _Back:
    """The waiter's report: a launched piece's scores (or why ``result()`` raised)."""

    piece: _Piece
    scores: list[Scores] | None
    error: BaseException | None
    at: float


#: What the engine thread reads: a new batch, a finished piece, or None (shut down).
_Message = _Job | _Back | None


class _Waiting:
    """Pieces not on the device yet: the highest priority first, then in submission order."""

    def __init__(self) -> None:
        self._levels: dict[int, deque[_Piece]] = {}

    def __bool__(self) -> bool:
        return any(self._levels.values())

    def add(self, pieces: list[_Piece]) -> None:
        for piece in pieces:
            self._levels.setdefault(piece.job.priority, deque()).append(piece)

    def pop(self) -> _Piece:
        return self._levels[max(p for p, queued in self._levels.items() if queued)].popleft()

    def drop_unlaunched(self) -> list[_Job]:
        """Take out the pieces of jobs none of whose pieces was launched; those jobs."""
        dropped: dict[int, _Job] = {}
        for queued in self._levels.values():
            kept = [p for p in queued if p.job.launched]
            dropped.update((id(p.job), p.job) for p in queued if not p.job.launched)
            queued.clear()
            queued.extend(kept)
        return list(dropped.values())


class PipelinedScorer:
    """One engine thread that keeps ``depth`` micro-batches (or pieces) on the device.

    The engine thread alone calls the engine: it queues the next batch with
    ``classify_async`` while the one before it is still computing, so the device goes from
    one to the next without waiting for the host (the next batch's tensors are built and
    uploaded meanwhile). A second thread, the waiter, waits on each queued batch's
    ``result()`` (the device synchronisation and the scores' arithmetic) and resolves its
    future at once: the engine thread may be inside a launch that waits for room in the
    device's queue for a good part of a batch's time, and the service writes (and hands
    the next batch over) as soon as a future is resolved. With one priority level batches
    come back, and their futures resolve, in submission order; with ``pieces`` a higher
    level's batch overtakes the pieces of lower ones not yet launched, and its future
    resolves first.

    Failures are handled like :class:`ThreadScorer`'s: when ``classify_async`` or
    ``result()`` raises, that piece is scored again by :func:`score_isolating` on the
    engine thread (poison requests become failed outcomes); an ``EngineError`` fails the
    batch's future. ``engine_seconds`` is the time the batch had the device to itself:
    for each piece, from when it was queued, or when the piece before it came back if
    later, until its scores are back; ``engine_idle_seconds`` the time with nothing on
    the device and nothing to launch.
    """

    def __init__(
        self, engine: AsyncEngine, metrics: Metrics, depth: int = 2, pieces: Pieces | None = None
    ) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.engine = engine
        self.metrics = metrics
        self.depth = depth
        self.pieces = pieces
        self.overtakes = pieces is not None
        self._inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._launched: queue.SimpleQueue[tuple[_Piece, PendingResult] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
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
            self._inbox.put(_Job(list(requests), future, priority_of(requests)))
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
        waiting = _Waiting()  # not on the device yet
        on_device = 0
        stopping = False
        while not stopping or on_device or waiting:
            message = self._next_message(idle=not waiting and not on_device and not stopping)
            if message is None:
                stopping = True
                for job in waiting.drop_unlaunched():
                    job.future.cancel()
                    job.done = True
            elif isinstance(message, _Job):
                waiting.add(self._split(message))
            else:
                on_device -= 1
                self._came_back(message)
            while waiting and on_device < self.depth:
                if self._launch(waiting.pop(), hold_tail=on_device > 0):
                    on_device += 1
            if on_device <= 1:
                self._flush()  # nothing ahead of the batch that holds a pass back
        self._launched.put(None)

    def _split(self, job: _Job) -> list[_Piece]:
        everything = [list(range(len(job.requests)))]
        parts = everything if self.pieces is None else self.pieces.split(job.requests)
        job.parts = [None] * len(parts)
        job.order = [position for part in parts for position in part]
        return [
            _Piece(job, index, [job.requests[position] for position in part])
            for index, part in enumerate(parts)
        ]

    def _next_message(self, idle: bool) -> _Message:
        """The inbox's next message, waited for unless there is work to launch;
        ``idle`` (nothing on the device, nothing to launch): the time until it comes is
        the engine's idle time."""
        if not idle:
            return self._inbox.get()
        started = time.monotonic()
        message = self._inbox.get()
        self.metrics.engine_idle_seconds.inc(time.monotonic() - started)
        return message

    def _launch(self, piece: _Piece, hold_tail: bool) -> bool:
        """Queue the piece on the device (True), or settle it here and now (False).

        ``hold_tail`` (a piece is still on the device ahead of this one): its last, partial
        pass may wait for the next piece's first pairs, so that every pass is full while
        the input is saturated. The next launch queues it, or :meth:`_flush` once the piece
        ahead has come back (the device still has this piece's other passes to run). Only
        the newest piece ever holds a pass back, and the pieces ahead of it never wait
        for it.
        """
        job = piece.job
        if not job.launched:
            job.launched = True
            if not job.future.set_running_or_notify_cancel():
                job.done = True  # cancelled before it started
        if job.done:
            return False  # cancelled, or an earlier piece failed the batch
        piece.started = time.monotonic()
        if not piece.requests:
            self._piece_done(piece, [])
            return False
        try:
            prepared = batch_of(piece.requests)
            launched = self.engine.classify_async(expand(prepared), hold_tail)
            pending = GatheredResult(prepared, launched)
        except EngineError as exc:
            self._failed(job, exc)
            return False
        except Exception:  # noqa: BLE001 - scored again request by request below
            self._isolate(piece)
            return False
        except BaseException as exc:  # noqa: BLE001 - never leave a future unresolved
            self._failed(job, exc)
            return False
        self._launched.put((piece, pending))
        return True

    def _flush(self) -> None:
        """Queue a pass the engine held back; a failure there fails that batch's result."""
        try:
            self.engine.flush()
        except Exception:  # noqa: BLE001 - reported through the held batch's result()
            log.debug("a held-back pass failed", exc_info=True)

    def _came_back(self, back: _Back) -> None:
        """A launched piece is off the device; the waiter settled it unless it failed."""
        if back.error is None:
            return
        if isinstance(back.error, EngineError):
            self._failed(back.piece.job, back.error)
        else:
            self._isolate(back.piece)

    def _isolate(self, piece: _Piece) -> None:
        try:
            outcomes = score_isolating(self.engine, piece.requests)
        except BaseException as exc:  # noqa: BLE001 - an EngineError, or worse: to the future
            self._failed(piece.job, exc)
        else:
            self._piece_done(piece, outcomes, time.monotonic() - piece.started)

    # -- resolving (either thread) ---------------------------------------------------------

    def _piece_done(self, piece: _Piece, outcomes: list[Outcome], seconds: float = 0.0) -> None:
        """One piece's outcomes; the last one back resolves the batch's future."""
        job = piece.job
        with self._resolving:
            if job.done:
                return
            job.parts[piece.index] = outcomes
            job.seconds += seconds
            if any(part is None for part in job.parts):
                return
            job.done = True
        if job.requests:
            self._record_batch(job.requests, job.seconds)
        back = (outcome for part in job.parts if part is not None for outcome in part)
        placed = sorted(zip(job.order, back, strict=True), key=lambda pair: pair[0])
        job.future.set_result([outcome for _, outcome in placed])

    def _failed(self, job: _Job, error: BaseException) -> None:
        with self._resolving:
            if job.done:
                return
            job.done = True
        job.future.set_exception(error)

    def _record_batch(self, requests: list[ClassifyRequest], seconds: float) -> None:
        record_batch(self.metrics, requests, seconds)

    # -- the waiter ------------------------------------------------------------------------

    def _run_waiter(self) -> None:
        while (launched := self._launched.get()) is not None:
            piece, pending = launched
            try:
                scores, error = pending.result(), None
            except BaseException as exc:  # noqa: BLE001 - reported to the engine thread
                scores, error = None, exc
            back = _Back(piece, scores, error, time.monotonic())
            if error is None:
                self._scored(back)
            self._inbox.put(back)

    def _scored(self, back: _Back) -> None:
        piece = back.piece
        started = max(piece.started, self._last_back)
        self._last_back = back.at
        assert back.scores is not None
        self._piece_done(piece, list(split(piece.requests, back.scores)), back.at - started)
