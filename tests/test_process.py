"""The service as users run it: a `stream-classifier run` process, signals and crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL
from kafka_helpers import (
    committed,
    create_topics,
    end_offsets,
    produce,
    read_all,
    unique,
    wait_until,
)

pytestmark = pytest.mark.kafka


def write_config(tmp_path: Path, bootstrap: str, partitions: int = 2) -> dict:
    topics = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, list(topics.values()), partitions)
    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": unique("group")},
        "processing": {
            "max_batch_messages": 32,
            "max_batch_wait_ms": 10,
            "commit_interval_ms": 100,
        },
        "engine": {"kind": "nli", "model": str(TINY_MODEL), "device": "cpu"},
        "metrics": {"enabled": False},
        "topics": [{**topics, "labels": ["spam", "harassment", "self-harm", "safe"]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return {"path": path, **topics, "group": config["kafka"]["group_id"]}


def start(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_classifier.cli", "run", "--config", str(config_path)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )


def mixed_events(n: int) -> list[bytes]:
    return [
        b"{broken" if i % 10 == 3 else json.dumps({"text": f"message {i} buy cheap pills"}).encode()
        for i in range(n)
    ]


def count_outputs(bootstrap: str, topic: str) -> int:
    return len(read_all(bootstrap, topic, 10**9, timeout=1.0))


def test_sigkill_mid_stream_and_restart_loses_nothing(bootstrap: str, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, bootstrap)
    n = 1500
    values = mixed_events(n)
    produce(bootstrap, cfg["input"], values, keys=[str(i).encode() for i in range(n)])
    bad = sum(1 for v in values if v == b"{broken")
    log = tmp_path / "service.log"

    for kill_after in (200, 700):
        process = start(cfg["path"], log)
        wait_until(
            lambda k=kill_after: count_outputs(bootstrap, cfg["output"]) >= k,
            120,
            f"{kill_after} outputs",
        )
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    process = start(cfg["path"], log)
    try:
        wait_until(
            lambda: (
                committed(bootstrap, cfg["group"], cfg["input"], 2)
                == end_offsets(bootstrap, cfg["input"], 2)
            ),
            180,
            "all offsets committed",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()

    outputs = read_all(bootstrap, cfg["output"], n - bad)
    dead = read_all(bootstrap, cfg["dead_letter"], bad)
    scored = Counter(
        (json.loads(r.value)["source"]["partition"], json.loads(r.value)["source"]["offset"])
        for r in outputs
    )
    inputs = read_all(bootstrap, cfg["input"], n)
    good_inputs = {(r.partition, r.offset) for r in inputs if r.value != b"{broken"}
    assert set(scored) == good_inputs, "an event was lost"
    dead_sources = {
        (
            int(r.headers["stream-classifier.source.partition"]),
            int(r.headers["stream-classifier.source.offset"]),
        )
        for r in dead
    }
    assert dead_sources == {(r.partition, r.offset) for r in inputs if r.value == b"{broken"}


def test_sigterm_finishes_batch_commits_and_exits_zero(bootstrap: str, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, bootstrap, partitions=1)
    n = 400
    produce(bootstrap, cfg["input"], mixed_events(n))
    log = tmp_path / "service.log"
    process = start(cfg["path"], log)
    wait_until(lambda: count_outputs(bootstrap, cfg["output"]) >= 50, 120, "first outputs")
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()

    committed_offset = committed(bootstrap, cfg["group"], cfg["input"])[0]
    assert committed_offset > 0
    processed = {
        json.loads(r.value)["source"]["offset"]
        for r in read_all(bootstrap, cfg["output"], n, timeout=5)
    }
    processed |= {
        int(r.headers["stream-classifier.source.offset"])
        for r in read_all(bootstrap, cfg["dead_letter"], n, timeout=5)
    }
    # Everything below the committed offset has its output: committed equals processed.
    assert set(range(committed_offset)) <= processed
    assert max(processed) + 1 == committed_offset
