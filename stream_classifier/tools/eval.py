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
Multi-label: a label is predicted when its score reaches ``--threshold`` (when not given:
the topic's threshold for that label, as the service flags it, else 0.5); accuracy is the
exact-set match rate; macro-F1 averages every label's F1.

Decisions. For a configured topic with decision lanes, each example is also decided as the
service would (:func:`stream_classifier.decisions.decide`) and compared with its expected
lane: the line's ``"expected_decision"`` when it has one, else the first lane whose
``labels`` name one of the line's gold labels, else the default (last) lane. Decision
accuracy: the share decided into the expected lane; "acted on as expected": the share acted
on (any lane but the default) where some action is expected and left to the default where
that is expected. Per lane: precision, recall and F1; "any action": every lane but the
default one against the default. ``--sweep LANE`` re-decides the same scores with that
lane's cut-off at other values, to tune it before deploying.

Shadow policies. A configured topic with a ``shadow`` is evaluated twice on its sample: as
configured, and as its shadow (``<topic> (shadow)``, baseline variant only, outside the
ranking); the report then compares the two: decision accuracy of each, and on how many
examples their decisions agree, with the changes from live to shadow counted. The shadow's
labels must include the sample's gold labels.
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
from stream_classifier.decisions import decide
from stream_classifier.engine.base import Engine, Scores
from stream_classifier.messages import parse_labels

#: The name of a shadow policy's task: its live topic's, with this after it.
SHADOW_SUFFIX = " (shadow)"


class EvalError(Exception):
    """The sample or the variants cannot be evaluated; the message says where and why."""


@dataclass(frozen=True)
class Example:
    text: str
    gold: frozenset[str]
    line: int
    #: The lane the line says the event should take (``"expected_decision"``), if it says.
    expected_decision: str | None = None


@dataclass(frozen=True)
class Task:
    """One topic's sample and its configured labels."""

    topic: str
    labels: tuple[str, ...]
    template: str
    multi_label: bool
    examples: tuple[Example, ...]
    #: The configured topic (thresholds, lanes), where the labels came from a config.
    policy: TopicConfig | None = None
    #: For a shadow policy's task: the live topic it shadows.
    shadow_of: str | None = None

    @property
    def decides(self) -> bool:
        """Does this topic define decision lanes (so that eval scores its decisions)?"""
        return self.policy is not None and bool(self.policy.lanes)


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
class Mismatch:
    """An example whose decision differs from the one expected."""

    line: int
    expected: str
    decided: str
    #: The event's highest scores (up to MISMATCH_SCORES labels), highest first.
    scores: dict[str, float]


@dataclass(frozen=True)
class SweepRow:
    """The decisions with one lane's cut-off at ``value`` (all else as configured)."""

    value: float
    per_lane: dict[str, LabelStats]
    any_action: LabelStats


@dataclass(frozen=True)
class DecisionResult:
    """A topic's decision lanes against the expected lanes of a sample."""

    lanes: tuple[str, ...]
    #: How many examples stated ``expected_decision``; the others were derived.
    stated: int
    per_lane: dict[str, LabelStats]
    #: Every lane but the default (last) one, taken together, against the default.
    any_action: LabelStats
    #: confusion[expected][decided]
    confusion: dict[str, dict[str, int]]
    mismatches: tuple[Mismatch, ...]
    #: Examples decided into their expected lane, and decided right as far as acting goes
    #: (acted on, any lane but the default, where a lane other than the default is expected;
    #: the default lane where it is expected).
    right: int = 0
    acted_right: int = 0
    #: The lane whose cut-off was swept (None: no sweep) and the rows.
    sweep_lane: str | None = None
    sweep: tuple[SweepRow, ...] = ()
    #: Each example's decided lane, in the sample's order.
    decided: tuple[str, ...] = ()

    @property
    def default(self) -> str:
        return self.lanes[-1]

    @property
    def examples(self) -> int:
        return sum(sum(row.values()) for row in self.confusion.values())

    @property
    def accuracy(self) -> float:
        """Decision accuracy: the share of examples decided into their expected lane."""
        return self.right / self.examples if self.examples else 0.0

    @property
    def action_accuracy(self) -> float:
        """The share acted on when they should be and left to the default when they should."""
        return self.acted_right / self.examples if self.examples else 0.0

    def acted_counts(self) -> tuple[int, int, int, int]:
        """(acted on, expecting action; left to the default, expecting the default)."""
        lanes, default = self.lanes, self.default
        acting = [lane for lane in lanes if lane != default]
        harmful = sum(self.confusion[e][d] for e in acting for d in lanes)
        acted = sum(self.confusion[e][d] for e in acting for d in acting)
        harmless = sum(self.confusion[default].values())
        return acted, harmful, self.confusion[default][default], harmless

    def as_dict(self) -> dict[str, Any]:
        return {
            "lanes": list(self.lanes),
            "default": self.default,
            "stated": self.stated,
            "accuracy": self.accuracy,
            "action_accuracy": self.action_accuracy,
            "per_lane": {k: vars(v) for k, v in self.per_lane.items()},
            "any_action": vars(self.any_action),
            "confusion": self.confusion,
            "mismatches": [vars(m) for m in self.mismatches],
            "sweep_lane": self.sweep_lane,
            "sweep": [
                {
                    "value": row.value,
                    "per_lane": {k: vars(v) for k, v in row.per_lane.items()},
                    "any_action": vars(row.any_action),
                }
                for row in self.sweep
            ],
        }


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
    #: The decision lanes against the sample (None: the topic defines no lanes).
    decisions: DecisionResult | None = None

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
            "decisions": None if self.decisions is None else self.decisions.as_dict(),
        }


