"""What a producer error means: the one table every write decision reads.

librdkafka's ``retriable()`` flag is never set on delivery reports or on ``produce()``
errors by confluent-kafka, so it cannot decide anything. Instead each error code maps to
one of three verdicts, and codes not in the table are ridden out (a later attempt may
cure them; repeated failures turn ``/healthz`` red, so an operator still hears of them):

- :attr:`Verdict.RIDE_OUT`: the cluster is away or busy (an outage of any length, a
  leader moving, a topic deleted and not yet recreated). at_least_once replays the
  partition from its last safe point; exactly_once aborts and redoes the batch.
- :attr:`Verdict.DEAD_LETTER`: this record can never be written as it is (too large for
  the producer or the topic, a timestamp the topic refuses). It is replaced by a dead
  letter that can be written (see :mod:`stream_classifier.records`).
- :attr:`Verdict.FATAL`: configuration or authorization; waiting will not fix it. The
  service exits with the message, like any other configuration error.

docs/RELIABILITY.md ("Producer errors") lists the same table for operators.
"""

from __future__ import annotations

from enum import Enum

from confluent_kafka import KafkaError


class Verdict(Enum):
    RIDE_OUT = "ride_out"
    DEAD_LETTER = "dead_letter"
    FATAL = "fatal"


#: The record itself can never be written to its topic as it is.
DEAD_LETTER_CODES = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,  # producer's message.max.bytes or topic's max.message.bytes
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,  # e.g. a null key on a compacted topic
        KafkaError.INVALID_TIMESTAMP,  # outside the topic's message.timestamp.*.max.ms
    }
)

#: Configuration or permissions: exit with a message naming the cause.
FATAL_CODES = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError._FATAL,
        KafkaError._INVALID_ARG,
        KafkaError.INVALID_CONFIG,
        KafkaError.INVALID_REQUIRED_ACKS,
        KafkaError.INVALID_TRANSACTION_TIMEOUT,
        KafkaError.UNSUPPORTED_VERSION,
        KafkaError._UNSUPPORTED_FEATURE,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.UNSUPPORTED_COMPRESSION_TYPE,
        KafkaError.POLICY_VIOLATION,
    }
)


def verdict(code: int, fatal_flag: bool = False) -> Verdict:
    """The verdict for an error code (``fatal_flag``: librdkafka said the client is dead)."""
    if fatal_flag or code in FATAL_CODES:
        return Verdict.FATAL
    if code in DEAD_LETTER_CODES:
        return Verdict.DEAD_LETTER
    return Verdict.RIDE_OUT


def verdict_of(error: KafkaError) -> Verdict:
    return verdict(error.code(), error.fatal())
