"""Least privilege: the exact Kafka ACLs each guarantee needs, checked on a real authorizer.

A kafka-local broker of this module's own (PLAINTEXT 9392, controller 9393, SASL/SCRAM
9394, started here and stopped at the end) runs Kafka's StandardAuthorizer with
``allow.everyone.if.no.acl.found=false``: the service's user may do exactly what an ACL
allows. kafka-local's PLAINTEXT and CONTROLLER listeners carry the broker's own controller
and inter-broker traffic as User:ANONYMOUS, which the authorizer must let through, so
ANONYMOUS is a super user; the test writes and reads its events over that listener, as an
operator's tooling would. The ACLs are managed the way an operator does it, as the SCRAM
super user ``admin``. The service connects over SASL/SCRAM as ``classifier`` and holds only
the ACLs of docs/OPERATIONS.md ("Kafka ACLs"), which :func:`service_acls` spells out.

What users depend on:

- with exactly those ACLs, both guarantees run end to end (outputs, dead letters, routed
  copies, offsets committed), and at_least_once needs no transactional id ACL;
- without any one of them, ``stream-classifier run`` stops in its start-up check, before
  the model loads, with the CLI's Kafka exit code and the missing permission named;
- an ACL revoked while the service runs stops it with the authorization error (the
  command exits non-zero with a log line naming it), instead of retrying forever;
- the start-up check of the transactional id does not fence the producer holding it
  (a SIGHUP reload runs the same check while the service's producer is mid-transaction).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

# Public in confluent_kafka.admin, which re-exports them without an __all__ (so mypy's
# strict no-implicit-reexport refuses them there); stream_classifier/sink.py does the same.
from confluent_kafka.admin._acl import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
)
from confluent_kafka.admin._resource import ResourcePatternType, ResourceType
from conftest import KAFKA_LOCAL, ROOT, TINY_MODEL, RunningService, service_config
from kafka_helpers import create_topics, produce, read_all, unique, wait_drained, wait_until

from stream_classifier.assemble import build_service
from stream_classifier.cli import EXIT_FAILED, EXIT_KAFKA
from stream_classifier.config import EngineConfig, ServiceConfig
from stream_classifier.engine.nli import NliEngine
from stream_classifier.preflight import check_kafka, required_permissions, transactional_id
from stream_classifier.service import ServiceError
from stream_classifier.sink import SinkError, producer_config
from stream_classifier.source import SourceError

PORT, CONTROLLER_PORT, SASL_PORT = 9392, 9393, 9394
USER, ADMIN = "classifier", "admin"
PASSWORD = "pw-" + uuid.uuid4().hex
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex
AUTHORIZER = """\
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:ANONYMOUS;User:admin
"""
#: How long an ACL change, and the service's reaction to one, may take.
DEADLINE_S = 60.0
LABELS = ["价格问题", "服务态度"]
GUARANTEES = ["at_least_once", "exactly_once"]

kafka_test = pytest.mark.kafka


@dataclass(frozen=True)
class AclBroker:
    plaintext: str  # User:ANONYMOUS, a super user: the test's events and offsets
    sasl: str  # the service, and the ACL admin, over SASL/SCRAM

    def admin(self) -> AdminClient:
        """A client of User:admin, for ACLs (one per use: none outlives the broker)."""
        return AdminClient({**sasl_settings(ADMIN, ADMIN_PASSWORD), "bootstrap.servers": self.sasl})


@pytest.fixture(scope="module")
def acl_broker() -> Iterator[AclBroker]:
    # A fixed state directory, wiped on each start: a broker left behind by an interrupted
    # run is recognised there and stopped (its ports are fixed too).
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    state = cache / "stream-classifier" / f"kafka-acls-{PORT}"
    state.mkdir(parents=True, exist_ok=True)
    (state / "authorizer.properties").write_text(AUTHORIZER)
    env = {
        **os.environ,
        "KAFKA_PORT": str(PORT),
        "KAFKA_CONTROLLER_PORT": str(CONTROLLER_PORT),
        "KAFKA_SASL_PORT": str(SASL_PORT),
        "KAFKA_LOCAL_DIR": str(state),
        "KAFKA_LOCAL_RESET": "1",
        "KAFKA_SASL_USERS": f"{ADMIN}:{ADMIN_PASSWORD} {USER}:{PASSWORD}",
        "KAFKA_EXTRA_PROPERTIES": str(state / "authorizer.properties"),
        "KAFKA_STOP_TIMEOUT": "20",
    }
    subprocess.run([str(KAFKA_LOCAL), "start"], env=env, check=True, timeout=300)
    try:
        yield AclBroker(plaintext=f"127.0.0.1:{PORT}", sasl=f"127.0.0.1:{SASL_PORT}")
    finally:
        subprocess.run([str(KAFKA_LOCAL), "stop"], env=env, check=True, timeout=120)


@pytest.fixture(scope="module")
def engine() -> NliEngine:
    return NliEngine.load(EngineConfig(model=str(TINY_MODEL), device="cpu"), max_batch_tokens=4096)


def sasl_settings(user: str, password: str) -> dict[str, str]:
    return {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": user,
        "sasl.password": password,
    }


@dataclass(frozen=True)
class Case:
    """One test's group and topics; every event is also routed (a default lane's route)."""

    group: str
    input: str
    output: str
    dead_letter: str
    route: str

    @classmethod
    def new(cls) -> Case:
        return cls(unique("g"), unique("in"), unique("out"), unique("dlq"), unique("route"))

    @property
    def topics(self) -> list[str]:
        return [self.input, self.output, self.dead_letter, self.route]

    def topic_config(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "dead_letter": self.dead_letter,
            "labels": LABELS,
            "lanes": [{"name": "all", "route": self.route}],
        }

    def kafka(self, bootstrap: str) -> dict[str, Any]:
        return {
            "bootstrap_servers": bootstrap,
            "group_id": self.group,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": USER,
            "sasl_password": PASSWORD,
        }


def service_acls(case: Case, guarantee: str) -> dict[str, AclBinding]:
    """docs/OPERATIONS.md's table: what each guarantee needs, keyed by what it is for.

    No DESCRIBE (READ and WRITE imply it), no IDEMPOTENT_WRITE on the cluster (WRITE on a
    topic covers the idempotent producer since Kafka 3.0), no CREATE.
    """

    def allow(kind: ResourceType, name: str, operation: AclOperation) -> AclBinding:
        pattern = ResourcePatternType.LITERAL
        if kind == ResourceType.TRANSACTIONAL_ID:
            pattern = ResourcePatternType.PREFIXED  # every instance's default id
        principal = f"User:{USER}"
        return AclBinding(kind, name, pattern, principal, "*", operation, AclPermissionType.ALLOW)

    acls = {
        "group": allow(ResourceType.GROUP, case.group, AclOperation.READ),
        "input": allow(ResourceType.TOPIC, case.input, AclOperation.READ),
        "output": allow(ResourceType.TOPIC, case.output, AclOperation.WRITE),
        "dead_letter": allow(ResourceType.TOPIC, case.dead_letter, AclOperation.WRITE),
        "route": allow(ResourceType.TOPIC, case.route, AclOperation.WRITE),
    }
    if guarantee == "exactly_once":
        acls["transactional_id"] = allow(
            ResourceType.TRANSACTIONAL_ID, f"{case.group}-", AclOperation.WRITE
        )
    return acls


def named(case: Case, config: ServiceConfig) -> dict[str, str]:
    """How the start-up check names each permission when it is missing."""
    return {
        "group": f"READ on group {case.group}",
        "input": f"READ on topic {case.input}",
        "output": f"WRITE on topic {case.output}",
        "dead_letter": f"WRITE on topic {case.dead_letter}",
        "route": f"WRITE on topic {case.route}",
        "transactional_id": f"WRITE on transactional id {transactional_id(config)}",
    }


def user_acls(admin: AdminClient) -> set[AclBinding]:
    """The service user's ACLs as the broker's authorizer holds them."""
    # None matches any name and any host in a filter; the stubs type both as str.
    wanted = AclBindingFilter(
        ResourceType.ANY,
        None,  # type: ignore[arg-type]
        ResourcePatternType.ANY,
        f"User:{USER}",
        None,  # type: ignore[arg-type]
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    return set(admin.describe_acls(wanted, request_timeout=10).result())


def grant(broker: AclBroker, acls: Iterable[AclBinding]) -> None:
    """Create ACLs and wait until the broker's authorizer holds them (it applies the
    metadata log after the controller commits it)."""
    acls = list(acls)
    admin = broker.admin()
    for future in admin.create_acls(acls, request_timeout=30).values():
        future.result()
    wait_until(lambda: set(acls) <= user_acls(admin), DEADLINE_S, "the ACLs to apply")


def revoke(broker: AclBroker, acl: AclBinding) -> None:
    """Delete one ACL and wait until the broker's authorizer no longer holds it."""
    exact = AclBindingFilter(
        acl.restype,
        acl.name,
        acl.resource_pattern_type,
        acl.principal,
        acl.host,
        acl.operation,
        acl.permission_type,
    )
    admin = broker.admin()
    for future in admin.delete_acls([exact], request_timeout=30).values():
        assert future.result() == [acl]
    wait_until(lambda: acl not in user_acls(admin), DEADLINE_S, f"{acl} to be revoked")


