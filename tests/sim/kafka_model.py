"""An in-memory model of the Kafka the service relies on, adversarial where Kafka may be.

One cluster of topics (each with its partition count and its ``max.message.bytes``) whose
partitioned logs hold records committed, aborted or still open in a transaction
(read_committed readers stop at the first open one), from a log start offset that
retention moves; one consumer group with committed offsets, generations and cooperative
rebalances (a partition moves only after its old owner has served the revoke, or was
lost); transactions that commit or abort atomically, pending transactional offsets that
make a partition's committed offset unstable, fencing by transactional id, transaction
time-outs; a producer with librdkafka's queue, batches and delivery reports; outages of
the whole cluster or of the output alone; topics deleted and created again.

:class:`SimSource` and :class:`SimSink` implement the service's ``Source`` and ``Sink``
ports over it, with librdkafka's behaviour where the service depends on it:

- consumed messages are real ``confluent_kafka.Message`` objects whose header list is a
  real librdkafka one (names of any bytes), read by the service's own header code;
- rebalance callbacks are served inside ``consume()``, possibly between the messages it
  returns; a seek right after an assignment may be refused (``_STATE``); a fetch position
  outside the log (retention passed it) is reset by ``auto.offset.reset``; a partition
  assigned while its committed offset is unstable may be started at ``auto.offset.reset``
  when the assignment changes before it is stable (librdkafka's own bug);
- a commit may be refused, or land and still report failure (its response was lost);
- ``produce()`` refuses a record over the producer's ``message.max.bytes`` at once
  (MSG_SIZE_TOO_LARGE) and a record that does not fit the queue
  (``queue.buffering.max.messages``/``kbytes``) after serving delivery reports, as
  ``KafkaSink`` does; records go to a partition chosen by key (librdkafka's
  consistent_random partitioner: CRC32 of the key, a random partition for a null key);
- delivery is per partition and in order, in batches capped by ``batch.size``, which the
  model sets as ``KafkaSink`` does (under the smallest ``max.message.bytes`` of the
  topics it writes); a batch larger than its topic's limit fails as a whole (librdkafka
  does not split it, librdkafka #488);
  during an outage records time out one by one, oldest first, so that later records of a
  partition may still land after earlier ones timed out (the idempotent producer's gaps,
  librdkafka's INTRODUCTION.md "Message timeout considerations"), and a record that times
  out in flight may have landed all the same;
- header names and values are converted the way confluent-kafka's ``produce()`` does
  (names are text, cut at their first NUL byte: ``rd_kafka_header_add(name, -1)``);
- in a transaction, a record that fails delivery fails the commit (abortable), its failure
  reported inside ``commit_transaction`` as librdkafka's flush does; an abort purges what
  is still queued, reporting each record as purged; a process may die inside
  ``commit_transaction`` with its offsets sent (:class:`ProcessKilled`).

Every error is a ``KafkaError`` code turned into a ``DeliveryFailure`` exactly as the Kafka
adapter does, so the service's own table (``kafka_errors``) decides what it means.
Everything is driven by the test's ``random.Random``: a seed replays a schedule exactly.
"""

from __future__ import annotations

import ctypes
import random
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import confluent_kafka
from confluent_kafka import KafkaError

from stream_classifier import headers as header_module
from stream_classifier.kafka_errors import Verdict
from stream_classifier.messages import KafkaMessage
from stream_classifier.sink import (
    BATCH_FRAMING,
    BATCH_SIZE,
    QUEUE_FULL_S,
    DeliveryCallback,
    DeliveryFailure,
    Record,
    SinkError,
    least_framed_size,
)
from stream_classifier.sink import TransactionFailed as TxnFailed
from stream_classifier.source import OffsetsUnavailable, RebalanceListener

TP = tuple[str, int]
#: confluent_kafka.OFFSET_BEGINNING, as the service seeks to it.
BEGINNING = -2
#: librdkafka's worst-case framing of one record (RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD), which
#: produce() adds to key, value and headers before comparing with message.max.bytes.
RECORD_OVERHEAD = 36
#: A record batch's own header (RD_KAFKAP_MSGSET_V2_SIZE): the broker compares the whole
#: batch with the topic's max.message.bytes.
BATCH_OVERHEAD = 61
#: The broker's default max.message.bytes.
BROKER_MAX_MESSAGE_BYTES = 1_048_588

WireHeaders = list[tuple[bytes, bytes | None]]


class ProcessKilled(BaseException):
    """The process died inside a call (SIGKILL, OOM): nothing after it runs.

    A BaseException so that no ``except Exception`` of the service can catch it.
    """


def failure(code: int) -> DeliveryFailure:
    """The failure ``KafkaSink`` reports for a librdkafka error code."""
    return DeliveryFailure.of(KafkaError(code))


def varint_size(n: int) -> int:
    """Bytes of Kafka's zigzag varint encoding of ``n``."""
    z = (n << 1) ^ (n >> 63)
    size = 1
    while z >= 0x80:
        z >>= 7
        size += 1
    return size


def headers_size(headers: WireHeaders) -> int:
    total = varint_size(len(headers))
    for name, value in headers:
        total += varint_size(len(name)) + len(name)
        total += varint_size(-1) if value is None else varint_size(len(value)) + len(value)
    return total


def wire_size(key: bytes | None, value: bytes | None, headers: WireHeaders) -> int:
    """librdkafka's size of a record (``rd_kafka_msg_max_wire_size``)."""
    return RECORD_OVERHEAD + len(key or b"") + len(value or b"") + headers_size(headers)


