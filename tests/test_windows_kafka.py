"""``on_too_long: windows`` on the real broker: a long post whose last sentence is the
violation is flagged when read in windows and missed when truncated.

The engine is :class:`keyword_engine.KeywordEngine`: it reads a bounded number of tokens
of each text (as a model reads its 512) and scores a label high exactly when what it read
holds the label's keyword, so "flagged" means what it says (the tiny checkpoints have
random weights). Everything else is what ``run`` runs: ``build_service`` and the broker.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import RunningService, service_config
from kafka_helpers import create_topics, produce, read_all, unique
from keyword_engine import KeywordEngine, long_post

from stream_classifier.assemble import build_service, check_windows
from stream_classifier.headers import HEADER_PREFIX

pytestmark = pytest.mark.kafka


def topic_set(bootstrap: str, **options: Any) -> dict[str, Any]:
    names = {"input": unique("in"), "output": unique("out"), "dead_letter": unique("dlq")}
    create_topics(bootstrap, names.values())
    return {
        **names,
        "labels": ["violence", "spam", "harmless"],
        "multi_label": True,
        "thresholds": {"violence": 0.5, "spam": 0.5},
        "max_text_chars": 10_000,
        **options,
    }


def test_a_violation_at_the_end_of_a_long_post_is_flagged_with_windows_only(
    bootstrap: str,
) -> None:
    windowed = topic_set(bootstrap, on_too_long="windows")
    truncated = topic_set(bootstrap, on_too_long="truncate")
    config = service_config(bootstrap, [windowed, truncated])
    engine = KeywordEngine()
    check_windows(config, engine)  # what `run` checks at start
    post = long_post()
    assert 2_900 < len(post) < 3_200 and "kill" in post[-40:]
    values = [
        json.dumps({"id": "long", "text": post}).encode(),
        json.dumps({"id": "short", "text": "buy cheap watches now"}).encode(),
    ]
    for topics in (windowed, truncated):
        produce(bootstrap, topics["input"], values)
    with RunningService(build_service(config, engine)):
        read = {
            name: {r.json_value()["id"]: r for r in read_all(bootstrap, t["output"], 2)}
            for name, t in (("windows", windowed), ("truncate", truncated))
        }

    long_windows = read["windows"]["long"].json_value()
    assert long_windows["flagged"] == ["violence"]
    assert long_windows["windows"] > 1 and long_windows["windows_truncated"] is False
    long_truncated = read["truncate"]["long"].json_value()
    assert long_truncated["flagged"] == []
    assert long_truncated["windows"] is None
    short_windows = read["windows"]["short"].json_value()
    short_truncated = read["truncate"]["short"].json_value()
    assert short_windows["windows"] == 1 and short_windows["flagged"] == ["spam"]
    assert short_windows["scores"] == short_truncated["scores"]  # one window: as it is
    truncated_header = HEADER_PREFIX + "text-truncated"
    assert truncated_header not in read["windows"]["long"].headers