def prepare(broker: AclBroker, guarantee: str, leave_out: str | None = None) -> Case:
    """A case's topics, and the guarantee's ACLs for the service user (all but one)."""
    case = Case.new()
    create_topics(broker.plaintext, case.topics)
    acls = service_acls(case, guarantee)
    if leave_out is not None:
        del acls[leave_out]
    grant(broker, acls.values())
    return case


def config_for(broker: AclBroker, case: Case, guarantee: str) -> ServiceConfig:
    return service_config(
        broker.sasl,
        [case.topic_config()],
        kafka=case.kafka(broker.sasl),
        processing={"guarantee": guarantee},
    )


def events(count: int, tag: str) -> list[bytes]:
    return [
        json.dumps({"id": f"{tag}-{i}", "text": "快递太慢了，客服也不回"}).encode()
        for i in range(count)
    ]


def run_cli(tmp_path: Path, broker: AclBroker, case: Case, guarantee: str) -> subprocess.Popen[str]:
    """``stream-classifier run`` on the case, as an operator starts it."""
    config = {
        "kafka": case.kafka(broker.sasl),
        "processing": {"guarantee": guarantee, "commit_interval_ms": 200},
        "engine": {"model": str(TINY_MODEL), "device": "cpu"},
        "metrics": {"enabled": False},
        "topics": [case.topic_config()],
    }
    path = tmp_path / f"{case.group}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_CLASSIFIER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "stream_classifier.cli", "run", "--config", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# -- no broker ---------------------------------------------------------------------------


