"""Where the first seconds go: a clock of named start-up steps, from the process's start.

Nothing is said while a service imports torch and loads a model unless something says it,
and "slow to start" cannot be fixed without knowing which part is slow. The clock keeps
one duration per named step, logs a line as each ends, and, once the first output is
written, one summary line that adds up to the time since the process started.

Steps do not overlap: a step inside another (the weights read inside the model load,
graph captures inside the warm-up) is taken out of the outer one's time, so the steps and
the rest ("other") add up to the total; the Prometheus gauge shows the same numbers.

The engine's loaders are called from ``run``, ``bench``, ``eval``, ``classify`` and the
tests; rather than thread a parameter through each, they report to the clock made active
around the load (:meth:`StartupClock.active`), through :func:`step` and :func:`record`,
which do nothing when no clock is active (and in other threads: the service's engine
thread captures graphs too, long after start-up).
"""

from __future__ import annotations

import contextvars
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

log = logging.getLogger(__name__)

#: The summary line's parts: its words and the steps each adds up, in start-up order.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python+imports", ("python", "imports")),
    ("kafka check", ("kafka_check", "registry_check")),
    (
        "model load",
        (
            "hub_check",
            "model_setup",
            "tokenizer",
            "weights_read",
            "cuda_init",
            "to_device",
            "probes",
        ),
    ),
    ("warm-up", ("warmup",)),
    ("graphs", ("graphs",)),
    ("labels", ("labels",)),
    ("service build", ("service_build", "heap_freeze")),
    ("group join", ("group_join",)),
    ("first batch", ("first_batch",)),
)
#: The model load's parts the summary names in brackets, and their words there.
MODEL_LOAD_PARTS = (
    ("tokenizer", "tokenizer"),
    ("weights_read", "weights"),
    ("cuda_init", "CUDA init"),
    ("to_device", "to device"),
    ("probes", "backend probes"),
)

_active: contextvars.ContextVar[StartupClock | None] = contextvars.ContextVar(
    "stream_classifier_startup_clock", default=None
)


