"""The tools' subcommands (``eval``, ``bench``, ``plan``): their arguments and handlers.

The arguments are declared here, not in the tools, so that building the command line (for
``run`` too) imports no tool: each handler imports its tool only when it runs. The runtime
never imports the tools otherwise (tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any

from stream_classifier.config import ConfigError
from stream_classifier.startup import StartupClock


def add_tool_commands(commands: Any) -> None:
    """``eval``, ``bench`` and ``plan`` on the CLI's subcommands (argparse's private
    ``_SubParsersAction``, hence ``Any``)."""
    evaluate = commands.add_parser(
        "eval", help="score a labelled JSONL sample; --compare label wordings and templates"
    )
    _add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    bench = commands.add_parser("bench", help="our engine vs the HF pipeline, random model")
    _add_bench_arguments(bench)
    bench.set_defaults(handler=cmd_bench)

    plan = commands.add_parser(
        "plan", help="GPU replicas for a target event rate, from a sample of events"
    )
    _add_plan_arguments(plan)
    plan.set_defaults(handler=cmd_plan)


def _add_bench_arguments(bench: argparse.ArgumentParser) -> None:
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


def cmd_eval(args: argparse.Namespace) -> int:
    from stream_classifier.tools.eval import command

    missing = [str(path) for path in [*args.samples, *args.compare] if not path.is_file()]
    if args.config is not None and not Path(args.config).is_file():
        missing.insert(0, args.config)
    if missing:
        raise ConfigError(f"eval: no such file: {', '.join(missing)}")
    return command(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from stream_classifier.tools.plan import command

    return command(args)


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