# -- reading ---------------------------------------------------------------------------------


def read_examples(
    path: Path, labels: Sequence[str], multi_label: bool, lanes: Sequence[str] = ()
) -> tuple[Example, ...]:
    """Parse a labelled JSONL file, checking every gold label against the topic's labels.

    ``lanes``: the topic's decision lanes, which an ``"expected_decision"`` must name (none:
    a line stating one is an error, there is nothing to compare it with).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalError(f"cannot read {path}: {exc.strerror}") from exc
    examples = [
        _example(path, number, line, set(labels), multi_label, tuple(lanes))
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not examples:
        raise EvalError(f"{path}: no examples")
    return tuple(examples)


def _example(
    path: Path, number: int, line: str, known: set[str], multi: bool, lanes: tuple[str, ...]
) -> Example:
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
    expected = record.get("expected_decision")
    if expected is not None:
        if not lanes:
            raise EvalError(
                f"{where}: expected_decision needs a topic with decision lanes (--config)"
            )
        if expected not in lanes:
            raise EvalError(f"{where}: expected_decision {expected!r} is not one of {list(lanes)}")
    return Example(record["text"], frozenset(gold), number, expected)


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
    threshold: float | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    sweep: Sweep | None = None,
) -> Result:
    """``variant`` on ``task``: label metrics, and decision metrics where the topic has lanes.

    ``threshold``: multi-label, the score from which a label counts as predicted (None: the
    topic's threshold for the label, else 0.5).
    """
    scores = predict(engine, task, variant, batch_size, progress or Progress(0, False))
    if task.multi_label:
        predicted = [_above(s, _cut_offs(task, threshold)) for s in scores]
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
        decisions=evaluate_decisions(task, scores, sweep) if task.decides else None,
    )


#: The multi-label cut-off for a label the topic sets no threshold for.
DEFAULT_THRESHOLD = 0.5


def _cut_offs(task: Task, threshold: float | None) -> dict[str, float]:
    def cut(label: str) -> float:
        if threshold is not None:
            return threshold
        configured = task.policy.threshold(label) if task.policy is not None else None
        return DEFAULT_THRESHOLD if configured is None else configured

    return {label: cut(label) for label in task.labels}


def _above(scores: Scores, cut_offs: dict[str, float]) -> frozenset[str]:
    return frozenset(
        lab for lab, s in zip(scores.labels, scores.scores, strict=True) if s >= cut_offs[lab]
    )


# -- decisions -------------------------------------------------------------------------------

#: How many of an event's highest scores a mismatch keeps.
MISMATCH_SCORES = 3

#: ``--sweep``'s values when the flag names none.
SWEEP_VALUES = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class Sweep:
    """``--sweep LANE[=V1,V2,...]``: re-decide with the lane's cut-off at each value."""

    lane: str
    values: tuple[float, ...] = SWEEP_VALUES


def parse_sweep(text: str) -> Sweep:
    lane, _, values = text.partition("=")
    if not lane.strip():
        raise EvalError(f"--sweep {text!r}: name a lane, e.g. --sweep review=0.05,0.1,0.2")
    if not values.strip():
        return Sweep(lane.strip())
    try:
        numbers = tuple(float(v) for v in values.split(","))
    except ValueError as exc:
        raise EvalError(f"--sweep {text!r}: values must be numbers ({exc})") from exc
    if not all(0.0 <= v <= 1.0 for v in numbers):
        raise EvalError(f"--sweep {text!r}: values must be within 0..1")
    return Sweep(lane.strip(), numbers)


def expected_lane(policy: TopicConfig, example: Example) -> str:
    """The lane ``example`` should take: as stated, else the first lane naming a gold label.

    Lanes without a ``labels`` list name no label; a gold label no lane names (a harmless
    one) expects the default lane.
    """
    if example.expected_decision is not None:
        return example.expected_decision
    for lane in policy.lanes:
        if lane.labels is not None and example.gold.intersection(lane.labels):
            return lane.name
    return policy.lanes[-1].name


def with_cut_off(policy: TopicConfig, lane_name: str, value: float) -> TopicConfig:
    """``policy`` with one lane's cut-off at ``value``: its ``min_score``, or, for a lane that
    holds on flagged labels, the threshold of each label it names."""
    names = [lane.name for lane in policy.lanes]
    if lane_name not in names:
        raise EvalError(f"--sweep: topic {policy.input!r} has no lane {lane_name!r} ({names})")
    lane = policy.lanes[names.index(lane_name)]
    if lane.min_score is not None:
        lanes = list(policy.lanes)
        lanes[names.index(lane_name)] = lane.model_copy(update={"min_score": value})
        return policy.model_copy(update={"lanes": lanes})
    if lane.labels is None:
        raise EvalError(f"--sweep: lane {lane_name!r} is the default lane, it has no cut-off")
    thresholds = {**policy.thresholds, **{label: value for label in lane.labels}}
    return policy.model_copy(update={"thresholds": thresholds})


def decision_metrics(
    lanes: Sequence[str], expected: Sequence[str], decided: Sequence[str]
) -> tuple[dict[str, LabelStats], LabelStats, dict[str, dict[str, int]]]:
    """Per lane precision/recall/F1, "any action" (not the default, last lane), confusion."""
    confusion = {e: {d: 0 for d in lanes} for e in lanes}
    for e, d in zip(expected, decided, strict=True):
        confusion[e][d] += 1
    per_lane = {}
    for lane in lanes:
        tp = confusion[lane][lane]
        per_lane[lane] = label_stats(
            tp, _predicted(confusion, lane) - tp, sum(confusion[lane].values()) - tp
        )
    default = lanes[-1]
    acted = [(e != default, d != default) for e, d in zip(expected, decided, strict=True)]
    any_action = label_stats(
        sum(e and d for e, d in acted),
        sum(d and not e for e, d in acted),
        sum(e and not d for e, d in acted),
    )
    return per_lane, any_action, confusion


def _decide_all(policy: TopicConfig, scores: Sequence[Scores]) -> list[str]:
    decided = []
    for s in scores:
        decision = decide(policy, s.labels, s.scores).decision
        assert decision is not None  # a topic with lanes always ends with the default one
        decided.append(decision)
    return decided


def evaluate_decisions(
    task: Task, scores: Sequence[Scores], sweep: Sweep | None = None
) -> DecisionResult:
    """The topic's lanes on ``scores`` against each example's expected lane."""
    policy = task.policy
    assert policy is not None and policy.lanes
    lanes = tuple(lane.name for lane in policy.lanes)
    expected = [expected_lane(policy, example) for example in task.examples]
    decided = _decide_all(policy, scores)
    per_lane, any_action, confusion = decision_metrics(lanes, expected, decided)
    mismatches = tuple(
        Mismatch(ex.line, e, d, dict(list(zip(s.labels, s.scores, strict=True))[:MISMATCH_SCORES]))
        for ex, e, d, s in zip(task.examples, expected, decided, scores, strict=True)
        if e != d
    )
    rows: list[SweepRow] = []
    if sweep is not None:
        for value in sweep.values:
            swept = _decide_all(with_cut_off(policy, sweep.lane, value), scores)
            lane_stats, acted, _ = decision_metrics(lanes, expected, swept)
            rows.append(SweepRow(value, lane_stats, acted))
    default = lanes[-1]
    return DecisionResult(
        lanes=lanes,
        stated=sum(example.expected_decision is not None for example in task.examples),
        per_lane=per_lane,
        any_action=any_action,
        confusion=confusion,
        mismatches=mismatches,
        right=sum(e == d for e, d in zip(expected, decided, strict=True)),
        acted_right=sum(
            (e == default) == (d == default) for e, d in zip(expected, decided, strict=True)
        ),
        sweep_lane=None if sweep is None else sweep.lane,
        sweep=tuple(rows),
        decided=tuple(decided),
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
        if result.topic.endswith(SHADOW_SUFFIX):
            continue  # a shadow is compared with its live policy, not ranked
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
        f"accuracy {result.accuracy:.3f}   macro-F1 {result.macro_f1:.3f}" + _decided(result),
        "",
        *_per_label_table(result),
        "",
        *(_multi_table(result) if result.multi_label else _confusion_table(result)),
    ]
    if result.decisions is not None:
        lines += ["", *format_decisions(result.decisions)]
    return "\n".join(lines)


def _decided(result: Result) -> str:
    """The headline's decision accuracy, beside the label accuracy (where there are lanes)."""
    if result.decisions is None:
        return ""
    d = result.decisions
    return f"   decision accuracy {d.accuracy:.3f}   acted on as expected {d.action_accuracy:.3f}"


#: How many mismatched examples the text report lists (``--json`` has them all).
MISMATCHES_SHOWN = 10


def format_decisions(decisions: DecisionResult) -> list[str]:
    lanes = decisions.lanes
    derived = sum(decisions.confusion[lane][d] for lane in lanes for d in lanes)
    derived -= decisions.stated
    width = max(12, *(len(lane) + 2 for lane in lanes))
    lines = [
        f"decisions: lanes {', '.join(lanes)} (default {decisions.default!r}); expected lane: "
        f"{decisions.stated} stated (expected_decision), {derived} from the gold label",
        f"{'lane':<{width}}precision  recall     f1  expected  decided",
    ]
    rows = [*((lane, decisions.per_lane[lane]) for lane in lanes)]
    rows.append(("any action", decisions.any_action))
    for lane, stats in rows:
        if lane == "any action":
            decided = sum(
                decisions.confusion[e][d] for e in lanes for d in lanes if d != decisions.default
            )
        else:
            decided = sum(decisions.confusion[e][lane] for e in lanes)
        lines.append(
            f"{lane:<{width}}{stats.precision:9.3f} {stats.recall:7.3f} {stats.f1:6.3f} "
            f"{stats.support:9d} {decided:8d}"
        )
    lines.append(_accuracy_line(decisions))
    cell = max(7, *(len(lane) + 2 for lane in lanes))
    lines += ["", "decision confusion (rows: expected, columns: decided)"]
    lines.append(f"{'':<{width}}" + "".join(f"{lane:>{cell}}" for lane in lanes))
    for expected in lanes:
        counts = "".join(f"{decisions.confusion[expected][d]:>{cell}}" for d in lanes)
        lines.append(f"{expected:<{width}}{counts}")
    if decisions.mismatches:
        lines += ["", "mismatches (sample line: expected -> decided; highest scores)"]
        for m in decisions.mismatches[:MISMATCHES_SHOWN]:
            scores = ", ".join(f"{label} {score:.3f}" for label, score in m.scores.items())
            lines.append(f"{m.line:>6}: {m.expected} -> {m.decided}; {scores}")
        more = len(decisions.mismatches) - MISMATCHES_SHOWN
        if more > 0:
            lines.append(f"  ... and {more} more (--json lists them all)")
    if decisions.sweep:
        lines += ["", *_sweep_table(decisions)]
    return lines


def _accuracy_line(decisions: DecisionResult) -> str:
    """Decision accuracy, exact and as far as acting goes (was a harmful text acted on?)."""
    acted, harmful, allowed, harmless = decisions.acted_counts()
    return (
        f"decision accuracy {decisions.accuracy:.3f} ({decisions.right}/{decisions.examples} "
        f"in the expected lane); acted on as expected {decisions.action_accuracy:.3f} "
        f"({acted}/{harmful} expecting a lane other than {decisions.default!r} got one, "
        f"{allowed}/{harmless} expecting it got it)"
    )


def _sweep_table(decisions: DecisionResult) -> list[str]:
    columns = [lane for lane in decisions.lanes if lane != decisions.default]
    columns += [decisions.default, "any action"]
    width = max(13, *(len(c) + 2 for c in columns))
    lines = [
        f"sweep: lane {decisions.sweep_lane}'s cut-off at each value, all else as "
        "configured (precision / recall)",
        "value " + "".join(f"{c:>{width}}" for c in columns),
    ]
    for row in decisions.sweep:
        stats = [*(row.per_lane[c] for c in columns[:-1]), row.any_action]
        cells = "".join(f"{f'{s.precision:.2f} / {s.recall:.2f}':>{width}}" for s in stats)
        lines.append(f"{row.value:<6.3g}{cells}")
    return lines


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
    """Each topic's report for one variant; with several, the ranking and the winner's;
    then each shadow against its live policy."""
    variants = list(dict.fromkeys(r.variant for r in results))
    shadows = [format_shadow(*pair) for pair in shadow_pairs(results)]
    if len(variants) == 1:
        return "\n\n".join([*(format_result(r) for r in results), *shadows])
    best = rank(results)[0][0]
    details = [format_result(r) for r in results if r.variant == best]
    return "\n\n".join([format_ranking(results), f"best: {best!r}", *details, *shadows])


def shadow_pairs(results: Sequence[Result]) -> list[tuple[Result, Result]]:
    """(live, shadow) baseline results of each shadowed topic that decides."""
    baseline = {r.topic: r for r in results if r.variant == BASELINE.name}
    return [
        (baseline[name.removesuffix(SHADOW_SUFFIX)], shadow)
        for name, shadow in baseline.items()
        if name.endswith(SHADOW_SUFFIX)
        and shadow.decisions is not None
        and name.removesuffix(SHADOW_SUFFIX) in baseline
        and baseline[name.removesuffix(SHADOW_SUFFIX)].decisions is not None
    ]


def shadow_comparison(live: Result, shadow: Result) -> dict[str, Any]:
    """Decision accuracy of each, and where their decisions differ (live -> shadow)."""
    assert live.decisions is not None and shadow.decisions is not None
    pairs = list(zip(live.decisions.decided, shadow.decisions.decided, strict=True))
    changes: dict[str, int] = {}
    for was, now in pairs:
        if was != now:
            changes[f"{was} -> {now}"] = changes.get(f"{was} -> {now}", 0) + 1
    return {
        "topic": live.topic,
        "examples": len(pairs),
        "agree": sum(was == now for was, now in pairs),
        "live_accuracy": live.decisions.accuracy,
        "shadow_accuracy": shadow.decisions.accuracy,
        "live_action_accuracy": live.decisions.action_accuracy,
        "shadow_action_accuracy": shadow.decisions.action_accuracy,
        "changes": dict(sorted(changes.items())),
    }


def format_shadow(live: Result, shadow: Result) -> str:
    c = shadow_comparison(live, shadow)
    changes = ", ".join(f"{k} {v}" for k, v in c["changes"].items()) or "none"
    return "\n".join(
        [
            f"== {c['topic']}: live against shadow on {c['examples']} examples",
            f"decision accuracy {c['live_accuracy']:.3f} live, {c['shadow_accuracy']:.3f} shadow"
            f"   acted on as expected {c['live_action_accuracy']:.3f} live, "
            f"{c['shadow_action_accuracy']:.3f} shadow",
            f"decisions agree on {c['agree']} of {c['examples']}; changed: {changes}",
        ]
    )


def run_eval(
    engine: Engine,
    tasks: Sequence[Task],
    variants: Sequence[Variant],
    threshold: float | None = None,
    batch_size: int = 32,
    show_progress: bool = False,
    sweep: Sweep | None = None,
) -> list[Result]:
    """Every variant on every topic; ``sweep`` on the topics that have its lane."""
    if sweep is not None and not any(_has_lane(task, sweep.lane) for task in tasks):
        raise EvalError(f"--sweep: no topic evaluated here has a lane {sweep.lane!r}")
    total = sum(len(task.examples) for task in tasks) * len(variants)
    progress = Progress(total, show_progress)
    return [
        evaluate(
            engine,
            task,
            variant,
            threshold,
            batch_size,
            progress,
            sweep if sweep is not None and _has_lane(task, sweep.lane) else None,
        )
        for variant in variants
        for task in tasks
        if task.shadow_of is None or variant.name == BASELINE.name
    ]


def _has_lane(task: Task, lane: str) -> bool:
    return task.policy is not None and any(lane == each.name for each in task.policy.lanes)


# -- command line ----------------------------------------------------------------------------

#: Exit codes, as the CLI's: 2 bad arguments, config or sample; 3 the engine could not load.
EXIT_USAGE = 2
EXIT_ENGINE = 3


def command(args: argparse.Namespace) -> int:
    """Run ``stream-classifier eval``; print the report; return the exit code.

    ``args`` is what the CLI parsed: its arguments are defined in ``cli._add_eval_arguments``,
    so that building the command line does not import this module.
    """
    from stream_classifier.config import ConfigError
    from stream_classifier.engine import EngineError, load_engine

    try:
        engine_config, max_tokens, tasks = _setup(args)
        variants = [BASELINE, *_variants(args)]
        if args.compare_labels and len(tasks) > 1:
            raise EvalError("--compare-labels needs samples of a single topic")
        sweep = None if args.sweep is None else parse_sweep(args.sweep)
        if sweep is not None and not any(_has_lane(task, sweep.lane) for task in tasks):
            raise EvalError(f"--sweep: no topic evaluated here has a lane {sweep.lane!r}")
    except (EvalError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    try:
        engine = load_engine(engine_config, max_tokens)
        results = run_eval(
            engine,
            tasks,
            variants,
            args.threshold,
            args.batch_size,
            _show_progress(args, tasks),
            sweep,
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
        "shadows": [shadow_comparison(*pair) for pair in shadow_pairs(results)],
    }


def _setup(args: argparse.Namespace) -> tuple[EngineConfig, int, list[Task]]:
    """The engine to load, its token budget and the tasks, from a config or from flags."""
    if args.batch_size < 1 or (args.threshold is not None and not 0.0 <= args.threshold <= 1.0):
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
        lanes = [lane.name for lane in topic.lanes]
        examples = read_examples(path, topic.labels, topic.multi_label, lanes)
        tasks.append(
            Task(
                topic.input,
                tuple(topic.labels),
                topic.hypothesis_template,
                topic.multi_label,
                examples,
                topic,
            )
        )
        shadow = topic.shadow_policy()
        if shadow is not None:
            tasks.append(_shadow_task(shadow, path, topic.input))
    return tasks


def _shadow_task(shadow: TopicConfig, path: Path, live: str) -> Task:
    lanes = [lane.name for lane in shadow.lanes]
    try:
        examples = read_examples(path, shadow.labels, shadow.multi_label, lanes)
    except EvalError as exc:
        raise EvalError(f"{live}'s shadow: {exc}") from None
    return Task(
        live + SHADOW_SUFFIX,
        tuple(shadow.labels),
        shadow.hypothesis_template,
        shadow.multi_label,
        examples,
        shadow,
        shadow_of=live,
    )


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
