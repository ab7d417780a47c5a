"""The prepare stage: tokenizing each event for the engine, off the loop when it can be.

``engine.prepare`` runs once per event, or ``engine.prepare_many`` once per chunk of
events where the engine has it (the NLI engine's tokenizes the whole chunk in one Rust
call that releases the interpreter lock). :class:`InlinePreparer` runs it on the calling
thread (the Kafka thread) at each :meth:`Preparer.flush`; other preparers may run it
elsewhere (worker processes). Futures come back in any order; the service takes events in
their consumed order regardless.

- :class:`InlinePreparer` (the default): on the caller's thread, every event submitted
  since the last ``flush()`` (the service flushes after each ``consume()``) in one chunk,
  so the lock is free while the Rust tokenizer runs and the engine thread launches
  kernels meanwhile; lower priority levels' events a bounded chunk a flush.
- :class:`ProcessPreparer`: a pool of worker processes, each holding the engine's
  tokenizer side (built once per worker from ``engine.preparer_factory()``, no model).
  Events go to the workers in chunks, so the Kafka thread's cost per event is a list
  append and the parent's, one pickled result. A worker that dies (killed, out of memory)
  is replaced and its events retried; an event that kills a worker on its own again and
  again fails with :class:`PreparerCrashed` (a dead letter), the rest go on.
- :class:`ThreadPreparer`: ``engine.prepare`` on one other thread: off the Kafka thread,
  and off the interpreter lock only while the Rust tokenizer runs (transformers' fast
  tokenizers release it inside ``encode_batch``). Measured against the others in
  ``benchmarks/prepare_ab.py``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Protocol

from stream_classifier.engine.base import Engine, EngineError, Prepared, PrepareTask
from stream_classifier.engine.capabilities import Capabilities, ProcessPreparing
from stream_classifier.engine.windows import Windowing, prepare_windowed

log = logging.getLogger(__name__)

#: Events sent to a worker at once, at most (fewer when fewer are waiting).
CHUNK_EVENTS = 32
#: Events submitted ``later`` that one inline flush takes, at most (what it costs the
#: Kafka thread: docs/PERFORMANCE.md, priority topics).
LATER_PER_FLUSH = 64
#: How many times an event may be in a chunk that broke the pool before it alone is blamed.
MAX_CRASHES = 3
#: How long the workers may take to start (import, build the tokenizer) before giving up.
START_TIMEOUT_S = 300.0


class Preparer(Protocol):
    def submit(
        self,
        text: str,
        labels: Sequence[str],
        template: str,
        multi_label: bool,
        windowing: Windowing | None = None,
        later: bool = False,
    ) -> Future[Prepared]:
        """Start preparing one event (``windowing``: read its text in token windows;
        ``later``: it may wait while events submitted without it go first)."""
        ...

    def flush(self, everything: bool = False) -> None:
        """Start on what was submitted so far (the submitter is done for now): all of it
        with ``everything``, else what the preparer takes at once."""
        ...

    def deferred(self) -> int:
        """Events submitted ``later`` that no flush has started yet."""
        ...

    def shutdown(self) -> None: ...


class PrepareSide(Protocol):
    """What a worker process runs: an engine's ``prepare`` without its model."""

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared: ...


#: One event's task, its windowing and its future, until tokenized.
_Task = tuple[PrepareTask, "Windowing | None", Future[Prepared]]

#: Builds a :class:`PrepareSide` in a worker; must pickle (``engine.preparer_factory()``).
PrepareFactory = Callable[[], PrepareSide]


class PreparerCrashed(Exception):
    """Tokenizing this event killed the worker process each time it was tried."""


