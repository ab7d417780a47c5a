"""Long texts read whole: overlapping token windows, scored as texts, aggregated per label.

A topic with ``on_too_long: windows`` has each text cut into windows of at most
``window_tokens`` of the model's own tokens, ``window_stride`` tokens apart (so
consecutive windows overlap by ``window_tokens - window_stride``), at most
``max_windows`` of them. Windows are cut on token boundaries at the tokenizer's character
offsets, so each window is a substring of the text; each is then prepared and scored by
the engine exactly like a text of its own (paired with every label inside the model's
budget), and the window scores of an event come back as one :class:`Scores`.

Why here and not inside each engine: the engines already batch sentence pairs by tokens,
so a window is just another text to them; an engine only has to say where its tokens
are (:class:`WindowSide`). Everything else (cutting, grouping, aggregating) is the same
for the NLI, Hugging Face and embedding engines.

**A text that fits one window is not windowed at all**: it is prepared as the one text it
is, so its scores are bit-identical to ``truncate``'s.

**Aggregation: each label's highest score in any window**, in both modes. Multi-label:
each label is an independent probability, and the post has the label if any part of it
does. Single-label: each window's scores are a softmax across the labels, and the post's
score of a label is the largest share that label got in any window, *not renormalised*:
the scores of a post read in several windows no longer sum to 1. That is what a moderation
user expects of thresholds and lanes: a label is flagged on the post exactly when some
window, read alone, would flag it, and the post takes the most severe lane any of its
windows takes. Renormalising would dilute a violation by the rest of the post (a clean
window at "harmless 0.95" and a violating one at "hate 0.90" renormalise to about 0.5
each, under a 0.8 threshold), so a harmful last sentence would still pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from stream_classifier.config import TopicConfig
from stream_classifier.engine.base import EngineError, Prepared, PrepareTask, Scores

#: Share of a window the next one starts after when ``window_stride`` is left unset:
#: a quarter of each window is read again by the next (context for a sentence cut in two).
DEFAULT_STRIDE_SHARE = 0.75


@dataclass(frozen=True)
class Windowing:
    """A topic's window settings; None: fill the model's budget / three quarters of a window."""

    tokens: int | None
    stride: int | None
    max_windows: int

    @classmethod
    def of(cls, topic: TopicConfig) -> Windowing | None:
        """The topic's windowing, or None where it does not cut windows."""
        if topic.on_too_long != "windows":
            return None
        return cls(topic.window_tokens, topic.window_stride, topic.max_windows)

    def resolve(self, budget: int | None) -> tuple[int | None, int]:
        """(window size, stride) in tokens for a model that reads ``budget`` text tokens
        beside the hypothesis (None: no limit, so no windows are needed: size None)."""
        size = self.tokens if self.tokens is not None else budget
        if size is None:
            return None, 1
        stride = self.stride if self.stride is not None else int(size * DEFAULT_STRIDE_SHARE)
        return size, max(1, min(stride, size))  # a stride over the size would skip text


@runtime_checkable
class WindowSide(Protocol):
    """What an engine's prepare side tells the windowing: where its tokens are."""

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """The (start, end) character offsets of each token of ``text`` (no special ones)."""
        ...

    def text_budget(self, hypotheses: Sequence[str]) -> int | None:
        """How many text tokens a pair with the longest of ``hypotheses`` keeps uncut
        (None: the model reads texts of any length)."""
        ...


@dataclass(frozen=True)
class TextWindows:
    """The windows of a text (substrings, in order) and whether text was left unread."""

    texts: tuple[str, ...]
    truncated: bool


def split_windows(
    text: str, spans: Sequence[tuple[int, int]], size: int, stride: int, max_windows: int
) -> TextWindows:
    """Cut ``text`` into windows of at most ``size`` of its tokens (``spans``), each
    starting ``stride`` tokens after the one before, at most ``max_windows``.

    A text of at most ``size`` tokens is one window: the text itself, unchanged. Each
    window runs from its first token's start to its last token's end, so it is a
    substring of the text (the characters between tokens, such as spaces, are kept
    inside a window and dropped at its edges).
    """
    if size < 1 or not 1 <= stride <= size or max_windows < 1:
        raise ValueError(f"bad windows: size {size}, stride {stride}, max_windows {max_windows}")
    count = len(spans)
    if count <= size:
        return TextWindows((text,), truncated=False)
    texts: list[str] = []
    start = 0
    while len(texts) < max_windows:
        end = min(start + size, count)
        texts.append(text[spans[start][0] : spans[end - 1][1]])
        if end == count:
            return TextWindows(tuple(texts), truncated=False)
        start += stride
    return TextWindows(tuple(texts), truncated=True)


def cut(side: object, task: PrepareTask, windowing: Windowing) -> TextWindows:
    """The windows of one task's text, for the model ``side`` prepares for."""
    text, labels, template, _ = task
    if not isinstance(side, WindowSide):
        raise EngineError(f"engine {type(side).__name__} cannot cut texts into token windows")
    size, stride = windowing.resolve(side.text_budget([template.format(x) for x in labels]))
    if size is None:
        return TextWindows((text,), truncated=False)
    return split_windows(text, side.token_spans(text), size, stride, windowing.max_windows)


# -- prepared windows ---------------------------------------------------------------------


@dataclass(frozen=True)
class WindowedPayload:
    """A request read in windows: each window prepared by the engine as a text of its own."""

    parts: tuple[Prepared, ...]
    truncated: bool


def window_count(prepared: object) -> int:
    """How many windows of the text a prepared request reads (1: the text as it is)."""
    payload = getattr(prepared, "payload", None)
    return len(payload.parts) if isinstance(payload, WindowedPayload) else 1


