"""The NLI engine in fp16: the encoder runs in half precision, the classifier head does not.

The pooler and classifier see only the [CLS] rows, so running them in fp32 (with the
checkpoint's fp32 weights) costs nothing, while fp16 there alone moves scores by up to
~1e-3 of the 2e-3 fp16 budget (docs/PERFORMANCE.md, "Reference workload and budgets"). fp16
runs on the CPU too, so this is checked here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stream_classifier.config import EngineConfig
from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.bert import BertClassifier
from stream_classifier.engine.nli import NliEngine
from stream_classifier.engine.packed import PackedBert

TEXTS = ["世界那么大，我想去看看", "The delivery was late and the box was damaged.", "价格太贵了"]
LABELS = ["家居", "旅游", "科技", "物流配送", "price"]


def head_in_float64(tiny_model: Path, cls_hidden: torch.Tensor) -> np.ndarray:
    """(entailment, contradiction) logits from [CLS] hidden states, checkpoint weights, fp64."""
    state = torch.load(tiny_model / "pytorch_model.bin", weights_only=True)

    def weights(name: str) -> tuple[np.ndarray, np.ndarray]:
        return (
            state[f"{name}.weight"].double().numpy(),
            state[f"{name}.bias"].double().numpy(),
        )

    hidden = cls_hidden.double().numpy()
    pooler_w, pooler_b = weights("bert.pooler.dense")
    classifier_w, classifier_b = weights("classifier")
    logits: np.ndarray = np.tanh(hidden @ pooler_w.T + pooler_b) @ classifier_w.T + classifier_b
    return logits[:, [0, 2]]


@pytest.mark.parametrize("backend", ["padded", "packed"])
def test_fp16_encoder_feeds_an_fp32_head(
    tiny_model: Path, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EngineConfig(model=str(tiny_model), device="cpu", dtype="float16")
    engine = NliEngine.load(config, max_batch_tokens=4096, backend=backend)
    assert next(engine.model.bert.encoder.parameters()).dtype == torch.float16
    cls_hidden: list[torch.Tensor] = []  # the encoder's [CLS] rows, per batch, in fp16
    if backend == "padded":
        encode = BertClassifier.encode

        def spy_encode(self: BertClassifier, *args: Any) -> torch.Tensor:
            result = encode(self, *args)
            cls_hidden.append(result[:, 0].clone())
            return result

        monkeypatch.setattr(BertClassifier, "encode", spy_encode)
    else:
        last_layer = PackedBert._last_layer

        def spy(self: PackedBert, *args: Any) -> torch.Tensor:
            result: torch.Tensor = last_layer(self, *args)
            cls_hidden.append(result.clone())
            return result

        monkeypatch.setattr(PackedBert, "_last_layer", spy)
    logits: list[torch.Tensor] = []
    forward = engine.forward

    def keep(batch: TokenBatch) -> torch.Tensor:
        result = forward(batch)
        logits.append(result)
        return result

    engine.forward = keep
    engine.classify([engine.prepare(text, LABELS, "这篇文章的标题是{}", False) for text in TEXTS])
    assert len(logits) == len(cls_hidden) >= 1
    for hidden, ours in zip(cls_hidden, logits, strict=True):
        assert hidden.dtype == torch.float16 and ours.dtype == torch.float32
        expected = head_in_float64(tiny_model, hidden)
        np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-5)
