"""The transformers NLI engine against golden outputs of the real zero-shot pipeline.

tests/fixtures/make_hf_nli.py trained the tokenizers and ran transformers'
``pipeline("zero-shot-classification")`` on tiny random BERT, RoBERTa, DeBERTa-v2 and BART
checkpoints; the same checkpoints are rebuilt here from their seed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ranking import assert_same_ranking

from stream_classifier.config import EngineConfig
from stream_classifier.engine import EngineError, load_engine
from stream_classifier.engine.base import Prepared
from stream_classifier.engine.hf_nli import HfNliEngine, Pairs, nli_columns
from stream_classifier.engine.nli import NliEngine

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "hf-nli" / "golden.json").read_text("utf-8"))
ARCHS = list(GOLDEN["architectures"])
CASES = [case for arch in ARCHS for case in GOLDEN["architectures"][arch]["cases"]]
MAX_LENGTH = GOLDEN["generator"]["max_length"]


def _builder() -> Any:
    spec = importlib.util.spec_from_file_location("make_hf_nli", FIXTURES / "make_hf_nli.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILDER = _builder()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-nli")
    built: dict[str, Path] = {}
    for arch in ARCHS:
        fingerprint = BUILDER.build_checkpoint(arch, root / arch)
        assert fingerprint == GOLDEN["architectures"][arch]["fingerprint"], (
            f"{arch}: the seeded weights changed (transformers renamed or reshaped a "
            "parameter?); regenerate with tests/fixtures/make_hf_nli.py --golden"
        )
        built[arch] = root / arch
    return built


@pytest.fixture(scope="module")
def engines(checkpoints: dict[str, Path]) -> dict[str, HfNliEngine]:
    loaded: dict[str, HfNliEngine] = {}
    for arch, path in checkpoints.items():
        engine = load_engine(EngineConfig(model=str(path), device="cpu"), 2048)
        assert isinstance(engine, HfNliEngine)
        loaded[arch] = engine
    return loaded


def arch_of(case: dict[str, Any]) -> str:
    return str(case["name"].split("/")[0])


def prepare(engine: HfNliEngine, case: dict[str, Any]) -> Prepared:
    return engine.prepare(
        case["text"], case["labels"], case["hypothesis_template"], case["multi_label"]
    )


def pairs_of(item: Prepared) -> Pairs:
    """The sentence pairs an HfNliEngine prepared."""
    assert isinstance(item.payload, Pairs)
    return item.payload


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_classify_one_message_matches_transformers_pipeline(
    engines: dict[str, HfNliEngine], case: dict[str, Any]
) -> None:
    engine = engines[arch_of(case)]
    prepared = prepare(engine, case)
    assert [int(n) for n in pairs_of(prepared).lengths] == case["pair_lengths"]
    assert_same_ranking(engine.classify([prepared])[0], case["expected"])


@pytest.mark.parametrize("arch", ARCHS)
def test_classify_all_messages_in_small_batches_matches_transformers_pipeline(
    checkpoints: dict[str, Path], arch: str
) -> None:
    # 256 tokens a batch: pairs of different messages and lengths share padded batches
    # (BART's rows with a literal </s> among them too).
    # Prepared in one chunk, as the service prepares what one consume() returned.
    engine = load_engine(EngineConfig(model=str(checkpoints[arch]), device="cpu"), 256)
    assert isinstance(engine, HfNliEngine)
    cases = GOLDEN["architectures"][arch]["cases"]
    tasks = [(c["text"], c["labels"], c["hypothesis_template"], c["multi_label"]) for c in cases]
    chunk = engine.prepare_many(tasks)
    prepared = [item for item in chunk if isinstance(item, Prepared)]
    assert len(prepared) == len(cases)
    for case, item in zip(cases, prepared, strict=True):
        assert [int(n) for n in pairs_of(item).lengths] == case["pair_lengths"]
    results = engine.classify(prepared)
    for case, result in zip(cases, results, strict=True):
        assert_same_ranking(result, case["expected"])


def test_golden_covers_both_modes_and_each_truncation_outcome() -> None:
    for arch in ARCHS:
        cases = GOLDEN["architectures"][arch]["cases"]
        assert {case["multi_label"] for case in cases} == {True, False}
        lengths = [n for case in cases for n in case["pair_lengths"]]
        assert any(n < MAX_LENGTH for n in lengths)
        assert any(n == MAX_LENGTH for n in lengths)  # the text was cut
        assert any(n > MAX_LENGTH for n in lengths)  # too short to cut: not truncated
        assert any(len(case["labels"]) == 1 for case in cases)
    assert {GOLDEN["architectures"][a]["model_type"] for a in ARCHS} == {
        "bert",
        "roberta",
        "deberta-v2",
        "bart",
    }


def test_load_engine_picks_the_engine_by_what_the_directory_holds(
    checkpoints: dict[str, Path], tiny_model: Path
) -> None:
    structbert = load_engine(EngineConfig(model=str(tiny_model), device="cpu"), 2048)
    assert isinstance(structbert, NliEngine)
    transformers_dir = load_engine(EngineConfig(model=str(checkpoints["bert"]), device="cpu"), 2048)
    assert isinstance(transformers_dir, HfNliEngine)


# -- tokenization: the pipeline's own call, on many lengths --------------------------------


def pipeline_ids(pipe: Any, text: str, hypothesis: str) -> tuple[list[int], list[int] | None]:
    encoded = pipe._parse_and_tokenize([[text, hypothesis]])
    types = encoded.get("token_type_ids")
    return encoded["input_ids"][0].tolist(), None if types is None else types[0].tolist()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_pairs_equal_the_pipeline_tokenization(
    checkpoints: dict[str, Path], arch: str, side: str
) -> None:
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoints[arch]), truncation_side=side)
    base = load_engine(EngineConfig(model=str(checkpoints[arch]), device="cpu"), 2048)
    assert isinstance(base, HfNliEngine)
    engine = HfNliEngine(base.model, tokenizer, "test", 2048)
    pipe = pipeline("zero-shot-classification", model=base.model, tokenizer=tokenizer)
    words = " ".join(BUILDER.CORPUS).split()
    rng = random.Random(3)
    outcomes: set[str] = set()
    for _ in range(80):
        text = " ".join(rng.choices(words, k=rng.randint(1, 60)))
        label = " ".join(rng.choices(words, k=rng.randint(1, 50)))
        expected_ids, expected_types = pipeline_ids(pipe, text, f"It is {label}.")
        length = len(expected_ids)
        outcomes.add(
            "fits" if length < MAX_LENGTH else "cut" if length == MAX_LENGTH else "not cut"
        )
        if engine.capacity is not None and length > engine.capacity:
            with pytest.raises(EngineError, match="positions"):
                engine.prepare(text, [label], "It is {}.", False)
            continue
        pairs = pairs_of(engine.prepare(text, [label], "It is {}.", False))
        assert pairs.input_ids == [expected_ids]
        if expected_types is not None:
            assert pairs.token_type_ids == [expected_types]
    assert outcomes == {"fits", "cut", "not cut"}


def test_truncation_side_left_keeps_the_end_of_the_text(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    base = load_engine(EngineConfig(model=str(checkpoints["bert"]), device="cpu"), 2048)
    assert isinstance(base, HfNliEngine)
    left = AutoTokenizer.from_pretrained(str(checkpoints["bert"]), truncation_side="left")
    engine = HfNliEngine(base.model, left, "test", 2048)
    text = "price " * 80 + "the box was damaged"
    text_ids = left(text, add_special_tokens=False)["input_ids"]
    ids = pairs_of(engine.prepare(text, ["logistics"], "{}", False)).input_ids[0]
    kept = MAX_LENGTH - 3 - len(left("logistics", add_special_tokens=False)["input_ids"])
    assert len(ids) == MAX_LENGTH  # [CLS] text [SEP] hypothesis [SEP]
    assert ids[1 : 1 + kept] == text_ids[-kept:]


def test_pair_longer_than_the_positions_is_rejected_by_prepare(
    engines: dict[str, HfNliEngine],
) -> None:
    engine = engines["bert"]
    long_label = " ".join(["quality"] * 150)  # the hypothesis alone is over the budget
    with pytest.raises(EngineError, match="128 positions"):
        engine.prepare("the box was damaged", [long_label], "{}", False)
    # in a chunk, only that event fails
    fine, too_long = engine.prepare_many(
        [("the box was damaged", ["quality"], "{}", False), ("same", [long_label], "{}", False)]
    )
    assert isinstance(fine, Prepared)
    assert isinstance(too_long, EngineError)


def test_tokenizer_without_max_length_cuts_to_the_model_positions(tmp_path: Path) -> None:
    BUILDER.build_checkpoint("bert", tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    saved = json.loads(config_path.read_text("utf-8"))
    del saved["model_max_length"]
    config_path.write_text(json.dumps(saved), "utf-8")
    engine = load_engine(EngineConfig(model=str(tmp_path), device="cpu"), 2048)
    assert isinstance(engine, HfNliEngine)
    assert engine.max_length == engine.capacity == 128
    long_text = " ".join(BUILDER.CORPUS)
    assert pairs_of(engine.prepare(long_text, ["price"], "{}", False)).lengths.tolist() == [128]
    # where the pipeline cut nothing, the scores are still the pipeline's
    for case in GOLDEN["architectures"]["bert"]["cases"]:
        if max(case["pair_lengths"]) < MAX_LENGTH:
            assert_same_ranking(engine.classify([prepare(engine, case)])[0], case["expected"])


# -- which logit is entailment -------------------------------------------------------------


@pytest.mark.parametrize(
    ("id2label", "expected"),
    [
        ({0: "entailment", 1: "neutral", 2: "contradiction"}, (0, 2)),
        ({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}, (2, 0)),
        ({0: "Entailment", 1: "not_entailment"}, (0, 1)),
        ({0: "not_entailment", 1: "entailment"}, (1, 0)),
        ({0: "neutral", 1: "entailment", 2: "contradiction"}, (1, 2)),
    ],
)
def test_nli_columns_read_id2label_case_insensitively(
    id2label: dict[int, str], expected: tuple[int, int]
) -> None:
    assert nli_columns(id2label) == expected


def test_nli_columns_without_names_is_an_error_naming_the_override() -> None:
    unnamed = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(EngineError, match="engine.entailment_index") as caught:
        nli_columns(unnamed)
    assert "LABEL_0" in str(caught.value)
    with pytest.raises(EngineError, match="engine.contradiction_index"):
        nli_columns(unnamed, entailment_index=0)
    assert nli_columns(unnamed, entailment_index=2, contradiction_index=0) == (2, 0)
    with pytest.raises(EngineError, match="not a column"):
        nli_columns(unnamed, entailment_index=3, contradiction_index=0)


def test_engine_config_rejects_equal_entailment_and_contradiction_index() -> None:
    with pytest.raises(ValueError, match="must differ"):
        EngineConfig(entailment_index=1, contradiction_index=1)


def _relabel(model_dir: Path, id2label: dict[int, str]) -> None:
    config_path = model_dir / "config.json"
    raw = json.loads(config_path.read_text("utf-8"))
    raw["id2label"] = {str(k): v for k, v in id2label.items()}
    raw["label2id"] = {v: k for k, v in id2label.items()}
    config_path.write_text(json.dumps(raw), "utf-8")


def test_unnamed_labels_fail_at_start_up_and_the_override_scores_like_the_pipeline(
    tmp_path: Path,
) -> None:
    BUILDER.build_checkpoint("roberta", tmp_path)
    _relabel(tmp_path, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(EngineError, match="ENTAILMENT_INDEX"):
        load_engine(EngineConfig(model=str(tmp_path), device="cpu"), 2048)
    # the fixture's RoBERTa is CONTRADICTION, NEUTRAL, ENTAILMENT
    config = EngineConfig(
        model=str(tmp_path), device="cpu", entailment_index=2, contradiction_index=0
    )
    engine = load_engine(config, 2048)
    assert isinstance(engine, HfNliEngine)
    for case in GOLDEN["architectures"]["roberta"]["cases"][:4]:
        assert_same_ranking(engine.classify([prepare(engine, case)])[0], case["expected"])


def test_contradiction_by_id2label_where_the_pipeline_would_take_it_by_position(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    BUILDER.build_checkpoint("bert", tmp_path)
    _relabel(tmp_path, {0: "neutral", 1: "entailment", 2: "contradiction"})
    with caplog.at_level(logging.WARNING, logger="stream_classifier.engine.hf_nli"):
        engine = load_engine(EngineConfig(model=str(tmp_path), device="cpu"), 2048)
    assert isinstance(engine, HfNliEngine)
    assert (engine.entailment, engine.contradiction) == (1, 2)
    assert "by position" in caplog.text
    prepared = engine.prepare("the box was damaged", ["price", "sports"], "{}", True)
    logits = engine.logits(pairs_of(prepared))
    with torch.inference_mode():
        full = engine.model(
            input_ids=torch.tensor(pairs_of(prepared).input_ids[:1]),
            token_type_ids=torch.tensor(pairs_of(prepared).token_type_ids[:1]),
        ).logits[0]
    assert logits[0] == pytest.approx([float(full[1]), float(full[2])], abs=1e-5)


# -- batching ------------------------------------------------------------------------------


def test_out_of_memory_splits_the_batch_and_keeps_the_scores(
    checkpoints: dict[str, Path],
) -> None:
    engine = load_engine(EngineConfig(model=str(checkpoints["deberta-v2"]), device="cpu"), 2048)
    assert isinstance(engine, HfNliEngine)
    cases = GOLDEN["architectures"]["deberta-v2"]["cases"]
    prepared = [prepare(engine, case) for case in cases]
    real = engine.forward
    splits: list[int] = []

    def small_memory(pairs: Pairs) -> torch.Tensor:
        if pairs.rows > 3:
            raise torch.OutOfMemoryError("simulated")
        return real(pairs)

    engine.forward = small_memory
    engine.on_out_of_memory = splits.append
    results = engine.classify(prepared)
    assert splits and max(splits) > 3
    for case, result in zip(cases, results, strict=True):
        assert_same_ranking(result, case["expected"])


@pytest.mark.parametrize("arch", ARCHS)
def test_warmup_runs_the_longest_pair(engines: dict[str, HfNliEngine], arch: str) -> None:
    engine = engines[arch]
    seen: list[int] = []
    real = engine.forward

    def recording(pairs: Pairs) -> torch.Tensor:
        seen.append(int(np.max(pairs.lengths)))
        return real(pairs)

    engine.forward = recording
    try:
        engine.warmup()
    finally:
        engine.forward = real
    assert seen == [MAX_LENGTH]
