"""The GPU service benchmark's script path, on a CPU with the tiny shape and a few events.

``benchmarks/gpu-service.sh`` against the test broker (so it starts none), one guarantee,
to stay well under a minute; the full CPU run of both guarantees is the manual command in
docs/PERFORMANCE.md ("The service on a GPU").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_classifier.tools.bench_service import percentile

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.kafka
def test_gpu_service_script_runs_the_real_service_and_writes_its_report(
    bootstrap: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": bootstrap,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "SHAPE": "tiny",
        "DEVICE": "cpu",
        "LABELS": "2",
        "EVENTS": "24",
        "GUARANTEES": "exactly_once",
        "LOADS": "0.5",
        "LATENCY_SECONDS": "1",
        "PREPARE_WORKERS": "1",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu-service.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 2 | exactly_once | 256 |" in done.stdout  # the table, CPU defaults
    report = json.loads((tmp_path / "service-2.json").read_text(encoding="utf-8"))
    (run,) = report["runs"]
    service, engine = run["service"], run["engine"]
    assert (service["labels"], service["guarantee"], service["events"]) == (2, "exactly_once", 24)
    # every event scored and committed, none dead-lettered, a clean SIGTERM stop
    assert service["msgs_per_s"] > 0 and service["dead_letters"] == 0
    assert service["exit_code"] == 0
    assert service["settings"] == {
        "max_batch_messages": "256",
        "scorer": "ThreadScorer",  # PipelinedScorer on a GPU
        "preparer": "ProcessPreparer",
        "switch_interval_ms": "5",  # Python's own on a CPU (0.5 on a GPU)
    }
    assert service["gpu_busy"] is None  # no GPU here
    assert service["msgs_per_s_after_compile"] is None  # nor layers compiled on a helper thread
    # its start-up clock: the first output after the first consume, after the model load
    startup = service["startup"]
    assert startup["total"] >= startup["model_setup"] > 0
    assert any("first output" in line for line in service["startup_lines"])
    assert 0.0 <= service["engine_idle"] <= 1.0
    (at_half,) = service["latency"]
    assert at_half["load"] == 0.5 and at_half["produced"] >= 1
    assert 0 < at_half["p50_ms"] <= at_half["p99_ms"]
    assert engine["pre_tokenized_msgs_per_s"] > 0 and engine["backend"].startswith("cpu-")
    assert service["ratio_to_engine"] == pytest.approx(
        service["msgs_per_s"] / engine["pre_tokenized_msgs_per_s"]
    )


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
