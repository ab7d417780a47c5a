"""``make demo``'s driver against the real broker: the real service, one row per event."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "examples" / "events.jsonl"


def run_demo(bootstrap: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--bootstrap", bootstrap],
        cwd=ROOT,
        env={**os.environ, "STREAM_CLASSIFIER_ENGINE__DEVICE": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )


def event_ids() -> list[str]:
    lines = EVENTS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["id"] for line in lines if line.strip()]


def assert_one_row_per_event(stdout: str) -> None:
    ids = event_ids()
    assert len(ids) == 30
    rows = [line for line in stdout.splitlines() if line.split()[1:2] and line.split()[1] in ids]
    assert sorted(line.split()[1] for line in rows) == sorted(ids)
    assert "30/30 events scored" in stdout


def test_demo_with_the_embedding_engine(bootstrap: str) -> None:
    result = run_demo(bootstrap, MODEL="")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_one_row_per_event(result.stdout)
    assert "service exit code 0" in result.stdout


def test_demo_with_a_local_nli_checkpoint(bootstrap: str, tiny_model: Path) -> None:
    result = run_demo(bootstrap, MODEL=str(tiny_model))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "engine nli on" in result.stdout
    assert_one_row_per_event(result.stdout)
