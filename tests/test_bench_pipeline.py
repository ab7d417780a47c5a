"""`bench --pipeline`: runs the whole Kafka path on the broker (numbers live in docs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stream_classifier.config import ConfigError, load_config
from stream_classifier.tools.bench_pipeline import BenchNullEngine, run_pipeline_bench


@pytest.mark.kafka
def test_pipeline_bench_reports_every_measurement(bootstrap: str) -> None:
    report = run_pipeline_bench(bootstrap, events=2_000, rate=400, seconds=1.0)
    assert report.events == 2_000
    assert report.ceiling_msgs_per_s > 0 and report.service_msgs_per_s > 0
    assert 0 < report.latency_p50_ms <= report.latency_p99_ms


def test_bench_null_engine_scores_uniformly_and_run_refuses_it(tmp_path: Path) -> None:
    engine = BenchNullEngine()
    (scores,) = engine.classify([engine.prepare("t", ["a", "b"], "{}", False)])
    assert scores.scores == (0.5, 0.5)
    config = {
        "engine": {"kind": "bench-null"},
        "topics": [{"input": "i", "output": "o", "dead_letter": "d", "labels": ["a"]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ConfigError, match="engine.kind"):
        load_config(path)