def _text_to_c(text: str) -> bytes:
    """A str as confluent-kafka hands it to C: UTF-8 (lone surrogates raise), and librdkafka
    then measures it with strlen(), so it ends at the first NUL."""
    return text.encode("utf-8").split(b"\0", 1)[0]


def wire_headers(headers: Sequence[tuple[Any, Any]]) -> WireHeaders:
    """Headers as confluent-kafka's ``produce()`` writes them (``py_header_to_c``)."""
    out: WireHeaders = []
    for name, value in headers:
        raw_name = _text_to_c(name if isinstance(name, str) else str(name))
        raw_value: bytes | None
        if value is None or isinstance(value, bytes):
            raw_value = value
        elif isinstance(value, str):
            raw_value = _text_to_c(value)
        else:
            raise TypeError(
                f"expected header value to be None, binary, or unicode string, not {type(value)}"
            )
        out.append((raw_name, raw_value))
    return out


def partition_for(key: bytes | None, partitions: int, rng: random.Random) -> int:
    """librdkafka's default partitioner (consistent_random)."""
    if key is None:
        return rng.randrange(partitions)
    return zlib.crc32(key) % partitions


# -- consumed messages: real confluent_kafka.Message objects --------------------------------


class _HeaderLists:
    """Builds librdkafka header lists (rd_kafka_headers_t) with names of any bytes."""

    def __init__(self) -> None:
        library = ctypes.CDLL(header_module.librdkafka_path())
        self.new = library.rd_kafka_headers_new
        self.new.argtypes = [ctypes.c_size_t]
        self.new.restype = ctypes.c_void_p
        self.add = library.rd_kafka_header_add
        self.add.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_ssize_t,
            ctypes.c_void_p,
            ctypes.c_ssize_t,
        ]
        self.add.restype = ctypes.c_int

    def build(self, headers: WireHeaders) -> int:
        handle = self.new(len(headers))
        for name, value in headers:
            data = None if value is None else ctypes.create_string_buffer(value, len(value))
            self.add(handle, name, len(name), data, 0 if value is None else len(value))
        return int(handle)


def _probe_raw_headers() -> _HeaderLists | None:
    """Header lists can be put into a Message only where the service reads them from there
    (its layout check passes); elsewhere the schedules give events no headers."""
    if header_module._RDKAFKA is None:
        return None
    try:
        lists = _HeaderLists()
    except (OSError, AttributeError):
        return None
    message = confluent_kafka.Message(topic="t", partition=0, offset=0, key=b"k", value=b"v")
    if _c_headers_slot(message) is None:
        return None
    return lists


def _c_headers_slot(message: Any) -> ctypes.c_void_p | None:
    """The message's c_headers field, if its layout is the one headers.py reads, and empty."""
    address = id(message)

    def word(offset: int) -> int:
        return ctypes.c_void_p.from_address(address + offset).value or 0

    h = header_module
    # A null key or value is a NULL field (confluent-kafka's Message_new0 leaves it unset).
    fields = (message.topic(), message.value(), message.key())
    if (word(h._TOPIC), word(h._VALUE), word(h._KEY)) != tuple(
        0 if obj is None else id(obj) for obj in fields
    ):
        return None
    if word(h._PY_HEADERS) or word(h._C_HEADERS):
        return None
    return ctypes.c_void_p.from_address(address + h._C_HEADERS)


RAW_HEADERS = _probe_raw_headers()


def make_message(tp: TP, stored: Stored) -> KafkaMessage:
    """What librdkafka hands the consumer: a Message owning a librdkafka header list."""
    message = confluent_kafka.Message(
        topic=tp[0],
        partition=tp[1],
        offset=stored.offset,
        key=stored.key,
        value=stored.value,
        timestamp=(confluent_kafka.TIMESTAMP_CREATE_TIME, stored.timestamp),
    )
    if stored.headers:
        assert RAW_HEADERS is not None, "headers with any bytes need librdkafka's header lists"
        slot = _c_headers_slot(message)
        assert slot is not None
        slot.value = RAW_HEADERS.build(stored.headers)  # the Message frees it
    return message


# -- the cluster ------------------------------------------------------------------------


@dataclass
class Stored:
    offset: int
    key: bytes | None
    value: bytes | None
    record: Record | None  # what the service wrote (None for the test's input events)
    headers: WireHeaders = field(default_factory=list)
    timestamp: int = 0
    state: str = "committed"  # or "open", "aborted"
    txn: Txn | None = None


@dataclass
class Txn:
    txn_id: str
    epoch: int
    started: int  # cluster step
    records: list[Stored] = field(default_factory=list)
    offsets: dict[TP, int] = field(default_factory=dict)
    #: A record of it failed delivery: the commit fails (abortable).
    failed: bool = False


@dataclass
class Log:
    records: list[Stored] = field(default_factory=list)
    #: The log start offset (retention deleted what is below).
    start: int = 0

    @property
    def end(self) -> int:
        return len(self.records)


@dataclass
class Topic:
    name: str
    partitions: int
    max_message_bytes: int = BROKER_MAX_MESSAGE_BYTES
    exists: bool = True
    incarnation: int = 0


