"""A shadow policy on the real broker: every output carries the shadow's decision beside
the live one, the live side (scores, decision, routing) is what it is without a shadow,
agreement and extra pairs are counted, and a reload (SIGHUP) promotes the shadow.

The engine is :class:`keyword_engine.KeywordEngine`: "kill" makes violence score high,
"buy" spam, so each event's right decision is known.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import RunningService, service_config
from kafka_helpers import (
    create_topics,
    produce,
    read_all,
    read_to_end,
    unique,
    wait_drained,
    wait_until,
)
from keyword_engine import KeywordEngine

from stream_classifier.assemble import build_service

pytestmark = pytest.mark.kafka

TEXTS = {"threat": "I will kill you", "ad": "buy cheap watches now", "chat": "see you at noon"}
#: The policy tried in shadow: spam blocked too, and a label of its own (scored for it alone).
SHADOW = {
    "labels": ["violence", "spam", "harmless", "scam"],
    "thresholds": {"violence": 0.5, "spam": 0.5},
    "lanes": [{"name": "block", "labels": ["violence", "spam"]}, {"name": "allow"}],
}


def topic_settings(bootstrap: str, shadow: dict[str, Any] | None) -> dict[str, Any]:
    names = {
        "input": unique("in"),
        "output": unique("out"),
        "dead_letter": unique("dlq"),
    }
    blocked = unique("blocked")
    create_topics(bootstrap, [*names.values(), blocked])
    lanes = [{"name": "block", "labels": ["violence"], "route": blocked}, {"name": "allow"}]
    settings: dict[str, Any] = {
        **names,
        "labels": ["violence", "spam", "harmless"],
        "multi_label": True,
        "thresholds": {"violence": 0.5},
        "lanes": lanes,
    }
    if shadow is not None:
        settings["shadow"] = shadow
    return settings


def events(suffix: str = "") -> list[bytes]:
    return [
        json.dumps({"id": name + suffix, "text": text}).encode() for name, text in TEXTS.items()
    ]


def outputs(bootstrap: str, topic: dict[str, Any], count: int) -> dict[str, Any]:
    return {
        r.json_value()["id"]: r.json_value() for r in read_all(bootstrap, topic["output"], count)
    }


@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
def test_the_shadow_decides_beside_the_live_policy_and_acts_on_nothing(
    bootstrap: str, mode: str
) -> None:
    shadowed = topic_settings(bootstrap, SHADOW)
    plain = topic_settings(bootstrap, None)
    config = service_config(bootstrap, [shadowed, plain], processing={"guarantee": mode})
    for topic in (shadowed, plain):
        produce(bootstrap, topic["input"], events())
    service = build_service(config, KeywordEngine())
    with RunningService(service):
        got = outputs(bootstrap, shadowed, 3)
        without = outputs(bootstrap, plain, 3)
        wait_drained(bootstrap, config.kafka.group_id, shadowed["input"])
    for name in TEXTS:
        live = {k: v for k, v in got[name].items() if k not in ("shadow", "latency_ms")}
        alone = {k: v for k, v in without[name].items() if k not in ("shadow", "latency_ms")}
        live["source"], alone["source"] = live["source"]["offset"], alone["source"]["offset"]
        live.pop("settings_version"), alone.pop("settings_version")
        assert live == alone, f"{name}: the live side is what it is without a shadow"
        assert without[name]["shadow"] is None
    assert [got[n]["decision"] for n in TEXTS] == ["block", "allow", "allow"]
    assert [got[n]["shadow"]["decision"] for n in TEXTS] == ["block", "block", "allow"]
    assert got["ad"]["shadow"]["flagged"] == ["spam"]
    routed = read_to_end(bootstrap, shadowed["lanes"][0]["route"])
    assert [r.json_value()["id"] for r in routed] == ["threat"], "routing: the live decision only"
    agreement = service.metrics.shadow_decisions
    topic_in = shadowed["input"]
    assert agreement.labels(topic_in, "allow", "block")._value.get() == 1
    assert agreement.labels(topic_in, "block", "block")._value.get() == 1
    assert agreement.labels(topic_in, "allow", "allow")._value.get() == 1
    assert service.metrics.shadow_pairs.labels(topic_in)._value.get() == 3, "scam, 3 events"


def test_a_reload_promotes_the_shadow(bootstrap: str) -> None:
    shadowed = topic_settings(bootstrap, SHADOW)
    config = service_config(bootstrap, [shadowed])
    produce(bootstrap, shadowed["input"], events())
    service = build_service(config, KeywordEngine())
    promoted_topic = {
        **{k: v for k, v in shadowed.items() if k != "shadow"},
        **SHADOW,
        "max_labels": 10,
    }
    promoted = service.config.model_copy(
        update={"topics": [service_config(bootstrap, [promoted_topic]).topics[0]]}
    )
    with RunningService(service):
        before = outputs(bootstrap, shadowed, 3)
        service.request_reload(lambda: promoted)
        applied = service.metrics.reloads.labels("applied")
        wait_until(lambda: applied._value.get() == 1, 30, "the reload applied")
        produce(bootstrap, shadowed["input"], events("-after"))
        after = outputs(bootstrap, shadowed, 6)
    assert before["ad"]["decision"] == "allow" and before["ad"]["shadow"]["decision"] == "block"
    assert after["ad-after"]["decision"] == "block", "the shadow's policy is live now"
    assert after["ad-after"]["shadow"] is None
    assert after["ad-after"]["labels"][0] in ("spam",) and "scam" in after["ad-after"]["labels"]