def process_age(
    stat: Path = Path("/proc/self/stat"), uptime: Path = Path("/proc/uptime")
) -> float | None:
    """Seconds since this process started (Linux: its start in clock ticks after boot,
    field 22 of ``stat``, against the seconds since boot); None where that cannot be read.
    """
    try:
        fields = stat.read_text(encoding="ascii").rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22; the split starts at field 3
        since_boot = float(uptime.read_text(encoding="ascii").split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    age = since_boot - started_ticks / ticks
    return age if age >= 0 else None


class StartupClock:
    """Named start-up steps and their durations, since ``origin`` (a ``now()`` reading)."""

    def __init__(self, origin: float | None = None, now: Callable[[], float] = time.monotonic):
        self._now = now
        started = now()
        self.origin = started if origin is None else origin
        #: Seconds per step, outer steps less the steps inside them, in the order they
        #: first started.
        self.steps: dict[str, float] = {}
        #: Where the last step ended (at first the origin): a milestone's duration starts there.
        self._mark = self.origin
        #: Per open step, the seconds of the steps recorded inside it.
        self._inside: list[float] = []
        self._watchers: list[Callable[[str, float], None]] = []
        self._lock = threading.Lock()
        #: Seconds from origin to the first output, once written.
        self.total: float | None = None

    @classmethod
    def from_process_start(
        cls,
        age: Callable[[], float | None] = process_age,
        now: Callable[[], float] = time.monotonic,
    ) -> StartupClock:
        """A clock from when the process started (the interpreter and the imports before
        ``main`` count), or from now where the process's age cannot be read."""
        seconds = age()
        current = now()
        return cls(None if seconds is None else current - seconds, now)

    def elapsed(self) -> float:
        return self._now() - self.origin

    @contextmanager
    def active(self) -> Iterator[StartupClock]:
        """Make this the clock that :func:`step` and :func:`record` report to, here."""
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (added to what the step had), less inner steps."""
        started = self._now()
        with self._lock:
            self.steps.setdefault(name, 0.0)  # its place: the order steps start in
        self._inside.append(0.0)
        try:
            yield
        finally:
            inner = self._inside.pop()
            seconds = self._now() - started
            self._record(name, seconds - inner, seconds)
            self._mark = self._now()
            log.info(
                "start-up: %s took %.2f s%s; %.1f s after start",
                name,
                seconds,
                f" ({inner:.2f} s of it in the steps inside)" if inner > 0 else "",
                self.elapsed(),
            )

    def record(self, name: str, seconds: float) -> None:
        """Add a duration measured elsewhere (a graph capture) to ``name``."""
        self._record(name, seconds, seconds)

    def milestone(self, name: str) -> bool:
        """Record the time since the last step ended as ``name``, the first time only (the
        first assignment, the first output); whether it was the first."""
        with self._lock:
            if name in self.steps or self.total is not None:
                return False
            now = self._now()
            seconds = now - self._mark
            self._mark = now
            self.steps[name] = seconds
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher(name, seconds)
        log.info("start-up: %s took %.2f s; %.1f s after start", name, seconds, self.elapsed())
        return True

    def watch(self, watcher: Callable[[str, float], None]) -> None:
        """Tell ``watcher`` each step's seconds: those so far now, the others as they change."""
        with self._lock:
            self._watchers.append(watcher)
            known = list(self.steps.items())
        for name, seconds in known:
            watcher(name, seconds)

    def finish(self) -> str | None:
        """The first output is written: log and return the summary line (the first call
        only; None after)."""
        if not self.milestone("first_batch"):
            return None
        with self._lock:
            self.total = self.elapsed()
            line = summary(self.total, dict(self.steps))
        log.info("%s", line)
        return line

    def _record(self, name: str, own: float, whole: float) -> None:
        with self._lock:
            if self._inside:
                self._inside[-1] += whole
            self.steps[name] = self.steps.get(name, 0.0) + own
            seconds = self.steps[name]
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher(name, seconds)


def summary(total: float, steps: dict[str, float]) -> str:
    """``first output N.N s after start: python+imports a, ...``: every group (0 where it
    did not happen), steps of no group by name, and what no step covers as "other"."""
    grouped = {name for _, names in GROUPS for name in names}
    parts = [_part(words, names, steps) for words, names in GROUPS]
    parts += [f"{name} {seconds:.2f}" for name, seconds in steps.items() if name not in grouped]
    parts.append(f"other {max(0.0, total - sum(steps.values())):.2f}")
    return f"first output {total:.1f} s after start: {', '.join(parts)} (seconds)"


def engine_summary(steps: dict[str, float]) -> str:
    """The engine's part of the summary (``bench``: no Kafka, no output written)."""
    return ", ".join(
        _part(words, names, steps)
        for words, names in GROUPS
        if words in ("python+imports", "model load", "warm-up", "graphs")
    )


def _part(words: str, names: tuple[str, ...], steps: dict[str, float]) -> str:
    part = f"{words} {sum(steps.get(n, 0.0) for n in names):.2f}"
    if words == "model load":
        inside = ", ".join(f"{w} {steps.get(n, 0.0):.2f}" for n, w in MODEL_LOAD_PARTS)
        part += f" ({inside})"
    return part


def step(name: str) -> AbstractContextManager[None]:
    """The active clock's :meth:`StartupClock.step`, or nothing where none is active."""
    clock = _active.get()
    return nullcontext() if clock is None else clock.step(name)


def record(name: str, seconds: float) -> None:
    """Add to a step of the active clock, if one is active here."""
    clock = _active.get()
    if clock is not None:
        clock.record(name, seconds)


def freeze_heap() -> None:
    """Collect once, then move every object alive into the collector's permanent generation.

    Why: a full collection walks every object the collector tracks and stops every thread
    while it does. Once torch, the model and (later) the compiled layers are loaded, that is
    millions of objects that live as long as the process, and each full collection stalls
    scoring long enough to make the p99, at a random moment (docs/PERFORMANCE.md). Frozen,
    they are no longer walked; what the stream allocates is collected as before. The
    collection first frees the loader's garbage, so nothing is frozen that could have been
    freed.
    Called once the service is built (before consuming) and when the layers have compiled.
    """
    gc.collect()
    gc.freeze()
