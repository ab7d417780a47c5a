"""``make demo``'s driver against the real broker: the real service, one row per event."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "examples" / "events.jsonl"
CONFIG = ROOT / "examples" / "demo.yaml"
#: A row's decision column sits just before its latency ("-" for a topic without lanes).
DECISION = re.compile(r"\s(\S+)\s+\d+ ms\s")


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


def assert_one_row_per_event(stdout: str) -> dict[str, str]:
    """Each event's row, by id."""
    ids = event_ids()
    assert len(ids) == 30
    rows = [line for line in stdout.splitlines() if line.split()[1:2] and line.split()[1] in ids]
    assert sorted(line.split()[1] for line in rows) == sorted(ids)
    assert "30/30 events scored" in stdout
    return {line.split()[1]: line for line in rows}


def decision(row: str) -> str:
    match = DECISION.search(row + " ")
    assert match, row
    return match.group(1)


def moderation_config() -> dict[str, Any]:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    return next(t for t in config["topics"] if t["input"] == "moderation")


def harmless_ids() -> list[str]:
    """Moderation events whose expected label no decision lane names ("friendly chat")."""
    named = {label for lane in moderation_config()["lanes"] for label in lane.get("labels") or []}
    events = [json.loads(line) for line in EVENTS.read_text(encoding="utf-8").splitlines() if line]
    return [e["id"] for e in events if e["topic"] == "moderation" and e["expected"] not in named]


def assert_routed_copies(stdout: str, rows: dict[str, str]) -> None:
    """Every block decision, and only those, has its copy on the route topic, once."""
    blocked = sorted(i for i, row in rows.items() if decision(row) == "block")
    copies = sorted(re.findall(r"↳ copy of (\S+) on moderation\.blocked", stdout))
    assert copies == blocked
    summary = re.search(r"route topic \S+\.moderation\.blocked: (\d+) copies", stdout)
    assert summary and int(summary.group(1)) == len(blocked), stdout


def test_demo_with_the_embedding_engine(bootstrap: str) -> None:
    result = run_demo(bootstrap, MODEL="")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = assert_one_row_per_event(result.stdout)
    assert "service exit code 0" in result.stdout
    assert "decision" in result.stdout.splitlines()[2]  # the table's header
    lanes = {lane["name"] for lane in moderation_config()["lanes"]}
    for id_, row in rows.items():
        assert decision(row) in (lanes if id_.startswith("cmt-") else {"-"}), row
    # The moderation topic's harmless texts (today's 4) all come out allowed ...
    harmless = harmless_ids()
    assert len(harmless) == 4
    assert {i: decision(rows[i]) for i in harmless} == dict.fromkeys(harmless, "allow")
    assert "expected friendly chat (no lane names it): 4/4 allow" in result.stdout
    # ... every harmful one (11) goes to review or block, and the demo says so ...
    harmful = [i for i in rows if i.startswith("cmt-") and i not in harmless]
    assert len(harmful) == 11
    assert {decision(rows[i]) for i in harmful} <= {"block", "review"}
    assert "expected a label some lane names: 11/11 block/review" in result.stdout
    assert "'expected', 15/15 decisions right;" in result.stdout
    # ... and the texts the demo's policy is sure about are blocked and copied.
    assert decision(rows["cmt-2012"]) == "block"  # spam, 0.82 on the packaged model
    assert_routed_copies(result.stdout, rows)


def test_demo_with_a_local_nli_checkpoint(bootstrap: str, tiny_model: Path) -> None:
    result = run_demo(bootstrap, MODEL=str(tiny_model))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "engine nli on" in result.stdout
    rows = assert_one_row_per_event(result.stdout)
    # Random weights decide at random, but whatever is blocked is copied, exactly once.
    assert_routed_copies(result.stdout, rows)