def windows_truncated(prepared: object) -> bool:
    """Were windows left unread (more than ``max_windows`` needed)?"""
    payload = getattr(prepared, "payload", None)
    return isinstance(payload, WindowedPayload) and payload.truncated


#: Prepares plain tasks, one result (or failure) per task: ``preparing.prepare_all``.
PreparePlain = Callable[[Any, Sequence[PrepareTask]], list[Prepared | Exception]]


def prepare_windowed(
    side: object,
    tasks: Sequence[PrepareTask],
    windowings: Sequence[Windowing | None],
    prepare_plain: PreparePlain,
) -> list[Prepared | Exception]:
    """Prepare every task, those with a windowing as their windows: every window of every
    task in one ``prepare_plain`` call (one tokenizer call where the engine batches them),
    then regrouped per task; a task whose cutting or any window fails fails alone."""
    expanded: list[PrepareTask] = []
    plans: list[tuple[int, int, bool] | Exception] = []
    for task, windowing in zip(tasks, windowings, strict=True):
        text, labels, template, multi_label = task
        try:
            windows = (
                TextWindows((text,), False) if windowing is None else cut(side, task, windowing)
            )
        except Exception as exc:  # noqa: BLE001 - that event's failure alone
            plans.append(exc)
            continue
        plans.append((len(expanded), len(windows.texts), windows.truncated))
        expanded += [(window, labels, template, multi_label) for window in windows.texts]
    prepared = prepare_plain(side, expanded)
    return [_regroup(plan, prepared) for plan in plans]


def _regroup(
    plan: tuple[int, int, bool] | Exception, prepared: Sequence[Prepared | Exception]
) -> Prepared | Exception:
    """One task's prepared windows as one request (a text of one window: itself)."""
    if isinstance(plan, Exception):
        return plan
    start, count, truncated = plan
    parts = prepared[start : start + count]
    for part in parts:
        if isinstance(part, Exception):
            return part
    done = [part for part in parts if isinstance(part, Prepared)]
    if count == 1 and not truncated:
        return done[0]
    first = done[0]
    return Prepared(
        labels=first.labels,
        multi_label=first.multi_label,
        tokens=sum(part.tokens for part in done),
        payload=WindowedPayload(tuple(done), truncated),
    )


# -- scoring ------------------------------------------------------------------------------


def expand(batch: Sequence[Prepared]) -> list[Prepared]:
    """What the engine scores for ``batch``: each request, or each of its windows."""
    flat: list[Prepared] = []
    for item in batch:
        payload = item.payload
        flat.extend(payload.parts if isinstance(payload, WindowedPayload) else (item,))
    return flat


def gather(batch: Sequence[Prepared], scores: Sequence[Scores]) -> list[Scores]:
    """One :class:`Scores` per request of ``batch`` from the scores of :func:`expand`'s
    list: a request's own, or its windows' aggregated by :func:`aggregate`."""
    counts = [window_count(item) for item in batch]
    if sum(counts) != len(scores):
        raise EngineError(f"{len(scores)} scores came back for {sum(counts)} texts and windows")
    results: list[Scores] = []
    at = 0
    for count in counts:
        part = scores[at : at + count]
        results.append(part[0] if count == 1 else aggregate(part))
        at += count
    return results


def aggregate(windows: Sequence[Scores]) -> Scores:
    """Each label's highest score in any window, highest first (ties in the first
    window's order). See the module's docstring for why not renormalised."""
    if not windows:
        raise ValueError("no windows to aggregate")
    best = dict(zip(windows[0].labels, windows[0].scores, strict=True))
    for window in windows[1:]:
        for label, value in zip(window.labels, window.scores, strict=True):
            best[label] = max(best[label], value)
    order = sorted(best, key=lambda label: -best[label])
    return Scores(labels=tuple(order), scores=tuple(best[label] for label in order))


@dataclass(frozen=True)
class GatheredResult:
    """A pending engine result over :func:`expand`'s list, gathered per request when read."""

    batch: tuple[Prepared, ...]
    pending: Any

    def result(self) -> list[Scores]:
        return gather(self.batch, self.pending.result())


# -- checked at start ---------------------------------------------------------------------


def window_problems(topics: Sequence[TopicConfig], side: object) -> list[str]:
    """Why a topic's windows cannot work with this engine, field and reason (empty: they
    can): the engine cannot cut windows, or a window does not fit beside the topic's
    longest hypothesis, or the stride is over the window size the model's budget gives."""
    problems: list[str] = []
    for index, topic in enumerate(topics):
        windowing = Windowing.of(topic)
        if windowing is None:
            continue
        where = f"topics[{index}] ({topic.input})"
        if not isinstance(side, WindowSide):
            problems.append(
                f"{where}.on_too_long=windows: engine {type(side).__name__} "
                "cannot cut texts into token windows"
            )
            continue
        hypotheses = [topic.hypothesis_template.format(label) for label in topic.labels]
        budget = side.text_budget(hypotheses)
        if budget is not None and windowing.tokens is not None and windowing.tokens > budget:
            problems.append(
                f"{where}.window_tokens={windowing.tokens}: a pair with the topic's longest "
                f"hypothesis keeps at most {budget} text tokens on this model; set it to "
                f"{budget} or less (or leave it unset to fill the model's budget)"
            )
        size, _ = windowing.resolve(budget)
        if size is not None and windowing.stride is not None and windowing.stride > size:
            problems.append(
                f"{where}.window_stride={windowing.stride}: more than the window size "
                f"{size} (text between windows would never be read)"
            )
    return problems
