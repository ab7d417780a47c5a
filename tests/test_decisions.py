"""Thresholds, decision lanes and routes: the config's validation and ``decide``."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from stream_classifier.config import ServiceConfig, TopicConfig
from stream_classifier.decisions import Decision, decide
from stream_classifier.messages import ScoredEvent, SourceRef

LABELS = ["hate speech", "violence", "spam", "harmless"]

#: The moderation example of decisions.py's docstring.
MODERATION: dict[str, Any] = {
    "input": "comments",
    "output": "comments.scored",
    "dead_letter": "comments.dlq",
    "labels": LABELS,
    "multi_label": True,
    "default_threshold": 0.5,
    "thresholds": {"spam": 0.8},
    "lanes": [
        {
            "name": "block",
            "labels": ["hate speech", "violence"],
            "min_score": 0.9,
            "route": "comments.blocked",
        },
        {
            "name": "review",
            "labels": ["hate speech", "violence", "spam"],
            "min_score": 0.6,
            "route": "comments.review",
        },
        {"name": "allow"},
    ],
}


def topic(**changes: Any) -> TopicConfig:
    return TopicConfig(**{**MODERATION, **changes})


def scores(**by_label: float) -> tuple[list[str], list[float]]:
    """Labels sorted by score, highest first, as an engine returns them."""
    ranked = sorted(by_label.items(), key=lambda item: item[1], reverse=True)
    return [label.replace("_", " ") for label, _ in ranked], [score for _, score in ranked]


# -- decide --------------------------------------------------------------------------------


def test_decide_blocks_flags_and_routes_a_clear_violation() -> None:
    labels, values = scores(hate_speech=0.93, violence=0.40, spam=0.20, harmless=0.10)
    assert decide(topic(), labels, values) == Decision(
        flagged=("hate speech",), decision="block", routes=("comments.blocked",)
    )


def test_decide_reviews_below_the_label_threshold() -> None:
    # spam 0.7 is under its own threshold 0.8 (not flagged) but over review's 0.6
    labels, values = scores(hate_speech=0.30, violence=0.20, spam=0.70, harmless=0.45)
    assert decide(topic(), labels, values) == Decision(
        flagged=(), decision="review", routes=("comments.review",)
    )


def test_decide_allows_when_no_lane_before_the_default_holds() -> None:
    labels, values = scores(hate_speech=0.55, violence=0.10, spam=0.10, harmless=0.97)
    result = decide(topic(), labels, values)
    assert result == Decision(flagged=("harmless", "hate speech"), decision="allow", routes=())


def test_decide_threshold_and_min_score_are_inclusive() -> None:
    labels, values = scores(hate_speech=0.9, violence=0.0, spam=0.8, harmless=0.0)
    result = decide(topic(), labels, values)
    assert result.decision == "block"
    assert result.flagged == ("hate speech", "spam")


def test_decide_first_lane_that_holds_wins() -> None:
    # both block (violence >= 0.9) and review hold: block comes first
    labels, values = scores(hate_speech=0.1, violence=0.95, spam=0.9, harmless=0.0)
    assert decide(topic(), labels, values).decision == "block"
    swapped = topic(lanes=[MODERATION["lanes"][1], MODERATION["lanes"][0], {"name": "allow"}])
    assert decide(swapped, labels, values).decision == "review"


def test_decide_in_single_label_mode_uses_the_softmax_shares() -> None:
    single = topic(multi_label=False)
    labels, values = scores(hate_speech=0.62, violence=0.18, spam=0.12, harmless=0.08)
    assert sum(values) == pytest.approx(1.0)
    assert decide(single, labels, values) == Decision(
        flagged=("hate speech",), decision="review", routes=("comments.review",)
    )
    labels, values = scores(hate_speech=0.05, violence=0.05, spam=0.05, harmless=0.85)
    assert decide(single, labels, values).decision == "allow"


def test_decide_lane_without_min_score_holds_when_one_of_its_labels_is_flagged() -> None:
    lanes = [{"name": "review", "labels": ["spam", "violence"]}, {"name": "allow"}]
    configured = topic(lanes=lanes)
    labels, values = scores(hate_speech=0.99, violence=0.1, spam=0.81, harmless=0.0)
    assert decide(configured, labels, values).decision == "review"  # spam >= 0.8
    labels, values = scores(hate_speech=0.99, violence=0.1, spam=0.79, harmless=0.0)
    assert decide(configured, labels, values).decision == "allow"  # hate is not its label


def test_decide_lane_without_labels_looks_at_every_label() -> None:
    lanes = [{"name": "review", "min_score": 0.6}, {"name": "allow"}]
    labels, values = scores(hate_speech=0.1, violence=0.1, spam=0.1, harmless=0.7)
    assert decide(topic(lanes=lanes), labels, values).decision == "review"


def test_decide_without_thresholds_or_lanes_adds_nothing() -> None:
    plain = topic(thresholds={}, default_threshold=None, lanes=[])
    labels, values = scores(hate_speech=0.99, violence=0.5, spam=0.2, harmless=0.1)
    assert decide(plain, labels, values) == Decision(flagged=None, decision=None, routes=())


def test_decide_lanes_without_thresholds_decide_but_flag_nothing() -> None:
    lanes_only = topic(thresholds={}, default_threshold=None)
    labels, values = scores(hate_speech=0.95, violence=0.5, spam=0.2, harmless=0.1)
    result = decide(lanes_only, labels, values)
    assert result.flagged is None and result.decision == "block"


def test_decide_thresholds_without_lanes_flag_but_do_not_decide() -> None:
    flags_only = topic(lanes=[])
    labels, values = scores(hate_speech=0.95, violence=0.5, spam=0.2, harmless=0.1)
    assert decide(flags_only, labels, values) == Decision(
        flagged=("hate speech", "violence"), decision=None, routes=()
    )


def test_decide_only_labels_with_a_threshold_are_flagged() -> None:
    no_default = topic(default_threshold=None, thresholds={"spam": 0.3})
    labels, values = scores(hate_speech=0.99, violence=0.99, spam=0.31, harmless=0.99)
    assert decide(no_default, labels, values).flagged == ("spam",)


def test_decide_event_labels_the_settings_do_not_name() -> None:
    # an event with its own labels: the default threshold applies, missing ones are ignored
    open_topic = topic(allow_message_labels=True)
    result = decide(open_topic, ["hate speech", "insult"], [0.7, 0.6])
    assert result == Decision(
        flagged=("hate speech", "insult"), decision="review", routes=("comments.review",)
    )


def test_decide_keeps_the_order_of_the_scores_given() -> None:
    result = decide(topic(), ["spam", "violence", "hate speech"], [0.85, 0.6, 0.99])
    assert result.flagged == ("spam", "violence", "hate speech")


def test_decide_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        decide(topic(), ["spam", "violence", "harmless"], [0.1, 0.2])


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"thresholds": {"spam": 1.2}}, "within \\[0, 1\\]: spam"),
        ({"thresholds": {"spam": -0.1}}, "within \\[0, 1\\]"),
        ({"default_threshold": 1.5}, "less than or equal to 1"),
        ({"thresholds": {"insult": 0.5}}, "thresholds name labels the topic does not have"),
        (
            {"lanes": [{"name": "allow"}, {"name": "allow"}]},
            "lane names must be unique: allow",
        ),
        (
            {"lanes": [{"name": "block", "labels": ["insult"], "min_score": 0.9}, {"name": "ok"}]},
            "lanes\\[0\\] \\(block\\) names labels the topic does not have",
        ),
        (
            {"lanes": [{"name": "review", "min_score": 1.01}, {"name": "allow"}]},
            "less than or equal to 1",
        ),
        (
            {"lanes": [{"name": "allow"}, {"name": "block", "min_score": 0.9}]},
            "only the last lane may be the default",
        ),
        (
            {"lanes": [{"name": "block", "min_score": 0.9}]},
            "the last lane must be the default",
        ),
        (
            {
                "default_threshold": None,
                "thresholds": {},
                "lanes": [{"name": "review", "labels": ["spam"]}, {"name": "allow"}],
            },
            "no threshold",
        ),
        (
            {"lanes": [{"name": "block", "min_score": 0.9, "route": "comments"}, {"name": "a"}]},
            "must differ from the topic's input and output",
        ),
        (
            {
                "lanes": [
                    {"name": "block", "min_score": 0.9, "route": "comments.scored"},
                    {"name": "a"},
                ]
            },
            "must differ from the topic's input and output",
        ),
        ({"lanes": [{"name": ""}]}, "at least 1 character"),
        ({"lanes": [{"name": "x", "labels": []}]}, "at least 1 item"),
    ],
)
def test_topic_config_rejects_bad_decision_settings(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        topic(**changes)


def test_topic_config_allows_unknown_labels_where_events_bring_their_own() -> None:
    configured = topic(
        allow_message_labels=True,
        thresholds={"insult": 0.4},
        lanes=[{"name": "block", "labels": ["insult"], "min_score": 0.9}, {"name": "allow"}],
    )
    assert configured.threshold("insult") == 0.4
    assert configured.threshold("anything else") == 0.5


def test_topic_config_route_topics_in_lane_order() -> None:
    assert topic().route_topics == ["comments.blocked", "comments.review"]


def test_service_config_rejects_a_route_to_any_input_topic() -> None:
    other = {
        "input": "reviews",
        "output": "reviews.scored",
        "dead_letter": "reviews.dlq",
        "labels": ["praise", "complaint"],
    }
    lanes = [{"name": "block", "min_score": 0.9, "route": "reviews"}, {"name": "allow"}]
    with pytest.raises(ValidationError, match="a lane routes to an input topic: reviews"):
        ServiceConfig(topics=[{**MODERATION, "lanes": lanes}, other])
    ServiceConfig(topics=[MODERATION, other])  # routes elsewhere are fine


def test_scored_event_carries_flagged_and_decision() -> None:
    labels, values = scores(hate_speech=0.93, violence=0.40, spam=0.20, harmless=0.10)
    result = decide(topic(), labels, values)
    event = ScoredEvent(
        id="evt-1",
        source=SourceRef(topic="comments", partition=0, offset=7),
        labels=labels,
        scores=values,
        top_label=labels[0],
        multi_label=True,
        model="m",
        latency_ms=1.0,
        flagged=None if result.flagged is None else list(result.flagged),
        decision=result.decision,
    )
    dumped = event.model_dump(mode="json")
    assert dumped["flagged"] == ["hate speech"] and dumped["decision"] == "block"
    legacy = ScoredEvent.model_validate({**dumped, "flagged": None, "decision": None})
    assert legacy.flagged is None and legacy.decision is None
