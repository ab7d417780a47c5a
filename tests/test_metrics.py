"""/metrics, /healthz and /readyz with a running service; the GPU gauges with a fake NVML."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import RunningService, service_config
from kafka_helpers import committed, create_topics, produce, read_all, unique, wait_until
from prometheus_client.parser import text_string_to_metric_families

from stream_classifier.assemble import build_service
from stream_classifier.config import EngineConfig, ServiceConfig
from stream_classifier.engine.nli import NliEngine
from stream_classifier.gpu import GpuSampler, start_gpu_sampler
from stream_classifier.metrics import HealthServer, Metrics
from stream_classifier.service import Service

LABELS = ["价格问题", "服务态度"]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


def sample(port: int, name: str, **labels: str) -> float:
    """The value of one series in /metrics (0 when absent)."""
    _, body = get(port, "/metrics")
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return float(s.value)
    return 0.0


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> NliEngine:
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), max_batch_tokens=4096)


@pytest.fixture
def served() -> Iterator[Any]:
    """Start a HealthServer on a free port for a service; stop it afterwards."""
    servers: list[HealthServer] = []

    def serve(service: Service) -> int:
        server = HealthServer(service.metrics, "127.0.0.1", 0, service.healthy, service.ready)
        server.start()
        servers.append(server)
        return server.port

    yield serve
    for server in servers:
        server.stop()


def setup(bootstrap: str, **sections: Any) -> ServiceConfig:
    topics = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, topics.values())
    return service_config(bootstrap, [{**topics, "labels": LABELS}], **sections)


@pytest.mark.kafka
def test_ready_after_assignment_and_counters_move(
    bootstrap: str, engine: NliEngine, served: Any
) -> None:
    config = setup(bootstrap)
    topic = config.topics[0]
    service = build_service(config, engine, Metrics())
    port = served(service)
    assert get(port, "/readyz") == (503, "starting\n")
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/nothing")[0] == 404

    with RunningService(service):
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, "readyz 200 after assignment")
        assert "partitions assigned" in get(port, "/readyz")[1]
        assert sample(port, "stream_classifier_assigned_partitions") == 1
        produce(
            bootstrap, topic.input, [b"{not json", *[json.dumps({"text": "太贵"}).encode()] * 4]
        )
        read_all(bootstrap, topic.output, 4)
        wait_until(
            lambda: sample(port, "stream_classifier_events_produced_total", topic=topic.input) == 4,
            30,
            "produced counter",
        )
        assert sample(port, "stream_classifier_events_consumed_total", topic=topic.input) == 5
        dead = sample(
            port, "stream_classifier_dead_letters_total", topic=topic.input, reason="not_json"
        )
        assert dead == 1
        assert sample(port, "stream_classifier_batch_messages_count") >= 1
        assert sample(port, "stream_classifier_end_to_end_latency_seconds_count") >= 4
        assert get(port, "/healthz") == (200, "ok\n")


@pytest.mark.kafka
def test_healthz_503_while_the_output_fails_then_recovers_without_loss(
    bootstrap: str, engine: NliEngine, served: Any
) -> None:
    """at_least_once: an output that cannot be written is retried, never skipped."""
    topics = {"input": unique("in"), "output": unique("missing"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, [topics["input"], topics["dead_letter"]])
    config = service_config(
        bootstrap,
        [{**topics, "labels": LABELS}],
        kafka={
            "extra": {"allow.auto.create.topics": False, "topic.metadata.refresh.interval.ms": 1000}
        },
        processing={"delivery_timeout_ms": 3000},
    )
    service = build_service(config, engine, Metrics())
    port = served(service)
    produce(bootstrap, topics["input"], [json.dumps({"text": "太贵"}).encode()])
    runner = RunningService(service)
    with runner:
        wait_until(lambda: get(port, "/healthz")[0] == 503, 60, "healthz 503")
        assert "output not writable" in get(port, "/healthz")[1]
        # Nothing past the undelivered event is committed (its own offset may be, unread).
        assert committed(bootstrap, config.kafka.group_id, topics["input"]) in ({0: -1001}, {0: 0})
        create_topics(bootstrap, [topics["output"]])
        wait_until(
            lambda: committed(bootstrap, config.kafka.group_id, topics["input"]) == {0: 1},
            120,
            "recovery once the output topic exists",
        )
        wait_until(lambda: get(port, "/healthz")[0] == 200, 30, "healthz 200 again")
    assert runner.error is None
    assert len(read_all(bootstrap, topics["output"], 1, timeout=10)) == 1


# -- GPU gauges -----------------------------------------------------------------------------


class FakeNvml:
    """Two GPUs: 0 busy 80% with 60 of 80 GB used, 1 idle."""

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.shutdowns = 0

    def nvmlInit(self) -> None:  # noqa: N802
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:  # noqa: N802
        return f"GPU-{handle}aaaa-bbbb"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=(60e9 if handle == 0 else 1e9), total=80e9)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=80 if handle == 0 else 0, memory=10)


def gauge(metrics: Metrics, name: str, gpu: str) -> float | None:
    value = metrics.registry.get_sample_value(name, {"gpu": gpu})
    return None if value is None else float(value)


def test_gpu_sampler_sets_the_gauges() -> None:
    metrics = Metrics()
    nvml = FakeNvml()
    sampler = start_gpu_sampler(metrics, interval_s=60, nvml=nvml, environ={})
    assert isinstance(sampler, GpuSampler)
    try:
        assert sampler.gpus == ["0", "1"]
        assert gauge(metrics, "stream_classifier_gpu_memory_used_bytes", "0") == 60e9
        assert gauge(metrics, "stream_classifier_gpu_memory_total_bytes", "0") == 80e9
        assert gauge(metrics, "stream_classifier_gpu_utilization_ratio", "0") == 0.8
        assert gauge(metrics, "stream_classifier_gpu_utilization_ratio", "1") == 0.0
        assert b'stream_classifier_gpu_utilization_ratio{gpu="0"} 0.8' in metrics.render()
    finally:
        sampler.stop()
    assert nvml.shutdowns == 1


@pytest.mark.parametrize(("visible", "gpus"), [("1", ["1"]), ("GPU-0aaaa", ["0"]), ("", [])])
def test_gpu_sampler_follows_cuda_visible_devices(visible: str, gpus: list[str]) -> None:
    metrics = Metrics()
    sampler = start_gpu_sampler(
        metrics, interval_s=60, nvml=FakeNvml(), environ={"CUDA_VISIBLE_DEVICES": visible}
    )
    if not gpus:
        assert sampler is None
        return
    assert sampler is not None
    try:
        assert sampler.gpus == gpus
    finally:
        sampler.stop()


def test_no_gpu_means_no_sampler_and_no_gpu_series() -> None:
    metrics = Metrics()
    assert start_gpu_sampler(metrics, nvml=FakeNvml(fail_init=True), environ={}) is None
    assert b"stream_classifier_gpu_utilization_ratio{" not in metrics.render()
    # The real module, on this machine: a GPU is sampled if there is one, never a crash.
    sampler = start_gpu_sampler(Metrics(), interval_s=60)
    if sampler is not None:
        sampler.stop()
