"""The NLI engine against golden outputs of the real ModelScope pipeline (tests/fixtures)."""

from __future__ import annotations

import gc
import json
import random
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from ranking import assert_same_ranking
from transformers_reference import reference_model, reference_tokenizer

from stream_classifier.config import EngineConfig
from stream_classifier.engine import EngineError, load_engine, nli
from stream_classifier.engine.nli import NliEngine, pair_set, truncate_longest_first
from stream_classifier.engine.nli import score as nli_score
from stream_classifier.messages import parse_labels

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> NliEngine:
    return NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), max_batch_tokens=2048)


def prepare(engine: NliEngine, case: dict[str, Any]) -> Any:
    labels = case["labels"]
    if isinstance(labels, str):  # the pipeline's "a，b, c" form, parsed as it parses it
        labels = parse_labels(labels)
    return engine.prepare(case["text"], labels, case["hypothesis_template"], case["multi_label"])


@pytest.mark.parametrize("case", GOLDEN, ids=[case["name"] for case in GOLDEN])
def test_classify_one_message_matches_modelscope_pipeline(
    engine: NliEngine, case: dict[str, Any]
) -> None:
    assert_same_ranking(engine.classify([prepare(engine, case)])[0], case["expected"])


def test_classify_all_messages_in_one_batch_matches_modelscope_pipeline(
    engine: NliEngine,
) -> None:
    results = engine.classify([prepare(engine, case) for case in GOLDEN])
    for case, result in zip(GOLDEN, results, strict=True):
        assert_same_ranking(result, case["expected"])


def test_golden_covers_truncation_both_modes_and_languages() -> None:
    names = " ".join(case["name"] for case in GOLDEN)
    assert any(len(case["text"]) > 600 for case in GOLDEN)
    assert {case["multi_label"] for case in GOLDEN} == {True, False}
    assert any(case["text"].isascii() for case in GOLDEN)
    assert "model_card" in names


def test_single_label_uses_entailment_against_contradiction(engine: NliEngine) -> None:
    prepared = engine.prepare("快递太慢", ["物流"], "{}", multi_label=False)
    (result,) = engine.classify([prepared])
    prepared_multi = engine.prepare("快递太慢", ["物流"], "{}", multi_label=True)
    assert result.scores == engine.classify([prepared_multi])[0].scores
    assert 0.0 < result.scores[0] < 1.0


