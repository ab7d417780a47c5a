"""The demo behind ``make demo``: the real service, a real broker, a live table.

1. creates this run's topics on the broker (names from examples/demo.yaml plus a run id,
   the decision lanes' route topics included),
2. starts ``stream-classifier run`` on that config as a subprocess and waits until ready,
3. produces the events of examples/events.jsonl to their topics,
4. prints one row per scored event as it arrives on the output topics (with its decision
   lane), and a line per copy that arrives on a route topic,
5. stops the service with SIGTERM, deletes the run's topics, exits 0 if every event was
   scored, every routed decision's copy arrived (and no other), and the service stopped
   cleanly.

``MODEL=/path/to/structbert make demo`` runs the NLI engine on that local checkpoint
instead of the embedding engine. The broker is ``$KAFKA_BOOTSTRAP``, else
``127.0.0.1:$KAFKA_PORT`` (default port 9092).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
ENV = "STREAM_CLASSIFIER_"
PRODUCE_INTERVAL_S = 0.15


@dataclass(frozen=True)
class Event:
    topic: str
    id: str
    text: str
    expected: str | None


@dataclass(frozen=True)
class Run:
    """This run's topic names: configured name -> name on the broker."""

    run_id: str
    topics: dict[str, str]

    def broker_name(self, configured: str) -> str:
        return self.topics[configured]

    def configured_name(self, broker: str) -> str:
        return next(name for name, real in self.topics.items() if real == broker)


def main() -> int:
    args = parse_args()
    events = read_events(args.events)
    config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    run_id = uuid.uuid4().hex[:8]
    run = Run(run_id, topic_names(config, run_id))
    with tempfile.TemporaryDirectory(prefix="stream-classifier-demo-") as workdir:
        config_path = write_run_config(config, run, Path(workdir))
        create_topics(args.bootstrap, run)
        try:
            return demo(args, events, run, config, config_path)
        finally:
            delete_topics(args.bootstrap, run)


def parse_args() -> argparse.Namespace:
    port = os.environ.get("KAFKA_PORT", "9092")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP") or f"127.0.0.1:{port}"
    )
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "demo.yaml")
    parser.add_argument("--events", type=Path, default=ROOT / "examples" / "events.jsonl")
    parser.add_argument("--model", default=os.environ.get("MODEL") or None, help="NLI model dir")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for each stage")
    return parser.parse_args()


def read_events(path: Path) -> list[Event]:
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            events.append(
                Event(record["topic"], record["id"], record["text"], record.get("expected"))
            )
    return events


