"""The consumer side: the :class:`Source` port and its Kafka adapter.

Offsets are never committed automatically: the service commits exactly what its
:mod:`~stream_classifier.checkpoint` says is finished. Partition assignment is
cooperative-sticky, so a rebalance moves only the partitions that change hands.

The port is deliberately thin (one librdkafka call per method) so that every decision
lives in the service and the checkpoint, where the simulation in ``tests/sim`` drives it
against an in-memory model of Kafka.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from stream_classifier.config import ServiceConfig
from stream_classifier.kafka_errors import FATAL_CODES
from stream_classifier.messages import KafkaMessage
from stream_classifier.offsets import TopicPartition as TP
from stream_classifier.sink import RECONNECT_BACKOFF_MAX_MS

#: How long closing waits for a background commit still in flight.
CLOSE_COMMIT_WAIT_S = 10.0
#: librdkafka statistics (consumer lag) interval when metrics are on.
STATS_INTERVAL_MS = 5000
#: ``fetch.wait.max.ms`` with topics of more than one priority, unless set: librdkafka
#: keeps one fetch in flight per broker, so a partition that becomes fetchable (assigned,
#: or resumed after a level was held) waits until the broker answers the fetch already
#: there, which waits this long for data when its partitions have none (500 ms by
#: default). A bulk backlog waited that long behind a live topic's long poll at start.
LEVELS_FETCH_WAIT_MAX_MS = 100
#: ``fetch.queue.backoff.ms`` with topics of more than one priority, unless set. librdkafka
#: checks its fetch thresholds (``queued.min.messages``, ``queued.max.messages.kbytes``)
#: against the consumer's one queue, not the partition's share of it: while a bulk
#: backlog's prefetch fills that queue, every partition's next fetch, the live topic's
#: too, is put off this long (1,000 ms by default). The queue empties as soon as the bulk
#: level is paused, so a live topic read again within milliseconds loses nothing.
LEVELS_FETCH_QUEUE_BACKOFF_MS = 10
#: What the consumer sets differently with topics of more than one priority.
LEVELS_CONSUMER_DEFAULTS = {
    "fetch.wait.max.ms": LEVELS_FETCH_WAIT_MAX_MS,
    "fetch.queue.backoff.ms": LEVELS_FETCH_QUEUE_BACKOFF_MS,
}

log = logging.getLogger(__name__)


class SourceError(Exception):
    """The consumer hit an error it cannot recover from."""


class OffsetsUnavailable(Exception):
    """The group's committed offsets could not be read now (try again later).

    Raised for a timeout of the whole call and for a per-partition error, such as an
    offset still unstable while another member's transaction is open: never guess.
    """


class RebalanceListener(Protocol):
    """Called from inside :meth:`Source.consume`; records what changed, acts later."""

    def assigned(self, partitions: list[TP]) -> None: ...
    def revoked(self, partitions: list[TP]) -> None: ...
    def lost(self, partitions: list[TP]) -> None: ...


class Source(Protocol):
    """What the service needs from a consumer in a group."""

    def start(self, listener: RebalanceListener) -> None: ...
    def consume(self, max_messages: int, timeout: float) -> Sequence[KafkaMessage]: ...
    def commit(self, offsets: dict[TP, int]) -> bool: ...
    def commit_in_background(self, offsets: dict[TP, int]) -> None: ...
    def commit_outcome(self, timeout: float) -> bool | None: ...
    def committed(self, partitions: list[TP], timeout: float) -> dict[TP, int | None]: ...
    def seek(self, tp: TP, offset: int) -> bool: ...
    def pause(self, partitions: list[TP]) -> None: ...
    def resume(self, partitions: list[TP]) -> None: ...
    def group_metadata(self) -> object: ...
    def close(self) -> None: ...


class KafkaSource:
    """:class:`Source` over one ``confluent_kafka.Consumer``."""

    def __init__(self, consumer_config: dict[str, Any], topics: list[str]) -> None:
        self._config = consumer_config
        self._topics = topics
        self._consumer: Consumer | None = None
        #: The background commit in flight, and where its outcome lands.
        self._committing: threading.Thread | None = None
        self._outcome: list[bool | SourceError] = []

    def start(self, listener: RebalanceListener) -> None:
        self._consumer = Consumer(self._config)
        self._consumer.subscribe(
            self._topics,
            on_assign=lambda _c, parts: listener.assigned(_tps(parts)),
            on_revoke=lambda _c, parts: listener.revoked(_tps(parts)),
            on_lost=lambda _c, parts: listener.lost(_tps(parts)),
        )

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("source not started")
        return self._consumer

    def consume(self, max_messages: int, timeout: float) -> list[KafkaMessage]:
        """One fetch of up to ``max_messages``; transient errors are logged, fatal ones raise.

        Fatal means librdkafka says the client is dead, or the code is one that waiting
        will not cure (:data:`~stream_classifier.kafka_errors.FATAL_CODES`: an ACL revoked
        on the input topic or the group, credentials gone). librdkafka reports those as
        ordinary consumer errors and keeps retrying, so without this the service would log
        them forever and commit nothing.
        """
        good: list[KafkaMessage] = []
        for message in self.consumer.consume(num_messages=max_messages, timeout=timeout):
            error = message.error()
            if error is None:
                good.append(message)
            elif error.fatal() or error.code() in FATAL_CODES:
                where = f" on {message.topic()}" if message.topic() else ""
                raise SourceError(f"consumer error{where}: {_describe(error)}")
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error on %s: %s", message.topic(), error.str())
        return good

    def commit(self, offsets: dict[TP, int]) -> bool:
        """Commit synchronously; False (and a log line) if the group refused any of it now.

        A refusal that retrying cannot cure (:data:`FATAL_CODES`, e.g. READ on the group
        or on the input topic revoked) raises :class:`SourceError` instead: a retried
        commit would fail the same way forever while nothing is committed.
        """
        partitions = [TopicPartition(topic, part, off) for (topic, part), off in offsets.items()]
        try:
            results = self.consumer.commit(offsets=partitions, asynchronous=False)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.fatal() or error.code() in FATAL_CODES:
                raise SourceError(f"commit refused: {_describe(error)}") from exc
            log.warning("commit failed, will retry: %s", error.str())
            return False
        failed = [tp for tp in results or [] if tp.error is not None]
        for tp in failed:
            assert tp.error is not None
            if tp.error.code() in FATAL_CODES:
                raise SourceError(
                    f"commit of {tp.topic}[{tp.partition}]@{tp.offset} refused: "
                    f"{_describe(tp.error)}"
                )
            log.warning(
                "commit of %s[%d]@%d failed: %s", tp.topic, tp.partition, tp.offset, tp.error.str()
            )
        return not failed

    def commit_in_background(self, offsets: dict[TP, int]) -> None:
        """Start :meth:`commit` on a helper thread; :meth:`commit_outcome` says how it went.

        librdkafka holds a synchronous commit, retrying, until the group's coordinator
        answers: for the whole of a coordinator move after a broker is lost. Committed
        from the loop, nothing would be written meanwhile (docs/RELIABILITY.md, "A
        replicated cluster"). One commit at a time: the caller waits for each outcome.
        """
        if self._committing is not None:
            raise RuntimeError("a background commit is already in flight")
        outcome: list[bool | SourceError] = []

        def commit() -> None:
            try:
                outcome.append(self.commit(offsets))
            except SourceError as exc:
                outcome.append(exc)
            except RuntimeError as exc:  # the consumer closed under it
                log.warning("background commit failed: %s", exc)
                outcome.append(False)

        self._outcome = outcome
        self._committing = threading.Thread(target=commit, name="offset-commit", daemon=True)
        self._committing.start()

    def commit_outcome(self, timeout: float) -> bool | None:
        """The background commit's outcome once it is done (None while it is in flight
        after ``timeout``); a refusal that retrying cannot cure raises here, on the loop."""
        thread = self._committing
        if thread is None:
            raise RuntimeError("no background commit in flight")
        thread.join(timeout)
        if thread.is_alive():
            return None
        self._committing = None
        outcome = self._outcome[0] if self._outcome else False
        if isinstance(outcome, SourceError):
            raise outcome
        return outcome

    def committed(self, partitions: list[TP], timeout: float) -> dict[TP, int | None]:
        """The group's committed offset of each partition (None: nothing committed yet)."""
        asked = [TopicPartition(topic, part) for topic, part in partitions]
        try:
            answers = self.consumer.committed(asked, timeout=timeout)
        except KafkaException as exc:
            raise OffsetsUnavailable(exc.args[0].str()) from exc
        offsets: dict[TP, int | None] = {}
        for tp in answers:
            if tp.error is not None:
                raise OffsetsUnavailable(f"{tp.topic}[{tp.partition}]: {tp.error.str()}")
            offsets[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
        return offsets

    def seek(self, tp: TP, offset: int) -> bool:
        """Move the fetch position; False where librdkafka refuses now (retry later).

        librdkafka refuses a seek on a partition whose assignment it has not applied yet
        (``_UNKNOWN_PARTITION`` inside the assign callback; ``_STATE`` is reported for one
        whose fetcher has not started). The loop seeks only after consume() returns, where
        librdkafka 2.16 accepted every seek tried, but a refusal must not stop the stream:
        the caller keeps the partition paused and seeks again at its next turn.
        """
        try:
            self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            log.debug("seek %s[%d] to %d not possible yet: %s", *tp, offset, exc.args[0].str())
            return False
        return True

    def pause(self, partitions: list[TP]) -> None:
        if partitions:
            self.consumer.pause([TopicPartition(t, p) for t, p in partitions])

    def resume(self, partitions: list[TP]) -> None:
        if partitions:
            self.consumer.resume([TopicPartition(t, p) for t, p in partitions])

    def group_metadata(self) -> object:
        return self.consumer.consumer_group_metadata()

    def close(self) -> None:
        """Close the consumer, after the background commit in flight has ended (or
        :data:`CLOSE_COMMIT_WAIT_S` later): a commit still waiting inside librdkafka
        while the handle is destroyed under it would be a crash at exit, not a failure."""
        if self._consumer is None:
            return
        thread = self._committing
        if thread is not None:
            thread.join(CLOSE_COMMIT_WAIT_S)
            if thread.is_alive():
                log.warning("closing with a commit still waiting for the group coordinator")
        self._consumer.close()
        self._consumer = None


def consumer_config(
    client: dict[str, Any], group_id: str, auto_offset_reset: str
) -> dict[str, Any]:
    return {
        # The group coordinator's new address is tried within a second of the cluster
        # naming it (librdkafka backs off up to 10 s by default): see sink.py.
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
        **client,
        "group.id": group_id,
        # The service decides what is finished; librdkafka must never commit on its own.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "partition.assignment.strategy": "cooperative-sticky",
        "auto.offset.reset": auto_offset_reset,
        # Input written by transactional producers: only read what they committed.
        "isolation.level": "read_committed",
    }


def service_consumer_config(
    config: ServiceConfig, on_stats: Callable[[str], None] | None
) -> dict[str, Any]:
    """The service's consumer settings; ``on_stats`` hears librdkafka's statistics
    (consumer lag) every ``STATS_INTERVAL_MS`` when given."""
    kafka = config.kafka
    settings = consumer_config(
        kafka.consumer_client_config(), kafka.group_id, kafka.auto_offset_reset
    )
    if config.has_priority_levels():
        settings = {**LEVELS_CONSUMER_DEFAULTS, **settings}  # the operator's settings win
    if on_stats is not None:
        settings["statistics.interval.ms"] = STATS_INTERVAL_MS
        settings["stats_cb"] = on_stats
    return settings


def _describe(error: KafkaError) -> str:
    """librdkafka's text and the code's name (e.g. GROUP_AUTHORIZATION_FAILED), so that
    the log line says which permission class failed even where the text is vague."""
    return f"{error.str()} ({error.name()})"


def _tps(parts: list[TopicPartition]) -> list[TP]:
    return [(tp.topic, tp.partition) for tp in parts]
