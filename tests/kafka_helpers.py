"""Talk to the real test broker as an independent client would."""

from __future__ import annotations

import ctypes
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

# Public in confluent_kafka.admin, which re-exports them without an __all__ (so mypy's
# strict no-implicit-reexport refuses them there); stream_classifier/sink.py does the same.
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource

from stream_classifier.tools import kafka_io


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 1) -> None:
    kafka_io.create_topics(bootstrap, names, partitions)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]
    timestamp: int

    def json_value(self) -> Any:
        """The value parsed as JSON; a record without a value fails the test."""
        assert self.value is not None, f"{self.topic}[{self.partition}]@{self.offset}: no value"
        return json.loads(self.value)

    def header(self, name: str) -> bytes:
        """The value of header ``name``; a missing or null one fails the test."""
        value = self.headers[name]
        assert value is not None, f"{self.topic}[{self.partition}]@{self.offset}: {name} null"
        return value


def ordered_producer(bootstrap: str) -> Producer:
    """Idempotent, so a request retried (say on a topic created a moment ago) cannot land
    after the one sent behind it: the tests read order back and need the input in order."""
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})


def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | None],
    keys: Iterable[bytes | None] | None = None,
    headers: list[tuple[str, str | bytes | None]] | None = None,
    partition: int | None = None,
    producer: Producer | None = None,
) -> None:
    """Write and wait for every acknowledgement, with ``producer`` (one already connected)
    or a new :func:`ordered_producer`."""
    producer = producer or ordered_producer(bootstrap)
    values = list(values)
    key_list = list(keys) if keys is not None else [None] * len(values)
    errors: list[str] = []

    def report(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    for key, value in zip(key_list, values, strict=True):
        producer.produce(
            topic,
            value=value,
            key=key,
            partition=-1 if partition is None else partition,  # -1: librdkafka's partitioner
            headers=headers,
            on_delivery=report,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not errors, errors


class TopicReader:
    """An independent read_committed reader of every partition, from the beginning.

    It assigns partitions directly (no group join), so reading again is cheap.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.records: list[Record] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique("reader"),
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        partitions = topic_partitions(self._consumer, topic)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def poll(self, timeout: float) -> None:
        for message in self._consumer.consume(num_messages=5000, timeout=timeout):
            if message.error():
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None and partition is not None and offset is not None
            # A consumed message's headers are a list of (name, bytes or None).
            headers = cast("list[tuple[str, bytes | None]]", message.headers() or [])
            self.records.append(
                Record(
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    key=message.key(),
                    value=message.value(),
                    headers=dict(headers),
                    timestamp=message.timestamp()[1],
                )
            )

    def read_until(self, count: int, timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline:
            self.poll(min(0.5, max(0.0, deadline - time.monotonic())))
        return self.records

    def read_to_end(self, timeout: float) -> list[Record]:
        """Read until every partition's position reaches its end offset (or the deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll(0.2)
            if self.caught_up():
                return self.records
        raise AssertionError(f"{self.topic}: not at the end after {timeout:.0f}s")

    def caught_up(self) -> bool:
        """At the end of every partition; False while an end cannot be read (a replicated
        cluster still recovering on a loaded machine timed the query out once, and once
        answered with a partition its metadata did not have yet)."""
        for tp in self._consumer.position(self._consumer.assignment()):
            try:
                high = self._consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
            except KafkaException as exc:
                if exc.args[0].code() not in END_NOT_READABLE_YET:
                    raise
                return False
            if high > 0 and tp.offset < high:
                return False
        return True

    def close(self) -> None:
        self._consumer.close()


def topic_partitions(consumer: Consumer, topic: str, timeout: float = 30.0) -> list[int]:
    """The topic's partitions, once the metadata names them. A broker that has not heard
    of a topic just created answers it without partitions (or with an error), and a reader
    that assigned those would read nothing for the whole test."""
    deadline = time.monotonic() + timeout
    while True:
        described = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if described is not None and described.error is None and described.partitions:
            return sorted(described.partitions)
        if time.monotonic() >= deadline:
            raise AssertionError(f"{topic}: no partitions in the metadata after {timeout:.0f}s")
        time.sleep(0.2)


def read_to_end(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Record]:
    reader = TopicReader(bootstrap, topic)
    try:
        return reader.read_to_end(timeout)
    finally:
        reader.close()


def read_all(bootstrap: str, topic: str, count: int, timeout: float = 60.0) -> list[Record]:
    """Read from the beginning (read_committed) until ``count`` records or the deadline."""
    reader = TopicReader(bootstrap, topic)
    try:
        return reader.read_until(count, timeout)
    finally:
        reader.close()


#: What reading a partition's end answers while a replicated cluster recovers: a query
#: timed out, or cut when librdkafka dropped a broker that left the metadata
#: (_DESTROY_BROKER), a partition its metadata does not have yet, a leader moving, and a
#: new leader whose high watermark has not caught up yet (OFFSET_NOT_AVAILABLE, KIP-207).
END_NOT_READABLE_YET = {
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._DESTROY_BROKER,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.OFFSET_NOT_AVAILABLE,
}

#: What a group's coordinator answers while it moves or loads the group.
COORDINATOR_MOVING = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
}


#: Either: "not yet" for a query of ends or committed offsets, within a test's deadline.
NOT_YET = END_NOT_READABLE_YET | COORDINATOR_MOVING


def committed(
    bootstrap: str, group: str, topic: str, partitions: int = 1, timeout: float = 30.0
) -> dict[int, int]:
    """The group's committed offsets. Asked again while the broker answers with a
    retriable error (``NOT_COORDINATOR`` while the group's coordinator moves or loads, on
    a loaded machine): librdkafka returns those to the caller."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                offsets = consumer.committed(
                    [TopicPartition(topic, p) for p in range(partitions)],
                    timeout=max(1.0, deadline - time.monotonic()),
                )
                break
            except KafkaException as exc:
                error = exc.args[0]
                transient = error.retriable() or error.code() in COORDINATOR_MOVING
                if not transient or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in offsets}


def end_offsets(
    bootstrap: str, topic: str, partitions: int = 1, isolation: str = "read_committed"
) -> dict[int, int]:
    """Each partition's end as a reader of ``isolation`` sees it: under read_committed the
    last stable offset, which stops before the first transaction still open."""
    config = {"bootstrap.servers": bootstrap, "group.id": unique("probe")}
    consumer = Consumer({**config, "isolation.level": isolation})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]
) -> None:
    """Poll ``condition`` until ``timeout``; ``what`` as a function is asked at the time
    out (logs read then, not when the wait began)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    described = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {described}")


def wait_drained(
    bootstrap: str, group: str, topic: str, partitions: int = 1, timeout: float = 90.0
) -> None:
    """Wait until the group's committed offsets equal the topic's end offsets (a partition
    that never held an event has nothing to commit: its offset stays unset)."""

    def drained() -> bool:
        try:
            done = committed(bootstrap, group, topic, partitions)
            ends = end_offsets(bootstrap, topic, partitions)
        except KafkaException as exc:
            # A query that timed out on a starved broker (the loaded fault runs), or met a
            # broker just restarted, is "not yet", within the deadline; a real error still
            # fails the test.
            if exc.args[0].code() in NOT_YET:
                return False
            raise
        return all(done[p] == end or (end == 0 and done[p] < 0) for p, end in ends.items())

    wait_until(drained, timeout, f"{group} committed to the end of {topic}")


def alter_topic(bootstrap: str, topic: str, **settings: str) -> None:
    """Set topic configs (``max.message.bytes``, ``min.insync.replicas``...) as an admin
    would; dots in names are written as underscores."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    entries = [
        ConfigEntry(name.replace("_", "."), value, incremental_operation=AlterConfigOpType.SET)
        for name, value in settings.items()
    ]
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(list(names), operation_timeout=30).values():
        future.result(timeout=30)


class _Mem(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class _Value(ctypes.Union):
    _fields_ = [("cstr", ctypes.c_char_p), ("ptr", ctypes.c_void_p), ("mem", _Mem)]
    _fields_ += [("pad", ctypes.c_char * 64)]


class _Vu(ctypes.Structure):
    _fields_ = [("vtype", ctypes.c_int), ("u", _Value)]


#: rd_kafka_vtype_t
_VTYPE_TOPIC, _VTYPE_VALUE, _VTYPE_KEY, _VTYPE_HEADERS = 1, 4, 5, 10


def c_api_produce(
    bootstrap: str,
    topic: str,
    value: bytes,
    headers: list[tuple[bytes, bytes | None]],
    key: bytes | None = None,
) -> None:
    """Produce one record through librdkafka's C API (rd_kafka_produceva), as tools
    built on it do: header names are any bytes there, which confluent-kafka cannot write."""
    from stream_classifier.headers import librdkafka_path

    lib = ctypes.CDLL(librdkafka_path())
    p, size = ctypes.c_void_p, ctypes.c_size_t
    lib.rd_kafka_conf_new.restype = p
    lib.rd_kafka_conf_set.argtypes = [p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, size]
    lib.rd_kafka_new.restype = p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, p, ctypes.c_char_p, size]
    lib.rd_kafka_headers_new.restype = p
    lib.rd_kafka_headers_new.argtypes = [size]
    lib.rd_kafka_header_add.argtypes = [p, ctypes.c_char_p, ctypes.c_ssize_t, p, ctypes.c_ssize_t]
    lib.rd_kafka_produceva.restype = p
    lib.rd_kafka_produceva.argtypes = [p, ctypes.POINTER(_Vu), size]
    lib.rd_kafka_error_string.restype = ctypes.c_char_p
    lib.rd_kafka_error_string.argtypes = [p]
    lib.rd_kafka_flush.argtypes = [p, ctypes.c_int]
    lib.rd_kafka_destroy.argtypes = [p]
    errstr = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    assert lib.rd_kafka_conf_set(conf, b"bootstrap.servers", bootstrap.encode(), errstr, 512) == 0
    handle = lib.rd_kafka_new(0, conf, errstr, 512)
    assert handle, errstr.value
    buffers = []
    c_headers = lib.rd_kafka_headers_new(len(headers))
    for name, data in headers:
        buffer = None if data is None else ctypes.create_string_buffer(data, len(data))
        buffers.append(buffer)
        length = -1 if data is None else len(data)
        assert lib.rd_kafka_header_add(c_headers, name, len(name), buffer, length) == 0
    fields = [(_VTYPE_TOPIC, topic.encode()), (_VTYPE_VALUE, value), (_VTYPE_HEADERS, c_headers)]
    if key is not None:
        fields.append((_VTYPE_KEY, key))
    vus = (_Vu * len(fields))()
    for slot, (vtype, data) in zip(vus, fields, strict=True):
        slot.vtype = vtype
        if vtype == _VTYPE_TOPIC:
            slot.u.cstr = data
        elif vtype == _VTYPE_HEADERS:
            slot.u.ptr = data
        else:
            buffer = ctypes.create_string_buffer(data, len(data))
            buffers.append(buffer)
            slot.u.mem = _Mem(ctypes.cast(buffer, ctypes.c_void_p), len(data))
    error = lib.rd_kafka_produceva(handle, vus, len(fields))
    assert not error, lib.rd_kafka_error_string(error)
    assert lib.rd_kafka_flush(handle, 30_000) == 0
    lib.rd_kafka_destroy(handle)
