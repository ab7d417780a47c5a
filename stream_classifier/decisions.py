"""What a moderation pipeline acts on: flagged labels, a decision lane, extra topics.

Pure functions of a topic's settings and one event's scores (no Kafka, no model), the same
in single- and multi-label mode: thresholds compare to whatever the scores are (in
single-label mode they sum to 1 across the labels, so a threshold there is a share of the
probability; in multi-label mode each label's score is its own entailment probability).

A worked example, a comment topic scored in multi-label mode::

    labels: [hate speech, violence, spam, harmless]
    multi_label: true
    default_threshold: 0.5
    thresholds: {spam: 0.8}
    lanes:
      - {name: block, labels: [hate speech, violence], min_score: 0.9, route: comments.blocked}
      - {name: review, labels: [hate speech, violence, spam], min_score: 0.6,
         route: comments.review}
      - {name: allow}

Scores hate speech 0.93, violence 0.40, spam 0.20, harmless 0.10: ``flagged`` is
[hate speech], the decision ``block`` and the event also goes to ``comments.blocked``.
Scores spam 0.70 and the others below 0.5: nothing is flagged (spam's threshold is 0.8),
the decision is ``review`` (spam is at least 0.6) and the event also goes to
``comments.review``. Scores all below 0.6: ``allow``, no extra topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stream_classifier.config import Lane, TopicConfig


@dataclass(frozen=True)
class Decision:
    """The outcome for one scored event.

    ``flagged``: labels at or over their threshold, in the order of the scores given
    (highest first for an engine's :class:`~stream_classifier.engine.base.Scores`); None
    where the topic sets no threshold. ``decision``: the first lane whose condition holds;
    None where the topic defines no lanes. ``routes``: the extra topics the scored event
    also goes to (the lane's route, if it has one).
    """

    flagged: tuple[str, ...] | None
    decision: str | None
    routes: tuple[str, ...]


NO_DECISION = Decision(flagged=None, decision=None, routes=())


def decide(topic: TopicConfig, labels: Sequence[str], scores: Sequence[float]) -> Decision:
    """Apply ``topic``'s thresholds and lanes to one event's ``labels`` and ``scores``.

    Labels the topic's settings name but the event does not carry (an event with its own
    labels) are ignored; labels the event carries but the settings do not name take the
    topic's ``default_threshold`` and count for lanes without a ``labels`` list.
    """
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    if not topic.flags_labels and not topic.lanes:
        return NO_DECISION
    flagged_set = {
        label
        for label, score in zip(labels, scores, strict=True)
        if (threshold := topic.threshold(label)) is not None and score >= threshold
    }
    flagged = tuple(label for label in labels if label in flagged_set)
    by_label = dict(zip(labels, scores, strict=True))
    lane = next((lane for lane in topic.lanes if _holds(lane, by_label, flagged_set)), None)
    return Decision(
        flagged=flagged if topic.flags_labels else None,
        decision=None if lane is None else lane.name,
        routes=() if lane is None or lane.route is None else (lane.route,),
    )


def _holds(lane: Lane, scores: dict[str, float], flagged: set[str]) -> bool:
    if lane.is_default:
        return True
    considered = [label for label in (lane.labels or scores) if label in scores]
    if lane.min_score is not None:
        return any(scores[label] >= lane.min_score for label in considered)
    return any(label in flagged for label in considered)
