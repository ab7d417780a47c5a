"""The embedding engine on the packaged all-MiniLM-L6-v2, on the CPU."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_classifier.config import DEFAULT_MODELS, EngineConfig, ServiceConfig, load_config
from stream_classifier.engine import EngineError, embedding, load_engine
from stream_classifier.engine.embedding import (
    Calibration,
    EmbeddingEngine,
    packaged_model_dir,
    pool,
    read_layout,
    score,
    token_budget_batches,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "examples" / "demo.yaml"

#: Top-1 accuracy on examples/eval/<topic>.jsonl with examples/demo.yaml's labels and
#: templates, MEASURED (fp32, CPU): moderation 34/40 = 0.850, support 38/40 = 0.950. The
#: floors leave one or two examples of room for numerical differences between CPUs.
ACCURACY_FLOOR = {"moderation": 0.80, "support": 0.90}


@pytest.fixture(scope="module")
def engine() -> EmbeddingEngine:
    loaded = load_engine(EngineConfig(kind="embedding", device="cpu"), max_batch_tokens=4096)
    assert isinstance(loaded, EmbeddingEngine)
    return loaded


def fresh(engine: EmbeddingEngine) -> EmbeddingEngine:
    """Same model, empty label cache."""
    return EmbeddingEngine(
        engine.model,
        engine.tokenizer,
        engine.model_id,
        engine.max_batch_tokens,
        engine.max_length,
        engine.pooling,
        engine.calibration,
    )


def test_packaged_model_is_the_default_and_loads_offline(engine: EmbeddingEngine) -> None:
    assert EngineConfig(kind="embedding").model == DEFAULT_MODELS["embedding"]
    assert EngineConfig().model == DEFAULT_MODELS["nli"]
    assert EngineConfig(kind="embedding", model="/x").model == "/x"
    assert engine.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    layout = read_layout(packaged_model_dir())
    assert (layout.pooling, layout.max_length) == ("mean", 256)
    assert engine.max_length == 256


def test_embeddings_match_sentence_transformers(engine: EmbeddingEngine) -> None:
    st = pytest.importorskip("sentence_transformers")
    texts = ["My parcel never arrived.", "You are an idiot.", "a " * 400]
    reference = st.SentenceTransformer(str(packaged_model_dir()), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True)
    ours = engine.embed_texts(texts).numpy()
    np.testing.assert_allclose((expected * ours).sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("topic", sorted(ACCURACY_FLOOR))
def test_top_label_on_the_labelled_samples(engine: EmbeddingEngine, topic: str) -> None:
    config = load_config(DEMO_CONFIG).topic(topic)
    lines = (ROOT / "examples" / "eval" / f"{topic}.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines if line.strip()]
    prepared = [
        engine.prepare(s["text"], config.labels, config.hypothesis_template, False) for s in samples
    ]
    results = engine.classify(prepared)
    correct = sum(r.top_label == s["label"] for r, s in zip(results, samples, strict=True))
    assert correct / len(samples) >= ACCURACY_FLOOR[topic]


class Counting:
    """Wraps embed_texts: every hypothesis the engine embeds, and how often."""

    def __init__(self, engine: EmbeddingEngine) -> None:
        self.embedded: list[str] = []
        self._inner = engine.embed_texts

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        self.embedded.extend(texts)
        return self._inner(texts)


def test_label_embeddings_are_computed_once_per_topic(
    engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = fresh(engine)
    counting = Counting(engine)
    monkeypatch.setattr(engine, "embed_texts", counting)
    topics = {
        "a": (["billing", "shipping", "refund"], "This message is {}."),
        "b": (["spam", "insults"], "{}"),
    }
    texts = [f"message number {i} about my order" for i in range(12)]
    for start in range(0, len(texts), 4):  # three micro-batches, both topics in each
        batch = [
            engine.prepare(text, *topics["a" if i % 2 else "b"], False)
            for i, text in enumerate(texts[start : start + 4])
        ]
        assert len(engine.classify(batch)) == 4
    expected = ["This message is billing.", "This message is shipping.", "This message is refund."]
    assert sorted(counting.embedded) == sorted([*expected, "spam", "insults"])


def test_prime_embeds_labels_at_start_up(
    engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = fresh(engine)
    engine.prime(["billing", "refund"], "about {}")
    counting = Counting(engine)
    monkeypatch.setattr(engine, "embed_texts", counting)
    engine.classify([engine.prepare("charged twice", ["billing", "refund"], "about {}", False)])
    assert counting.embedded == []


def test_cost_does_not_grow_with_the_number_of_labels(engine: EmbeddingEngine) -> None:
    few = engine.prepare("where is my parcel", ["a", "b"], "{}", False)
    many = engine.prepare("where is my parcel", [f"label {i}" for i in range(64)], "{}", False)
    assert few.tokens == many.tokens == 8  # 6 tokens with [CLS] and [SEP], padded to 8


def test_long_text_is_truncated_to_the_model_limit(engine: EmbeddingEngine) -> None:
    prepared = engine.prepare("word " * 1000, ["a", "b"], "{}", False)
    assert prepared.tokens == 256
    assert engine.classify([prepared])[0].labels


def test_single_label_scores_are_a_softmax_sorted_high_to_low(engine: EmbeddingEngine) -> None:
    labels = ["billing", "shipping", "technical issue"]
    result = engine.classify([engine.prepare("I was charged twice", labels, "{}", False)])[0]
    assert result.top_label == "billing"
    assert sum(result.scores) == pytest.approx(1.0)
    assert list(result.scores) == sorted(result.scores, reverse=True)
    assert sorted(result.labels) == sorted(labels)


def test_multi_label_scores_are_independent_sigmoids(engine: EmbeddingEngine) -> None:
    labels = ["billing", "shipping"]
    text = "I was charged twice and my parcel is late"
    result = engine.classify([engine.prepare(text, labels, "{}", True)])[0]
    cosines = (engine.embed_texts(labels) @ engine.embed_texts([text])[0]).numpy()
    expected = 1 / (1 + np.exp(-(20.0 * cosines - 6.0)))
    got = dict(zip(result.labels, result.scores, strict=True))
    assert [got[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)


def test_scoring_math() -> None:
    cosines = np.array([0.1, 0.3])
    single = score(("a", "b"), cosines, False, Calibration(temperature=0.1))
    assert single.labels == ("b", "a")
    assert single.scores[0] == pytest.approx(np.exp(3) / (np.exp(1) + np.exp(3)))
    multi = score(("a", "b"), cosines, True, Calibration(scale=10.0, bias=-2.0))
    assert multi.labels == ("b", "a")
    assert multi.scores == pytest.approx((1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))))
    one = score(("a",), np.array([0.3]), False, Calibration(scale=10.0, bias=-3.0))
    assert one.scores == (0.5,)  # one label: the independent probability, as NLI does


def test_mean_pooling_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 2.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 1.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 3.0]]


def test_token_budget_batches_bound_rows_times_width() -> None:
    sequences = [[0] * n for n in (30, 7, 16, 16, 3)]
    order = sorted(range(5), key=lambda i: -len(sequences[i]))
    batches = token_budget_batches(order, sequences, max_tokens=48)
    # padded widths 32 | 16 16 8 (3 x 16 = 48) | 8 (a fourth row would make 64)
    assert batches == [[0], [2, 3, 1], [4]]


def test_a_missing_model_directory_is_an_engine_error() -> None:
    with pytest.raises(EngineError, match="local sentence-transformers directory"):
        load_engine(EngineConfig(kind="embedding", model="no/such-model"), 4096)


def test_small_token_budgets_are_allowed_for_the_embedding_engine() -> None:
    topic = {"input": "in", "output": "out", "dead_letter": "dlq", "labels": ["a"]}
    config = ServiceConfig(
        engine={"kind": "embedding"}, processing={"max_batch_tokens": 256}, topics=[topic]
    )
    assert config.engine.model == DEFAULT_MODELS["embedding"]


def storage_bytes(vectors: Iterable[torch.Tensor]) -> int:
    """The memory the tensors keep alive: each distinct storage counted once."""
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in vectors}
    return sum(storages.values())


def test_cached_label_vectors_are_copies_within_a_byte_budget(
    engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached vector must not be a view that keeps its whole batch's buffer alive."""
    budget = 40 * (384 * 4 + 300)  # room for about 40 of MiniLM's 384-dim vectors
    monkeypatch.setattr(embedding, "LABEL_CACHE_BYTES", budget, raising=False)
    engine = fresh(engine)
    labels = [f"topic number {i}" for i in range(8)]
    engine.classify([engine.prepare("hello there", labels, "{}", False)])
    cached = list(engine._labels.values())
    assert len(cached) == 8
    assert all(v.untyped_storage().nbytes() == v.nbytes for v in cached)  # not views
    for start in range(0, 200, 20):  # 200 more labels, in batches of 20
        batch = [f"subject {i}" for i in range(start, start + 20)]
        engine.classify([engine.prepare("hello there", batch, "{}", True)])
    assert storage_bytes(engine._labels.values()) <= budget
    assert "subject 199" in engine._labels and "topic number 0" not in engine._labels