def remove_one_at_a_time(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """The Python BertTokenizer's original longest_first loop (transformers 3.x)."""
    while len_a + len_b > budget:
        if len_a > len_b:
            len_a -= 1
        else:
            len_b -= 1
    return len_a, len_b


def test_truncate_longest_first_matches_the_python_tokenizer_rule() -> None:
    rng = random.Random(7)
    lengths = [(300, 300), (301, 300), (300, 301), (263, 264), (600, 5), (5, 600), (509, 1)]
    lengths += [(rng.randint(0, 900), rng.randint(0, 900)) for _ in range(500)]
    for len_a, len_b in lengths:
        expected = remove_one_at_a_time(len_a, len_b, 509)
        assert truncate_longest_first(len_a, len_b, 509) == expected, (len_a, len_b)


def test_truncation_keeps_odd_token_on_the_text_like_the_reference() -> None:
    # The Rust tokenizer would give (254, 255) here; the reference pipeline gives (255, 254).
    assert truncate_longest_first(263, 264, 509) == (255, 254)


def test_prepare_pair_ids_equal_the_tokenizer_pair_encoding(
    engine: NliEngine, tiny_model: Path
) -> None:
    text = "The delivery was late, 快递三天还没到！" * 40
    prepared = engine.prepare(text, ["物流配送", "price"], "这篇文章的标题是{}", False)
    for ids, label in zip(pair_set(prepared).input_ids, ["物流配送", "price"], strict=True):
        expected = reference_tokenizer(tiny_model)(
            text, f"这篇文章的标题是{label}", truncation=True, max_length=512
        )
        assert ids == expected["input_ids"]


def test_load_engine_missing_local_dir_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        load_engine(EngineConfig(model=str(tmp_path / "nope"), device="cpu"), 4096)


def test_load_engine_hub_id_offline_names_the_id_and_the_fix(tmp_path: Path) -> None:
    config = EngineConfig(
        model="damo/nlp_structbert_zero-shot-classification_chinese-tiny",
        device="cpu",
        cache_dir=str(tmp_path),
    )
    with pytest.raises(EngineError) as caught:
        load_engine(config, 4096)
    message = str(caught.value)
    assert "damo/nlp_structbert_zero-shot-classification_chinese-tiny" in message
    assert "STREAM_CLASSIFIER_ENGINE__MODEL" in message


def test_classify_cli_prints_one_json_line_per_text(tiny_model: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_classifier.cli",
            "classify",
            "--model",
            str(tiny_model),
            "--labels",
            "家居,旅游,科技,军事,游戏,故事",
            "--device",
            "cpu",
            "世界那么大，我想去看看",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    case = next(c for c in GOLDEN if c["name"] == "model_card/single")
    assert record["labels"] == case["expected"]["labels"]
    assert record["scores"] == pytest.approx(case["expected"]["scores"], abs=1e-5)


def reference_postprocess(
    logits: np.ndarray, labels: list[str], multi_label: bool
) -> tuple[list[str], list[float]]:
    """ModelScope 1.40's ``ZeroShotClassificationPipeline.postprocess``, line for line, on
    float32 ``[entailment, neutral, contradiction]`` logits (one row per label); its
    ``scipy.special.softmax`` written out as scipy 1.17 computes it."""

    def softmax(x: np.ndarray) -> np.ndarray:
        shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
        result: np.ndarray = shifted / np.sum(shifted, axis=-1, keepdims=True)
        return result

    if multi_label or len(labels) == 1:
        scores = softmax(logits[..., [2, 0]])[..., 1]
    else:
        scores = softmax(logits[..., 0])
    reversed_index = list(reversed(scores.argsort()))
    return [labels[i] for i in reversed_index], [scores[i].item() for i in reversed_index]


def test_score_orders_float32_saturated_ties_like_the_reference() -> None:
    """Margins of 20 and 30 are distinct in float64 but both 1.0 in float32: the reference
    sorts its float32 values, so the tie's order (and the reported 1.0) is what it gives."""
    rng = np.random.default_rng(3)
    cases: list[tuple[np.ndarray, bool]] = [
        (np.array([[30, 0, 0], [20, 0, 0], [0, 0, 0]], dtype=np.float32), True),
        (np.array([[0, 0, -30], [0, 0, 0], [0, 0, -20]], dtype=np.float32), True),
        # single-label: entailment gaps beyond ~104 underflow to 0.0 in float32
        (np.array([[200, 0, 0], [10, 0, 0], [0, 0, 0], [5, 0, 0]], dtype=np.float32), False),
    ]
    for size in (5, 12, 40):  # larger ties too: numpy's argsort is not stable there
        margins = rng.choice([-40.0, -25.0, 0.5, 22.0, 35.0], size=size)
        rows = np.zeros((size, 3), dtype=np.float32)
        rows[:, 0] = margins + rng.normal(0, 2, size)
        rows[:, 2] = rows[:, 0] - margins
        cases.append((rows, True))
    for logits, multi_label in cases:
        labels = [f"label{i}" for i in range(logits.shape[0])]
        expected_labels, expected_scores = reference_postprocess(logits, labels, multi_label)
        result = nli_score(tuple(labels), logits[:, [0, 2]], multi_label)
        assert list(result.labels) == expected_labels, (logits.tolist(), multi_label)
        np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-6, atol=1e-12)
        assert list(result.scores) == sorted(result.scores, reverse=True)


@pytest.fixture(scope="module")
def short_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint cut to 128 positions (``max_position_embeddings: 128``)."""
    directory = tmp_path_factory.mktemp("structbert-128")
    for name in ("vocab.txt", "configuration.json"):
        shutil.copy(tiny_model / name, directory / name)
    config = json.loads((tiny_model / "config.json").read_text("utf-8"))
    config["max_position_embeddings"] = 128
    (directory / "config.json").write_text(json.dumps(config), "utf-8")
    state = torch.load(tiny_model / "pytorch_model.bin", weights_only=True)
    state["bert.embeddings.position_embeddings.weight"] = state[
        "bert.embeddings.position_embeddings.weight"
    ][:128].clone()
    state["bert.embeddings.position_ids"] = state["bert.embeddings.position_ids"][:, :128].clone()
    torch.save(state, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("backend", ["padded", "packed"])
def test_a_checkpoint_with_128_positions_truncates_pairs_to_128_tokens(
    short_model: Path, backend: Literal["padded", "packed"]
) -> None:
    engine = NliEngine.load(
        EngineConfig(model=str(short_model), device="cpu"), 2048, backend=backend
    )
    engine.warmup()
    text = "世界那么大我想去看看" * 30  # 300 tokens
    labels = ["旅游", "这篇文章的标题是科技"]
    for multi_label in (False, True):
        prepared = engine.prepare(text, labels, "{}", multi_label)
        (result,) = engine.classify([prepared])
        # the reference's own steps with max_length = the model's 128 positions
        encoded = reference_tokenizer(short_model)(
            [text] * len(labels), labels, truncation=True, max_length=128, return_tensors="pt"
        )
        assert encoded["input_ids"].shape[1] == 128
        assert pair_set(prepared).input_ids == encoded["input_ids"].tolist()
        with torch.inference_mode():
            logits = reference_model(short_model)(**encoded).logits.numpy()
        expected_labels, expected_scores = reference_postprocess(logits, labels, multi_label)
        assert list(result.labels) == expected_labels
        np.testing.assert_allclose(result.scores, expected_scores, rtol=0, atol=1e-5)


def test_hypothesis_cache_keeps_truncated_ids_within_its_byte_budget(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000-character labels: what the cache retains stays within its byte budget."""
    budget = 1 << 20
    monkeypatch.setattr(nli, "HYPOTHESIS_CACHE_BYTES", budget, raising=False)
    engine = NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), 2048)
    characters = "世界那么大我想去看看家居旅游科技军事游戏故事"

    def long_label(number: int) -> str:  # a new string each time, as from a new event
        return (characters * 500)[number % 7 : number % 7 + 10_000] + str(number)

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(60):
            engine.prepare("快递太慢", [long_label(number)], "{}", False)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 2 * budget, f"{retained / 2**20:.1f} MiB retained"
    # a hypothesis longer than a pair can hold is still cut like the tokenizer cuts it
    text, label = "The delivery was late.", long_label(0)
    (ids,) = pair_set(engine.prepare(text, [label], "{}", False)).input_ids
    reference = reference_tokenizer(tiny_model)
    assert ids == reference(text, label, truncation=True, max_length=512)["input_ids"]


def test_longest_first_never_keeps_more_of_a_sequence_than_the_budget() -> None:
    """Why caching a hypothesis cut to the budget loses nothing: the cut of any pair is the
    same whether the hypothesis is given whole or already cut to the budget."""
    budget = 509
    for len_a in range(0, 1200, 7):
        for len_b in range(budget - 20, 1500, 11):
            expected = truncate_longest_first(len_a, len_b, budget)
            assert truncate_longest_first(len_a, min(len_b, budget), budget) == expected
