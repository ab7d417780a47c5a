"""What the sink writes for each event: scored outputs, routed copies and dead letters.

Every record keeps the input's key (partitioning and per-key order survive), its headers
(ours added after them) and its timestamp. Any failure to build an output turns it into a
dead letter: nothing about one event's content can stop the stream.

A record the cluster refuses for good (too large for the producer's ``message.max.bytes``
or the topic's ``max.message.bytes``, a timestamp the topic does not accept) is replaced by
:func:`smaller`, one step at a time, until one is written:

1. a dead letter (code ``output_too_large`` or ``output_rejected``) on the topic's
   dead-letter topic, with the input's value cut to fit ``message.max.bytes``;
2. the same without the value;
3. the same without the input's key, headers and timestamp (only ours are left).

If even the last cannot be written, the event is given up: logged and counted
(``stream_classifier_undeliverable_total``), and its offset advances.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from stream_classifier.config import TopicConfig
from stream_classifier.decisions import Decision, decide
from stream_classifier.engine.base import Scores
from stream_classifier.engine.windows import window_count, windows_truncated
from stream_classifier.formats import Encode, json_value
from stream_classifier.headers import HEADER_PREFIX, Headers
from stream_classifier.kafka_errors import Verdict
from stream_classifier.messages import (
    ClassifyRequest,
    Envelope,
    Rejection,
    ScoredEvent,
    ShadowResult,
)
from stream_classifier.scoring import Outcome
from stream_classifier.shadow import result as shadow_result
from stream_classifier.sink import DeliveryFailure, Record

log = logging.getLogger(__name__)

Item = ClassifyRequest | Rejection

#: Room left below ``message.max.bytes`` for librdkafka's per-record framing.
FRAMING_BYTES = 512
#: The last step of :func:`smaller`.
LAST_STAGE = 3


def our_headers(model: str, truncated: bool) -> Headers:
    headers: Headers = [(HEADER_PREFIX + "model", model.encode())]
    if truncated:
        headers.append((HEADER_PREFIX + "text-truncated", b"true"))
    return headers


def records_for(
    item: Item,
    outcome: Outcome | None,
    topic: TopicConfig,
    model: str,
    encode: Encode = json_value,
) -> list[Record]:
    """The output (and routed copies) of a scored event, or its dead letter; ``encode``
    writes the event in each target topic's format."""
    if isinstance(item, Rejection):
        return [dead_letter(item, topic)]
    if isinstance(outcome, str):
        return [dead_letter(Rejection(item.envelope, "engine_failed", outcome), topic)]
    assert outcome is not None
    try:
        decision = decide(item.topic, outcome.labels, outcome.scores)
        shadow, shadow_decision = shadow_result(item.shadow)
        event = scored_event(item, outcome, decision, model, shadow)
        values = {to: encode(event, to) for to in (topic.output, *decision.routes)}
    except Exception as exc:  # noqa: BLE001 - e.g. an id no JSON encoder accepts
        reason = f"{type(exc).__name__}: {exc}"
        return [dead_letter(Rejection(item.envelope, "output_failed", reason), topic)]
    truncated = item.text_truncated or windows_truncated(item.prepared)
    headers = item.envelope.headers + our_headers(model, truncated)
    envelope = item.envelope

    def record(to: str, kind: str, lane: str | None = None) -> Record:
        return _record(to, envelope, values[to], headers, kind, topic.dead_letter, lane)

    output = record(topic.output, "output", decision.decision)
    if shadow_decision is not None:
        output = replace(output, shadowed=True, shadow_decision=shadow_decision.decision)
    return [output] + [record(route, "route") for route in decision.routes]


def dead_letter(rejection: Rejection, topic: TopicConfig) -> Record:
    """The input's own bytes with the reason in headers, on the topic's dead-letter topic."""
    log.debug("dead letter %s: %s", rejection.code, rejection.reason)
    envelope = rejection.envelope
    headers = envelope.headers + rejection.context().headers()
    return _record(
        topic.dead_letter,
        envelope,
        envelope.value,
        headers,
        "dead_letter",
        topic.dead_letter,
        code=rejection.code,
    )


