"""A real scrape: Prometheus (Debian's package) scrapes a running `stream-classifier run`.

Events flow through the service; Prometheus' HTTP API then shows the counters that moved,
evaluates our alert and recording rules against the real series without errors, and
answers every query of the Grafana dashboard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_MODEL
from kafka_helpers import create_topics, produce, unique, wait_until

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules" / "stream-classifier.rules.yml"
RULE_NAMES = [
    rule.get("alert") or rule["record"]
    for group in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    for rule in group["rules"]
]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "stream-classifier.json"

pytestmark = pytest.mark.kafka


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return int(process.returncode)


def alive(process: subprocess.Popen[bytes], log: Path) -> Callable[[], None]:
    def check() -> None:
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()[-3000:]}"

    return check


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "prometheus not found: apt-get install -y prometheus (make tools)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture
def classifier(bootstrap: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`stream-classifier run` on the tiny model, metrics on a free port."""
    topics = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, topics.values())
    port = free_port()
    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": unique("group")},
        "processing": {"max_batch_wait_ms": 10, "commit_interval_ms": 200},
        "engine": {"kind": "nli", "model": str(TINY_MODEL), "device": "cpu"},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": port},
        "topics": [{**topics, "labels": ["spam", "safe"]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_CLASSIFIER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_classifier.cli", "run", "--config", str(path)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        check = alive(process, log)

        def ready() -> bool:
            check()
            return answers(f"http://127.0.0.1:{port}/readyz")

        wait_until(ready, 120, "the service's /readyz")
        yield {"port": port, "topics": topics, "check": check}
    finally:
        assert stop(process) == 0, log.read_text()[-3000:]


@pytest.fixture
def prometheus(prometheus_binary: str, classifier: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "stream-classifier",
                "static_configs": [{"targets": [f"127.0.0.1:{classifier['port']}"]}],
            }
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    process = subprocess.Popen(
        [prometheus_binary, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        check = alive(process, log)

        def ready() -> bool:
            check()
            return answers(base + "/-/ready")

        wait_until(ready, 60, "Prometheus /-/ready")
        yield base
    finally:
        stop(process)


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = http_json(url)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def scalar(base: str, expr: str) -> float:
    result = query(base, expr)
    return float(result[0]["value"][1]) if result else 0.0


def test_prometheus_scrapes_counters_that_moved_and_evaluates_rules_and_dashboard(
    bootstrap: str, classifier: dict[str, Any], prometheus: str
) -> None:
    topic = classifier["topics"]["input"]
    wait_until(lambda: scalar(prometheus, 'up{job="stream-classifier"}') == 1, 60, "target up")
    before = scalar(prometheus, f'sum(stream_classifier_events_consumed_total{{topic="{topic}"}})')
    assert before == 0
    consumed = f'sum(stream_classifier_events_consumed_total{{topic="{topic}"}})'
    produced = f'sum(stream_classifier_events_produced_total{{topic="{topic}"}})'

    def seen(expr: str, value: float) -> Callable[[], bool]:
        def check() -> bool:
            classifier["check"]()
            return scalar(prometheus, expr) == value

        return check

    # Two waves: a counter's first scrape starts its series, so rate() needs a second one.
    produce(bootstrap, topic, [b"{broken", json.dumps({"text": "buy cheap pills"}).encode()])
    wait_until(seen(consumed, 2), 120, "Prometheus to see the first wave")
    n = 12
    produce(bootstrap, topic, [json.dumps({"text": f"pills {i}"}).encode() for i in range(n - 2)])
    wait_until(seen(consumed, n), 120, "Prometheus to see the consumed counter move")
    wait_until(seen(produced, n - 1), 60, "Prometheus to see the produced counter move")
    dead = f'stream_classifier_dead_letters_total{{topic="{topic}",reason="not_json"}}'
    assert scalar(prometheus, dead) == 1
    assert scalar(prometheus, "sum(stream_classifier_end_to_end_latency_seconds_count)") >= n - 1

    def rules_evaluated() -> bool:
        groups = http_json(prometheus + "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert all(r["health"] != "err" for r in rules), [r for r in rules if r.get("lastError")]
        return len(rules) == len(RULE_NAMES) and all(r["health"] == "ok" for r in rules)

    wait_until(rules_evaluated, 30, "every rule evaluated without error")
    wait_until(
        lambda: scalar(prometheus, "sum(stream_classifier:events_consumed:rate5m)") > 0,
        30,
        "the recording rule to see the traffic",
    )

    # Every panel's query, as Grafana sends it, accepted and (after the traffic above)
    # answering with at least one number, except where this run cannot have data.
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    assert panels, "the dashboard has no queries"
    without_data = {
        title: expr
        for title, expr in panels
        if not any(metric in expr for metric in NO_DATA_HERE)
        and not answered(prometheus, grafana_expr(expr))
    }
    assert without_data == {}, f"panels whose query returns no data: {without_data}"
    for _title, expr in panels:
        query(prometheus, grafana_expr(expr))  # the exempt ones too: Prometheus accepts them


#: Metrics that this test's service cannot produce, and why; every other panel must show data.
NO_DATA_HERE = {
    "stream_classifier_transactions_total": "exactly_once only; this service runs at_least_once",
    "stream_classifier_gpu_": "NVML gauges; this service runs on the CPU",
}


def grafana_expr(expr: str) -> str:
    """The query as Grafana would send it: 1 s scrapes, the job variable set to All."""
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*")


def answered(base: str, expr: str, timeout: float = 30.0) -> bool:
    """Does the query return at least one series with a finite value (within the deadline)?"""
    deadline = time.monotonic() + timeout
    while True:
        values = [float(series["value"][1]) for series in query(base, expr)]
        if any(math.isfinite(value) for value in values):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