def test_the_check_names_the_transactional_id_the_service_uses() -> None:
    """The start-up check must probe the very id the producer will use, default or set."""
    case = Case.new()
    default = service_config(
        "127.0.0.1:1", [case.topic_config()], processing={"guarantee": "exactly_once"}
    )
    assert transactional_id(default) == producer_config(default, 1)["transactional.id"]
    assert transactional_id(default).startswith(f"{default.kafka.group_id}-")  # the ACL prefix
    chosen = service_config(
        "127.0.0.1:1",
        [case.topic_config()],
        processing={"guarantee": "exactly_once", "transactional_id": "pod-7"},
    )
    assert transactional_id(chosen) == producer_config(chosen, 1)["transactional.id"] == "pod-7"


def test_the_documented_kafka_acls_commands_grant_what_the_check_requires() -> None:
    """docs/OPERATIONS.md's commands, for its example topics, are the check's list."""
    text = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    section = text.split("### Kafka ACLs", 1)[1]
    commands = section.split("```sh", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    flags = {"--group": "group", "--topic": "topic", "--transactional-id": "transactional id"}
    documented = set()
    for line in commands.splitlines():
        words = line.split("#")[0].split()
        if words[:2] == ["acl", "--operation"]:
            operation = words[2].upper()
            documented |= {
                (operation, flags[flag], name)
                for flag, name in zip(words, words[1:], strict=False)
                if flag in flags
            }
    lanes = [
        {"name": "block", "labels": ["spam"], "min_score": 0.9, "route": "comments.blocked"},
        {"name": "review", "labels": ["spam"], "min_score": 0.6, "route": "comments.review"},
        {"name": "allow"},
    ]
    topic = {"input": "comments", "output": "comments.scored", "dead_letter": "comments.dlq"}
    config = ServiceConfig(
        kafka={"group_id": "stream-classifier"},
        processing={"guarantee": "exactly_once"},
        topics=[{**topic, "labels": ["spam", "ok"], "lanes": lanes}],
    )
    required = {(p.operation, p.resource, p.name) for p in required_permissions(config)}
    prefix = ("WRITE", "transactional id", "stream-classifier-")  # prefixed: every replica
    assert documented - {prefix} == {p for p in required if p[1] != "transactional id"}
    assert prefix in documented and transactional_id(config).startswith(prefix[2])


# -- against the broker with the authorizer ------------------------------------------------

MISSING = [("at_least_once", name) for name in ("group", "input", "output", "dead_letter", "route")]
MISSING += [
    ("exactly_once", name)
    for name in ("group", "input", "output", "dead_letter", "route", "transactional_id")
]


@kafka_test
@pytest.mark.parametrize(("guarantee", "left_out"), MISSING)
def test_each_missing_acl_stops_the_service_at_start_naming_it(
    acl_broker: AclBroker, tmp_path: Path, guarantee: str, left_out: str
) -> None:
    case = prepare(acl_broker, guarantee, leave_out=left_out)
    expected = named(case, config_for(acl_broker, case, guarantee))[left_out]
    process = run_cli(tmp_path, acl_broker, case, guarantee)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_KAFKA, output
    # Only the one left out is named, and before the model loads.
    assert f"missing permission(s): {expected} (" in output, output
    assert "kafka: cannot use Kafka (" in output and f"as user '{USER}'" in output
    assert "warming up" not in output and PASSWORD not in output


@kafka_test
@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_each_guarantee_runs_end_to_end_with_only_its_acls(
    acl_broker: AclBroker, engine: NliEngine, guarantee: str
) -> None:
    case = prepare(acl_broker, guarantee)
    config = config_for(acl_broker, case, guarantee)
    held = user_acls(acl_broker.admin())
    mine = {a for a in held if a.name.startswith(case.group) or a.name in case.topics}
    assert mine == set(service_acls(case, guarantee).values())
    check_kafka(config, timeout_s=20)
    good = events(5, guarantee)
    produce(acl_broker.plaintext, case.input, [*good, b"not json"])
    with RunningService(build_service(config, engine)):
        outputs = read_all(acl_broker.plaintext, case.output, 5, timeout=DEADLINE_S)
        routed = read_all(acl_broker.plaintext, case.route, 5, timeout=DEADLINE_S)
        dead = read_all(acl_broker.plaintext, case.dead_letter, 1, timeout=DEADLINE_S)
        wait_drained(acl_broker.plaintext, case.group, case.input, timeout=DEADLINE_S)
    ids = sorted(json.loads(event)["id"] for event in good)
    assert sorted(json.loads(r.value or b"")["id"] for r in outputs) == ids
    assert sorted(json.loads(r.value or b"")["id"] for r in routed) == ids
    assert len(dead) == 1


REVOKED = [("at_least_once", name) for name in ("group", "input", "output")]
REVOKED += [("exactly_once", name) for name in ("group", "input", "output", "transactional_id")]


@kafka_test
@pytest.mark.parametrize(("guarantee", "revoked"), REVOKED)
def test_an_acl_revoked_while_running_stops_the_service_with_the_reason(
    acl_broker: AclBroker, engine: NliEngine, guarantee: str, revoked: str
) -> None:
    case = prepare(acl_broker, guarantee)
    config = config_for(acl_broker, case, guarantee)
    produce(acl_broker.plaintext, case.input, events(3, "before"))
    with RunningService(build_service(config, engine)) as running:
        assert len(read_all(acl_broker.plaintext, case.output, 3, timeout=DEADLINE_S)) == 3
        revoke(acl_broker, service_acls(case, guarantee)[revoked])
        produce(acl_broker.plaintext, case.input, events(3, "after"))
        wait_until(lambda: running.error is not None, DEADLINE_S, "the service to stop")
    error = running.error
    # One of the failures `stream-classifier run` reports and exits 1 on.
    assert isinstance(error, SourceError | SinkError | ServiceError), repr(error)
    assert "authorization failed" in str(error).lower(), str(error)


@kafka_test
def test_the_command_exits_non_zero_naming_an_acl_revoked_while_it_runs(
    acl_broker: AclBroker, tmp_path: Path
) -> None:
    case = prepare(acl_broker, "at_least_once")
    produce(acl_broker.plaintext, case.input, events(3, "before"))
    process = run_cli(tmp_path, acl_broker, case, "at_least_once")
    try:
        assert len(read_all(acl_broker.plaintext, case.output, 3, timeout=120)) == 3
        revoke(acl_broker, service_acls(case, "at_least_once")["input"])
        output, _ = process.communicate(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == EXIT_FAILED, output
    failure = [line for line in output.splitlines() if "ERROR" in line and "stopped" in line]
    assert len(failure) == 1, output  # "stopped on a failure, nothing past it was committed"
    assert "TOPIC_AUTHORIZATION_FAILED" in failure[0], output


@kafka_test
def test_the_transactional_id_check_does_not_fence_the_producer_holding_it(
    acl_broker: AclBroker,
) -> None:
    case = prepare(acl_broker, "exactly_once")
    config = config_for(acl_broker, case, "exactly_once")
    live = Producer(
        {
            **sasl_settings(USER, PASSWORD),
            "bootstrap.servers": acl_broker.sasl,
            "transactional.id": transactional_id(config),
        }
    )
    live.init_transactions(30)
    live.begin_transaction()
    live.produce(case.output, b"in an open transaction")
    assert live.flush(30) == 0
    check_kafka(config, timeout_s=20)  # what a SIGHUP reload runs, mid-transaction
    live.commit_transaction(30)  # raises if the check had fenced it
    assert len(read_all(acl_broker.plaintext, case.output, 1, timeout=DEADLINE_S)) == 1
