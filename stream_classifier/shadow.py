"""Shadow policies: a second policy decided on the same events, acted on by nobody.

A topic's ``shadow`` (:class:`~stream_classifier.config.ShadowPolicy`) is the policy an
operator wants to try on live traffic before making it live: other thresholds or lanes,
other label wordings, another template. Each scored output carries the shadow's decision,
flagged labels and settings version beside the live ones; routing and the live decision
never see it, and ``stream_classifier_shadow_decisions_total{live, shadow}`` counts how
the two agree.

What the shadow costs the engine depends on how it reads the text (:func:`plan`):

- the live labels, template and multi-label setting: nothing; its scores are the live
  ones (only thresholds and lanes differ);
- multi-label with the live template and some labels of its own: only those labels are
  scored (each label's score is independent of the others in multi-label mode, so the
  shared ones are the live scores exactly);
- anything else (single-label over another label set, another template): every label of
  the shadow is scored, as a request of its own in the same micro-batch.

A shadow that fails (its tokenizing, say) leaves its event's output without a shadow; the
live side goes on as if there were none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stream_classifier.config import TopicConfig
from stream_classifier.decisions import Decision, decide
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.engine.windows import window_count
from stream_classifier.messages import ClassifyRequest, ShadowResult


@dataclass
class Shadow:
    """One event's shadow: what it takes of the live scores, what it scores itself."""

    policy: TopicConfig
    version: str
    #: The shadow's labels for this event, in its order.
    labels: tuple[str, ...]
    #: Labels scored for the shadow alone (its own engine pairs); empty: none.
    extra: tuple[str, ...]
    #: ``extra`` tokenized, once done (None: nothing to score, or it failed).
    prepared: Prepared | None = None
    scores: Scores | None = None
    failed: str | None = None


def plan(policy: TopicConfig, version: str, topic: TopicConfig, live: Sequence[str]) -> Shadow:
    """What the shadow of ``topic`` (``policy``: its settings applied) reads of an event
    whose live labels are ``live``."""
    labels = tuple(policy.labels) if topic.shadow and topic.shadow.labels else tuple(live)
    same_reading = (
        policy.hypothesis_template == topic.hypothesis_template
        and policy.multi_label == topic.multi_label
    )
    if same_reading and set(labels) == set(live):
        extra: tuple[str, ...] = ()
    elif same_reading and policy.multi_label:
        extra = tuple(label for label in labels if label not in live)
    else:
        extra = labels
    return Shadow(policy, version, labels, extra)


def batch_of(requests: Sequence[ClassifyRequest]) -> tuple[Prepared, ...]:
    """What the engine scores for these requests: each one's prepared form, then the
    shadows' own (in the same order)."""
    live = tuple(request.prepared for request in requests)
    return live + tuple(
        r.shadow.prepared for r in requests if r.shadow is not None and r.shadow.prepared
    )


def split(requests: Sequence[ClassifyRequest], scores: Sequence[Scores]) -> list[Scores]:
    """The live scores of each request from :func:`batch_of`'s results; each shadow gets
    its scores on the way."""
    live, own = list(scores[: len(requests)]), iter(scores[len(requests) :])
    for request, scored in zip(requests, live, strict=True):
        shadow = request.shadow
        if shadow is None:
            continue
        extra = next(own) if shadow.prepared is not None else None
        if shadow.failed is None and (extra is not None or not shadow.extra):
            shadow.scores = combine(scored, shadow, extra)
    return live


def combine(live: Scores, shadow: Shadow, extra: Scores | None) -> Scores:
    """The shadow's scores: its own labels' from ``extra``, the rest from ``live``,
    highest first (ties in the shadow's label order)."""
    values = dict(zip(live.labels, live.scores, strict=True))
    if extra is not None:
        values.update(zip(extra.labels, extra.scores, strict=True))
    order = sorted(shadow.labels, key=lambda label: -values[label])
    return Scores(tuple(order), tuple(values[label] for label in order))


def result(shadow: Shadow | None) -> tuple[ShadowResult | None, Decision | None]:
    """What an output says of its shadow, and the shadow's decision (None: no shadow, or
    it failed)."""
    if shadow is None or shadow.scores is None:
        return None, None
    decision = decide(shadow.policy, shadow.scores.labels, shadow.scores.scores)
    flagged = None if decision.flagged is None else list(decision.flagged)
    summary = ShadowResult(
        decision=decision.decision, flagged=flagged, settings_version=shadow.version
    )
    return summary, decision


def pairs(requests: Sequence[ClassifyRequest]) -> dict[str, int]:
    """Engine pairs the shadows of these requests added, by input topic."""
    count: dict[str, int] = {}
    for request in requests:
        shadow = request.shadow
        if shadow is not None and shadow.prepared is not None:
            topic = request.topic.input
            count[topic] = count.get(topic, 0) + len(shadow.extra) * window_count(shadow.prepared)
    return count


def tokens(requests: Sequence[ClassifyRequest]) -> int:
    """Tokens the shadows of these requests added."""
    return sum(
        r.shadow.prepared.tokens for r in requests if r.shadow is not None and r.shadow.prepared
    )
