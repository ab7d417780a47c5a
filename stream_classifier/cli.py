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
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import ValidationError

from stream_classifier.config import (
    DEFAULT_MODELS,
    ConfigError,
    EngineConfig,
    ServiceConfig,
    load_config,
)
from stream_classifier.startup import StartupClock

if TYPE_CHECKING:  # the run command's modules import confluent_kafka; load them lazily
    from stream_classifier.metrics import HealthServer, Metrics
    from stream_classifier.service import Service

log = logging.getLogger("stream_classifier")

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_ENGINE = 3
EXIT_KAFKA = 4


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

    evaluate = commands.add_parser(
        "eval", help="score a labelled JSONL sample; --compare label wordings and templates"
    )
    _add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    schemas = commands.add_parser("schemas", help="write the JSON Schemas of the contracts")
    schemas.add_argument("directory")
    schemas.set_defaults(handler=cmd_schemas)

    bench = commands.add_parser("bench", help="our engine vs the HF pipeline, random model")
    bench.add_argument("--shape", choices=["tiny", "base", "large"], default="tiny")
    bench.add_argument(
        "--arch",
        choices=["structbert", "deberta-v3"],
        default="structbert",
        help="random model: StructBERT (ModelScope engine) or DeBERTa-v3 (HF NLI engine)",
    )
    bench.add_argument("--messages", type=int, default=2000)
    bench.add_argument(
        "--baseline-messages",
        type=int,
        help="HF pipeline timed on the first N after a warm-up (default 8000, at most --messages)",
    )
    bench.add_argument("--labels", default="4,10", help="comma-separated label counts")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--max-batch-tokens", type=int, default=65536)
    bench.add_argument("--batch-messages", type=int, default=1024, help="micro-batch size")
    bench.add_argument("--multi-label", action="store_true")
    bench.add_argument(
        "--backend",
        choices=["auto", "flash", "efficient", "packed", "padded"],
        default="auto",
        help="force one (flash/efficient: packed with that attention kernel, else an error)",
    )
    bench.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="launch each pass eagerly (engine.cuda_graphs: false), for an A/B",
    )
    bench.add_argument("--reference-messages", type=int, default=200, help="fp32 check (GPU)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    pipeline = bench.add_argument_group("--pipeline: the Kafka path with a bench-only engine")
    pipeline.add_argument("--pipeline", action="store_true", help="benchmark the Kafka path")
    pipeline.add_argument("--bootstrap", default="127.0.0.1:9092", help="broker to use")
    pipeline.add_argument(
        "--events", type=int, help="pre-filled events (--pipeline: 100000, --service: 20000)"
    )
    pipeline.add_argument("--rate", type=int, default=5_000, help="msgs/s for the latency run")
    pipeline.add_argument("--seconds", type=float, default=5.0, help="latency run length")
    pipeline.add_argument("--cpu", type=int, help="pin the process to this CPU core")
    service = bench.add_argument_group(
        "--service: the real run process on the engine's device, through the broker"
    )
    service.add_argument("--service", action="store_true", help="benchmark the service")
    service.add_argument(
        "--guarantees", default="at_least_once,exactly_once", help="comma-separated"
    )
    service.add_argument("--partitions", type=int, default=12, help="input topic partitions")
    service.add_argument(
        "--loads", default="0.5,0.9", help="latency at these fractions of the saturated rate"
    )
    service.add_argument("--latency-seconds", type=float, default=20.0, help="each load's run")
    service.add_argument(
        "--max-batch-messages", type=int, help="the service's (default: its device default)"
    )
    service.add_argument(
        "--prepare-workers", type=int, help="the service's (default: its device default)"
    )
    service.add_argument(
        "--service-prefix",
        default="",
        help="a command the service runs under, e.g. a profiler: "
        "'py-spy record -f raw -o spy-{guarantee}.txt --' ({guarantee} is filled in)",
    )
    bench.set_defaults(handler=cmd_bench)

    plan = commands.add_parser(
        "plan", help="GPU replicas for a target event rate, from a sample of events"
    )
    _add_plan_arguments(plan)
    plan.set_defaults(handler=cmd_plan)
    return parser


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """``eval``'s arguments, here rather than in :mod:`stream_classifier.tools.eval` so that
    building the parser (for ``run`` too) does not import the tool; the tool reads them."""
    parser.add_argument("samples", nargs="+", metavar="SAMPLE.jsonl", type=Path)
    parser.add_argument("--config", help="service YAML: its engine, topics, labels, templates")
    parser.add_argument("--topic", help="the input topic every sample belongs to")
    parser.add_argument("--engine", choices=["nli", "embedding"], help="engine kind")
    parser.add_argument("--model", help="model directory or id (default: the kind's default)")
    parser.add_argument("--labels", help="comma-separated labels (without --config)")
    parser.add_argument("--template", default="{}", help="hypothesis template (without --config)")
    parser.add_argument("--multi-label", action="store_true", help="(without --config)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", help="auto, float16 (fp16), bfloat16 (bf16), float32 (fp32)")
    parser.add_argument(
        "--compare-template",
        action="append",
        default=[],
        metavar="TEMPLATE",
        help="also try this template (repeatable)",
    )
    parser.add_argument(
        "--compare-labels",
        action="append",
        default=[],
        metavar="CSV",
        help="also try these wordings, one per configured label, in order (repeatable)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        type=Path,
        metavar="VARIANTS.yaml",
        help="also try the variants in this file (repeatable)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="multi-label: a label counts as predicted from this score up (default: the "
        "topic's threshold for the label, else 0.5)",
    )
    parser.add_argument(
        "--sweep",
        metavar="LANE[=V1,V2,...]",
        help="also decide the sample with this lane's cut-off (its min_score, or the "
        "thresholds of its labels) at each value, all else as configured",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument(
        "--progress",
        choices=["auto", "always", "never"],
        default="auto",
        help="progress bar on stderr (auto: on a terminal, for long samples)",
    )


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """``plan``'s arguments, here so that building the parser does not import
    :mod:`stream_classifier.tools.plan`; the tool checks them."""
    parser.add_argument(
        "sample",
        nargs="?",
        type=Path,
        metavar="SAMPLE",
        help="events, one a line: JSON objects (their text field) or plain text",
    )
    parser.add_argument(
        "--reference-workload",
        action="store_true",
        help="instead of a sample: the events the H200 calibration ran (bench's workload)",
    )
    parser.add_argument(
        "--labels", required=True, help="a label count, or the comma-separated labels"
    )
    parser.add_argument("--template", default="{}", help="hypothesis template with {}")
    parser.add_argument(
        "--label-tokens",
        type=int,
        help="tokens of each label where --labels is a count (default 3)",
    )
    parser.add_argument("--rate", type=float, required=True, help="target events/s")
    parser.add_argument("--gpu", help="one GPU of the table, e.g. T4 or H100 (default: all)")
    parser.add_argument(
        "--model",
        help="a model directory: its config.json and tokenizer (default: the StructBERT-large "
        "shape, tokens estimated)",
    )
    parser.add_argument(
        "--text-field",
        help="the JSON field (dotted) holding the text, or $value for plain lines "
        "(default: text where the first line is a JSON object, else $value)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


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
    metrics = Metrics()
    clock.watch(lambda step, seconds: metrics.startup_seconds.labels(step=step).set(seconds))
    try:
        with clock.step("hub_check"):
            check_model_hub(config.engine)
        engine = load_ready_engine(config, metrics, clock)
        # Settings left to the device (batch size, tokenizer processes), also on reloads.
        with clock.step("service_build"):
            service = build_service(config, engine, metrics, [FirstOutput(clock, metrics)])
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


def cmd_eval(args: argparse.Namespace) -> int:
    from stream_classifier.tools.eval import command

    missing = [str(path) for path in [*args.samples, *args.compare] if not path.is_file()]
    if args.config is not None and not Path(args.config).is_file():
        missing.insert(0, args.config)
    if missing:
        print(f"eval: no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_CONFIG
    return command(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from stream_classifier.tools.plan import command

    return command(args)


def cmd_schemas(args: argparse.Namespace) -> int:
    from stream_classifier.schemas import write_schemas

    for path in write_schemas(Path(args.directory)):
        print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.pipeline:
        return cmd_bench_pipeline(args)
    if args.service:
        return cmd_bench_service(args)
    clock = StartupClock.from_process_start()
    clock.milestone("python")
    with clock.step("imports"):  # torch and transformers, with the tool
        from stream_classifier.tools import bench

    options = bench.BenchOptions(
        shape=args.shape,
        arch=args.arch,
        messages=args.messages,
        baseline_messages=args.baseline_messages,
        labels=tuple(int(n) for n in args.labels.split(",") if n.strip()),
        device=args.device,
        max_batch_tokens=args.max_batch_tokens,
        batch_messages=args.batch_messages,
        multi_label=args.multi_label,
        backend=args.backend,
        cuda_graphs=args.cuda_graphs,
        reference_messages=args.reference_messages,
        seed=args.seed,
    )
    return bench.main(options, args.json, clock)


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    import os

    from stream_classifier.tools import bench_pipeline

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    events = 100_000 if args.events is None else args.events
    report = bench_pipeline.run_pipeline_bench(args.bootstrap, events, args.rate, args.seconds)
    print(bench_pipeline.format_report(report))
    if args.json:
        Path(args.json).write_text(bench_pipeline.report_json(report), encoding="utf-8")
    return 0


def cmd_bench_service(args: argparse.Namespace) -> int:
    from stream_classifier.tools import bench_service

    options = bench_service.ServiceBenchOptions(
        bootstrap=args.bootstrap,
        shape=args.shape,
        device=args.device,
        labels=tuple(int(n) for n in args.labels.split(",") if n.strip()),
        events=20_000 if args.events is None else args.events,
        guarantees=tuple(g.strip() for g in args.guarantees.split(",") if g.strip()),
        partitions=args.partitions,
        loads=tuple(float(x) for x in args.loads.split(",") if x.strip()),
        latency_seconds=args.latency_seconds,
        max_batch_messages=args.max_batch_messages,
        prepare_workers=args.prepare_workers,
        service_prefix=tuple(shlex.split(args.service_prefix)),
        engine_batch_messages=args.batch_messages,
        max_batch_tokens=args.max_batch_tokens,
        cuda_graphs=args.cuda_graphs,
        seed=args.seed,
    )
    return bench_service.main(options, args.json)


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
