"""The bench on CPU, tiny shape: our engine scores exactly like the HF pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_classifier import bench
from stream_classifier.engine.nli import NliEngine


def test_workload_follows_engine_md() -> None:
    events = bench.make_events(2000, 4, seed=1)
    lengths = [len(e.text) for e in events]
    assert min(lengths) >= bench.MIN_TOKENS and max(lengths) <= bench.MAX_TOKENS
    assert 50 <= sorted(lengths)[len(lengths) // 2] <= 70  # median 60
    assert all(2 <= len(label) <= 5 for label in events[0].labels)
    assert len(set(events[0].labels)) == 4
    assert len(bench.vocabulary()) == bench.VOCAB_SIZE == 21128


def test_flops_match_engine_md() -> None:
    large = bench.SHAPES["large"]
    assert abs(large.weights - 302e6) < 1e6
    assert large.flops(100) == 100 * (2 * large.weights + 4 * 24 * 1024 * 100)


@pytest.mark.parametrize("backend", ["padded", "packed"])
def test_cpu_bench_scores_equal_hf_pipeline(tmp_path: Path, backend: bench.Backend) -> None:
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
    json.dumps(report)  # the --json output


def test_tiny_model_loads_through_the_engine(tmp_path: Path) -> None:
    from stream_classifier.config import EngineConfig

    model_dir = bench.build_model_dir(bench.SHAPES["tiny"], tmp_path / "m", seed=0)
    engine = NliEngine.load(EngineConfig(model=str(model_dir), device="cpu"), 4096)
    event = bench.make_events(1, 4, seed=0)[0]
    scores = engine.classify([engine.prepare(event.text, event.labels, bench.TEMPLATE, False)])
    assert sorted(scores[0].labels) == sorted(event.labels)
    assert abs(sum(scores[0].scores) - 1.0) < 1e-6
