"""SASL (PLAIN, SCRAM-SHA-256/512) and TLS against a broker of their own, and secrets.

A second kafka-local instance (its own ports and state directory, started here and stopped
at the end) serves a SASL_PLAINTEXT, an SSL and a SASL_SSL listener with a test CA made
here with openssl; the main test broker stays plain. The service works with the right
credentials, fails at start with a clear message with wrong ones, and never prints a
secret.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import KAFKA_LOCAL, TINY_MODEL, RunningService, service_config
from kafka_helpers import create_topics, produce, read_all, unique, wait_until

from stream_classifier.config import ConfigError, KafkaConfig, ServiceConfig, load_config
from stream_classifier.preflight import PreflightError, check_kafka

USER = "classifier"
#: Distinctive, so that a leak anywhere in the output is found by a plain search.
PASSWORD = "pw-" + uuid.uuid4().hex
WRONG = "wrong-" + uuid.uuid4().hex
KEY_PASSWORD = "key-" + uuid.uuid4().hex
EXIT_KAFKA = 4


@dataclass(frozen=True)
class SecureBroker:
    plaintext: str
    sasl: str
    ssl: str
    sasl_ssl: str
    ca: Path


def free_ports(count: int) -> list[int]:
    """Ports free now, each with the next one free too (kafka-local's controller port)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        taken = {q for p in ports for q in (p, p + 1)}
        if port + 1 < 65536 and _free(port + 1) and not {port, port + 1} & taken:
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def openssl(command: str, *extra: str, cwd: Path) -> None:
    """Run ``openssl`` with the words of ``command`` and then ``extra`` (kept whole)."""
    args = ["openssl", *command.split(), *extra]
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(directory: Path) -> tuple[Path, Path]:
    """A test CA and a broker certificate for 127.0.0.1/localhost; (ca.pem, keystore.pem).

    The keystore is Kafka's PEM format: the broker's key, encrypted (Kafka requires a key
    password for PEM keystores) with PBE-SHA1-3DES (Java 17 reads no PBES2), then the
    certificate chain.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_subject = "/CN=stream-classifier test CA"
    openssl("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2",
            "-subj", ca_subject, cwd=directory)  # fmt: skip
    openssl("req -newkey rsa:2048 -nodes -keyout broker.key -out broker.csr -subj /CN=localhost",
            cwd=directory)  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out broker.pem"
            " -days 2 -extfile san.cnf", cwd=directory)  # fmt: skip
    openssl("pkcs8 -topk8 -v1 PBE-SHA1-3DES -in broker.key -out broker.enc.key",
            "-passout", f"pass:{KEY_PASSWORD}", cwd=directory)  # fmt: skip
    keystore = directory / "keystore.pem"
    keystore.write_text(
        "".join((directory / n).read_text() for n in ("broker.enc.key", "broker.pem", "ca.pem"))
    )
    return directory / "ca.pem", keystore


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    root = tmp_path_factory.mktemp("secure-kafka")
    ca, keystore = make_pki(root / "pki")
    port, sasl, ssl, sasl_ssl = free_ports(4)
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_LOCAL_DIR": str(root / "state"),
        "KAFKA_SASL_PORT": str(sasl),
        "KAFKA_SSL_PORT": str(ssl),
        "KAFKA_SASL_SSL_PORT": str(sasl_ssl),
        "KAFKA_SASL_USERS": f"{USER}:{PASSWORD}",
        "KAFKA_SSL_KEYSTORE": str(keystore),
        "KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
        "KAFKA_STOP_TIMEOUT": "20",
    }
    subprocess.run([str(KAFKA_LOCAL), "start"], env=env, check=True, timeout=300)
    try:
        yield SecureBroker(
            plaintext=f"127.0.0.1:{port}",
            sasl=f"127.0.0.1:{sasl}",
            ssl=f"127.0.0.1:{ssl}",
            sasl_ssl=f"127.0.0.1:{sasl_ssl}",
            ca=ca,
        )
    finally:
        subprocess.run([str(KAFKA_LOCAL), "stop"], env=env, check=True, timeout=120)


def topic_names() -> dict[str, str]:
    return {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}


def create(broker: SecureBroker, names: list[str]) -> None:
    """Create topics and wait until the broker's metadata lists them."""
    from confluent_kafka.admin import AdminClient

    create_topics(broker.plaintext, names)
    admin = AdminClient({"bootstrap.servers": broker.plaintext})
    wait_until(
        lambda: set(names) <= set(admin.list_topics(timeout=10).topics), 30, "topic metadata"
    )


def secured(broker: SecureBroker, listener: str, **overrides: Any) -> dict[str, Any]:
    """KafkaConfig fields for one listener of the secure broker."""
    fields: dict[str, Any] = {
        "sasl": {
            "bootstrap_servers": broker.sasl,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": USER,
            "sasl_password": PASSWORD,
        },
        "ssl": {
            "bootstrap_servers": broker.ssl,
            "security_protocol": "SSL",
            "ssl_ca_location": str(broker.ca),
        },
        "sasl_ssl": {
            "bootstrap_servers": broker.sasl_ssl,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": USER,
            "sasl_password": PASSWORD,
            "ssl_ca_location": str(broker.ca),
        },
    }[listener]
    return {**fields, **overrides}


def config_for(kafka: dict[str, Any], topics: dict[str, str]) -> ServiceConfig:
    return ServiceConfig(kafka=kafka, topics=[{**topics, "labels": ["价格问题", "服务态度"]}])


# -- configuration, no broker -------------------------------------------------------------


def test_secrets_are_masked_in_repr_str_and_json() -> None:
    config = config_for(
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": USER,
         "sasl_password": PASSWORD, "ssl_key_password": KEY_PASSWORD},
        topic_names(),
    )  # fmt: skip
    for text in (repr(config), str(config), config.model_dump_json(), repr(config.kafka)):
        assert PASSWORD not in text and KEY_PASSWORD not in text
    client = config.kafka.client_config()
    assert client["sasl.password"] == PASSWORD
    assert client["ssl.key.password"] == KEY_PASSWORD


