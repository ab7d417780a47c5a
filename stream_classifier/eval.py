"""``stream-classifier eval``: score a labelled sample and tell which label wording works.

A sample is JSONL, one ``{"text": ..., "label": ...}`` per line (``"labels": [...]`` for a
multi-label topic). Each file belongs to one topic: ``--topic``, else the configured input
topic named like the file's stem, else the config's only topic.

A *variant* is a hypothesis template plus, per label, the wording the model sees (the gold
labels keep the configured names). The configured one is the baseline; ``--compare-*`` or a
variants YAML adds more, and variants are ranked by macro-F1 (mean over topics), then
accuracy.

Metrics. Single-label: accuracy is top label == gold; per-label precision/recall/F1 from
the confusion matrix; macro-F1 averages the labels that occur as gold or as prediction.
Multi-label: a label is predicted when its score reaches ``--threshold``; accuracy is the
exact-set match rate; macro-F1 averages every label's F1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from stream_classifier.config import (
    EngineConfig,
    ServiceConfig,
    TopicConfig,
    load_config,
)
from stream_classifier.engine.base import Engine, Scores
from stream_classifier.messages import parse_labels


class EvalError(Exception):
    """The sample or the variants cannot be evaluated; the message says where and why."""


@dataclass(frozen=True)
class Example:
    text: str
    gold: frozenset[str]
    line: int


@dataclass(frozen=True)
class Task:
    """One topic's sample and its configured labels."""

    topic: str
    labels: tuple[str, ...]
    template: str
    multi_label: bool
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class Variant:
    """A template and, per configured label, the wording the model sees instead of it."""

    name: str
    template: str | None = None
    wording: dict[str, str] = field(default_factory=dict)
    #: Positional wordings (``--compare-labels``), applied to a topic with as many labels.
    positional: tuple[str, ...] = ()

    def template_for(self, task: Task) -> str:
        return self.template if self.template is not None else task.template

    def words_for(self, task: Task) -> tuple[str, ...]:
        if self.positional:
            if len(self.positional) != len(task.labels):
                raise EvalError(
                    f"variant {self.name!r} has {len(self.positional)} labels, topic "
                    f"{task.topic!r} has {len(task.labels)} ({', '.join(task.labels)})"
                )
            return self.positional
        return tuple(self.wording.get(label, label) for label in task.labels)


BASELINE = Variant("baseline")


@dataclass(frozen=True)
class LabelStats:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Result:
    """One variant on one topic."""

    topic: str
    variant: str
    template: str
    labels: tuple[str, ...]
    words: tuple[str, ...]
    multi_label: bool
    examples: int
    accuracy: float
    macro_f1: float
    per_label: dict[str, LabelStats]
    #: Single-label: confusion[gold][predicted]. Multi-label: per label tp/fp/fn/tn.
    confusion: dict[str, dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "variant": self.variant,
            "template": self.template,
            "labels": list(self.labels),
            "words": list(self.words),
            "multi_label": self.multi_label,
            "examples": self.examples,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_label": {k: vars(v) for k, v in self.per_label.items()},
            "confusion": self.confusion,
        }


# -- reading ---------------------------------------------------------------------------------


def read_examples(path: Path, labels: Sequence[str], multi_label: bool) -> tuple[Example, ...]:
    """Parse a labelled JSONL file, checking every gold label against the topic's labels."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalError(f"cannot read {path}: {exc.strerror}") from exc
    examples = [
        _example(path, number, line, set(labels), multi_label)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not examples:
        raise EvalError(f"{path}: no examples")
    return tuple(examples)


def _example(path: Path, number: int, line: str, known: set[str], multi: bool) -> Example:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalError(f"{where}: not JSON ({exc.msg})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise EvalError(f'{where}: expected an object with a "text" string')
    gold = _gold(record, where)
    unknown = sorted(gold - known)
    if unknown:
        raise EvalError(f"{where}: label {unknown[0]!r} is not one of {sorted(known)}")
    if not multi and len(gold) != 1:
        raise EvalError(f"{where}: a single-label topic needs exactly one gold label")
    return Example(record["text"], frozenset(gold), number)


def _gold(record: dict[str, Any], where: str) -> set[str]:
    if isinstance(record.get("label"), str):
        return {record["label"]}
    labels = record.get("labels")
    if isinstance(labels, list) and all(isinstance(label, str) for label in labels):
        return set(labels)
    raise EvalError(f'{where}: needs "label" (a string) or "labels" (a list of strings)')


def read_variants(path: Path) -> list[Variant]:
    """A YAML file: ``variants: [{name, template?, labels?: {configured: wording}}]``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise EvalError(f"cannot read variants file {path}: {exc}") from exc
    entries = data.get("variants") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise EvalError(f"{path}: expected a top-level 'variants' list")
    return [_variant(path, index, entry) for index, entry in enumerate(entries)]


