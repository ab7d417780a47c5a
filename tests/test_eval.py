"""``stream-classifier eval``: metrics, variants, the report, and the command itself."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from stream_classifier import cli
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.eval import (
    EvalError,
    Variant,
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