def test_secrets_from_environment_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "password").write_text(PASSWORD + "\n")
    (tmp_path / "key-password").write_text(KEY_PASSWORD)
    path = tmp_path / "config.yaml"
    kafka = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": USER,
        "sasl_password_file": str(tmp_path / "password"),
        "ssl_certificate_location": "/certs/client.pem",
        "ssl_key_location": "/certs/client.key",
        "ssl_key_password_file": str(tmp_path / "key-password"),
    }
    path.write_text(
        yaml.safe_dump({"kafka": kafka, "topics": [{**topic_names(), "labels": ["a"]}]})
    )
    client = load_config(path).kafka.client_config()
    assert client["sasl.password"] == PASSWORD  # the trailing newline of the file is dropped
    assert client["ssl.key.password"] == KEY_PASSWORD
    assert client["ssl.certificate.location"] == "/certs/client.pem"
    assert client["ssl.endpoint.identification.algorithm"] == "https"

    monkeypatch.setenv("STREAM_CLASSIFIER_KAFKA__SASL_USERNAME", "other")
    monkeypatch.setenv("STREAM_CLASSIFIER_KAFKA__SSL_ENDPOINT_IDENTIFICATION", "none")
    client = load_config(path).kafka.client_config()
    assert client["sasl.username"] == "other"
    assert client["ssl.endpoint.identification.algorithm"] == "none"