class Cluster:
    def __init__(self, rng: random.Random, txn_timeout_steps: int) -> None:
        self.rng = rng
        self.topics: dict[str, Topic] = {}
        self.logs: dict[TP, Log] = {}
        #: Logs of deleted topics: (tp, incarnation, log), their records still counted as
        #: written (deleting a topic is the operator's decision).
        self.retired: list[tuple[TP, int, Log]] = []
        self.input_topics: list[str] = []
        self.input_partitions: list[TP] = []
        self.committed: dict[TP, int] = {}
        self.step = 0
        self.outage = False  # the whole cluster
        self.output_down = False  # the output's brokers only: the input stays readable
        #: The step the output became unreachable (records sent before may be in flight).
        self.down_since = 0
        self.txn_timeout_steps = txn_timeout_steps
        self.open_txns: dict[str, Txn] = {}
        self.epochs: dict[str, int] = {}
        # the group
        self.generation = 0
        self.members: dict[str, SimSource] = {}
        self.owner: dict[TP, str] = {}
        #: Injected faults, consumed by the next matching call.
        self.fail_next_commit: set[str] = set()  # member ids: refused
        self.lose_next_commit_response: set[str] = set()  # member ids: lands, reports failure
        self.fail_next_txn: dict[str, str] = {}  # txn id -> "abortable" | "unknown"
        self.kill_in_commit: set[str] = set()  # txn ids: die after send_offsets
        #: What the model saw that the checks need.
        self.violations: list[str] = []
        #: (event timestamp, kind of the first form, stage) of every record refused for
        #: good, and whether that record alone was over the limit it hit.
        self.refusals: dict[tuple[int, str, int], bool] = {}
        self.note: Callable[[str], None] = lambda text: None
        self.on_visible: Callable[[Stored], None] = lambda stored: None
        #: How often each modelled fault or behaviour came up (the test reports them).
        self.stats: Counter[str] = Counter()

    # -- topics ------------------------------------------------------------------------

    def create_topic(
        self,
        name: str,
        partitions: int,
        max_message_bytes: int = BROKER_MAX_MESSAGE_BYTES,
        is_input: bool = False,
    ) -> None:
        self.topics[name] = Topic(name, partitions, max_message_bytes)
        for p in range(partitions):
            self.logs[(name, p)] = Log()
        if is_input:
            self.input_topics.append(name)
            self._inputs_changed()

    def resize(self, name: str, partitions: int, max_message_bytes: int | None = None) -> None:
        """Set up an empty topic again (named scenarios, before anything is written)."""
        topic = self.topics[name]
        assert all(not self.logs[(name, p)].records for p in range(topic.partitions))
        for p in range(topic.partitions):
            del self.logs[(name, p)]
        topic.partitions = partitions
        if max_message_bytes is not None:
            topic.max_message_bytes = max_message_bytes
        for p in range(partitions):
            self.logs[(name, p)] = Log()
        self._inputs_changed()

    def _inputs_changed(self) -> None:
        self.input_partitions = sorted(
            (name, p)
            for name in self.input_topics
            if self.topics[name].exists
            for p in range(self.topics[name].partitions)
        )

    def delete_topic(self, name: str) -> None:
        """The topic and its records go; so do the group's offsets for it (committed and
        pending in transactions), as the group coordinator drops them."""
        topic = self.topics[name]
        topic.exists = False
        for p in range(topic.partitions):
            tp = (name, p)
            self.retired.append((tp, topic.incarnation, self.logs.pop(tp)))
            self.committed.pop(tp, None)
            for txn in self.open_txns.values():
                txn.offsets.pop(tp, None)
        self.note(f"topic {name} DELETED")
        self.stats[f"topic deleted ({'input' if name in self.input_topics else 'output'})"] += 1
        if name in self.input_topics:
            self._inputs_changed()
            self.rebalance()  # its partitions are revoked from their owners

    def can_recreate(self, name: str) -> bool:
        """An input topic comes back once no member holds its old partitions (a stale
        commit of an old offset racing the recreation is left out of the model)."""
        if name not in self.input_topics:
            return True
        return not any(
            tp[0] == name for member in self.members.values() for tp in member.owned
        ) and not any(tp[0] == name for tp in self.owner)

    def recreate_topic(self, name: str) -> None:
        topic = self.topics[name]
        topic.exists = True
        topic.incarnation += 1
        for p in range(topic.partitions):
            self.logs[(name, p)] = Log()
        self.note(f"topic {name} created again")
        if name in self.input_topics:
            self._inputs_changed()
            self.rebalance()

    def exists(self, topic: str) -> bool:
        found = self.topics.get(topic)
        return found is not None and found.exists

    def retain(self, tp: TP, start: int) -> None:
        """Retention deletes the records below ``start``."""
        log = self.logs[tp]
        log.start = max(log.start, min(start, log.end))
        self.note(f"retention: {tp} starts at {log.start}")
        self.stats["retention"] += 1

    # -- logs --------------------------------------------------------------------------

    def append(
        self,
        tp: TP,
        key: bytes | None,
        value: bytes | None,
        record: Record | None,
        headers: WireHeaders | None = None,
        timestamp: int = 0,
        state: str = "committed",
    ) -> Stored:
        log = self.logs[tp]
        stored = Stored(log.end, key, value, record, headers or [], timestamp, state)
        log.records.append(stored)
        if state == "committed":
            self.on_visible(stored)
        return stored

    def visible(self, topic: str) -> list[Stored]:
        """What a read_committed reader of ``topic`` sees now."""
        out: list[Stored] = []
        for (t, _p), log in self.logs.items():
            if t == topic:
                out += [s for s in log.records[log.start :] if s.state == "committed"]
        return out

    def end(self, tp: TP) -> int:
        return self.logs[tp].end

    # -- offsets -----------------------------------------------------------------------

    def commit_offsets(self, offsets: dict[TP, int], by: str) -> None:
        for tp, offset in offsets.items():
            old = self.committed.get(tp)
            if old is not None and offset < old:
                self.violations.append(
                    f"{by} moved the committed offset of {tp} back: {old} -> {offset}"
                )
            self.committed[tp] = offset

    # -- transactions ------------------------------------------------------------------

    def unstable(self, tp: TP) -> bool:
        return any(tp in txn.offsets for txn in self.open_txns.values())

    def end_txn(self, txn: Txn, commit: bool) -> None:
        events = [
            (s.record.source.partition, s.record.source.offset) for s in txn.records if s.record
        ]
        self.note(
            f"txn {txn.txn_id} {'COMMIT' if commit else 'abort'} {events} offsets {txn.offsets}"
        )
        for stored in txn.records:
            stored.state = "committed" if commit else "aborted"
            if commit:
                self.on_visible(stored)
        if commit:
            self.commit_offsets(txn.offsets, f"transaction {txn.txn_id}")
        self.open_txns.pop(txn.txn_id, None)

    def fence(self, txn_id: str) -> int:
        """A new producer with this id: abort what the old one left open; new epoch."""
        old = self.open_txns.get(txn_id)
        if old is not None:
            self.end_txn(old, commit=False)
        self.epochs[txn_id] = self.epochs.get(txn_id, 0) + 1
        return self.epochs[txn_id]

    def expire_transactions(self) -> None:
        for txn in list(self.open_txns.values()):
            if self.step - txn.started > self.txn_timeout_steps:
                self.end_txn(txn, commit=False)

    # -- the group ---------------------------------------------------------------------

    def join(self, member: SimSource) -> None:
        self.members[member.member_id] = member
        self.rebalance()

    def leave(self, member_id: str) -> None:
        """The member is gone (closed, crashed past its session, or timed out)."""
        self.members.pop(member_id, None)
        for tp, owner in list(self.owner.items()):
            if owner == member_id:
                del self.owner[tp]
        self.rebalance()

    def _target(self) -> dict[TP, str]:
        ids = sorted(self.members)
        return {tp: ids[i % len(ids)] for i, tp in enumerate(self.input_partitions)}

    def rebalance(self) -> None:
        """Cooperative: revoke what moves first; assign it once its old owner let go."""
        self.generation += 1
        if not self.members:
            return
        target = self._target()
        for member in self.members.values():
            if not member.pending:
                member.generation = self.generation  # rejoined in the background
            moving = [tp for tp in member.owned if target.get(tp) != member.member_id]
            if moving:
                member.pending.append(("revoke", moving))
        self.assign_free(target)

    def assign_free(self, target: dict[TP, str] | None = None) -> None:
        if not self.members:
            return
        if target is None:
            target = self._target()
        revoking = {
            tp
            for m in self.members.values()
            for kind, parts in m.pending
            if kind == "revoke"
            for tp in parts
        }
        for tp in self.input_partitions:
            if tp in self.owner or tp in revoking:
                continue
            member = self.members[target[tp]]
            self.owner[tp] = member.member_id
            member.pending.append(("assign", [tp]))


