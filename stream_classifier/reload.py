"""Topic settings changed without a restart (SIGHUP): what may change, and its version.

Labels, template, multi-label, thresholds, lanes and routes, and the input limits of a
topic may change while the service runs; events already read keep the settings they were
read with. Anything else (Kafka, processing, engine, metrics, the schema registry, which
topics exist, where their outputs and dead letters go, their priority and formats) needs
a restart: a reload that changes it is refused, with the reason, and the running settings
stay. A reload whose file names a topic that does not exist (a new route), or a route in
a registry format whose schema cannot be registered, is rejected before it gets here
(:func:`stream_classifier.assemble.reload_config`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from stream_classifier.config import ServiceConfig, TopicConfig
from stream_classifier.metrics import Metrics

log = logging.getLogger(__name__)

#: The topic fields that need a restart: the Kafka topics the service was started (and
#: checked) with, the priority level whose queue holds the topic's events in hand, and the
#: formats whose output schemas were registered at start.
_TOPIC_PLUMBING = ("input", "output", "dead_letter", "priority", "input_format", "output_format")


def settings_version(topic: TopicConfig) -> str:
    """A short digest of a topic's settings: equal settings, equal version, on any host."""
    return hashlib.sha256(topic.model_dump_json().encode()).hexdigest()[:12]


def restart_needed(running: ServiceConfig, new: ServiceConfig) -> str | None:
    """Why ``new`` cannot replace ``running`` without a restart (None: it can)."""
    for section in ("kafka", "processing", "engine", "metrics", "schema_registry"):
        if getattr(running, section) != getattr(new, section):
            return f"the {section} section changed"
    old_topics = {topic.input: topic for topic in running.topics}
    new_topics = {topic.input: topic for topic in new.topics}
    if set(old_topics) != set(new_topics):
        added = sorted(set(new_topics) - set(old_topics))
        removed = sorted(set(old_topics) - set(new_topics))
        return f"input topics changed (added {added}, removed {removed})"
    for name, topic in new_topics.items():
        for field in _TOPIC_PLUMBING:
            if getattr(topic, field) != getattr(old_topics[name], field):
                return f"topic {name}: {field} changed"
    return None


def reloaded(
    running: ServiceConfig,
    load: Callable[[], ServiceConfig],
    metrics: Metrics,
    problems: Callable[[ServiceConfig], list[str]] = lambda _: [],
) -> ServiceConfig | None:
    """The configuration ``load`` reads, if it may replace ``running`` now; else None,
    with the reason logged and counted (the running settings stay). ``problems`` names
    what the running engine cannot do with the new settings (windows that do not fit the
    model), which the file alone cannot tell."""
    try:
        new = load()
    except Exception as exc:  # noqa: BLE001 - any invalid file: keep the running settings
        log.error("configuration reload rejected, keeping the running settings: %s", exc)
        metrics.reloads.labels("invalid").inc()
        return None
    problem = restart_needed(running, new)
    if problem is not None:
        log.error("configuration reload refused (%s needs a restart)", problem)
        metrics.reloads.labels("refused").inc()
        return None
    unfit = problems(new)
    if unfit:
        log.error(
            "configuration reload rejected, keeping the running settings: %s", "; ".join(unfit)
        )
        metrics.reloads.labels("invalid").inc()
        return None
    versions = ", ".join(f"{topic.input} {settings_version(topic)}" for topic in new.topics)
    log.info("configuration reloaded: %s", versions)
    metrics.reloads.labels("applied").inc()
    return new