class InlinePreparer:
    """On the caller's thread, at :meth:`flush`: the events submitted since the last flush
    in one :func:`prepare_all` call; a failure is in that event's future.

    Events submitted ``later`` (lower priority levels' while a higher level is read) are
    taken at most :data:`LATER_PER_FLUSH` a flush, oldest first: a flush blocks the Kafka
    thread, and one over a bulk topic's thousand fetched events kept a live event from
    being read and batched for as long (docs/PERFORMANCE.md). The loop does not wait
    while some are left (:meth:`deferred`), so they are all started within a few turns.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._submitted: list[_Task] = []
        self._later: deque[_Task] = deque()

    def submit(
        self,
        text: str,
        labels: Sequence[str],
        template: str,
        multi_label: bool,
        windowing: Windowing | None = None,
        later: bool = False,
    ) -> Future[Prepared]:
        future: Future[Prepared] = Future()
        task = (text, tuple(labels), template, multi_label)
        (self._later.append if later else self._submitted.append)((task, windowing, future))
        return future

    def flush(self, everything: bool = False) -> None:
        submitted, self._submitted = self._submitted, []
        take = len(self._later) if everything else min(len(self._later), LATER_PER_FLUSH)
        submitted += [self._later.popleft() for _ in range(take)]
        if not submitted:
            return
        tasks = [task for task, _, _ in submitted]
        results = prepare_all(self.engine, tasks, [windowing for _, windowing, _ in submitted])
        for (_, _, future), result in zip(submitted, results, strict=True):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def deferred(self) -> int:
        return len(self._later)

    def shutdown(self) -> None:
        for _, _, future in [*self._submitted, *self._later]:
            future.cancel()
        self._submitted = []
        self._later.clear()


class ThreadPreparer:
    """``engine.prepare`` on one other thread (one: the engine's caches are not shared
    between threads)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="prepare")

    def submit(
        self,
        text: str,
        labels: Sequence[str],
        template: str,
        multi_label: bool,
        windowing: Windowing | None = None,
        later: bool = False,
    ) -> Future[Prepared]:
        if windowing is None:
            return self._executor.submit(self.engine.prepare, text, labels, template, multi_label)
        task = (text, tuple(labels), template, multi_label)
        return self._executor.submit(_prepare_one, self.engine, task, windowing)

    def flush(self, everything: bool = False) -> None:
        pass  # each event started when submitted

    def deferred(self) -> int:
        return 0

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def make_preparer(engine: Engine, workers: int, capabilities: Capabilities) -> Preparer:
    """A :class:`ProcessPreparer` of ``workers`` processes, or inline for 0 (or for an
    engine that cannot rebuild its tokenizer side elsewhere)."""
    if workers <= 0:
        return InlinePreparer(engine)
    if not isinstance(engine, ProcessPreparing) or not capabilities.process_preparing:
        log.info("engine %s tokenizes inline: it has no preparer_factory", engine.model_id)
        return InlinePreparer(engine)
    factory = engine.preparer_factory
    return ProcessPreparer(factory(), workers)


# -- worker processes -----------------------------------------------------------------------

_side: PrepareSide | None = None


def _start_worker(factory: PrepareFactory) -> None:
    """Worker initializer: build the tokenizer side once; leave signals to the parent
    (a Ctrl-C or a SIGTERM to the process group must not kill the pool under the drain)."""
    global _side
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _side = factory()


def _ready() -> int:
    return os.getpid()


def _prepare_chunk(
    tasks: list[PrepareTask], windowings: list[Windowing | None] | None = None
) -> list[Prepared | BaseException]:
    """In a worker: prepare each event; a failure is returned in its place."""
    assert _side is not None
    results = prepare_all(_side, tasks, windowings)
    return [_picklable(r) if isinstance(r, Exception) else r for r in results]