def _variant(path: Path, index: int, entry: Any) -> Variant:
    where = f"{path}: variants[{index}]"
    if not isinstance(entry, dict):
        raise EvalError(f"{where}: expected a mapping")
    template = entry.get("template")
    if template is not None:
        check_template(template, where)
    wording = entry.get("labels") or {}
    if not isinstance(wording, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wording.items()
    ):
        raise EvalError(f"{where}: labels must map configured labels to wordings")
    return Variant(str(entry.get("name") or f"variant {index + 1}"), template, dict(wording))


def check_template(template: object, where: str) -> None:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise EvalError(f"{where}: template must be a string with '{{}}' exactly once")


def cli_variants(templates: Sequence[str], label_lists: Sequence[str]) -> list[Variant]:
    """Variants from ``--compare-template T`` and ``--compare-labels a,b,c`` flags."""
    variants: list[Variant] = []
    for template in templates:
        check_template(template, "--compare-template")
        variants.append(Variant(f"template {template!r}", template=template))
    for csv in label_lists:
        words = tuple(parse_labels(csv))
        variants.append(Variant(f"labels {', '.join(words)}", positional=words))
    return variants


# -- scoring ---------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal (nothing when disabled)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = max(1, total)
        self.done = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr

    def advance(self, count: int, what: str) -> None:
        self.done += count
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // self.total
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{what[:30]:<30} [{bar}] {self.done}/{self.total}")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def predict(
    engine: Engine,
    task: Task,
    variant: Variant,
    batch_size: int,
    progress: Progress,
) -> list[Scores]:
    """The engine's scores for every example, labels in configured names."""
    words = variant.words_for(task)
    if len(set(words)) != len(words):
        raise EvalError(f"variant {variant.name!r}: two labels have the same wording")
    template = variant.template_for(task)
    back = dict(zip(words, task.labels, strict=True))
    scores: list[Scores] = []
    for start in range(0, len(task.examples), batch_size):
        chunk = task.examples[start : start + batch_size]
        prepared = [engine.prepare(ex.text, words, template, task.multi_label) for ex in chunk]
        for result in engine.classify(prepared):
            scores.append(Scores(tuple(back[w] for w in result.labels), result.scores))
        progress.advance(len(chunk), f"{task.topic}: {variant.name}")
    return scores


