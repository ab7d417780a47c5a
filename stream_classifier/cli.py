"""stream-classifier: run the service, classify from the shell, check configs, write schemas.

Exit codes: 0 done, 1 the service stopped on a failure (nothing past it was committed),
2 bad configuration or arguments, 3 the engine could not load, 4 Kafka could not be used
(unreachable, authentication or TLS failed, a configured topic missing).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import ValidationError

from stream_classifier.cli_tools import add_tool_commands
from stream_classifier.config import (
    DEFAULT_MODELS,
    ConfigError,
    EngineConfig,
    ServiceConfig,
    load_config,
)
from stream_classifier.startup import StartupClock, freeze_heap

if TYPE_CHECKING:  # the run command's modules import confluent_kafka; load them lazily
    from stream_classifier.metrics import HealthServer, Metrics
    from stream_classifier.service import Service

log = logging.getLogger("stream_classifier")

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_ENGINE = 3
EXIT_KAFKA = 4
EXIT_REGISTRY = 5


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-classifier", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="consume, classify and produce until stopped")
    run.add_argument("--config", help="YAML file (default: $STREAM_CLASSIFIER_CONFIG)")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate-config", help="check a config file and exit")
    validate.add_argument("config")
    validate.set_defaults(handler=cmd_validate_config)

    classify = commands.add_parser("classify", help="classify texts from the shell, no Kafka")
    classify.add_argument(
        "--engine",
        choices=["nli", "embedding"],
        help="engine kind (default: $STREAM_CLASSIFIER_ENGINE__KIND, else nli)",
    )
    classify.add_argument(
        "--model",
        help="model directory or id (default: $STREAM_CLASSIFIER_ENGINE__MODEL, else the "
        "engine kind's default model)",
    )
    classify.add_argument("--labels", required=True, help="comma-separated labels")
    classify.add_argument("--template", default="{}", help="hypothesis template with {}")
    classify.add_argument("--multi-label", action="store_true")
    classify.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    classify.add_argument(
        "--dtype", help="auto, float16 (fp16), bfloat16 (bf16), float32 (fp32); default auto"
    )
    classify.add_argument("texts", nargs="+", metavar="TEXT")
    classify.set_defaults(handler=cmd_classify)

    schemas = commands.add_parser("schemas", help="write the JSON Schemas of the contracts")
    schemas.add_argument("directory")
    schemas.set_defaults(handler=cmd_schemas)

    add_tool_commands(commands)
    return parser


def cmd_validate_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    topics = len(config.topics)
    print(
        f"{args.config}: ok ({topics} topic{'' if topics == 1 else 's'}, "
        f"engine {config.engine.kind})"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    clock = StartupClock.from_process_start()
    log.info(
        "stream-classifier %s starting: config %s, pid %d",
        _version(),
        args.config or os.environ.get("STREAM_CLASSIFIER_CONFIG", "(environment only)"),
        os.getpid(),
    )
    clock.milestone("python")  # the interpreter and the imports before main
    config = load_config(args.config)
    stop = threading.Event()
    _stop_on_signals(stop)  # first: a SIGTERM while the model loads still exits cleanly
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    with clock.step("imports"):
        from stream_classifier.assemble import (
            FirstOutput,
            build_service,
            load_ready_engine,
            on_gpu,
            reload_config,
        )
        from stream_classifier.engine import EngineError
        from stream_classifier.formats import FormatError, ready_formats
        from stream_classifier.gpu import start_gpu_sampler
        from stream_classifier.metrics import Metrics
        from stream_classifier.preflight import PreflightError, check_kafka, check_model_hub
        from stream_classifier.service import ServiceError
        from stream_classifier.sink import SinkError
        from stream_classifier.source import SourceError

    try:
        with clock.step("kafka_check"):
            check_kafka(config)
    except PreflightError as exc:
        print(f"kafka: {exc}", file=sys.stderr)
        return EXIT_KAFKA
    try:
        with clock.step("registry_check"):
            formats = ready_formats(config)
    except FormatError as exc:
        print(f"schema registry: {exc}", file=sys.stderr)
        return EXIT_REGISTRY
    metrics = Metrics()
    clock.watch(lambda step, seconds: metrics.startup_seconds.labels(step=step).set(seconds))
    try:
        with clock.step("hub_check"):
            check_model_hub(config.engine)
        engine = load_ready_engine(config, metrics, clock)
        # Settings left to the device (batch size, tokenizer processes), also on reloads.
        with clock.step("service_build"):
            first = FirstOutput(clock, metrics, engine)
            service = build_service(config, engine, metrics, [first], formats)
        with clock.step("heap_freeze"):
            freeze_heap()
        service.rebalances.on_assigned = lambda _partitions: clock.milestone("group_join")
    except EngineError as exc:
        print(f"engine: {exc}", file=sys.stderr)
        return EXIT_ENGINE
    gpu = on_gpu(engine)
    # `kill -HUP PID`: re-read the topic settings (labels, thresholds, lanes...) in place.
    signal.signal(
        signal.SIGHUP,
        lambda _s, _f: service.request_reload(lambda: reload_config(args.config, gpu)),
    )
    server = _start_health_server(service.config, metrics, service)
    sampler = start_gpu_sampler(metrics)
    try:
        service.run(stop)
    except (ServiceError, SinkError, SourceError, EngineError) as exc:
        log.error("stopped on a failure, nothing past it was committed: %s", exc)
        return EXIT_FAILED
    finally:
        if server is not None:
            server.stop()
        if sampler is not None:
            sampler.stop()
    log.info("stopped cleanly")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stream-classifier")
    except PackageNotFoundError:
        return "(not installed)"


def _start_health_server(
    config: ServiceConfig, metrics: Metrics, service: Service
) -> HealthServer | None:
    from stream_classifier.metrics import HealthServer

    if not config.metrics.enabled:
        return None
    server = HealthServer(
        metrics, config.metrics.host, config.metrics.port, service.healthy, service.ready
    )
    server.start()
    log.info("metrics and health on http://%s:%d/metrics", config.metrics.host, server.port)
    return server


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the batch in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_classify(args: argparse.Namespace) -> int:
    from stream_classifier.engine import EngineError, load_engine
    from stream_classifier.messages import parse_labels
    from stream_classifier.preflight import check_model_hub

    labels = parse_labels(args.labels)
    if not labels or "{}" not in args.template:
        print("--labels needs at least one label and --template needs '{}'", file=sys.stderr)
        return EXIT_CONFIG
    engine_config = _classify_engine_config(args, labels)
    try:
        check_model_hub(engine_config)  # before torch loads: offline fails in a second
        engine = load_engine(engine_config, max_batch_tokens=65536)
    except EngineError as exc:
        print(f"engine: {exc}", file=sys.stderr)
        return EXIT_ENGINE
    prepared = [
        engine.prepare(text, labels, args.template, args.multi_label) for text in args.texts
    ]
    for text, scores in zip(args.texts, engine.classify(prepared), strict=True):
        record = {
            "text": text,
            "labels": list(scores.labels),
            "scores": list(scores.scores),
            "top_label": scores.top_label,
            "multi_label": args.multi_label,
            "model": engine.model_id,
        }
        print(json.dumps(record, ensure_ascii=False))
    return 0


def _classify_engine_config(args: argparse.Namespace, labels: list[str]) -> EngineConfig:
    """The flags given, over the STREAM_CLASSIFIER_ENGINE__* variables, over the defaults.

    The environment is read the way ``run`` reads it (through ServiceConfig), so that
    ``STREAM_CLASSIFIER_ENGINE__MODEL=/models/structbert`` means the same to both.
    """
    topic = {"input": "classify", "output": "classify.out", "dead_letter": "classify.dlq"}
    try:
        from_env = ServiceConfig(topics=[{**topic, "labels": labels}]).engine
    except ValidationError as exc:
        raise ConfigError(f"invalid STREAM_CLASSIFIER_* environment:\n{exc}") from exc
    settings = from_env.model_dump(include=from_env.model_fields_set)
    if "model" in settings and settings["model"] == DEFAULT_MODELS.get(from_env.kind):
        del settings["model"]  # a default that follows the kind, not a choice
    flags = {"kind": args.engine, "model": args.model, "device": args.device, "dtype": args.dtype}
    settings.update({name: value for name, value in flags.items() if value is not None})
    if args.engine is not None and args.model is None and args.engine != from_env.kind:
        settings.pop("model", None)  # the environment's model belongs to another kind
    try:
        return EngineConfig(**settings)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"classify: {problems}") from exc


def cmd_schemas(args: argparse.Namespace) -> int:
    from stream_classifier.schemas import write_schemas

    for path in write_schemas(Path(args.directory)):
        print(path)
    return 0


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


if __name__ == "__main__":
    sys.exit(main())
