"""The command line as a newcomer meets it: help, classify, validate-config, eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stream_classifier.cli import _classify_engine_config, _parser, main

COMMANDS = ["run", "classify", "eval", "bench", "validate-config", "schemas"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_CLASSIFIER_")}
    return subprocess.run(
        [sys.executable, "-m", "stream_classifier.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**clean, **(env or {})},
    )


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_plain_text(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: stream-classifier" in text
    assert "`" not in text, text


def test_classify_reads_the_engine_environment(tiny_model: Path) -> None:
    result = cli(
        "classify",
        "--labels",
        "家居,旅游,科技",
        "世界那么大，我想去看看",
        env={"STREAM_CLASSIFIER_ENGINE__MODEL": str(tiny_model)},
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["model"] == str(tiny_model)
    assert sorted(record["labels"]) == ["家居", "旅游", "科技"]


def test_classify_flags_win_over_the_environment(tiny_model: Path) -> None:
    args = _parser().parse_args(["classify", "--model", str(tiny_model), "--labels", "a", "t"])
    env = {
        "STREAM_CLASSIFIER_ENGINE__MODEL": "/nowhere",
        "STREAM_CLASSIFIER_ENGINE__DTYPE": "float32",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        engine = _classify_engine_config(args, ["a"])
        assert engine.model == str(tiny_model) and engine.dtype == "float32"
        patch.setenv("STREAM_CLASSIFIER_ENGINE__KIND", "embedding")
        patch.delenv("STREAM_CLASSIFIER_ENGINE__MODEL")
        args = _parser().parse_args(["classify", "--labels", "a", "t"])
        embedding = _classify_engine_config(args, ["a"])
        assert embedding.kind == "embedding"
        assert embedding.model == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize("endpoint", ["https://modelscope.invalid", "http://127.0.0.1:1"])
def test_classify_offline_fails_fast_naming_the_fix(endpoint: str) -> None:
    started = time.monotonic()
    result = cli(
        "classify",
        "--model",
        "damo/nlp_structbert_zero-shot-classification_chinese-large",
        "--labels",
        "a,b",
        "text",
        env={"MODELSCOPE_ENDPOINT": endpoint},
    )
    took = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    # Not a speed target: the process start alone (torch's import) takes seconds on a loaded
    # machine. What must not happen is ModelScope's own ~30 s of retries before the error.
    assert took < 20.0, f"took {took:.1f}s: waited for the hub instead of failing fast"
    message = result.stderr
    assert "cannot fetch model 'damo/nlp_structbert_zero-shot-classification_chinese-large'" in (
        message
    )
    assert "STREAM_CLASSIFIER_ENGINE__MODEL" in message and "config.json" in message


def test_validate_config_counts_topics_in_words(tmp_path: Path) -> None:
    topic = {"input": "a", "output": "a.out", "dead_letter": "a.dlq", "labels": ["x"]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"topics": [topic]}), encoding="utf-8")
    result = cli("validate-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok (1 topic, engine nli)"


def test_eval_missing_sample_file_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "support.jsonl"
    result = cli("eval", "--labels", "a,b", str(missing))
    assert result.returncode == 2
    assert result.stderr.strip() == f"eval: no such file: {missing}"


@pytest.mark.kafka
def test_a_reload_naming_a_missing_route_topic_is_rejected_with_its_name(
    bootstrap: str, tmp_path: Path
) -> None:
    """SIGHUP re-reads the file; a lane that routes to a topic that does not exist would
    fail its first write and stop the service, so the reload is refused instead."""
    from kafka_helpers import create_topics, unique

    from stream_classifier.assemble import reload_config
    from stream_classifier.preflight import PreflightError

    names = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    routed = unique("review")
    create_topics(bootstrap, [*names.values(), routed], partitions=1)
    path = tmp_path / "config.yaml"

    def write(route: str) -> None:
        lanes = [{"name": "review", "labels": ["x"], "min_score": 0.5, "route": route}]
        lanes.append({"name": "allow"})
        topic = {**names, "labels": ["x", "y"], "lanes": lanes}
        config = {"kafka": {"bootstrap_servers": bootstrap}, "topics": [topic]}
        path.write_text(yaml.safe_dump(config), encoding="utf-8")

    write(routed)
    assert reload_config(str(path), gpu=False).topics[0].route_topics == [routed]
    missing = unique("nowhere")
    write(missing)
    with pytest.raises(PreflightError, match=missing):
        reload_config(str(path), gpu=False)
