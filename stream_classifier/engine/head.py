"""The NLI classifier head (pooler + classifier) in fp32, on the [CLS] rows only.

Whatever the encoder's dtype, the head runs in fp32 with the checkpoint's own fp32
weights: it sees one row per sentence pair, so it costs nothing next to the encoder, and in
fp16 it alone moves scores by up to ~1e-3 (half of the 2e-3 fp16 budget in
docs/PERFORMANCE.md, "Reference workload and budgets").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stream_classifier.engine.bert import BertClassifier

#: Logit columns the reference pipeline reads: entailment and contradiction.
ENTAILMENT_CONTRADICTION = (0, 2)


@dataclass(frozen=True)
class ClassifierHead:
    """``tanh(pooler([CLS])) → classifier``, fp32; returns (entailment, contradiction)."""

    pooler_weight: torch.Tensor
    pooler_bias: torch.Tensor
    classifier_weight: torch.Tensor
    classifier_bias: torch.Tensor

    @classmethod
    def of(cls, model: BertClassifier, device: torch.device | None = None) -> ClassifierHead:
        """fp32 copies of the model's head weights (the same tensors if already fp32).

        Take it before the model is cast to fp16 to keep the checkpoint's precision.
        """
        pooler = model.bert.pooler
        rows = list(ENTAILMENT_CONTRADICTION)

        def fp32(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to(device=device, dtype=torch.float32)

        return cls(
            pooler_weight=fp32(pooler.dense.weight),
            pooler_bias=fp32(pooler.dense.bias),
            # only the two rows that are read: the neutral column is never used
            classifier_weight=fp32(model.classifier.weight[rows]),
            classifier_bias=fp32(model.classifier.bias[rows]),
        )

    def __call__(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """``[pairs, hidden]`` [CLS] states (any dtype) → ``[pairs, 2]`` fp32 logits."""
        pooled = torch.tanh(F.linear(cls_hidden.float(), self.pooler_weight, self.pooler_bias))
        return F.linear(pooled, self.classifier_weight, self.classifier_bias)