def _picklable(exc: Exception) -> BaseException:
    """The exception itself where it survives pickling, else one that says the same."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any failure to round-trip
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


@dataclass(eq=False)
class _Event:
    future: Future[Prepared]
    task: PrepareTask
    windowing: Windowing | None = None
    crashes: int = 0


class ProcessPreparer:
    """``prepare`` in a pool of worker processes, fed in chunks by one feeder thread.

    If the pool cannot be started again after a worker died, the feeder thread prepares
    the events itself (logged as an error): slower, but no event is lost to it.
    """

    def __init__(
        self,
        factory: PrepareFactory,
        workers: int,
        chunk_events: int = CHUNK_EVENTS,
        max_crashes: int = MAX_CRASHES,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.chunk_events = chunk_events
        self.max_crashes = max_crashes
        self._factory = factory
        self._cond = threading.Condition()
        self._queued: deque[_Event] = deque()
        #: Chunks that were in a pool when it broke, to send again (before new events).
        self._retry: deque[list[_Event]] = deque()
        self._broken: ProcessPoolExecutor | None = None
        self._closed = False
        #: Times the pool was started again after a worker died.
        self.restarts = 0
        self._pool: ProcessPoolExecutor | None = self._start_pool()
        #: The tokenizer side in this process, once the pool could not be started again.
        self._local: PrepareSide | None = None
        self._feeder = threading.Thread(target=self._feed, name="prepare-feeder", daemon=True)
        self._feeder.start()

    def _start_pool(self) -> ProcessPoolExecutor:
        """A pool whose workers have all built their tokenizer (EngineError if they can't)."""
        pool = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self._factory,),
        )
        try:
            for ready in [pool.submit(_ready) for _ in range(self.workers)]:
                ready.result(START_TIMEOUT_S)
        except Exception as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            raise EngineError(f"the tokenizer worker processes did not start: {exc}") from exc
        return pool

    def submit(
        self,
        text: str,
        labels: Sequence[str],
        template: str,
        multi_label: bool,
        windowing: Windowing | None = None,
        later: bool = False,
    ) -> Future[Prepared]:
        future: Future[Prepared] = Future()
        task = (text, tuple(labels), template, multi_label)
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot prepare after shutdown")
            self._queued.append(_Event(future, task, windowing))
            self._cond.notify()
        return future

    def flush(self, everything: bool = False) -> None:
        pass  # the feeder sends what is queued as soon as a worker is free

    def deferred(self) -> int:
        return 0

    def shutdown(self) -> None:
        """Stop the feeder and the workers; events not sent to a worker are cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._feeder.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._cond:
            left = list(self._queued) + [event for chunk in self._retry for event in chunk]
            self._queued.clear()
            self._retry.clear()
        for event in left:
            event.future.cancel()

    # -- the feeder thread ------------------------------------------------------------------

    def _feed(self) -> None:
        while True:
            with self._cond:
                while not (self._queued or self._retry or self._broken or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                broken, self._broken = self._broken, None
                if self._retry:
                    chunk = self._retry.popleft()
                else:
                    count = min(len(self._queued), self.chunk_events)
                    chunk = [self._queued.popleft() for _ in range(count)]
            if broken is not None and broken is self._pool:
                self._replace_pool(broken)
            if chunk:
                self._send(chunk)

    def _replace_pool(self, broken: ProcessPoolExecutor) -> None:
        broken.shutdown(wait=False, cancel_futures=True)
        self.restarts += 1
        log.warning("a tokenizer worker process died: starting the pool again")
        try:
            self._pool = self._start_pool()
        except EngineError as exc:
            log.error("%s; tokenizing on the feeder thread from now on", exc)
            self._pool = None
            self._local = self._factory()

    def _send(self, chunk: list[_Event]) -> None:
        chunk = [event for event in chunk if not event.future.cancelled()]
        pool = self._pool
        tasks = [event.task for event in chunk]
        windowings = [event.windowing for event in chunk]
        if pool is None:
            assert self._local is not None
            self._settle(chunk, list(prepare_all(self._local, tasks, windowings)))
            return
        try:
            done = pool.submit(_prepare_chunk, tasks, windowings)
        except BrokenProcessPool as exc:
            self._pool_broke(pool, chunk, exc)
            return
        done.add_done_callback(lambda finished: self._deliver(pool, chunk, finished))

    def _deliver(
        self,
        pool: ProcessPoolExecutor,
        chunk: list[_Event],
        done: Future[list[Prepared | BaseException]],
    ) -> None:
        """In the pool's thread: each event's result, or the chunk again if the pool broke."""
        try:
            results = done.result()
        except BrokenProcessPool as exc:
            self._pool_broke(pool, chunk, exc)
            return
        except BaseException as exc:  # noqa: BLE001 - cancelled at shutdown: fail, never hang
            results = [exc] * len(chunk)
        self._settle(chunk, results)

    @staticmethod
    def _settle(chunk: list[_Event], results: list[Prepared | BaseException]) -> None:
        for event, result in zip(chunk, results, strict=True):
            if event.future.cancelled():
                continue
            if isinstance(result, BaseException):
                event.future.set_exception(result)
            else:
                event.future.set_result(result)

    def _pool_broke(
        self, pool: ProcessPoolExecutor, chunk: list[_Event], exc: BaseException
    ) -> None:
        """Send the chunk again in halves, down to the event that breaks the pool alone."""
        retry: list[list[_Event]] = []
        if len(chunk) > 1:
            half = len(chunk) // 2
            retry = [chunk[:half], chunk[half:]]
        else:
            event = chunk[0]
            event.crashes += 1
            if event.crashes < self.max_crashes:
                retry = [chunk]
            else:
                reason = f"a tokenizer process died on this event alone {event.crashes} times"
                event.future.set_exception(PreparerCrashed(reason))
        with self._cond:
            self._retry.extendleft(reversed(retry))
            if pool is self._pool:
                self._broken = pool
            self._cond.notify()


def prepare_all(
    side: PrepareSide,
    tasks: Sequence[PrepareTask],
    windowings: Sequence[Windowing | None] | None = None,
) -> list[Prepared | Exception]:
    """Prepare every task, a failure in its place: in one ``prepare_many`` call where the
    engine has one (if that call itself fails, event by event, to find whose it is). A
    task with a windowing is prepared as its text's token windows (engine/windows.py)."""
    if windowings is not None and any(w is not None for w in windowings):
        return prepare_windowed(side, tasks, windowings, _prepare_plain)
    return _prepare_plain(side, tasks)


def _prepare_one(side: PrepareSide, task: PrepareTask, windowing: Windowing) -> Prepared:
    """One event in its windows (the thread preparer's), raising its failure."""
    result = prepare_all(side, [task], [windowing])[0]
    if isinstance(result, Exception):
        raise result
    return result


def _prepare_plain(side: PrepareSide, tasks: Sequence[PrepareTask]) -> list[Prepared | Exception]:
    many = getattr(side, "prepare_many", None)
    if callable(many) and tasks:
        try:
            return list(many(tasks))
        except Exception:  # noqa: BLE001 - isolated below
            log.debug("prepare_many failed on %d events: preparing them one by one", len(tasks))
    return [_prepare_with(side, task) for task in tasks]


def _prepare_with(side: PrepareSide, task: PrepareTask) -> Prepared | Exception:
    try:
        return side.prepare(*task)
    except Exception as exc:  # noqa: BLE001 - that event's failure, for its future
        return exc