def test_unreadable_secret_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    kafka = KafkaConfig(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username=USER,
        sasl_password_file=str(tmp_path / "absent"),
    )
    with pytest.raises(ConfigError, match="sasl secret file .*absent"):
        kafka.client_config()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"security_protocol": "SASL_SSL"}, "sasl_mechanism is required"),
        ({"sasl_mechanism": "PLAIN", "sasl_password": "x"}, "sasl_username is required"),
        ({"sasl_mechanism": "PLAIN", "sasl_username": "u"}, "sasl_password or"),
        (
            {"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "x",
             "sasl_password_file": "/f"},
            "not both",
        ),
        ({"extra": {"ssl.keystore.password": "x"}}, "secrets don't go in extra"),
    ],
)  # fmt: skip
def test_incomplete_or_leaky_security_settings_are_rejected(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        KafkaConfig(**fields)


# -- against the secured broker -----------------------------------------------------------

kafka_test = pytest.mark.kafka  # the tests below need the secured broker


@kafka_test
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_preflight_accepts_the_right_credentials(
    secure_broker: SecureBroker, mechanism: str
) -> None:
    topics = topic_names()
    create(secure_broker, list(topics.values()))
    config = config_for(secured(secure_broker, "sasl", sasl_mechanism=mechanism), topics)
    check_kafka(config, timeout_s=20)


@kafka_test
def test_preflight_accepts_tls_with_the_test_ca(secure_broker: SecureBroker) -> None:
    topics = topic_names()
    create(secure_broker, list(topics.values()))
    check_kafka(config_for(secured(secure_broker, "ssl"), topics), timeout_s=20)


@kafka_test
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_preflight_rejects_a_wrong_password_at_once_and_says_why(
    secure_broker: SecureBroker, mechanism: str
) -> None:
    kafka = secured(secure_broker, "sasl", sasl_mechanism=mechanism, sasl_password=WRONG)
    with pytest.raises(PreflightError) as caught:
        check_kafka(config_for(kafka, topic_names()), timeout_s=20)
    message = str(caught.value)
    assert secure_broker.sasl in message and mechanism in message and USER in message
    assert "Authentication failed" in message or "authentication" in message.lower()
    assert WRONG not in message and PASSWORD not in message


@kafka_test
def test_preflight_rejects_an_untrusted_broker_certificate(secure_broker: SecureBroker) -> None:
    kafka = secured(secure_broker, "ssl", ssl_ca_location=None)  # the system store
    with pytest.raises(PreflightError, match="certificate verify failed"):
        check_kafka(config_for(kafka, topic_names()), timeout_s=20)


@kafka_test
def test_preflight_names_missing_topics(secure_broker: SecureBroker) -> None:
    topics = topic_names()
    create(secure_broker, [topics["input"]])
    with pytest.raises(PreflightError, match="missing: .*" + topics["output"]):
        check_kafka(config_for(secured(secure_broker, "sasl_ssl"), topics), timeout_s=20)


@kafka_test
def test_service_classifies_over_sasl_ssl_and_logs_no_secret(
    secure_broker: SecureBroker, caplog: pytest.LogCaptureFixture
) -> None:
    from stream_classifier.engine.nli import NliEngine
    from stream_classifier.service import Service

    topics = topic_names()
    create(secure_broker, list(topics.values()))
    config = service_config(
        secure_broker.sasl_ssl,
        [{**topics, "labels": ["价格问题", "服务态度"]}],
        kafka=secured(secure_broker, "sasl_ssl"),
    )
    caplog.set_level(logging.DEBUG)
    check_kafka(config, timeout_s=20)
    engine = NliEngine.load(config.engine, max_batch_tokens=4096)
    produce(secure_broker.plaintext, topics["input"], [json.dumps({"text": "太贵了"}).encode()] * 5)
    with RunningService(Service(config, engine)):
        outputs = read_all(secure_broker.plaintext, topics["output"], 5, timeout=60)
    assert len(outputs) == 5
    assert PASSWORD not in caplog.text


def write_cli_config(tmp_path: Path, broker: SecureBroker, topics: dict[str, str]) -> Path:
    config = {
        "kafka": {
            key: value
            for key, value in secured(broker, "sasl").items()
            if key != "sasl_password"  # from the environment or a file instead
        },
        "engine": {"model": str(TINY_MODEL), "device": "cpu"},
        "metrics": {"enabled": False},
        "topics": [{**topics, "labels": ["a", "b"]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@kafka_test
@pytest.mark.parametrize("source", ["env", "file"])
def test_cli_with_a_wrong_password_exits_at_start_without_printing_it(
    secure_broker: SecureBroker, tmp_path: Path, source: str
) -> None:
    topics = topic_names()
    create(secure_broker, list(topics.values()))
    path = write_cli_config(tmp_path, secure_broker, topics)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_CLASSIFIER_")}
    if source == "env":
        env["STREAM_CLASSIFIER_KAFKA__SASL_PASSWORD"] = WRONG
    else:
        (tmp_path / "password").write_text(WRONG + "\n")
        env["STREAM_CLASSIFIER_KAFKA__SASL_PASSWORD_FILE"] = str(tmp_path / "password")
    result = subprocess.run(
        [sys.executable, "-m", "stream_classifier.cli", "--log-level", "DEBUG", "run",
         "--config", str(path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_KAFKA, output
    assert "kafka: cannot use Kafka" in result.stderr
    assert secure_broker.sasl in result.stderr and "SCRAM-SHA-256" in result.stderr
    assert "Authentication failed" in result.stderr
    assert WRONG not in output and PASSWORD not in output