class SimSource:
    """The ``Source`` port over the model: one group member."""

    def __init__(self, cluster: Cluster, member_id: str) -> None:
        self.cluster = cluster
        self.member_id = member_id
        self.listener: RebalanceListener | None = None
        self.generation = 0
        #: Partitions this member has been told it owns.
        self.owned: set[TP] = set()
        self.pending: list[tuple[str, list[TP]]] = []
        self.position: dict[TP, int | None] = {}
        self.paused: set[TP] = set()  # survives revoke and re-assign, as librdkafka's may
        #: Assigned and not fetched from since, whether a seek now is refused (_STATE):
        #: drawn at assignment, so that the order of the service's seeks draws nothing.
        self.unfetched: dict[TP, bool] = {}
        self.closed = False
        #: The background commit in flight: its offsets, the generation and the step it
        #: was sent in.
        self.background: tuple[dict[TP, int], int, int] | None = None

    def start(self, listener: RebalanceListener) -> None:
        self.listener = listener
        self.cluster.join(self)

    def _serve(self, kind: str, parts: list[TP]) -> None:
        assert self.listener is not None
        self._start_unstable_at_reset()
        if kind == "assign":
            fresh = [tp for tp in parts if tp not in self.owned]
            for tp in fresh:
                self.owned.add(tp)
                self.unfetched[tp] = self.cluster.rng.random() < 0.5
                self.position[tp] = None  # fetched from the group when first read
            self.generation = self.cluster.generation
            if fresh:
                self.listener.assigned(fresh)
        elif kind == "revoke":
            mine = [tp for tp in parts if tp in self.owned]
            self.listener.revoked(mine)
            for tp in mine:
                self.owned.discard(tp)
                self.position.pop(tp, None)
                if self.cluster.owner.get(tp) == self.member_id:
                    del self.cluster.owner[tp]
            self.generation = self.cluster.generation
            self.cluster.assign_free()
        elif kind == "lost":
            mine = sorted(self.owned)
            self.owned.clear()
            self.position.clear()
            self.listener.lost(mine)
            self.pending = [(k, p) for k, p in self.pending if k == "lost"]
            self.cluster.join(self)  # rejoin with a new generation

    def _start_unstable_at_reset(self) -> None:
        """librdkafka 2.16: a partition whose committed offset is still being fetched,
        unstable (another member's open transaction holds offsets of it), is started at
        ``auto.offset.reset`` when the assignment changes meanwhile (it keeps the broker's
        -1: rd_kafka_assignment_apply_offsets). Modelled at half of such changes."""
        for tp in sorted(self.owned):
            log = self.cluster.logs.get(tp)
            if log is None or self.position.get(tp) is not None or not self.cluster.unstable(tp):
                continue
            if self.cluster.rng.random() < 0.5:
                self.position[tp] = log.start
                self.cluster.stats["started at auto.offset.reset while unstable"] += 1

    def lose(self) -> None:
        """Session time-out: the group moves on; this member learns it in consume()."""
        self.cluster.members.pop(self.member_id, None)
        for tp, owner in list(self.cluster.owner.items()):
            if owner == self.member_id:
                del self.cluster.owner[tp]
        self.pending = [("lost", [])]
        self.cluster.rebalance()

    def consume(self, max_messages: int, timeout: float) -> Sequence[KafkaMessage]:
        rng = self.cluster.rng
        out: list[KafkaMessage] = []
        if self.cluster.outage:
            if self.pending and self.pending[0][0] == "lost":
                self._serve(*self.pending.pop(0))
            return out
        # Messages fetched before the callbacks may come back with those after them.
        if rng.random() < 0.3:
            out += self._fetch(rng.randint(0, max_messages))
        while self.pending:
            self._serve(*self.pending.pop(0))
        out += self._fetch(max_messages - len(out))
        return out

    def _fetch(self, limit: int) -> list[KafkaMessage]:
        out: list[KafkaMessage] = []
        parts = sorted(self.owned - self.paused)
        self.cluster.rng.shuffle(parts)
        for tp in parts:
            if len(out) >= limit:
                break
            log = self.cluster.logs.get(tp)
            if log is None:
                continue  # its topic was deleted: revoked soon
            position = self._resolve(tp, log)
            if position is None:
                continue
            self.unfetched.pop(tp, None)
            if not log.start <= position <= log.end:
                # OFFSET_OUT_OF_RANGE: auto.offset.reset=earliest (librdkafka also emits
                # an _AUTO_OFFSET_RESET consumer error, which the adapter logs).
                self.cluster.note(f"{self.member_id}: {tp}@{position} out of range, reset")
                self.cluster.stats["fetch offset out of range, reset"] += 1
                position = log.start
            while position < log.end and len(out) < limit:
                stored = log.records[position]
                if stored.state == "open":
                    break  # read_committed stops at the last stable offset
                position += 1
                if stored.state == "committed":
                    out.append(make_message(tp, stored))
                    if stored.headers:
                        self.cluster.stats["consumed with headers"] += 1
            self.position[tp] = position
        return out

    def _resolve(self, tp: TP, log: Log) -> int | None:
        position = self.position.get(tp)
        if position is None:
            if self.cluster.unstable(tp):
                return None  # librdkafka waits for a stable committed offset
            committed = self.cluster.committed.get(tp)
            position = log.start if committed is None else committed
            self.position[tp] = position
        return position

    def commit(self, offsets: dict[TP, int]) -> bool:
        cluster = self.cluster
        if cluster.outage or self.member_id not in cluster.members:
            return False
        if self.member_id in cluster.fail_next_commit:
            cluster.fail_next_commit.discard(self.member_id)
            return False
        if self.generation != cluster.generation:
            return False  # REBALANCE_IN_PROGRESS / ILLEGAL_GENERATION
        if not all(cluster.exists(tp[0]) for tp in offsets):
            return False  # UNKNOWN_TOPIC_OR_PART for the partitions of a deleted topic
        cluster.commit_offsets(offsets, self.member_id)
        if self.member_id in cluster.lose_next_commit_response:
            cluster.lose_next_commit_response.discard(self.member_id)
            cluster.note(f"{self.member_id}: commit {offsets} landed, reported as failed")
            cluster.stats["commit landed, reported failed"] += 1
            return False  # the request timed out after the coordinator applied it
        return True

    def commit_in_background(self, offsets: dict[TP, int]) -> None:
        assert self.background is None, "a background commit is already in flight"
        self.background = (dict(offsets), self.cluster.generation, self.cluster.step)

    def commit_outcome(self, timeout: float) -> bool | None:
        """In flight for the step it was sent in and while the coordinator is away; then
        it lands, unless the group moved on since it was sent (ILLEGAL_GENERATION)."""
        assert self.background is not None, "no background commit in flight"
        offsets, generation, step = self.background
        if self.cluster.outage or (timeout == 0 and self.cluster.step == step):
            return None
        self.background = None
        if generation != self.cluster.generation:
            self.cluster.stats["background commit refused: the group moved on"] += 1
            return False
        return self.commit(offsets)

    def committed(self, partitions: list[TP], timeout: float) -> dict[TP, int | None]:
        if self.cluster.outage:
            raise OffsetsUnavailable("coordinator not available")
        unstable = [tp for tp in partitions if self.cluster.unstable(tp)]
        if unstable:
            raise OffsetsUnavailable(f"{unstable[0]}: UNSTABLE_OFFSET_COMMIT")
        return {tp: self.cluster.committed.get(tp) for tp in partitions}

    def seek(self, tp: TP, offset: int) -> bool:
        assert tp in self.owned, f"seek on {tp} not assigned"
        if self.unfetched.get(tp):
            # _STATE: librdkafka has not started fetching it yet; it has by the next turn.
            self.unfetched[tp] = False
            self.cluster.stats["seek refused (_STATE)"] += 1
            return False
        log = self.cluster.logs.get(tp)
        start = log.start if log is not None else 0
        self.position[tp] = start if offset == BEGINNING else offset
        return True

    def pause(self, partitions: list[TP]) -> None:
        self.paused.update(partitions)

    def resume(self, partitions: list[TP]) -> None:
        for tp in sorted(partitions):
            if tp in self.paused and tp in self.owned and self.cluster.rng.random() < 0.2:
                # As librdkafka was seen to do for a partition paused right at assignment:
                # fetch again from the committed offset what was already delivered.
                self.position[tp] = None
        self.paused.difference_update(partitions)

    def group_metadata(self) -> object:
        return (self.member_id, self.generation)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.listener is not None and self.owned and self.member_id in self.cluster.members:
            self.listener.revoked(sorted(self.owned))
        self.owned.clear()
        self.cluster.leave(self.member_id)


