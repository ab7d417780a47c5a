"""``on_too_long: windows``: cutting texts into token windows, scoring them, aggregating.

No broker: the splitting on real tokenizers (the tiny StructBERT's, CJK included), the
aggregation rules, the settings checked at load and at start, the prepare and engine
stages with windows, and the output's window fields. The end-to-end run on a broker is
in tests/test_windows_kafka.py.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from keyword_engine import KeywordEngine, long_post

from stream_classifier.assemble import check_windows
from stream_classifier.config import EngineConfig, ServiceConfig, TopicConfig, load_config
from stream_classifier.decisions import decide
from stream_classifier.engine.base import EngineError, Prepared, Scores
from stream_classifier.engine.nli import NliEngine, pair_set
from stream_classifier.engine.windows import (
    GatheredResult,
    WindowedPayload,
    Windowing,
    aggregate,
    expand,
    gather,
    split_windows,
    window_count,
    window_problems,
    windows_truncated,
)
from stream_classifier.messages import ClassifyRequest, Envelope, SourceRef, decode_event
from stream_classifier.metrics import Metrics
from stream_classifier.preparing import (
    InlinePreparer,
    ProcessPreparer,
    ThreadPreparer,
    prepare_all,
)
from stream_classifier.records import records_for
from stream_classifier.reload import reloaded
from stream_classifier.scoring import PipelinedScorer, score_isolating

LABELS = ["violence", "spam", "harmless"]
WAIT_S = 30.0


def topic(**changes: Any) -> TopicConfig:
    settings: dict[str, Any] = {
        "input": "in",
        "output": "out",
        "dead_letter": "dlq",
        "labels": LABELS,
        "on_too_long": "windows",
        "max_text_chars": 20_000,
        **changes,
    }
    return TopicConfig(**settings)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> NliEngine:
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), max_batch_tokens=4096)


def spans_of(text: str, words: list[str]) -> list[tuple[int, int]]:
    spans, at = [], 0
    for word in words:
        start = text.index(word, at)
        spans.append((start, start + len(word)))
        at = start + len(word)
    return spans


# -- splitting ------------------------------------------------------------------------------


def test_a_text_that_fits_one_window_is_one_window_equal_to_the_text() -> None:
    text = "  short text, kept as it is  "
    windows = split_windows(
        text, spans_of(text, ["short", "text,", "kept", "as", "it", "is"]), 6, 3, 4
    )
    assert windows.texts == (text,) and not windows.truncated


def test_windows_have_the_size_the_stride_and_cover_the_text() -> None:
    words = [f"w{i}" for i in range(10)]
    text = " ".join(words)
    windows = split_windows(text, spans_of(text, words), size=4, stride=3, max_windows=10)
    assert windows.texts == ("w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9")  # overlap of 1
    assert not windows.truncated


def test_the_last_window_ends_at_the_text_and_no_window_repeats_the_end() -> None:
    words = [f"w{i}" for i in range(7)]
    text = " ".join(words)
    windows = split_windows(text, spans_of(text, words), size=4, stride=2, max_windows=10)
    assert windows.texts == ("w0 w1 w2 w3", "w2 w3 w4 w5", "w4 w5 w6")


def test_max_windows_caps_the_windows_and_says_text_was_left() -> None:
    words = [f"w{i}" for i in range(20)]
    text = " ".join(words)
    windows = split_windows(text, spans_of(text, words), size=4, stride=4, max_windows=2)
    assert windows.texts == ("w0 w1 w2 w3", "w4 w5 w6 w7") and windows.truncated


@pytest.mark.parametrize(("size", "stride", "most"), [(0, 1, 1), (4, 5, 1), (4, 0, 1), (4, 2, 0)])
def test_bad_window_arguments_raise(size: int, stride: int, most: int) -> None:
    with pytest.raises(ValueError, match="bad windows"):
        split_windows("a b", [(0, 1), (2, 3)], size, stride, most)


def test_windows_of_the_engines_tokenizer_are_substrings_on_token_boundaries(
    engine: NliEngine,
) -> None:
    text = long_post(20)
    spans = engine.token_spans(text)
    assert len(spans) == len(
        engine.pairs.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    )
    windows = split_windows(text, spans, size=50, stride=40, max_windows=100)
    assert len(windows.texts) == -(-(len(spans) - 50) // 40) + 1
    starts = {start for start, _ in spans}
    ends = {end for _, end in spans}
    at = 0
    for window in windows.texts:
        found = text.index(window, at)
        assert found in starts and found + len(window) in ends
        at = found
    assert windows.texts[-1].endswith(text[spans[-1][0] :])


def test_cjk_text_is_cut_per_character_token(engine: NliEngine) -> None:
    text = "今天天气很好我们去公园散步吧" * 3
    spans = engine.token_spans(text)
    assert len(spans) == len(text)  # BERT tokenizes each CJK character alone
    windows = split_windows(text, spans, size=10, stride=8, max_windows=10)
    assert windows.texts[0] == text[:10] and windows.texts[1] == text[8:18]
    assert "".join(w[:8] for w in windows.texts[:-1]) + windows.texts[-1] == text


def test_default_windows_fill_the_models_budget_beside_the_longest_hypothesis(
    engine: NliEngine,
) -> None:
    hypotheses = [f"This text is about {label}." for label in LABELS]
    budget = engine.text_budget(hypotheses)
    longest = max(len(engine.token_spans(h)) for h in hypotheses)
    assert budget == 512 - 3 - longest
    assert Windowing(None, None, 8).resolve(budget) == (budget, int(budget * 0.75))
    assert Windowing(100, None, 8).resolve(budget) == (100, 75)
    assert Windowing(None, None, 8).resolve(None) == (None, 1)


# -- aggregation ----------------------------------------------------------------------------


def test_multi_label_takes_each_labels_highest_score_in_any_window() -> None:
    windows = [
        Scores(("harmless", "spam", "violence"), (0.9, 0.3, 0.1)),
        Scores(("violence", "harmless", "spam"), (0.8, 0.5, 0.2)),
    ]
    assert aggregate(windows) == Scores(("harmless", "violence", "spam"), (0.9, 0.8, 0.3))


def test_single_label_takes_each_labels_highest_share_without_renormalising() -> None:
    """A violation anywhere flags the post: the violating window's share is kept as it
    is, so a threshold means the same as on a short post (renormalising would give
    violence 0.9 / 1.85, under a 0.8 threshold)."""
    clean = Scores(("harmless", "spam", "violence"), (0.95, 0.03, 0.02))
    violating = Scores(("violence", "harmless", "spam"), (0.90, 0.08, 0.02))
    post = aggregate([clean, clean, violating])
    assert post == Scores(("harmless", "violence", "spam"), (0.95, 0.90, 0.03))
    moderation = topic(thresholds={"violence": 0.8})
    assert decide(moderation, post.labels, post.scores).flagged == ("violence",)


def test_a_label_is_flagged_on_the_post_exactly_when_some_window_flags_it() -> None:
    lanes = [
        {"name": "block", "labels": ["violence"], "min_score": 0.7},
        {"name": "review", "labels": ["spam"], "min_score": 0.5},
        {"name": "allow"},
    ]
    moderation = topic(default_threshold=0.5, lanes=lanes)
    windows = [
        Scores(("spam", "harmless", "violence"), (0.6, 0.3, 0.1)),
        Scores(("harmless", "violence", "spam"), (0.5, 0.45, 0.05)),
        Scores(("violence", "harmless", "spam"), (0.75, 0.2, 0.05)),
    ]
    post = aggregate(windows)
    each = [decide(moderation, w.labels, w.scores) for w in windows]
    decision = decide(moderation, post.labels, post.scores)
    assert set(decision.flagged or ()) == {label for d in each for label in d.flagged or ()}
    assert decision.decision == "block"  # the most severe lane any window takes


def test_gather_gives_one_scores_per_request_in_order() -> None:
    def prepared(text: str) -> Prepared:
        return Prepared(("a", "b"), True, 1, text)

    windowed = Prepared(
        ("a", "b"), True, 2, WindowedPayload((prepared("w1"), prepared("w2")), False)
    )
    batch = [prepared("one"), windowed, prepared("three")]
    flat = expand(batch)
    assert [item.payload for item in flat] == ["one", "w1", "w2", "three"]
    scores = [
        Scores(("a", "b"), (0.6, 0.1)),
        Scores(("a", "b"), (0.2, 0.1)),
        Scores(("b", "a"), (0.7, 0.3)),
        Scores(("b", "a"), (0.5, 0.4)),
    ]
    assert gather(batch, scores) == [scores[0], Scores(("b", "a"), (0.7, 0.3)), scores[3]]
    with pytest.raises(EngineError):
        gather(batch, scores[:3])


# -- settings -------------------------------------------------------------------------------


def test_windows_settings_load_and_a_stride_over_the_size_fails_with_field_and_reason(
    tmp_path: Path,
) -> None:
    assert topic(window_tokens=128, window_stride=128, max_windows=3).max_windows == 3
    path = tmp_path / "config.yaml"
    settings = {"topics": [{**topic().model_dump(), "window_tokens": 64, "window_stride": 65}]}
    path.write_text(json.dumps(settings))
    with pytest.raises(Exception, match="window_stride=65 is over window_tokens=64"):
        load_config(path)
    with pytest.raises(Exception, match="on_too_long"):
        topic(on_too_long="chunks")


def test_a_window_over_the_models_budget_fails_at_start(engine: NliEngine) -> None:
    fits = ServiceConfig(topics=[topic(window_tokens=400)])
    check_windows(fits, engine)
    too_big = ServiceConfig(topics=[topic(window_tokens=510, hypothesis_template="It is {}.")])
    with pytest.raises(
        EngineError, match=r"topics\[0\] \(in\)\.window_tokens=510: .* at most 50[0-9] text"
    ):
        check_windows(too_big, engine)
    stride = ServiceConfig(topics=[topic(window_stride=600)])
    with pytest.raises(EngineError, match=r"window_stride=600: more than the window size"):
        check_windows(stride, engine)
    assert window_problems([topic(on_too_long="truncate", window_tokens=9999)], engine) == []


def test_a_reload_whose_windows_do_not_fit_the_model_keeps_the_running_settings(
    engine: NliEngine,
) -> None:
    running = ServiceConfig(topics=[topic(window_tokens=400)])
    too_big = ServiceConfig(topics=[topic(window_tokens=510, hypothesis_template="It is {}.")])
    metrics = Metrics()

    def problems(config: ServiceConfig) -> list[str]:
        return window_problems(config.topics, engine)

    assert reloaded(running, lambda: too_big, metrics, problems) is None
    assert metrics.reloads.labels("invalid")._value.get() == 1
    fits = ServiceConfig(topics=[topic(window_tokens=300)])
    assert reloaded(running, lambda: fits, metrics, problems) is fits


def test_an_engine_that_cannot_cut_windows_fails_at_start() -> None:
    class Plain:
        model_id = "plain"

    problems = window_problems([topic()], Plain())
    assert problems and "cannot cut texts into token windows" in problems[0]


def test_texts_over_max_text_chars_are_cut_to_it_first_under_windows() -> None:
    source = SourceRef(topic="in", partition=0, offset=1)
    value = json.dumps({"text": "x " * 50}).encode()
    request = decode_event(Envelope(source, None, value, [], 0.0), topic(max_text_chars=30))
    assert isinstance(request, ClassifyRequest)
    assert request.text == ("x " * 50)[:30] and request.text_truncated


# -- prepared and scored --------------------------------------------------------------------


def same(one: Prepared, other: Prepared) -> bool:
    """Equal requests: the same labels, cost and pair ids (windows compared one by one)."""

    def ids(item: Prepared) -> list[Any]:
        payload = item.payload
        if isinstance(payload, WindowedPayload):
            return [ids(part) for part in payload.parts] + [payload.truncated]
        return [item.labels, item.multi_label, item.tokens, pair_set(item).input_ids]

    return ids(one) == ids(other)


def prepared_with(
    side: Any, text: str, windowing: Windowing | None, multi: bool = True
) -> Prepared:
    result = prepare_all(side, [(text, tuple(LABELS), "This is {}.", multi)], [windowing])[0]
    assert isinstance(result, Prepared)
    return result


@pytest.mark.parametrize("multi_label", [True, False])
def test_a_short_text_scores_bit_identical_under_windows(
    engine: NliEngine, multi_label: bool
) -> None:
    text = "a short post about the garden"
    plain = engine.prepare(text, LABELS, "This is {}.", multi_label)
    windowed = prepared_with(engine, text, Windowing(None, None, 8), multi_label)
    assert same(windowed, plain) and window_count(windowed) == 1
    expected = engine.classify([plain])
    assert score_isolating(engine, [request_for(windowed)]) == expected


def test_a_long_text_is_scored_as_its_windows_aggregated(engine: NliEngine) -> None:
    text = long_post(30)
    windowing = Windowing(200, 150, 50)
    windowed = prepared_with(engine, text, windowing)
    assert isinstance(windowed.payload, WindowedPayload)
    parts = windowed.payload.parts
    count = len(parts)
    assert count == window_count(windowed) > 1 and not windowed.payload.truncated
    assert windowed.tokens == sum(part.tokens for part in parts)
    assert all(len(ids) <= 512 for part in parts for ids in pair_set(part).input_ids)
    expected = aggregate(engine.classify(list(parts)))
    assert score_isolating(engine, [request_for(windowed)]) == [expected]
    short = engine.prepare("short", LABELS, "This is {}.", True)
    both = score_isolating(engine, [request_for(short), request_for(windowed)])
    flat = engine.classify([short, *parts])  # the same pairs in one batch, as the engine got them
    assert both == [flat[0], aggregate(flat[1:])]


def test_inline_and_thread_preparers_cut_windows(engine: NliEngine) -> None:
    text = long_post(30)
    windowing = Windowing(200, 150, 2)
    expected = prepared_with(engine, text, windowing)
    inline = InlinePreparer(engine)
    futures = [
        inline.submit(text, LABELS, "This is {}.", True, windowing),
        inline.submit("short", LABELS, "This is {}.", True),
    ]
    inline.flush()
    assert same(futures[0].result(0), expected) and window_count(futures[1].result(0)) == 1
    assert windows_truncated(expected) and window_count(expected) == 2
    thread = ThreadPreparer(engine)
    try:
        by_thread = thread.submit(text, LABELS, "This is {}.", True, windowing).result(WAIT_S)
        assert same(by_thread, expected)
    finally:
        thread.shutdown()


def test_tokenizer_processes_cut_windows(engine: NliEngine) -> None:
    text = long_post(30)
    windowing = Windowing(200, 150, 50)
    preparer = ProcessPreparer(engine.preparer_factory(), 1)
    try:
        windowed = preparer.submit(text, LABELS, "This is {}.", True, windowing)
        plain = preparer.submit("short", LABELS, "This is {}.", True, windowing)
        assert same(windowed.result(WAIT_S), prepared_with(engine, text, windowing))
        assert same(plain.result(WAIT_S), engine.prepare("short", LABELS, "This is {}.", True))
    finally:
        preparer.shutdown()


def test_an_engine_without_windows_fails_the_event_alone() -> None:
    class Plain:
        def prepare(self, text: str, labels: Any, template: str, multi: bool) -> Prepared:
            return Prepared(tuple(labels), multi, 1, text)

    results = prepare_all(
        Plain(),
        [("a", ("x",), "{}", True), ("b", ("x",), "{}", True)],
        [Windowing(None, None, 2), None],
    )
    assert isinstance(results[0], EngineError) and isinstance(results[1], Prepared)


class AsyncKeywordEngine(KeywordEngine):
    """The keyword engine with the pipelined scorer's ``classify_async``."""

    def classify_async(self, batch: Any, hold_tail: bool = False) -> Any:
        done: Future[list[Scores]] = Future()
        done.set_result(self.classify(batch))
        return done

    def flush(self) -> None:
        pass