def evaluate(
    engine: Engine,
    task: Task,
    variant: Variant,
    threshold: float = 0.5,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Result:
    scores = predict(engine, task, variant, batch_size, progress or Progress(0, False))
    if task.multi_label:
        predicted = [_above(s, threshold) for s in scores]
    else:
        predicted = [frozenset([s.top_label]) for s in scores]
    gold = [ex.gold for ex in task.examples]
    metrics = multi_label_metrics if task.multi_label else single_label_metrics
    accuracy, macro, per_label, confusion = metrics(task.labels, gold, predicted)
    return Result(
        topic=task.topic,
        variant=variant.name,
        template=variant.template_for(task),
        labels=task.labels,
        words=variant.words_for(task),
        multi_label=task.multi_label,
        examples=len(task.examples),
        accuracy=accuracy,
        macro_f1=macro,
        per_label=per_label,
        confusion=confusion,
    )


def _above(scores: Scores, threshold: float) -> frozenset[str]:
    return frozenset(
        lab for lab, s in zip(scores.labels, scores.scores, strict=True) if s >= threshold
    )


Metrics = tuple[float, float, dict[str, LabelStats], dict[str, dict[str, int]]]


def single_label_metrics(
    labels: Sequence[str], gold: Sequence[frozenset[str]], predicted: Sequence[frozenset[str]]
) -> Metrics:
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for g, p in zip(gold, predicted, strict=True):
        confusion[next(iter(g))][next(iter(p))] += 1
    per_label: dict[str, LabelStats] = {}
    for label in labels:
        tp = confusion[label][label]
        fn = sum(confusion[label].values()) - tp
        fp = sum(confusion[g][label] for g in labels) - tp
        per_label[label] = label_stats(tp, fp, fn)
    seen = [s.f1 for label, s in per_label.items() if s.support or _predicted(confusion, label)]
    correct = sum(confusion[label][label] for label in labels)
    return correct / len(gold), _mean(seen), per_label, confusion


def _predicted(confusion: dict[str, dict[str, int]], label: str) -> int:
    return sum(row[label] for row in confusion.values())


def multi_label_metrics(
    labels: Sequence[str], gold: Sequence[frozenset[str]], predicted: Sequence[frozenset[str]]
) -> Metrics:
    confusion: dict[str, dict[str, int]] = {}
    per_label: dict[str, LabelStats] = {}
    for label in labels:
        pairs = [(label in g, label in p) for g, p in zip(gold, predicted, strict=True)]
        counts = {
            "tp": sum(g and p for g, p in pairs),
            "fp": sum(p and not g for g, p in pairs),
            "fn": sum(g and not p for g, p in pairs),
            "tn": sum(not g and not p for g, p in pairs),
        }
        confusion[label] = counts
        per_label[label] = label_stats(counts["tp"], counts["fp"], counts["fn"])
    exact = sum(g == p for g, p in zip(gold, predicted, strict=True))
    return exact / len(gold), _mean([s.f1 for s in per_label.values()]), per_label, confusion


def label_stats(tp: int, fp: int, fn: int) -> LabelStats:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return LabelStats(precision, recall, f1, tp + fn)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def rank(results: Iterable[Result]) -> list[tuple[str, float, float, list[Result]]]:
    """(variant, mean macro-F1, mean accuracy, its results) best first."""
    by_variant: dict[str, list[Result]] = {}
    for result in results:
        by_variant.setdefault(result.variant, []).append(result)
    rows = [
        (name, _mean([r.macro_f1 for r in rs]), _mean([r.accuracy for r in rs]), rs)
        for name, rs in by_variant.items()
    ]
    return sorted(rows, key=lambda row: (-row[1], -row[2]))


# -- reporting -------------------------------------------------------------------------------


def format_result(result: Result) -> str:
    mode = "multi-label" if result.multi_label else "single-label"
    lines = [
        f"== {result.topic}: {result.examples} examples, {len(result.labels)} labels, {mode}, "
        f"variant {result.variant!r} (template {result.template!r})",
        f"accuracy {result.accuracy:.3f}   macro-F1 {result.macro_f1:.3f}",
        "",
        *_per_label_table(result),
        "",
        *(_multi_table(result) if result.multi_label else _confusion_table(result)),
    ]
    return "\n".join(lines)


def _name(result: Result, label: str) -> str:
    word = result.words[result.labels.index(label)]
    return label if word == label else f"{label} ({word!r})"


def _per_label_table(result: Result) -> list[str]:
    width = max(len(_name(result, label)) for label in result.labels) + 2
    lines = [f"{'label':<{width}}precision  recall     f1  support"]
    for label in result.labels:
        s = result.per_label[label]
        lines.append(
            f"{_name(result, label):<{width}}{s.precision:9.3f} {s.recall:7.3f} "
            f"{s.f1:6.3f} {s.support:8d}"
        )
    return lines


def _confusion_table(result: Result) -> list[str]:
    width = max(len(label) for label in result.labels) + 5
    numbers = "".join(f"{i:>5}" for i in range(1, len(result.labels) + 1))
    lines = ["confusion (rows: gold, columns: predicted)", f"{'':<{width}}{numbers}"]
    for i, gold in enumerate(result.labels, start=1):
        cells = "".join(f"{result.confusion[gold][p]:>5}" for p in result.labels)
        lines.append(f"{f'{i:>2} {gold}':<{width}}{cells}")
    return lines


def _multi_table(result: Result) -> list[str]:
    width = max(len(label) for label in result.labels) + 2
    lines = [f"{'label':<{width}}   tp   fp   fn   tn"]
    for label in result.labels:
        c = result.confusion[label]
        lines.append(f"{label:<{width}}{c['tp']:>5}{c['fp']:>5}{c['fn']:>5}{c['tn']:>5}")
    return lines


def format_ranking(results: Sequence[Result]) -> str:
    topics = list(dict.fromkeys(r.topic for r in results))
    ranked = rank(results)
    width = max(len(name) for name, *_ in ranked) + 2
    header = f"{'rank':<6}{'variant':<{width}}{'macro-F1':>9}{'accuracy':>10}"
    header += "".join(f"{topic[:14]:>16}" for topic in topics)
    lines = ["== ranking (macro-F1, mean over topics; per topic: macro-F1)", header]
    for place, (name, macro, accuracy, rs) in enumerate(ranked, start=1):
        per_topic = {r.topic: r.macro_f1 for r in rs}
        cells = "".join(f"{per_topic.get(topic, float('nan')):>16.3f}" for topic in topics)
        lines.append(f"{place:<6}{name:<{width}}{macro:>9.3f}{accuracy:>10.3f}{cells}")
    return "\n".join(lines)


def format_report(results: Sequence[Result]) -> str:
    """Each topic's report for one variant; with several, the ranking and the winner's."""
    variants = list(dict.fromkeys(r.variant for r in results))
    if len(variants) == 1:
        return "\n\n".join(format_result(r) for r in results)
    best = rank(results)[0][0]
    details = [format_result(r) for r in results if r.variant == best]
    return "\n\n".join([format_ranking(results), f"best: {best!r}", *details])


def run_eval(
    engine: Engine,
    tasks: Sequence[Task],
    variants: Sequence[Variant],
    threshold: float = 0.5,
    batch_size: int = 32,
    show_progress: bool = False,
) -> list[Result]:
    """Every variant on every topic."""
    total = sum(len(task.examples) for task in tasks) * len(variants)
    progress = Progress(total, show_progress)
    return [
        evaluate(engine, task, variant, threshold, batch_size, progress)
        for variant in variants
        for task in tasks
    ]


# -- command line ----------------------------------------------------------------------------

#: Exit codes, as the CLI's: 2 bad arguments, config or sample; 3 the engine could not load.
EXIT_USAGE = 2
EXIT_ENGINE = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", nargs="+", metavar="SAMPLE.jsonl", type=Path)
    parser.add_argument("--config", help="service YAML: its engine, topics, labels, templates")
    parser.add_argument("--topic", help="the input topic every sample belongs to")
    parser.add_argument("--engine", choices=["nli", "embedding"], help="engine kind")
    parser.add_argument("--model", help="model directory or id (default: the kind's default)")
    parser.add_argument("--labels", help="comma-separated labels (without --config)")
    parser.add_argument("--template", default="{}", help="hypothesis template (without --config)")
    parser.add_argument("--multi-label", action="store_true", help="(without --config)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", help="auto, float16, bfloat16, float32")
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
    parser.add_argument("--threshold", type=float, default=0.5, help="multi-label cut-off")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument(
        "--progress",
        choices=["auto", "always", "never"],
        default="auto",
        help="progress bar on stderr (auto: on a terminal, for long samples)",
    )


def command(args: argparse.Namespace) -> int:
    """Run ``stream-classifier eval``; print the report; return the exit code."""
    from stream_classifier.config import ConfigError
    from stream_classifier.engine import EngineError, load_engine

    try:
        engine_config, max_tokens, tasks = _setup(args)
        variants = [BASELINE, *_variants(args)]
        if args.compare_labels and len(tasks) > 1:
            raise EvalError("--compare-labels needs samples of a single topic")
    except (EvalError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    try:
        engine = load_engine(engine_config, max_tokens)
        results = run_eval(
            engine, tasks, variants, args.threshold, args.batch_size, _show_progress(args, tasks)
        )
    except EngineError as exc:
        print(f"engine: {exc}", file=sys.stderr)
        return EXIT_ENGINE
    except EvalError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(_json_report(results, engine.model_id), ensure_ascii=False, indent=2))
    else:
        print(f"model: {engine.model_id}\n")
        print(format_report(results))
    return 0


def _variants(args: argparse.Namespace) -> list[Variant]:
    variants = cli_variants(args.compare_template, args.compare_labels)
    for path in args.compare:
        variants += read_variants(path)
    names = [BASELINE.name, *(v.name for v in variants)]
    if len(set(names)) != len(names):
        raise EvalError("two variants have the same name")
    return variants


def _show_progress(args: argparse.Namespace, tasks: Sequence[Task]) -> bool:
    if args.progress != "auto":
        return bool(args.progress == "always")
    return sys.stderr.isatty() and sum(len(t.examples) for t in tasks) >= 100


def _json_report(results: Sequence[Result], model_id: str) -> dict[str, Any]:
    ranked = rank(results)
    return {
        "model": model_id,
        "ranking": [{"variant": n, "macro_f1": m, "accuracy": a} for n, m, a, _ in ranked],
        "results": [r.as_dict() for r in results],
    }


def _setup(args: argparse.Namespace) -> tuple[EngineConfig, int, list[Task]]:
    """The engine to load, its token budget and the tasks, from a config or from flags."""
    if args.batch_size < 1 or not 0.0 <= args.threshold <= 1.0:
        raise EvalError("--batch-size must be 1 or more and --threshold within 0..1")
    if args.config:
        config = load_config(args.config)
        engine = _override(config.engine, args)
        return engine, config.processing.max_batch_tokens, _tasks_from_config(config, args)
    if not args.labels:
        raise EvalError("give --config, or --labels (and --template) to evaluate without one")
    labels = tuple(parse_labels(args.labels))
    check_template(args.template, "--template")
    engine = _override(EngineConfig(kind=args.engine or "nli"), args)
    tasks = [
        Task(
            args.topic or path.stem,
            labels,
            args.template,
            args.multi_label,
            read_examples(path, labels, args.multi_label),
        )
        for path in args.samples
    ]
    return engine, 65536, tasks


def _override(engine: EngineConfig, args: argparse.Namespace) -> EngineConfig:
    """The engine config with the flags given on the command line applied over it."""
    changes = {
        name: getattr(args, name)
        for name in ("model", "device", "dtype")
        if getattr(args, name) is not None
    }
    if args.engine is not None and args.engine != engine.kind:
        changes["kind"] = args.engine
        changes.setdefault("model", None)  # the new kind's default model
    data = {**engine.model_dump(), **changes}
    return EngineConfig(**data)


def _tasks_from_config(config: ServiceConfig, args: argparse.Namespace) -> list[Task]:
    tasks: list[Task] = []
    for path in args.samples:
        topic = _topic_of(config, path, args.topic)
        examples = read_examples(path, topic.labels, topic.multi_label)
        tasks.append(
            Task(
                topic.input,
                tuple(topic.labels),
                topic.hypothesis_template,
                topic.multi_label,
                examples,
            )
        )
    return tasks


def _topic_of(config: ServiceConfig, path: Path, topic: str | None) -> TopicConfig:
    names = [t.input for t in config.topics]
    for name in (topic, path.stem):
        if name is not None and name in names:
            return config.topic(name)
    if topic is not None:
        raise EvalError(f"--topic {topic!r} is not an input topic of the config ({names})")
    if len(names) == 1:
        return config.topics[0]
    raise EvalError(
        f"{path}: which topic? name the file <topic>.jsonl or pass --topic (one of {names})"
    )
