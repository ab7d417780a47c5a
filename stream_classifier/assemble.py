"""The one place that assembles the service: ``run``, every benchmark, reloads and tests.

Whatever measures the service must measure what ``run`` runs: the engine loaded and
warmed up the same way, the settings left unset resolved for the engine's device, the
same engine and prepare stages and the same interpreter switch interval.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from stream_classifier.config import (
    PYTHON_SWITCH_INTERVAL_MS,
    ServiceConfig,
    load_config,
)
from stream_classifier.engine import import_libraries, load_engine
from stream_classifier.engine.base import Engine
from stream_classifier.engine.capabilities import (
    Capabilities,
    CompilingLater,
    OomReporting,
    Primed,
)
from stream_classifier.formats import Formats
from stream_classifier.metrics import Metrics
from stream_classifier.outputs import Observer
from stream_classifier.scoring import Pieces
from stream_classifier.service import Service
from stream_classifier.sink import Record
from stream_classifier.startup import StartupClock

log = logging.getLogger(__name__)

#: How long a reload may wait for the cluster's topic list (the loop waits meanwhile).
RELOAD_CHECK_S = 5.0


def load_ready_engine(
    config: ServiceConfig, metrics: Metrics, clock: StartupClock | None = None
) -> Engine:
    """Load, warm up at the largest batch, and prepare each topic's labels once; each step
    timed on ``clock`` (the engine's loaders report theirs to it while it is active)."""
    clock = clock or StartupClock()
    with clock.active():
        with clock.step("imports"):
            import_libraries(config.engine)

        log.info("loading %s", describe_model(config))
        with clock.step("model_setup"):
            engine = load_engine(config.engine, config.processing.max_batch_tokens)
            check_windows(config, engine)
        log.info("engine %s loaded; warming up at the largest batch", engine.model_id)
        with clock.step("warmup"):
            if isinstance(engine, CompilingLater) and config.engine.compile_in_background:
                engine.warmup_eagerly()  # compiles after the first output (FirstOutput)
            else:
                engine.warmup()
    if isinstance(engine, Primed):  # embed each topic's label hypotheses once, now
        with clock.step("labels"):
            for topic in config.topics:
                engine.prime(topic.labels, topic.hypothesis_template)
    if isinstance(engine, OomReporting):
        engine.on_out_of_memory = lambda rows: metrics.oom_splits.inc()
    return engine


def describe_model(config: ServiceConfig) -> str:
    """``nli model X from PATH on DEVICE``: what the load is about to read, from where, and
    the device it resolves to, said before the load (which may take a while)."""
    from stream_classifier.engine.shared import pick_device

    engine = config.engine
    path = Path(engine.model).expanduser()
    where = str(path.resolve()) if path.is_dir() else "the hub (its cache, else a download)"
    if not path.is_dir() and engine.cache_dir:
        where += f", cache {engine.cache_dir}"
    try:
        device = str(pick_device(engine.device))
    except Exception as exc:  # noqa: BLE001 - the load reports it properly; this only logs
        device = f"{engine.device} ({exc})"
    return f"{engine.kind} model {engine.model} from {where} on {device}"


class FirstOutput(Observer):
    """Closes the start-up clock at the first record written: its summary line, and the
    total in ``stream_classifier_startup_seconds{step="total"}``. Then the engine compiles
    (where it compiles later): not sooner, because compiling holds the interpreter lock
    for seconds and would slow the first batch, and the CUDA graphs captured meanwhile
    would be of the eager layers."""

    def __init__(self, clock: StartupClock, metrics: Metrics, engine: Engine | None = None):
        self.clock = clock
        self.metrics = metrics
        self.engine = engine

    def written(self, record: Record) -> None:
        if self.clock.total is None and self.clock.finish() is not None:
            self.metrics.startup_seconds.labels(step="total").set(self.clock.total or 0.0)
            if isinstance(self.engine, CompilingLater):
                self.engine.compile_in_background()


def check_windows(config: ServiceConfig, engine: Engine) -> None:
    """Topics that read texts in windows: do their windows fit this model? An EngineError
    naming each field and why, before anything is consumed (the size depends on the
    model's tokenizer, so the configuration alone cannot tell)."""
    from stream_classifier.engine.base import EngineError
    from stream_classifier.engine.windows import window_problems

    problems = window_problems(config.topics, engine)
    if problems:
        raise EngineError("; ".join(problems))


def on_gpu(engine: Engine) -> bool:
    return Capabilities.of(engine).cuda


def for_device(config: ServiceConfig, gpu: bool) -> ServiceConfig:
    """The configuration with the settings left unset resolved for the engine's device
    (and for topics of more than one priority)."""
    processing = config.processing.for_device(gpu, config.has_priority_levels())
    return config.model_copy(update={"processing": processing})


def build_service(
    config: ServiceConfig,
    engine: Engine,
    metrics: Metrics | None = None,
    observers: Sequence[Observer] = (),
    formats: Formats | None = None,
) -> Service:
    """The service with its engine stage (two batches on the device on a GPU), its prepare
    stage (``processing.prepare_workers`` tokenizer processes, or inline) and the
    settings resolved for the engine's device."""
    from stream_classifier.preparing import make_preparer
    from stream_classifier.scoring import make_scorer

    capabilities = Capabilities.of(engine)
    log.info("engine %s can: %s", engine.model_id, capabilities.describe())
    gpu = capabilities.cuda
    config = for_device(config, gpu)
    metrics = metrics or Metrics()
    processing = config.processing
    switch_ms = processing.switch_interval_ms or PYTHON_SWITCH_INTERVAL_MS
    sys.setswitchinterval(switch_ms / 1000.0)
    preparer = make_preparer(engine, processing.prepare_workers or 0, capabilities)
    scorer = make_scorer(engine, metrics, capabilities, lower_level_pieces(config))
    log.info(
        "micro-batches of up to %d messages; engine stage %s; prepare stage %s; "
        "interpreter switch interval %g ms",
        processing.max_batch_messages,
        type(scorer).__name__,
        type(preparer).__name__,
        switch_ms,
    )
    try:
        return Service(
            config,
            engine,
            metrics,
            scorer=scorer,
            preparer=preparer,
            observers=observers,
            formats=formats,
        )
    except BaseException:
        scorer.shutdown()
        preparer.shutdown()
        raise


def lower_level_pieces(config: ServiceConfig) -> Pieces | None:
    """With topics of more than one priority, how the engine stage splits the lower
    levels' batches so that a live batch overtakes them."""
    priorities = {topic.priority for topic in config.topics}
    if len(priorities) < 2:
        return None
    return Pieces(top=max(priorities), tokens=config.processing.lower_priority_piece())


def reload_config(path: str, gpu: bool) -> ServiceConfig:
    """The configuration a SIGHUP reload applies: the file, with the device's defaults, and
    only if every topic it names exists (a new route to a missing topic would fail its
    first write and stop the service); any error rejects the reload."""
    from stream_classifier.preflight import check_kafka

    config = for_device(load_config(path), gpu)
    check_kafka(config, timeout_s=RELOAD_CHECK_S)
    return config