def test_the_pipelined_scorer_gathers_windows() -> None:
    engine = AsyncKeywordEngine(read_tokens=60)
    text = long_post(40)
    windowed = prepared_with(engine, text, Windowing(None, None, 20))
    plain = engine.prepare(text, LABELS, "This is {}.", True)
    scorer = PipelinedScorer(engine, Metrics())
    try:
        outcomes = scorer.submit([request_for(windowed), request_for(plain)]).result(WAIT_S)
    finally:
        scorer.shutdown()
    assert isinstance(outcomes[0], Scores) and isinstance(outcomes[1], Scores)
    assert score_of(outcomes[0], "violence") > 0.9 > 0.1 > score_of(outcomes[1], "violence")
    assert isinstance(GatheredResult((plain,), engine.classify_async([plain])).result()[0], Scores)


def test_the_keyword_engine_reads_the_violation_only_in_windows() -> None:
    """Single-label: the last window's share of violence is the post's."""
    engine = KeywordEngine()
    text = long_post()
    assert 2_900 < len(text) < 3_200
    request = request_for(prepared_with(engine, text, Windowing(None, None, 8), multi=False))
    [post] = score_isolating(engine, [request])
    assert isinstance(post, Scores) and score_of(post, "violence") > 0.9
    [cut] = score_isolating(engine, [request_for(engine.prepare(text, LABELS, "{}", False))])
    assert isinstance(cut, Scores) and score_of(cut, "violence") < 0.1


