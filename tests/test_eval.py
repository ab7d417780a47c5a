"""``stream-classifier eval``: metrics, variants, the report, and the command itself."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from stream_classifier import cli
from stream_classifier.config import Lane, ServiceConfig
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.tools.eval import (
    EvalError,
    Example,
    Variant,
    decision_metrics,
    expected_lane,
    multi_label_metrics,
    read_variants,
    single_label_metrics,
)


class KeywordEngine:
    """Scores 0.9 for a label whose wording occurs in the text, 0.1 otherwise."""

    model_id = "keyword-fake"

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        return Prepared(tuple(labels), multi_label, 1, text.lower())

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        results = []
        for item in batch:
            text = str(item.payload)
            scored = sorted(item.labels, key=lambda label: label not in text)
            results.append(
                Scores(tuple(scored), tuple(0.9 if lab in text else 0.1 for lab in scored))
            )
        return results

    def warmup(self) -> None:
        pass


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stream_classifier.engine.load_engine", lambda c, t: KeywordEngine())


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "support.jsonl",
        [
            {"text": "please fix my bill", "label": "billing"},
            {"text": "the bill is wrong", "label": "billing"},
            {"text": "shipping is slow", "label": "shipping"},
            {"text": "where is my parcel", "label": "shipping"},
        ],
    )


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--log-level", "WARNING", "eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_single_label_metrics() -> None:
    gold = [frozenset([g]) for g in ("a", "a", "b", "c")]
    predicted = [frozenset([p]) for p in ("a", "b", "b", "a")]
    accuracy, macro, per_label, confusion = single_label_metrics(["a", "b", "c"], gold, predicted)
    assert accuracy == 0.5
    assert confusion["a"] == {"a": 1, "b": 1, "c": 0}
    assert per_label["a"].precision == 0.5 and per_label["a"].recall == 0.5
    assert per_label["b"].f1 == pytest.approx(2 / 3)
    assert per_label["c"].f1 == 0.0
    assert macro == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def test_single_label_macro_f1_skips_labels_never_seen_nor_predicted() -> None:
    gold = [frozenset(["a"]), frozenset(["b"])]
    accuracy, macro, _, _ = single_label_metrics(["a", "b", "unused"], gold, gold)
    assert (accuracy, macro) == (1.0, 1.0)


def test_multi_label_metrics() -> None:
    gold = [frozenset(["a", "b"]), frozenset(["b"])]
    predicted = [frozenset(["a", "b"]), frozenset(["a", "b"])]
    accuracy, macro, per_label, confusion = multi_label_metrics(["a", "b"], gold, predicted)
    assert accuracy == 0.5
    assert confusion["a"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 0}
    assert per_label["b"].f1 == 1.0
    assert macro == pytest.approx((2 / 3 + 1.0) / 2)


def test_report_with_confusion_table(
    fake_engine: None, sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "--labels", "billing,shipping", str(sample))
    assert code == 0
    assert "== support: 4 examples, 2 labels, single-label, variant 'baseline'" in out
    # "bill" texts don't contain "billing": both fall to the label sorted first (billing)
    assert "accuracy 0.750   macro-F1 0.733" in out
    assert " 1 billing       2    0" in out
    assert " 2 shipping      1    1" in out


def test_compare_ranks_label_wordings(
    fake_engine: None, sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys,
        "--labels",
        "shipping,billing",
        str(sample),
        "--compare-labels",
        "ship,bill",
        "--compare-template",
        "about {}",
    )
    assert code == 0
    ranking = out.split("== ranking")[1].splitlines()
    assert ranking[2].split()[:3] == ["1", "labels", "ship,"]
    assert "best: 'labels ship, bill'" in out
    assert "shipping ('ship')" in out  # the winner's per-label table shows its wording


def test_variants_file(tmp_path: Path) -> None:
    path = tmp_path / "variants.yaml"
    path.write_text(
        "variants:\n  - name: short\n    template: 'x {}'\n    labels: {billing: bill}\n"
    )
    assert read_variants(path) == [Variant("short", "x {}", {"billing": "bill"})]
    path.write_text("variants:\n  - template: 'no slot'\n")
    with pytest.raises(EvalError, match="exactly once"):
        read_variants(path)


def test_json_output_and_multi_label(
    fake_engine: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = write_jsonl(
        tmp_path / "tags.jsonl",
        [
            {"text": "bill and shipping", "labels": ["bill", "shipping"]},
            {"text": "shipping only", "labels": ["shipping"]},
        ],
    )
    code, out, _ = run_cli(
        capsys, "--labels", "bill,shipping", "--multi-label", "--json", str(sample)
    )
    assert code == 0
    report = json.loads(out)
    assert report["model"] == "keyword-fake"
    (result,) = report["results"]
    assert (result["accuracy"], result["macro_f1"]) == (1.0, 1.0)
    assert result["confusion"]["bill"] == {"tp": 1, "fp": 0, "fn": 0, "tn": 1}


def test_config_topics_by_file_name(
    fake_engine: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "service.yaml"
    config.write_text(
        "topics:\n"
        "  - {input: support, output: s.out, dead_letter: s.dlq, labels: [bill, ship]}\n"
        "  - {input: other, output: o.out, dead_letter: o.dlq, labels: [x, y]}\n"
    )
    sample = write_jsonl(tmp_path / "support.jsonl", [{"text": "a bill", "label": "bill"}])
    code, out, _ = run_cli(capsys, "--config", str(config), str(sample))
    assert code == 0 and "== support: 1 examples" in out
    stray = write_jsonl(tmp_path / "unknown.jsonl", [{"text": "a bill", "label": "bill"}])
    code, _, err = run_cli(capsys, "--config", str(config), str(stray))
    assert code == 2 and "pass --topic" in err


def test_unknown_gold_label_names_the_line(
    fake_engine: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = write_jsonl(
        tmp_path / "s.jsonl", [{"text": "t", "label": "a"}, {"text": "t", "label": "z"}]
    )
    code, _, err = run_cli(capsys, "--labels", "a,b", str(sample))
    assert code == 2
    assert "s.jsonl:2: label 'z' is not one of ['a', 'b']" in err


def test_progress_bar_on_stderr(
    fake_engine: None, sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys, "--labels", "billing,shipping", "--progress", "always", str(sample)
    )
    assert code == 0
    assert err.rstrip().endswith("4/4")


def test_embedding_engine_on_a_tiny_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = write_jsonl(
        tmp_path / "tiny.jsonl",
        [
            {"text": "I was charged twice for my subscription", "label": "billing"},
            {"text": "My package has not been delivered yet", "label": "shipping"},
            {"text": "I cannot log in to my account", "label": "account access"},
        ],
    )
    code, out, _ = run_cli(
        capsys,
        "--engine",
        "embedding",
        "--device",
        "cpu",
        "--labels",
        "billing,shipping,account access",
        "--template",
        "This message is {}.",
        str(sample),
    )
    assert code == 0
    assert out.startswith("model: sentence-transformers/all-MiniLM-L6-v2")
    assert "accuracy 1.000   macro-F1 1.000" in out


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_demo_samples_are_the_demo_events() -> None:
    """examples/eval/events/<topic>.jsonl: examples/events.jsonl, as eval reads it."""
    events = [json.loads(line) for line in (EXAMPLES / "events.jsonl").read_text().splitlines()]
    for topic in ("moderation", "support"):
        sample = (EXAMPLES / "eval" / "events" / f"{topic}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in sample] == [
            {"id": e["id"], "text": e["text"], "label": e["expected"]}
            for e in events
            if e["topic"] == topic
        ]


@pytest.mark.parametrize(
    ("sample", "harmful", "harmless"),
    [("eval/moderation.jsonl", 32, 8), ("eval/events/moderation.jsonl", 11, 4)],
)
def test_the_demo_policy_acts_on_every_harmful_text_and_allows_every_harmless_one(
    capsys: pytest.CaptureFixture[str], sample: str, harmful: int, harmless: int
) -> None:
    """examples/demo.yaml on the packaged model: every text whose label a lane names goes
    to review or block, every friendly chat text is allowed (tuned on eval/moderation.jsonl,
    the demo's own events held out; docs/DEMO.md)."""
    config, path = str(EXAMPLES / "demo.yaml"), str(EXAMPLES / sample)
    code, out, _ = run_cli(capsys, "--config", config, "--device", "cpu", "--json", path)
    assert code == 0
    decisions = json.loads(out)["results"][0]["decisions"]
    assert decisions["action_accuracy"] == 1.0
    confusion = decisions["confusion"]
    assert sum(confusion["block"].values()) + sum(confusion["review"].values()) == harmful
    assert sum(confusion["allow"].values()) == confusion["allow"]["allow"] == harmless
    assert confusion["block"]["allow"] == confusion["review"]["allow"] == 0
    assert confusion["review"]["block"] == 0  # no self-harm disclosure is blocked


# -- decision policies -----------------------------------------------------------------------


class ScoreEngine:
    """Scores read from the text: ``"hate=0.6 spam=0.2"``; labels not named score 0."""

    model_id = "score-fake"

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        return Prepared(tuple(labels), multi_label, 1, text)

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        results = []
        for item in batch:
            given = dict(pair.split("=") for pair in str(item.payload).split())
            scores = {label: float(given.get(label, 0.0)) for label in item.labels}
            ranked = sorted(scores, key=lambda label: -scores[label])
            results.append(Scores(tuple(ranked), tuple(scores[label] for label in ranked)))
        return results

    def warmup(self) -> None:
        pass


POLICY = """\
topics:
  - input: comments
    output: comments.scored
    dead_letter: comments.dlq
    labels: [hate, spam, chat]
    multi_label: true
    thresholds: {hate: 0.5, spam: 0.5}
    lanes:
      - {name: block, labels: [hate], min_score: 0.9, route: comments.blocked}
      - {name: review, labels: [hate, spam]}
      - {name: allow}
"""

#: (text, gold label, stated expected_decision); expected -> decided in the comments.
POLICY_SAMPLE: list[tuple[str, str, str | None]] = [
    ("hate=0.95", "hate", None),  # block -> block
    ("hate=0.6", "hate", None),  # block (first lane naming hate) -> review
    ("spam=0.7", "spam", None),  # review (block does not name spam) -> review
    ("chat=0.9", "chat", None),  # allow (no lane names chat) -> allow
    ("spam=0.55 chat=0.6", "chat", None),  # allow -> review
    ("hate=0.7", "hate", "review"),  # review, as the line says -> review
    ("hate=0.2", "hate", None),  # block -> allow
]


@pytest.fixture
def score_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stream_classifier.engine.load_engine", lambda c, t: ScoreEngine())


@pytest.fixture
def policy(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "service.yaml"
    config.write_text(POLICY)
    records: list[dict[str, object]] = []
    for text, label, stated in POLICY_SAMPLE:
        record: dict[str, object] = {"text": text, "label": label}
        if stated is not None:
            record["expected_decision"] = stated
        records.append(record)
    return config, write_jsonl(tmp_path / "comments.jsonl", records)


def test_decision_metrics_per_lane_and_any_action() -> None:
    lanes = ["block", "review", "allow"]
    expected = ["block", "block", "review", "allow", "allow", "review", "block"]
    decided = ["block", "review", "review", "allow", "review", "review", "allow"]
    per_lane, any_action, confusion = decision_metrics(lanes, expected, decided)
    assert confusion["block"] == {"block": 1, "review": 1, "allow": 1}
    assert per_lane["block"].precision == 1.0
    assert per_lane["block"].recall == pytest.approx(1 / 3)
    assert (per_lane["review"].precision, per_lane["review"].recall) == (0.5, 1.0)
    assert (per_lane["allow"].precision, per_lane["allow"].recall) == (0.5, 0.5)
    # acted on (block or review) when it should be: 4 of 5 right, 1 harmless acted on
    assert (any_action.precision, any_action.recall, any_action.support) == (0.8, 0.8, 5)


def test_expected_lane_is_stated_or_the_first_lane_naming_a_gold_label() -> None:
    topic = load_policy().topic("comments")
    assert expected_lane(topic, Example("t", frozenset(["hate"]), 1)) == "block"
    assert expected_lane(topic, Example("t", frozenset(["spam"]), 1)) == "review"
    assert expected_lane(topic, Example("t", frozenset(["spam", "hate"]), 1)) == "block"
    assert expected_lane(topic, Example("t", frozenset(["chat"]), 1)) == "allow"
    assert expected_lane(topic, Example("t", frozenset(["hate"]), 1, "allow")) == "allow"
    # a lane without a labels list names no label: the gold label falls through it
    catch_all = topic.model_copy(update={"lanes": [Lane(name="look", min_score=0.8), *topic.lanes]})
    assert expected_lane(catch_all, Example("t", frozenset(["spam"]), 1)) == "review"


def load_policy() -> ServiceConfig:
    return ServiceConfig(**yaml.safe_load(POLICY))


def test_eval_reports_the_decision_lanes(
    score_engine: None, policy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, sample = policy
    code, out, _ = run_cli(capsys, "--config", str(config), str(sample))
    assert code == 0, out
    report = out.split("decisions: ")[1]
    assert report.startswith(
        "lanes block, review, allow (default 'allow'); expected lane: 1 stated "
        "(expected_decision), 6 from the gold label"
    )
    table = {line.split()[0]: line.split()[1:] for line in report.splitlines()[2:6]}
    assert table["block"] == ["1.000", "0.333", "0.500", "3", "1"]
    assert table["review"] == ["0.500", "1.000", "0.667", "2", "4"]
    assert table["allow"] == ["0.500", "0.500", "0.500", "2", "2"]
    assert report.splitlines()[5].split() == ["any", "action", "0.800", "0.800", "0.800", "5", "5"]
    # 4 of 7 in the expected lane; acted on where expected (4/5) and allowed (1/2): 5 of 7
    assert report.splitlines()[6] == (
        "decision accuracy 0.571 (4/7 in the expected lane); acted on as expected 0.714 "
        "(4/5 expecting a lane other than 'allow' got one, 1/2 expecting it got it)"
    )
    assert "   decision accuracy 0.571   acted on as expected 0.714" in out.split("decisions: ")[0]
    # the mismatches, by sample line, with their highest scores
    assert "     2: block -> review; hate 0.600, spam 0.000, chat 0.000" in report
    assert "     5: allow -> review; chat 0.600, spam 0.550, hate 0.000" in report


def test_multi_label_predictions_use_the_topic_thresholds_unless_given(
    score_engine: None, policy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, sample = policy
    code, out, _ = run_cli(capsys, "--config", str(config), str(sample), "--json")
    assert code == 0
    (result,) = json.loads(out)["results"]
    # hate and spam at their thresholds (0.5), chat (none) at 0.5: lines 5 and 7 are wrong
    assert result["accuracy"] == pytest.approx(5 / 7)
    assert result["confusion"]["spam"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 5}
    decisions = result["decisions"]
    assert decisions["any_action"]["precision"] == pytest.approx(0.8)
    assert decisions["accuracy"] == pytest.approx(4 / 7)
    assert decisions["action_accuracy"] == pytest.approx(5 / 7)
    assert [m["line"] for m in decisions["mismatches"]] == [2, 5, 7]
    code, out, _ = run_cli(
        capsys, "--config", str(config), str(sample), "--json", "--threshold", "0.65"
    )
    (result,) = json.loads(out)["results"]
    assert result["accuracy"] == pytest.approx(4 / 7)  # hate 0.6 is no longer predicted
    assert result["decisions"] == decisions  # decisions follow the topic, not --threshold


def test_sweep_a_min_score_lane_and_a_threshold_lane(
    score_engine: None, policy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, sample = policy
    code, out, _ = run_cli(
        capsys, "--config", str(config), str(sample), "--json", "--sweep", "block=0.5,0.9"
    )
    assert code == 0
    sweep = json.loads(out)["results"][0]["decisions"]["sweep"]
    assert [row["value"] for row in sweep] == [0.5, 0.9]
    # block from 0.5: hate 0.6 is blocked (right), hate 0.7 too (the line says review)
    low = sweep[0]["per_lane"]["block"]
    assert (low["precision"], low["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert sweep[1]["per_lane"]["block"]["recall"] == pytest.approx(1 / 3)  # as configured
    # review holds on flagged labels: its sweep moves the thresholds of hate and spam
    code, out, _ = run_cli(capsys, "--config", str(config), str(sample), "--sweep", "review=0.1")
    assert code == 0
    assert "sweep: lane review's cut-off at each value" in out
    row = out.split("sweep: lane review")[1].splitlines()[2].split()
    # hate 0.2 is now reviewed: every harmful line is acted on, one harmless one too
    assert row[0] == "0.1" and row[-3:] == ["0.83", "/", "1.00"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sweep", "escalate"], "no topic evaluated here has a lane 'escalate'"),
        (["--sweep", "allow"], "lane 'allow' is the default lane, it has no cut-off"),
        (["--sweep", "block=0.5,high"], "values must be numbers"),
        (["--sweep", "block=1.5"], "values must be within 0..1"),
    ],
)
def test_sweep_refuses_what_it_cannot_vary(
    score_engine: None,
    policy: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    config, sample = policy
    code, _, err = run_cli(capsys, "--config", str(config), str(sample), *argv)
    assert code == 2
    assert message in err


def test_expected_decision_must_name_a_lane_of_the_topic(
    score_engine: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "service.yaml"
    config.write_text(POLICY)
    sample = write_jsonl(
        tmp_path / "comments.jsonl",
        [
            {"text": "hate=0.95", "label": "hate", "expected_decision": "block"},
            {"text": "hate=0.95", "label": "hate", "expected_decision": "delete"},
        ],
    )
    code, _, err = run_cli(capsys, "--config", str(config), str(sample))
    assert code == 2
    assert "comments.jsonl:2: expected_decision 'delete' is not one of" in err
    # without lanes (here: no config) there is nothing to compare it with
    code, _, err = run_cli(capsys, "--labels", "hate,spam", str(sample))
    assert code == 2
    assert "comments.jsonl:1: expected_decision needs a topic with decision lanes" in err


def test_topics_without_lanes_report_no_decisions(
    fake_engine: None, sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "--labels", "billing,shipping", "--json", str(sample))
    assert code == 0
    assert json.loads(out)["results"][0]["decisions"] is None


SHADOWED = (
    POLICY
    + """\
    shadow:
      thresholds: {hate: 0.2, spam: 0.6}
"""
)


def test_eval_compares_a_shadow_with_the_live_policy(
    score_engine: None, policy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, sample = policy
    config.write_text(SHADOWED)
    code, out, _ = run_cli(capsys, "--config", str(config), str(sample), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert [r["topic"] for r in report["results"]] == ["comments", "comments (shadow)"]
    assert [row["variant"] for row in report["ranking"]] == ["baseline"]
    (compared,) = report["shadows"]
    # the shadow's lower hate threshold sends hate=0.2 from allow to review (block expected),
    # its higher spam threshold spam=0.55 from review to allow (allow expected)
    assert compared["changes"] == {"allow -> review": 1, "review -> allow": 1}
    assert (compared["agree"], compared["examples"]) == (5, 7)
    assert compared["live_accuracy"] == pytest.approx(4 / 7)
    assert compared["shadow_accuracy"] == pytest.approx(5 / 7)
    code, text, _ = run_cli(capsys, "--config", str(config), str(sample))
    assert "== comments: live against shadow on 7 examples" in text
    assert "decisions agree on 5 of 7; changed: allow -> review 1, review -> allow 1" in text