def scored_event(
    request: ClassifyRequest,
    scores: Scores,
    decision: Decision,
    model: str,
    shadow: ShadowResult | None = None,
) -> ScoredEvent:
    return ScoredEvent(
        id=request.event_id,
        source=request.envelope.source,
        labels=list(scores.labels),
        scores=list(scores.scores),
        top_label=scores.top_label,
        multi_label=request.topic.multi_label,
        model=model,
        latency_ms=round((time.monotonic() - request.envelope.received_at) * 1000.0, 3),
        flagged=None if decision.flagged is None else list(decision.flagged),
        decision=decision.decision,
        settings_version=request.settings_version,
        shadow=shadow,
        **window_fields(request),
    )


def window_fields(request: ClassifyRequest) -> dict[str, Any]:
    """``windows`` and ``windows_truncated`` on a topic that reads texts in windows."""
    if request.topic.on_too_long != "windows":
        return {}
    return {
        "windows": window_count(request.prepared),
        "windows_truncated": windows_truncated(request.prepared),
    }


def _record(
    to: str,
    envelope: Envelope,
    value: bytes | None,
    headers: Headers,
    kind: str,
    dead_letter_topic: str,
    decision: str | None = None,
    code: str | None = None,
) -> Record:
    return Record(
        topic=to,
        key=envelope.key,
        value=value,
        headers=headers,
        timestamp=envelope.source.timestamp or 0,
        source=envelope.source,
        kind=kind,
        decision=decision,
        envelope=envelope,
        dead_letter_topic=dead_letter_topic,
        code=code,
    )


# -- records the cluster refuses for good ----------------------------------------------------


def smaller(record: Record, failure: DeliveryFailure, max_bytes: int) -> Record | None:
    """The next form of a record that can never be written as it is; None: give up."""
    assert failure.verdict is Verdict.DEAD_LETTER
    if record.stage >= LAST_STAGE or record.dead_letter_topic is None or record.envelope is None:
        return None
    envelope = record.envelope
    stage = record.stage + 1
    size_code = "output_too_large" if "SIZE" in failure.reason.upper() else "output_rejected"
    code = size_code if record.stage == 0 else record.code or size_code
    reason = failure.reason if record.stage == 0 else _first_reason(record, failure)
    rejection = Rejection(envelope, code, reason)
    ours = rejection.context().headers() + [
        (HEADER_PREFIX + "original.topic", _first_topic(record).encode()),
        (HEADER_PREFIX + "original.size", str(_first_size(record)).encode()),
    ]
    key: bytes | None = envelope.key
    headers = envelope.headers + ours
    value = envelope.value
    if stage == 1:
        room = max_bytes - FRAMING_BYTES - len(key or b"") - _headers_size(headers) - 64
        value, note = _cut(value, room)
    elif stage == 2:
        value, note = None, f"dropped ({len(envelope.value or b'')} bytes)"
    else:
        value, note, key, headers = (
            None,
            f"dropped ({len(envelope.value or b'')} bytes)",
            None,
            ours,
        )
    headers = headers + [(HEADER_PREFIX + "value", note.encode())]
    return replace(
        record,
        topic=record.dead_letter_topic,
        key=key,
        value=value,
        headers=headers,
        timestamp=0 if stage == LAST_STAGE else record.timestamp,
        kind="dead_letter",
        decision=None,
        code=code,
        stage=stage,
        first=record.first or record,
    )


def _cut(value: bytes | None, room: int) -> tuple[bytes | None, str]:
    if value is None:
        return None, "none (tombstone)"
    if len(value) <= room:
        return value, "whole"
    kept = max(0, room)
    return value[:kept], f"cut to {kept} of {len(value)} bytes"


def _headers_size(headers: Headers) -> int:
    return sum(len(name) + len(value or b"") + 8 for name, value in headers)


def _first_topic(record: Record) -> str:
    return (record.first or record).topic


def _first_size(record: Record) -> int:
    return (record.first or record).size()


def _first_reason(record: Record, failure: DeliveryFailure) -> str:
    return f"{failure.reason}; the original to {_first_topic(record)} was refused first"
