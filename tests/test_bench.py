"""The bench on CPU, tiny shape: our engine scores exactly like the HF pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_classifier.engine.nli import Backend, NliEngine
from stream_classifier.tools import bench


def test_workload_is_the_reference_workload() -> None:
    """docs/PERFORMANCE.md, "Reference workload and budgets": what every run compares on."""
    events = bench.make_events(2000, 4, seed=1)
    lengths = [len(e.text) for e in events]
    assert min(lengths) >= bench.MIN_TOKENS and max(lengths) <= bench.MAX_TOKENS
    assert 50 <= sorted(lengths)[len(lengths) // 2] <= 70  # median 60
    assert all(2 <= len(label) <= 5 for label in events[0].labels)
    assert len(set(events[0].labels)) == 4
    assert len(bench.vocabulary()) == bench.VOCAB_SIZE == 21128


def test_flops_are_the_reference_count() -> None:
    """F(L) = L * (2 W + 4 n d L), W = 302 M for the large shape (docs/PERFORMANCE.md)."""
    large = bench.SHAPES["large"]
    assert abs(large.weights - 302e6) < 1e6
    assert large.flops(100) == 100 * (2 * large.weights + 4 * 24 * 1024 * 100)


@pytest.mark.parametrize("backend", ["padded", "packed"])
def test_cpu_bench_scores_equal_hf_pipeline(tmp_path: Path, backend: Backend) -> None:
    options = bench.BenchOptions(
        shape="tiny", messages=12, labels=(4,), device="cpu", backend=backend, batch_messages=5
    )
    report = bench.run_bench(options)
    baseline, ours, model_only = report["results"]
    assert baseline["method"].startswith("HF pipeline")
    assert ours["messages"] == 12 and ours["pairs"] == 48
    assert ours["max_score_diff"] is not None and ours["max_score_diff"] < 1e-5
    assert model_only["msgs_per_s"] > 0
    table = bench.format_table(report)
    assert "stream-classifier" in table and "HF pipeline" in table
    # the engine's start-up steps, in the report and its table
    assert {"random_model", "model_setup", "weights_read", "to_device", "warmup"} <= set(
        report["startup"]
    )
    assert "start-up (seconds): python+imports " in table and "warm-up " in table
    json.dumps(report)  # the --json output


def test_tiny_model_loads_through_the_engine(tmp_path: Path) -> None:
    from stream_classifier.config import EngineConfig

    model_dir = bench.build_model_dir(bench.SHAPES["tiny"], tmp_path / "m", seed=0)
    engine = NliEngine.load(EngineConfig(model=str(model_dir), device="cpu"), 4096)
    event = bench.make_events(1, 4, seed=0)[0]
    scores = engine.classify([engine.prepare(event.text, event.labels, bench.TEMPLATE, False)])
    assert sorted(scores[0].labels) == sorted(event.labels)
    assert abs(sum(scores[0].scores) - 1.0) < 1e-6


def test_deberta_flops_add_disentangled_attention() -> None:
    large = bench.shape_of(bench.BenchOptions(shape="large", arch="deberta-v3"))
    assert large.position_buckets == 256 and large.weights == bench.SHAPES["large"].weights
    # per layer: c2p and p2c, each (L x d) @ (d x 2k), 2 FLOPs per multiply-add
    extra = 24 * 2 * (2 * 100 * (2 * 256) * 1024)
    assert large.flops(100) == bench.SHAPES["large"].flops(100) + extra


def test_cpu_bench_deberta_scores_equal_hf_pipeline(tmp_path: Path) -> None:
    """``bench --shape tiny --arch deberta-v3``: the HF NLI engine against the pipeline."""
    from stream_classifier import cli

    out = tmp_path / "report.json"
    argv = ["bench", "--shape", "tiny", "--arch", "deberta-v3", "--messages", "12"]
    argv += ["--labels", "4", "--device", "cpu", "--batch-messages", "5", "--json", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["options"]["arch"] == "deberta-v3"
    baseline, ours, model_only = report["results"]
    assert baseline["method"].startswith("HF pipeline")
    assert ours["method"].startswith("stream-classifier (padded, float32")
    assert ours["messages"] == 12 and ours["pairs"] == 48
    assert ours["max_score_diff"] is not None and ours["max_score_diff"] < 1e-5  # fp32 bar
    assert ours["mfu"] > 0 and model_only["msgs_per_s"] > 0
    assert "deberta-v3 shape tiny" in bench.format_table(report)


def test_tiny_deberta_loads_through_load_engine(tmp_path: Path) -> None:
    from stream_classifier.config import EngineConfig
    from stream_classifier.engine import load_engine
    from stream_classifier.engine.hf_nli import HfNliEngine

    shape = bench.shape_of(bench.BenchOptions(arch="deberta-v3"))
    model_dir = bench.build_deberta_dir(shape, tmp_path / "m", seed=0, vocab_size=None)
    engine = load_engine(EngineConfig(model=str(model_dir), device="cpu"), 4096)
    assert isinstance(engine, HfNliEngine)
    assert engine.model.config.position_buckets == 256
    event = bench.make_events(1, 4, seed=0)[0]
    prepared = engine.prepare(event.text, event.labels, bench.TEMPLATE, False)
    # every character is one piece: [CLS] ▁ text [SEP] ▁ hypothesis [SEP]
    hypothesis = len(bench.TEMPLATE.format(event.labels[0]))
    assert prepared.payload.lengths[0] == len(event.text) + hypothesis + 5  # type: ignore[attr-defined]
    scores = engine.classify([prepared])
    assert sorted(scores[0].labels) == sorted(event.labels)
    assert abs(sum(scores[0].scores) - 1.0) < 1e-6