# -- the producer -------------------------------------------------------------------------


@dataclass
class Queued:
    record: Record
    tp: TP | None  # None: its topic is not known (deleted), partition not chosen yet
    created: int
    size: int
    headers: WireHeaders
    txn: Txn | None = None


class SimSink:
    """The ``Sink`` port over the model: one producer (transactional if ``txn_id``).

    ``configure`` hands it the producer settings the service built (message.max.bytes,
    queue limits).
    """

    def __init__(
        self,
        cluster: Cluster,
        on_delivery: DeliveryCallback,
        txn_id: str | None,
        delivery_timeout_steps: int,
    ) -> None:
        self.cluster = cluster
        self.on_delivery = on_delivery
        self.txn_id = txn_id
        self.delivery_timeout_steps = delivery_timeout_steps
        self.config: dict[str, Any] = {}
        #: The topics it writes, whose smallest max.message.bytes caps its batches.
        self.topics: list[str] = []
        self.batch_size = BATCH_SIZE
        #: Each written topic's max.message.bytes as read at the first start.
        self.limits: dict[str, int] = {}
        self.max_bytes = 1_000_000
        self.max_messages = 100_000
        self.max_queue_bytes = 1_048_576 * 1024
        self.epoch = 0
        self.queue: list[Queued] = []
        self.txn: Txn | None = None
        #: The commit in the background: its offsets, group metadata and the step it began.
        self.committing: tuple[dict[TP, int], object, int] | None = None
        #: Most records and bytes queued at once since the simulation last looked.
        self.peak_records = 0
        self.peak_bytes = 0
        #: Partitions where a record timed out unwritten since the last delivery.
        self._gaps: set[TP | None] = set()

    def configure(self, config: dict[str, Any], topics: list[str]) -> None:
        self.config, self.topics = config, topics
        self.max_bytes = int(config.get("message.max.bytes", self.max_bytes))
        self.max_messages = int(config.get("queue.buffering.max.messages", self.max_messages))
        kbytes = int(config.get("queue.buffering.max.kbytes", 1_048_576))
        self.max_queue_bytes = kbytes * 1024

    def queued_bytes(self) -> int:
        return sum(q.size for q in self.queue)

    def _down(self) -> bool:
        return self.cluster.outage or self.cluster.output_down

    def _coordinator_down(self, name: str) -> None:
        if self.cluster.outage:
            raise TxnFailed(f"{name}: timed out", abortable=False)

    def _check_epoch(self) -> None:
        if self.txn_id is not None and self.cluster.epochs.get(self.txn_id) != self.epoch:
            raise SinkError("producer fenced")

    def start(self) -> None:
        self.queue = []  # a replaced producer's queue is purged, its reports ignored
        self.txn = None
        if not self.limits:
            topics = self.cluster.topics
            self.limits = {t: topics[t].max_message_bytes for t in self.topics if t in topics}
        self.batch_size = self._batch_size()
        if self.txn_id is None:
            self.epoch += 1
            return
        self._coordinator_down("init_transactions")
        # Settles what an earlier incarnation left: an unknown commit may have landed.
        self.epoch = self.cluster.fence(self.txn_id)

    def restart(self) -> None:
        self.start()

    def _batch_size(self) -> int:
        """``batch.size`` as KafkaSink starts its producer (batch_within_topic_limits):
        under the smallest max.message.bytes of the topics it writes, read at start."""
        if "batch.size" in self.config:
            return int(self.config["batch.size"])
        limit = min(self.limits.values(), default=BATCH_SIZE + BATCH_FRAMING)
        return BATCH_SIZE if limit - BATCH_FRAMING >= BATCH_SIZE else max(1, limit - BATCH_FRAMING)

    def die(self) -> None:
        """The process is killed: what was already sent may land, unreported."""
        if self.txn_id is not None or self._down():
            return
        rng = self.cluster.rng
        for tp in sorted({q.tp for q in self.queue if q.tp is not None}):
            mine = [q for q in self.queue if q.tp == tp]
            for queued in mine[: rng.randint(0, len(mine))]:
                if self.cluster.exists(tp[0]):
                    self._land(queued, "committed")
                    self.cluster.stats["landed, unreported (killed)"] += 1
        self.queue = []

    # -- records ---------------------------------------------------------------------

    def produce(
        self, record: Record, abandoned: Callable[[], bool] = lambda: False
    ) -> DeliveryFailure | None:
        if self.txn is not None:
            self._check_epoch()
        headers = wire_headers(record.headers)  # raises as confluent-kafka would
        size = wire_size(record.key, record.value, headers)
        stats = self.cluster.stats
        if size > self.max_bytes:
            self._refused(record, stage_alone=True)
            stats["produce refused: over message.max.bytes"] += 1
            return failure(KafkaError.MSG_SIZE_TOO_LARGE)
        if self._over_topic_limit(record):
            self._refused(record, stage_alone=True)
            stats["produce refused: over the topic's max.message.bytes read at start"] += 1
            return failure(KafkaError.MSG_SIZE_TOO_LARGE)
        rng = self.cluster.rng
        if not self.cluster.exists(record.topic) and rng.random() < 0.5:
            stats["produce refused: unknown topic"] += 1
            return failure(KafkaError._UNKNOWN_TOPIC)  # known missing from metadata
        if not self._room(size):
            # KafkaSink waits up to QUEUE_FULL_S for room, serving delivery reports (which
            # may queue smaller forms of refused records), while librdkafka sends what the
            # brokers take; instantaneous in model time.
            before = None
            while not self._room(size) and before != [id(q) for q in self.queue]:
                before = [id(q) for q in self.queue]
                self._deliver(everything=not self._down())
                if abandoned():
                    return DeliveryFailure("its partition is replayed", Verdict.RIDE_OUT)
            if not self._room(size):
                stats["produce refused: queue full"] += 1
                return DeliveryFailure(
                    f"producer queue full for {QUEUE_FULL_S:.0f}s", Verdict.RIDE_OUT
                )
        tp = self._partition(record)
        self.queue.append(Queued(record, tp, self.cluster.step, size, headers, self.txn))
        self.peak_records = max(self.peak_records, len(self.queue))
        self.peak_bytes = max(self.peak_bytes, self.queued_bytes())
        return None

    def _over_topic_limit(self, record: Record) -> bool:
        """KafkaSink's check before sending, against the limits it read at start."""
        limit = self.limits.get(record.topic)
        if self.config.get("compression.type", "none") != "none":
            return False  # the broker measures compressed batches
        return limit is not None and least_framed_size(record) > limit

    def _room(self, size: int) -> bool:
        return len(self.queue) < self.max_messages and (
            self.queued_bytes() + size <= self.max_queue_bytes
        )

    def _partition(self, record: Record) -> TP | None:
        topic = self.cluster.topics.get(record.topic)
        if topic is None or not topic.exists:
            return None
        return (record.topic, partition_for(record.key, topic.partitions, self.cluster.rng))

    def _refused(self, record: Record, stage_alone: bool) -> None:
        first = record.first or record
        ts = record.source.timestamp or 0
        key = (ts, first.kind, record.stage)
        self.cluster.refusals[key] = self.cluster.refusals.get(key, False) or stage_alone

    def poll(self, timeout: float) -> None:
        self._deliver(everything=False)

    def _deliver(self, everything: bool) -> None:
        """Send what the brokers take now, per partition in order; time out the rest.

        A record leaves the queue just before its report, which may queue more (a smaller
        form of a refused record) or, re-entering produce(), poll again.
        """
        cluster, rng = self.cluster, self.cluster.rng
        by_tp: dict[TP | None, list[Queued]] = {}
        for queued in self.queue:
            if queued.tp is None and cluster.exists(queued.record.topic):
                queued.tp = self._partition(queued.record)  # the topic is known again
            by_tp.setdefault(queued.tp, []).append(queued)
        order = list(by_tp)
        rng.shuffle(order)
        for tp in order:
            queue = [q for q in by_tp[tp] if q in self.queue]  # a nested poll took some
            if tp is None or not cluster.exists(tp[0]):
                # Metadata says the topic does not exist (now, or any more).
                if everything or rng.random() < 0.5:
                    for queued in queue:
                        cluster.stats["delivery failed: unknown topic"] += 1
                        self._report(queued, failure(KafkaError.UNKNOWN_TOPIC_OR_PART))
            elif self._down():
                self._expire(queue)
            else:
                count = (
                    len(queue)
                    if everything or rng.random() < 0.7
                    else rng.randrange(len(queue) + 1)
                )
                self._send(tp, queue[:count])

    def _expire(self, queue: list[Queued]) -> None:
        """The output is unreachable: records past delivery.timeout.ms fail, oldest first.

        One that was in flight when the outage began may have been written all the same;
        the idempotent producer writes a partition's records in order, so only while no
        record before it was lost.
        """
        for queued in queue:
            if self.cluster.step - queued.created <= self.delivery_timeout_steps:
                break
            tp = queued.tp
            in_flight = queued.created < self.cluster.down_since and tp not in self._gaps
            if queued.txn is None and in_flight and self.cluster.rng.random() < 0.3:
                self._land(queued, "committed")
                self.cluster.stats["timed out in flight, written"] += 1
            elif tp is not None:
                self._gaps.add(tp)
            self.cluster.stats["delivery timed out"] += 1
            self._report(queued, failure(KafkaError._MSG_TIMED_OUT))

    def _send(self, tp: TP, queue: list[Queued]) -> None:
        """In batches (librdkafka's linger decides where they split, batch.size and
        message.max.bytes cap them, a record larger alone goes alone); the broker refuses
        a batch over the topic's max.message.bytes whole (librdkafka #488)."""
        rng = self.cluster.rng
        limit = self.cluster.topics[tp[0]].max_message_bytes
        batches: list[list[Queued]] = []
        batch: list[Queued] = []
        size = BATCH_OVERHEAD
        cap = min(self.max_bytes, self.batch_size)
        for queued in queue:
            if batch and (size + queued.size > cap or rng.random() < 0.3):
                batches.append(batch)
                batch, size = [], BATCH_OVERHEAD
            batch.append(queued)
            size += queued.size
        if batch:
            batches.append(batch)
        for batch in batches:
            if BATCH_OVERHEAD + sum(q.size for q in batch) > limit:
                for queued in batch:
                    alone = BATCH_OVERHEAD + queued.size > limit
                    self._refused(queued.record, alone)
                    self.cluster.stats[
                        "delivery refused: over the topic's max.message.bytes"
                        + ("" if alone else " (its batch)")
                    ] += 1
                    self._report(queued, failure(KafkaError.MSG_SIZE_TOO_LARGE))
                continue
            self._gaps.discard(tp)
            for queued in batch:
                self._land(queued, "committed" if queued.txn is None else "open")
                self._report(queued, None)

    def _land(self, queued: Queued, state: str) -> None:
        record = queued.record
        assert queued.tp is not None
        stored = self.cluster.append(
            queued.tp, record.key, record.value, record, queued.headers, state=state
        )
        if queued.txn is not None:
            stored.txn = queued.txn
            queued.txn.records.append(stored)

    def _report(self, queued: Queued, failed: DeliveryFailure | None) -> None:
        self.queue = [q for q in self.queue if q is not queued]
        if queued.txn is not None and failed is not None:
            queued.txn.failed = True
        self.on_delivery(queued.record, failed)

    def flush(self, timeout: float) -> int:
        self._deliver(everything=True)
        return len(self.queue)

    # -- transactions ----------------------------------------------------------------

    def begin(self) -> None:
        assert self.txn_id is not None and self.txn is None, "begin inside a transaction"
        self._check_epoch()
        self.txn = Txn(self.txn_id, self.epoch, self.cluster.step)
        self.cluster.open_txns[self.txn_id] = self.txn

    def commit(self, offsets: dict[TP, int], group_metadata: object) -> None:
        txn = self.txn
        assert txn is not None, "commit outside a transaction"
        cluster = self.cluster
        self._check_epoch()
        self._deliver(everything=True)  # commit_transaction flushes, serving the reports
        if self.queue:
            # The output is unreachable: the flush outlives commit_transaction's timeout
            # (outcome unknown), or the records time out first (abortable).
            if cluster.rng.random() < 0.5:
                raise TxnFailed("commit_transaction: timed out", abortable=False)
            for queued in self.queue:
                self._report(queued, failure(KafkaError._MSG_TIMED_OUT))
            self.queue = []
        if txn.failed:
            cluster.stats["transaction failed: a record failed delivery"] += 1
            raise TxnFailed("commit_transaction: a record failed delivery", abortable=True)
        fault = cluster.fail_next_txn.pop(self.txn_id or "", None)
        if cluster.outage:
            raise TxnFailed("commit_transaction: timed out", abortable=False)
        if txn.txn_id not in cluster.open_txns:
            raise TxnFailed("transaction timed out on the broker", abortable=True)
        # send_offsets_to_transaction comes before commit_transaction: the group
        # coordinator refuses offsets of a member that is not the partition's owner now.
        member_id, generation = cast(tuple[str, int], group_metadata)
        if member_id not in cluster.members or generation != cluster.generation:
            raise TxnFailed("send_offsets_to_transaction: ILLEGAL_GENERATION", abortable=True)
        if not all(cluster.exists(tp[0]) for tp in offsets):
            raise TxnFailed("send_offsets_to_transaction: UNKNOWN_TOPIC_OR_PART", abortable=True)
        if fault == "unknown":
            if cluster.rng.random() < 0.5:
                txn.offsets.update(offsets)
                cluster.end_txn(txn, commit=True)  # it did commit; the caller can't know
            raise TxnFailed("commit_transaction: timed out", abortable=False)
        if fault == "abortable":
            raise TxnFailed("commit_transaction: injected abortable error", abortable=True)
        if self.txn_id in cluster.kill_in_commit:
            cluster.kill_in_commit.discard(self.txn_id or "")
            txn.offsets.update(offsets)  # send_offsets_to_transaction went through
            cluster.note(f"{self.txn_id} killed inside commit_transaction, offsets pending")
            cluster.stats["killed inside commit_transaction"] += 1
            raise ProcessKilled(self.txn_id)
        txn.offsets.update(offsets)
        cluster.end_txn(txn, commit=True)
        self.txn = None

    def commit_in_background(self, offsets: dict[TP, int], group_metadata: object) -> None:
        assert self.committing is None, "a transaction is already committing"
        self.committing = (dict(offsets), group_metadata, self.cluster.step)

    def commit_landed(self, timeout: float) -> bool:
        """In flight for the step it began in, then committed as by :meth:`commit`
        against the cluster as it is then (a rebalance or an outage meanwhile fails it)."""
        assert self.committing is not None, "no transaction committing"
        offsets, group_metadata, step = self.committing
        if timeout == 0 and self.cluster.step == step:
            return False
        self.committing = None
        self.commit(offsets, group_metadata)
        return True

    def abort(self) -> None:
        txn = self.txn
        self._coordinator_down("abort_transaction")
        purged, self.queue = self.queue, []
        for queued in purged:  # abort_transaction purges the queue, reporting each record
            self.cluster.stats["purged by abort_transaction"] += 1
            self.on_delivery(queued.record, failure(KafkaError._PURGE_QUEUE))
        if txn is not None and self.cluster.open_txns.get(txn.txn_id) is txn:
            self.cluster.end_txn(txn, commit=False)
        self.txn = None

    def close(self, timeout: float) -> int:
        return self.flush(timeout)
