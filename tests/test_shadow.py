"""Shadow policies without a broker: what a shadow costs the engine, that its scores are
the live ones where it reads the same way, and what its configuration refuses
(tests/test_shadow_kafka.py runs one through the broker)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import service_config
from pydantic import ValidationError

from stream_classifier.config import TopicConfig
from stream_classifier.engine.base import Scores
from stream_classifier.shadow import combine, plan, result

LABELS = ["violence", "spam", "harmless"]


def topic(shadow: dict[str, Any] | None = None, **settings: Any) -> TopicConfig:
    base: dict[str, Any] = {
        "input": "in",
        "output": "out",
        "dead_letter": "dlq",
        "labels": LABELS,
        "multi_label": True,
        "thresholds": {"violence": 0.5},
        "lanes": [{"name": "block", "labels": ["violence"]}, {"name": "allow"}],
        **settings,
    }
    if shadow is not None:
        base["shadow"] = shadow
    return service_config("127.0.0.1:1", [base]).topics[0]


def planned(config: TopicConfig, live: list[str] = LABELS) -> Any:
    policy = config.shadow_policy()
    assert policy is not None
    return plan(policy, "v", config, live)


def test_a_shadow_that_reads_like_the_live_policy_costs_no_pairs() -> None:
    config = topic({"thresholds": {"violence": 0.5, "spam": 0.5}})
    shadow = planned(config)
    assert shadow.extra == () and set(shadow.labels) == set(LABELS)


def test_a_multi_label_shadow_scores_only_the_labels_it_adds() -> None:
    config = topic({"labels": ["violence", "scam"], "thresholds": {"scam": 0.5}, "lanes": []})
    shadow = planned(config)
    assert shadow.extra == ("scam",)
    live = Scores(("harmless", "violence", "spam"), (0.9, 0.3, 0.1))
    scores = combine(live, shadow, Scores(("scam",), (0.6,)))
    assert scores == Scores(("scam", "violence"), (0.6, 0.3)), "violence: the live score"


@pytest.mark.parametrize(
    "change",
    [
        {"labels": ["violence", "harmless"], "multi_label": False, "thresholds": {}, "lanes": []},
        {"hypothesis_template": "This text is about {}."},
    ],
)
def test_a_shadow_that_reads_otherwise_scores_every_label_itself(change: dict[str, Any]) -> None:
    shadow = planned(topic(change))
    assert shadow.extra == shadow.labels


def test_the_shadow_decides_by_its_own_thresholds_and_lanes() -> None:
    config = topic(
        {
            "thresholds": {"violence": 0.5, "spam": 0.5},
            "lanes": [{"name": "block", "labels": ["violence", "spam"]}, {"name": "allow"}],
        }
    )
    shadow = planned(config)
    shadow.scores = Scores(("spam", "harmless", "violence"), (0.8, 0.3, 0.1))
    summary, decision = result(shadow)
    assert summary is not None and decision is not None
    assert summary.decision == "block" and summary.flagged == ["spam"]
    assert decision.routes == (), "a shadow routes nothing"


def test_a_shadow_that_failed_says_nothing() -> None:
    shadow = planned(topic({"thresholds": {"violence": 0.4}}))
    shadow.failed = "ValueError: cannot tokenize"
    assert result(shadow) == (None, None)


def test_shadow_lanes_that_route_fail_at_start() -> None:
    lanes = [{"name": "block", "labels": ["violence"], "route": "x"}, {"name": "allow"}]
    with pytest.raises(ValidationError, match="shadow lanes"):
        topic({"lanes": lanes})


def test_a_shadow_whose_policy_is_invalid_fails_at_start_with_the_field() -> None:
    with pytest.raises(ValidationError, match="shadow: .*thresholds name labels"):
        topic({"labels": ["spam", "scam"]})  # the live threshold names violence
