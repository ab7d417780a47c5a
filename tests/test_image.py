"""The container image, built and run: what a deployment depends on.

``make test-image`` builds deploy/Dockerfile (``deploy/build-image``) and runs this file
with ``STREAM_CLASSIFIER_TEST_IMAGE`` naming the image; plain ``pytest`` runs skip it
(``make pytest`` does not collect it at all). The container runs on the host network
against the test broker with the tiny checkpoint mounted read-only, as an operator would
run it: config file mounted, metrics port from the environment, a volume for /models.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kafka_helpers import create_topics, produce, read_all, unique, wait_drained, wait_until

IMAGE = os.environ.get("STREAM_CLASSIFIER_TEST_IMAGE", "")
DOCKER = os.environ.get("DOCKER", "docker")
#: The image's user (deploy/Dockerfile: USER 10001:10001).
IMAGE_UID = 10001
#: docker stop's grace period; processing.shutdown_timeout_s below is well inside it.
GRACE_S = 30

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(not IMAGE, reason="make test-image names the image to test"),
]


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def state(container: str, field: str) -> str:
    return docker("inspect", "-f", "{{" + field + "}}", container)


class Container:
    def __init__(self, name: str) -> None:
        self.name = name

    def logs(self) -> str:
        result = subprocess.run(
            [DOCKER, "logs", self.name], capture_output=True, text=True, check=False
        )
        return result.stdout + result.stderr

    def running(self) -> bool:
        return state(self.name, ".State.Running") == "true"

    def health(self) -> str:
        return state(self.name, "if .State.Health}}{{.State.Health.Status}}{{end")


@pytest.fixture
def topics(bootstrap: str) -> dict[str, str]:
    names = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, list(names.values()))
    return names


@pytest.fixture
def container(
    tmp_path: Path, bootstrap: str, tiny_model: Path, topics: dict[str, str]
) -> Iterator[tuple[Container, str, Path]]:
    group = unique("group")
    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group},
        "processing": {
            "max_batch_wait_ms": 20,
            "commit_interval_ms": 200,
            "shutdown_timeout_s": 20,
        },
        "engine": {"kind": "nli", "model": "/opt/model", "device": "cpu"},
        "topics": [{**topics, "labels": ["价格问题", "服务态度", "物流配送"]}],
    }
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), "utf-8")
    etc.chmod(0o755)
    (etc / "config.yaml").chmod(0o644)
    models = tmp_path / "models"  # the /models volume: the image's user must own it
    models.mkdir()
    os.chown(models, IMAGE_UID, IMAGE_UID)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    name = unique("stream-classifier-test")
    port = free_port()
    docker(
        "run", "--detach", "--name", name, "--network", "host",
        "--volume", f"{etc}:/etc/stream-classifier:ro",
        "--volume", f"{model}:/opt/model:ro",
        "--volume", f"{models}:/models",
        # The HEALTHCHECK reads the port from here, so a non-default port goes here too.
        "--env", f"STREAM_CLASSIFIER_METRICS__PORT={port}",
        IMAGE,
    )  # fmt: skip
    try:
        yield Container(name), group, models
    finally:
        subprocess.run([DOCKER, "rm", "--force", "--volumes", name], capture_output=True)


def test_image_runs_drains_on_stop_and_writes_only_its_volume(
    bootstrap: str, topics: dict[str, str], container: tuple[Container, str, Path]
) -> None:
    box, group, models = container

    def healthy() -> bool:
        assert box.running(), f"container exited:\n{box.logs()[-4000:]}"
        return box.health() == "healthy"

    # The image's own HEALTHCHECK (interval 15 s): the model loads, then /healthz answers.
    wait_until(healthy, 180, "the HEALTHCHECK to report healthy")

    pid = int(state(box.name, ".State.Pid"))
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines()
    uids = next(line.split()[1:] for line in status if line.startswith("Uid:"))
    gids = next(line.split()[1:] for line in status if line.startswith("Gid:"))
    assert set(uids) == {str(IMAGE_UID)} and set(gids) == {str(IMAGE_UID)}, (uids, gids)
    comm = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"stream-classifier" in comm[1] and comm[2] == b"run", comm  # PID 1 is the service

    good = [json.dumps({"id": f"e{i}", "text": f"快递第{i}天还没到"}).encode() for i in range(30)]
    bad = [b"\xff\xfe not utf-8", b"not json", json.dumps({"body": "no text"}).encode()]
    produce(
        bootstrap,
        topics["input"],
        good + bad,
        keys=[f"k{i}".encode() for i in range(len(good) + len(bad))],
    )
    outputs = read_all(bootstrap, topics["output"], len(good), timeout=120)
    dead = read_all(bootstrap, topics["dead_letter"], len(bad), timeout=60)
    assert sorted(json.loads(r.value or b"")["id"] for r in outputs) == sorted(
        f"e{i}" for i in range(len(good))
    )
    for record in outputs:
        scored = json.loads(record.value or b"")
        assert scored["model"] == "/opt/model"
        assert sorted(scored["labels"]) == sorted(["价格问题", "服务态度", "物流配送"])
        assert abs(sum(scored["scores"]) - 1.0) < 1e-4
        assert record.key == f"k{scored['id'][1:]}".encode()
    assert sorted(r.header("stream-classifier.error.code") for r in dead) == [
        b"not_json",
        b"not_utf8",
        b"text_missing",
    ]
    assert [r.value for r in sorted(dead, key=lambda r: r.key or b"")] == [
        bad[0],
        bad[1],
        bad[2],
    ]
    wait_drained(bootstrap, group, topics["input"], timeout=60)

    started = time.monotonic()
    docker("stop", "--time", str(GRACE_S), box.name, timeout=GRACE_S + 30)
    took = time.monotonic() - started
    logs = box.logs()
    assert state(box.name, ".State.ExitCode") == "0", logs[-4000:]
    assert took < GRACE_S, f"docker stop took {took:.1f}s (SIGKILL after {GRACE_S}s)"
    assert "received SIGTERM" in logs and "stopped cleanly" in logs, logs[-4000:]

    # Nothing written outside the volume: the container's own layer holds only the mount
    # points that docker itself creates.
    mounts = json.loads(state(box.name, "json .Mounts"))
    created = {Path(m["Destination"]) for m in mounts}
    allowed = {f"A {p}" for p in created} | {f"C {a}" for p in created for a in p.parents}
    changes = docker("diff", box.name).splitlines()
    assert [change for change in changes if change not in allowed] == []
    assert models.stat().st_uid == IMAGE_UID
