"""An in-memory model of the Kafka the service relies on, adversarial where Kafka may be.

One cluster: partitioned logs whose records are committed, aborted or still open in a
transaction (read_committed readers stop at the first open one); one consumer group with
committed offsets, generations and cooperative rebalances (a partition moves only after its
old owner has served the revoke, or was lost); transactions that commit or abort
atomically, pending transactional offsets that make a partition's committed offset
unstable, fencing by transactional id, transaction time-outs; delivery reports; outages.

:class:`SimSource` and :class:`SimSink` implement the service's ``Source`` and ``Sink``
ports over it. Rebalance callbacks are served inside ``consume()``, possibly between the
messages it returns (what a librdkafka batch may hold). Everything is driven by the
test's ``random.Random``: a seed replays a schedule exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stream_classifier.kafka_errors import Verdict
from stream_classifier.messages import KafkaMessage
from stream_classifier.sink import DeliveryCallback, DeliveryFailure, Record, SinkError
from stream_classifier.sink import TransactionFailed as TxnFailed
from stream_classifier.source import OffsetsUnavailable, RebalanceListener

TP = tuple[str, int]
BEGINNING = -2


@dataclass
class Stored:
    offset: int
    key: bytes | None
    value: bytes | None
    record: Record | None  # what the service wrote (None for the test's input events)
    state: str = "committed"  # or "open", "aborted"
    txn: Txn | None = None


@dataclass
class Txn:
    txn_id: str
    epoch: int
    started: int  # cluster step
    records: list[Stored] = field(default_factory=list)
    offsets: dict[TP, int] = field(default_factory=dict)


class Message:
    """The part of ``confluent_kafka.Message`` the service reads."""

    def __init__(self, tp: TP, stored: Stored) -> None:
        self._tp = tp
        self._stored = stored

    def topic(self) -> str:
        return self._tp[0]

    def partition(self) -> int:
        return self._tp[1]

    def offset(self) -> int:
        return self._stored.offset

    def key(self) -> bytes | None:
        return self._stored.key

    def value(self) -> bytes | None:
        return self._stored.value

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return []

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def error(self) -> None:
        return None


class Cluster:
    def __init__(self, rng: random.Random, inputs: dict[str, int], txn_timeout_steps: int) -> None:
        self.rng = rng
        self.logs: dict[TP, list[Stored]] = {}
        for topic, partitions in inputs.items():
            for p in range(partitions):
                self.logs[(topic, p)] = []
        self.input_partitions = sorted(self.logs)
        self.committed: dict[TP, int] = {}
        self.step = 0
        self.outage = False
        self.txn_timeout_steps = txn_timeout_steps
        self.open_txns: dict[str, Txn] = {}
        self.epochs: dict[str, int] = {}
        # the group
        self.generation = 0
        self.members: dict[str, SimSource] = {}
        self.owner: dict[TP, str] = {}
        #: Injected faults, consumed by the next matching call.
        self.fail_next_commit: set[str] = set()  # member ids
        self.fail_next_txn: dict[str, str] = {}  # txn id -> "abortable" | "unknown"
        self.note: Callable[[str], None] = lambda text: None

    # -- logs --------------------------------------------------------------------------

    def log(self, tp: TP) -> list[Stored]:
        return self.logs.setdefault(tp, [])

    def append(
        self, tp: TP, key: bytes | None, value: bytes | None, record: Record | None
    ) -> Stored:
        log = self.log(tp)
        stored = Stored(len(log), key, value, record)
        log.append(stored)
        return stored

    def visible(self, topic: str) -> list[Stored]:
        """What a read_committed reader of ``topic`` sees now."""
        out: list[Stored] = []
        for (t, _p), log in self.logs.items():
            if t == topic:
                out += [s for s in log if s.state == "committed"]
        return out

    def end(self, tp: TP) -> int:
        return len(self.log(tp))

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
            self.committed.update(txn.offsets)
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

    def rebalance(self) -> None:
        """Cooperative: revoke what moves first; assign it once its old owner let go."""
        self.generation += 1
        ids = sorted(self.members)
        if not ids:
            return
        target = {tp: ids[i % len(ids)] for i, tp in enumerate(self.input_partitions)}
        for member in self.members.values():
            if not member.pending:
                member.generation = self.generation  # rejoined in the background
            moving = [tp for tp in member.owned if target[tp] != member.member_id]
            if moving:
                member.pending.append(("revoke", moving))
        self.assign_free(target)

    def assign_free(self, target: dict[TP, str] | None = None) -> None:
        ids = sorted(self.members)
        if not ids:
            return
        if target is None:
            target = {tp: ids[i % len(ids)] for i, tp in enumerate(self.input_partitions)}
        for tp in self.input_partitions:
            if tp in self.owner or any(
                tp in parts
                for m in self.members.values()
                for kind, parts in m.pending
                if kind == "revoke"
            ):
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
        self.closed = False

    def start(self, listener: RebalanceListener) -> None:
        self.listener = listener
        self.cluster.join(self)

    def _serve(self, kind: str, parts: list[TP]) -> None:
        assert self.listener is not None
        if kind == "assign":
            fresh = [tp for tp in parts if tp not in self.owned]
            for tp in fresh:
                self.owned.add(tp)
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
            position = self._resolve(tp)
            if position is None:
                continue
            log = self.cluster.log(tp)
            while position < len(log) and len(out) < limit:
                stored = log[position]
                if stored.state == "open":
                    break  # read_committed stops at the last stable offset
                position += 1
                if stored.state == "committed":
                    out.append(Message(tp, stored))
            self.position[tp] = position
        return out

    def _resolve(self, tp: TP) -> int | None:
        position = self.position.get(tp)
        if position is None:
            if self.cluster.unstable(tp):
                return None  # librdkafka waits for a stable committed offset
            position = self.cluster.committed.get(tp, 0)
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
        cluster.committed.update(offsets)
        return True

    def committed(self, partitions: list[TP], timeout: float) -> dict[TP, int | None]:
        if self.cluster.outage:
            raise OffsetsUnavailable("coordinator not available")
        unstable = [tp for tp in partitions if self.cluster.unstable(tp)]
        if unstable:
            raise OffsetsUnavailable(f"{unstable[0]}: UNSTABLE_OFFSET_COMMIT")
        return {tp: self.cluster.committed.get(tp) for tp in partitions}

    def seek(self, tp: TP, offset: int) -> bool:
        assert tp in self.owned, f"seek on {tp} not assigned"
        self.position[tp] = 0 if offset == BEGINNING else offset
        return True

    def pause(self, partitions: list[TP]) -> None:
        self.paused.update(partitions)

    def resume(self, partitions: list[TP]) -> None:
        for tp in partitions:
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


@dataclass
class Queued:
    record: Record
    created: int
    epoch: int


class SimSink:
    """The ``Sink`` port over the model: one producer (transactional if ``txn_id``)."""

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
        self.epoch = 0
        self.queue: list[Queued] = []
        self.txn: Txn | None = None

    def _outage(self, name: str) -> None:
        if self.cluster.outage:
            raise TxnFailed(f"{name}: timed out", abortable=False)

    def _check_epoch(self) -> None:
        if self.txn_id is not None and self.cluster.epochs.get(self.txn_id) != self.epoch:
            raise SinkError("producer fenced")

    def start(self) -> None:
        self.queue = []
        self.txn = None
        if self.txn_id is None:
            self.epoch += 1
            return
        self._outage("init_transactions")
        # Settles what an earlier incarnation left: an unknown commit may have landed.
        self.epoch = self.cluster.fence(self.txn_id)

    def restart(self) -> None:
        self.start()

    def produce(self, record: Record) -> DeliveryFailure | None:
        if self.txn is not None:
            self._check_epoch()
            tp = (record.topic, 0)
            stored = self.cluster.append(tp, record.key, record.value, record)
            stored.state, stored.txn = "open", self.txn
            self.txn.records.append(stored)
            return None
        self.queue.append(Queued(record, self.cluster.step, self.epoch))
        return None

    def poll(self, timeout: float) -> None:
        if self.txn_id is not None:
            return
        waiting, self.queue = self.queue, []
        for queued in waiting:
            if self.cluster.outage:
                if self.cluster.step - queued.created > self.delivery_timeout_steps:
                    self.on_delivery(queued.record, DeliveryFailure("timed out", Verdict.RIDE_OUT))
                else:
                    self.queue.append(queued)
                continue
            record = queued.record
            self.cluster.append((record.topic, 0), record.key, record.value, record)
            self.on_delivery(record, None)

    def flush(self, timeout: float) -> int:
        self.poll(timeout)
        return len(self.queue)

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
        fault = cluster.fail_next_txn.pop(self.txn_id or "", None)
        if cluster.outage or fault == "unknown":
            if (
                cluster.rng.random() < 0.5
                and not cluster.outage
                and txn.txn_id in cluster.open_txns
            ):
                txn.offsets.update(offsets)
                cluster.end_txn(txn, commit=True)  # it did commit; the caller can't know
            raise TxnFailed("commit_transaction: timed out", abortable=False)
        if txn.txn_id not in cluster.open_txns:
            raise TxnFailed("transaction timed out on the broker", abortable=True)
        member_id, generation = group_metadata  # type: ignore[misc]
        if member_id not in cluster.members or generation != cluster.generation:
            raise TxnFailed("send_offsets_to_transaction: ILLEGAL_GENERATION", abortable=True)
        if fault == "abortable":
            raise TxnFailed("commit_transaction: injected abortable error", abortable=True)
        txn.offsets.update(offsets)
        cluster.end_txn(txn, commit=True)
        self.txn = None

    def abort(self) -> None:
        txn = self.txn
        self._outage("abort_transaction")
        if txn is not None and self.cluster.open_txns.get(txn.txn_id) is txn:
            self.cluster.end_txn(txn, commit=False)
        self.txn = None

    def close(self, timeout: float) -> int:
        return self.flush(timeout)