def score_of(scores: Scores, label: str) -> float:
    return dict(zip(scores.labels, scores.scores, strict=True))[label]


# -- outputs --------------------------------------------------------------------------------


def request_for(prepared: Prepared, settings: TopicConfig | None = None) -> ClassifyRequest:
    source = SourceRef(topic="in", partition=0, offset=3)
    return ClassifyRequest(
        envelope=Envelope(source, b"k", b"{}", [], 0.0),
        event_id="e",
        text="",
        labels=tuple(LABELS),
        topic=settings or topic(),
        prepared=prepared,
    )


def output_of(request: ClassifyRequest, scores: Scores) -> tuple[dict[str, Any], dict[str, bytes]]:
    [record] = records_for(request, scores, request.topic, "m")
    assert record.value is not None
    return json.loads(record.value), {k: v for k, v in record.headers if isinstance(v, bytes)}


def test_outputs_carry_the_window_count_and_whether_text_was_left() -> None:
    scores = Scores(tuple(LABELS), (0.5, 0.3, 0.2))
    part = Prepared(tuple(LABELS), True, 1, "x")
    one, headers = output_of(request_for(part), scores)
    assert (one["windows"], one["windows_truncated"]) == (1, False)
    assert "stream-classifier.text-truncated" not in headers
    capped = Prepared(tuple(LABELS), True, 2, WindowedPayload((part, part), True))
    two, headers = output_of(request_for(capped), scores)
    assert (two["windows"], two["windows_truncated"]) == (2, True)
    assert headers["stream-classifier.text-truncated"] == b"true"
    plain, _ = output_of(request_for(part, topic(on_too_long="truncate")), scores)
    assert plain["windows"] is None and plain["windows_truncated"] is None
