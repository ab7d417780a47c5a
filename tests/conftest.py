"""Session fixtures: the real local Kafka broker and the tiny StructBERT checkpoint."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_classifier.config import ServiceConfig

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "deploy" / "kafka" / "kafka-local"
REGISTRY_LOCAL = ROOT / "deploy" / "registry" / "registry-local"
#: Apicurio's Confluent-compatible API, below its root.
CCOMPAT_PATH = "/apis/ccompat/v7"
TINY_MODEL = ROOT / "tests" / "fixtures" / "tiny-structbert"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="fault suite at full size (20,000)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses the broker is a ``kafka`` test, marked or not: ``make unit``
    (``-m "not kafka"``) then runs without one."""
    for item in items:
        if "bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def bootstrap() -> str:
    """The broker's address: $KAFKA_BOOTSTRAP, or a kafka-local broker started here."""
    address = os.environ.get("KAFKA_BOOTSTRAP")
    if address:
        return address
    port = os.environ.get("KAFKA_PORT", "9092")
    subprocess.run([str(KAFKA_LOCAL), "start"], check=True, env={**os.environ, "KAFKA_PORT": port})
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def registry_port() -> Iterator[int]:
    """A real Schema Registry (Apicurio, deploy/registry/registry-local) for the session,
    on $REGISTRY_PORT (default 8081); stopped at the end if this session started it."""
    port = os.environ.get("REGISTRY_PORT", "8081")
    env = {**os.environ, "REGISTRY_PORT": port}
    running = subprocess.run([str(REGISTRY_LOCAL), "status"], env=env, capture_output=True)
    if running.returncode != 0:
        subprocess.run([str(REGISTRY_LOCAL), "start"], check=True, env=env)
    yield int(port)
    if running.returncode != 0:
        subprocess.run([str(REGISTRY_LOCAL), "stop"], check=True, env=env)


@pytest.fixture(scope="session")
def registry_url(registry_port: int) -> str:
    return f"http://127.0.0.1:{registry_port}{CCOMPAT_PATH}"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    assert (TINY_MODEL / "config.json").is_file(), "run tests/fixtures/make_golden.sh"
    return TINY_MODEL


def service_config(bootstrap: str, topics: list[dict[str, Any]], **sections: Any) -> ServiceConfig:
    """A config for one test: its own group, metrics off, small batches."""
    from kafka_helpers import unique

    kafka = {
        "bootstrap_servers": bootstrap,
        "group_id": unique("group"),
        **sections.pop("kafka", {}),
    }
    processing = {
        "max_batch_wait_ms": 20,
        "commit_interval_ms": 200,
        **sections.pop("processing", {}),
    }
    return ServiceConfig(
        kafka=kafka,
        processing=processing,
        engine=sections.pop("engine", {"model": str(TINY_MODEL), "device": "cpu"}),
        metrics={"enabled": False},
        topics=topics,
        **sections,
    )


class RunningService:
    """A Service in a background thread, stopped like SIGTERM stops it."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.service.run(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    def __enter__(self) -> RunningService:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "service did not stop within its deadline"
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.stop()


@pytest.fixture
def running() -> Iterator[type[RunningService]]:
    yield RunningService