def topic_names(config: dict[str, Any], run_id: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for topic in config["topics"]:
        for name in [topic[key] for key in ("input", "output", "dead_letter")] + list(
            routes(topic).values()
        ):
            names[name] = f"demo-{run_id}.{name}"
    return names


def routes(topic: dict[str, Any]) -> dict[str, str]:
    """A configured topic's decision lanes that route: lane name -> route topic."""
    return {lane["name"]: lane["route"] for lane in topic.get("lanes", []) if lane.get("route")}


def default_lane(topic: dict[str, Any]) -> str | None:
    lanes = topic.get("lanes") or []
    return str(lanes[-1]["name"]) if lanes else None


def lane_labels(topic: dict[str, Any]) -> set[str]:
    """Every label some decision lane of the topic names (eval's rule: an event whose
    expected label no lane names is expected to take the default lane)."""
    return {label for lane in topic.get("lanes", []) for label in lane.get("labels") or []}


def write_run_config(config: dict[str, Any], run: Run, workdir: Path) -> Path:
    """The demo config with this run's topic names and consumer group."""
    topics = [
        {
            **t,
            **{key: run.broker_name(t[key]) for key in ("input", "output", "dead_letter")},
            **({"lanes": [_run_lane(lane, run) for lane in t["lanes"]]} if t.get("lanes") else {}),
        }
        for t in config["topics"]
    ]
    kafka = {**config.get("kafka", {}), "group_id": f"demo-{run.run_id}"}
    path = workdir / "demo.yaml"
    path.write_text(yaml.safe_dump({**config, "kafka": kafka, "topics": topics}), encoding="utf-8")
    return path


def _run_lane(lane: dict[str, Any], run: Run) -> dict[str, Any]:
    return {**lane, "route": run.broker_name(lane["route"])} if lane.get("route") else lane


def create_topics(bootstrap: str, run: Run) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    new = [NewTopic(name, num_partitions=1, replication_factor=1) for name in run.topics.values()]
    for future in admin.create_topics(new, request_timeout=30).values():
        future.result(timeout=60)


def delete_topics(bootstrap: str, run: Run) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    for future in admin.delete_topics(list(run.topics.values()), request_timeout=30).values():
        try:
            future.result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - cleanup is best effort
            print(f"could not delete a demo topic: {exc}", file=sys.stderr)


# -- the service -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(args: argparse.Namespace, port: int) -> dict[str, str]:
    env = {
        **os.environ,
        ENV + "KAFKA__BOOTSTRAP_SERVERS": args.bootstrap,
        ENV + "METRICS__HOST": "127.0.0.1",
        ENV + "METRICS__PORT": str(port),
    }
    if args.model:
        env[ENV + "ENGINE__KIND"] = "nli"
        env[ENV + "ENGINE__MODEL"] = str(Path(args.model).expanduser().resolve())
    return env


@contextmanager
def service(args: argparse.Namespace, config: Path, log_path: Path) -> Iterator[Service]:
    """``stream-classifier run`` in a subprocess; SIGTERM and wait on the way out."""
    port = free_port()
    command = [sys.executable, "-m", "stream_classifier.cli", "--log-level", "INFO"]
    command += ["run", "--config", str(config)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=service_env(args, port), stdout=log, stderr=log
        )
        running = Service(process, port, log_path)
        try:
            yield running
        finally:
            running.stop(args.timeout)


class Service:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.exit_code: int | None = None

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if self._ready():
                return True
            time.sleep(0.25)
        return False

    def _ready(self) -> bool:
        url = f"http://127.0.0.1:{self.port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


# -- producing and the live table -----------------------------------------------------------


def produce(bootstrap: str, run: Run, events: list[Event]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for event in events:
        value = json.dumps({"id": event.id, "text": event.text, "expected": event.expected})
        producer.produce(run.broker_name(event.topic), value=value.encode(), key=event.id.encode())
        producer.poll(0)
        time.sleep(PRODUCE_INTERVAL_S)
    producer.flush(30)


class Table:
    """Fixed-width rows cut to the terminal's width."""

    def __init__(self, run: Run, events: list[Event], labels: list[str], lanes: list[str]) -> None:
        self.run = run
        self.events = {event.id: event for event in events}
        self.label_width = min(30, max(len(label) for label in labels))
        self.topic_width = max(len(event.topic) for event in events)
        self.decision_width = max([len("decision"), *(len(lane) for lane in lanes)])
        columns = shutil.get_terminal_size((120, 24)).columns
        fixed = self.topic_width + 10 + self.label_width + 5 + self.decision_width + 8 + 1 + 6 * 2
        self.text_width = max(20, columns - fixed)

    def header(self) -> str:
        return self._row("topic", "id", "text", "top label", "score", "decision", "latency", " ")

    def rule(self) -> str:
        return "-" * len(self.header())

    def scored(self, output: dict[str, Any]) -> str:
        event = self.events.get(str(output.get("id")))
        topic = self.run.configured_name(output["source"]["topic"])
        text = event.text if event else ""
        mark = (
            " "
            if event is None or event.expected is None
            else "✓✗"[output["top_label"] != event.expected]
        )
        return self._row(
            topic,
            str(output["id"]),
            text,
            output["top_label"],
            f"{output['scores'][0]:.3f}",
            output.get("decision") or "-",
            f"{output['latency_ms']:.0f} ms",
            mark,
        )

    def routed(self, output: dict[str, Any], route: str) -> str:
        """The line for a scored event's copy on a route topic."""
        return f"{'':<{self.topic_width}}  ↳ copy of {output['id']} on {route}"

    def _row(
        self,
        topic: str,
        id_: str,
        text: str,
        label: str,
        score: str,
        decision: str,
        lat: str,
        m: str,
    ) -> str:
        text = cut(text, self.text_width)
        label = cut(label, self.label_width)
        return (
            f"{topic:<{self.topic_width}}  {id_:<10}{text:<{self.text_width}}  "
            f"{label:<{self.label_width}}  {score:>5}  {decision:<{self.decision_width}}  "
            f"{lat:>8}  {m}"
        )


def cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def output_consumer(bootstrap: str, run: Run, config: dict[str, Any]) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-reader-{run.run_id}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    outputs = [
        run.broker_name(t[key]) for t in config["topics"] for key in ("output", "dead_letter")
    ]
    outputs += [run.broker_name(route) for t in config["topics"] for route in routes(t).values()]
    consumer.subscribe(outputs)
    return consumer


@dataclass
class Tally:
    scored: int = 0
    matched: int = 0
    dead: int = 0
    latencies: list[float] = field(default_factory=list)
    #: Per configured input topic, per decision lane: how many scored events took it.
    decisions: dict[str, Counter[str]] = field(default_factory=dict)
    #: Per configured input topic: the lanes taken by the events whose expected label some
    #: lane names (harmful ones: right when not the default lane).
    flagged: dict[str, Counter[str]] = field(default_factory=dict)
    #: Per configured input topic: the lanes taken by the events whose expected label no lane
    #: names (harmless ones: right in the default lane), and those labels.
    unflagged: dict[str, Counter[str]] = field(default_factory=dict)
    unflagged_labels: dict[str, set[str]] = field(default_factory=dict)
    #: Per configured route topic: the ids whose decision routes there, and the ids of the
    #: copies that arrived there (a list: a copy that arrived twice shows).
    routed: dict[str, set[str]] = field(default_factory=dict)
    copies: dict[str, list[str]] = field(default_factory=dict)

    def copies_complete(self) -> bool:
        return all(sorted(ids) == sorted(self.copies.get(r, [])) for r, ids in self.routed.items())

    def acted_on(self, topic: str, default: str) -> tuple[int, int]:
        """(harmful events acted on: any lane but the default, harmful events decided)."""
        lanes = self.flagged.get(topic, Counter())
        return sum(lanes.values()) - lanes[default], sum(lanes.values())

    def allowed(self, topic: str, default: str) -> tuple[int, int]:
        """(harmless events in the default lane, harmless events decided)."""
        lanes = self.unflagged.get(topic, Counter())
        return lanes[default], sum(lanes.values())

    def decisions_right(self, config: dict[str, Any]) -> tuple[int, int]:
        """(decisions right, decisions with an expectation) over the topics with lanes: a
        harmful event acted on, a harmless one left to the default lane."""
        right = total = 0
        for topic in config["topics"]:
            default = default_lane(topic)
            if default is None:
                continue
            for good, count in (
                self.acted_on(topic["input"], default),
                self.allowed(topic["input"], default),
            ):
                right, total = right + good, total + count
        return right, total


def show_results(
    consumer: Consumer, table: Table, config: dict[str, Any], expected: int, timeout: float
) -> Tally:
    """Print each output (and routed copy) as it arrives until every event has its output
    and every routed decision its copy, or the deadline passes."""
    tally = Tally()
    seen: set[str] = set()
    route_topics = {
        table.run.broker_name(route) for t in config["topics"] for route in routes(t).values()
    }
    deadline = time.monotonic() + timeout
    while (len(seen) < expected or not tally.copies_complete()) and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=100, timeout=0.5):
            if message.error():
                continue
            if message.topic() in route_topics:
                record_copy(message, table, tally)
                continue
            key = (message.key() or b"").decode()
            if key in seen:
                continue
            seen.add(key)
            record_row(message, table, config, tally)
    return tally


def record_row(message: Any, table: Table, config: dict[str, Any], tally: Tally) -> None:
    headers = dict(message.headers() or [])
    if "stream-classifier.error.code" in headers:
        tally.dead += 1
        reason = headers.get("stream-classifier.error.message") or b""
        print(f"DEAD LETTER {message.key()!r}: {reason.decode()}", flush=True)
        return
    output = json.loads(message.value())
    event = table.events.get(str(output["id"]))
    tally.scored += 1
    tally.matched += int(event is not None and event.expected == output["top_label"])
    tally.latencies.append(float(output["latency_ms"]))
    decision = output.get("decision")
    if decision is not None:
        name = table.run.configured_name(output["source"]["topic"])
        topic = next(t for t in config["topics"] if t["input"] == name)
        tally.decisions.setdefault(name, Counter())[decision] += 1
        if event is not None and event.expected in lane_labels(topic):
            tally.flagged.setdefault(name, Counter())[decision] += 1
        elif event is not None:
            tally.unflagged.setdefault(name, Counter())[decision] += 1
            tally.unflagged_labels.setdefault(name, set()).add(str(event.expected))
        route = routes(topic).get(decision)
        if route is not None:
            tally.routed.setdefault(route, set()).add(str(output["id"]))
    print(table.scored(output), flush=True)


def decision_line(tally: Tally, topic: dict[str, Any]) -> str:
    """A topic's lanes taken, and how many harmful events were acted on, harmless allowed."""
    name = topic["input"]
    lanes = [lane["name"] for lane in topic["lanes"]]
    counts = ", ".join(f"{tally.decisions[name][lane]} {lane}" for lane in lanes)
    default = default_lane(topic) or ""
    acting = "/".join(lane for lane in lanes if lane != default)
    acted, harmful = tally.acted_on(name, default)
    allowed, harmless = tally.allowed(name, default)
    labels = ", ".join(sorted(tally.unflagged_labels.get(name, set()))) or "none"
    return (
        f"decisions on {name}: {counts}; expected a label some lane names: {acted}/{harmful} "
        f"{acting}; expected {labels} (no lane names it): {allowed}/{harmless} {default}"
    )


def record_copy(message: Any, table: Table, tally: Tally) -> None:
    output = json.loads(message.value())
    route = table.run.configured_name(message.topic())
    tally.copies.setdefault(route, []).append(str(output["id"]))
    print(table.routed(output, route), flush=True)


def demo(
    args: argparse.Namespace,
    events: list[Event],
    run: Run,
    config: dict[str, Any],
    config_path: Path,
) -> int:
    """Run the service on ``config_path`` (``config`` with this run's names) and show it."""
    engine = f"nli on {args.model}" if args.model else f"{config['engine']['kind']} (demo.yaml)"
    print(f"broker {args.bootstrap}, topics demo-{run.run_id}.*, engine {engine}")
    print("starting the service (stream-classifier run) ...", flush=True)
    with service(args, config_path, config_path.parent / "service.log") as running:
        if not running.wait_ready(args.timeout):
            print("the service did not become ready:\n" + running.log_tail(), file=sys.stderr)
            return 1
        started = time.monotonic()
        consumer = output_consumer(args.bootstrap, run, config)
        producer = threading.Thread(target=produce, args=(args.bootstrap, run, events))
        labels = [label for t in config["topics"] for label in t["labels"]]
        lanes = [lane["name"] for t in config["topics"] for lane in t.get("lanes", [])]
        table = Table(run, events, labels, lanes)
        print(table.header())
        print(table.rule(), flush=True)
        producer.start()
        try:
            tally = show_results(consumer, table, config, len(events), args.timeout)
        finally:
            producer.join()
            consumer.close()
        elapsed = time.monotonic() - started
    return summary(tally, config, run, len(events), elapsed, running)


def summary(
    tally: Tally,
    config: dict[str, Any],
    run: Run,
    total: int,
    elapsed: float,
    running: Service,
) -> int:
    latencies = sorted(tally.latencies or [0.0])
    median = latencies[len(latencies) // 2]
    right, decided = tally.decisions_right(config)
    print(
        f"\n{tally.scored}/{total} events scored in {elapsed:.1f}s; median latency "
        f"{median:.0f} ms; {tally.matched}/{total} top labels match examples/events.jsonl's "
        f"'expected', {right}/{decided} decisions right; service exit code {running.exit_code}"
    )
    for topic in config["topics"]:
        if topic["input"] in tally.decisions:
            print(decision_line(tally, topic))
    for route in sorted({r for t in config["topics"] for r in routes(t).values()}):
        ids = tally.routed.get(route, set())
        copies = tally.copies.get(route, [])
        print(
            f"route topic {run.broker_name(route)}: {len(copies)} copies "
            f"({', '.join(sorted(copies)) or 'none'}) for {len(ids)} routed decisions"
        )
    stray = sorted(set(tally.copies) - set(tally.routed))
    if (
        tally.scored != total
        or tally.dead
        or running.exit_code != 0
        or not tally.copies_complete()
        or stray
    ):
        print("demo FAILED; the service's log ends with:\n" + running.log_tail(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
