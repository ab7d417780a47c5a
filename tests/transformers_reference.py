"""transformers' own BERT classifier and tokenizer for a checkpoint directory: the
reference the engine's own encoder and tokenizer (stream_classifier/engine/bert.py) are
held to."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer


@cache
def reference_tokenizer(model_dir: Path, **options: Any) -> BertTokenizer:
    return BertTokenizer(vocab=str(model_dir / "vocab.txt"), **options)


def reference_model(model_dir: Path) -> BertForSequenceClassification:
    """The checkpoint in transformers' class, fp32, eval mode, SDPA attention."""
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    raw.pop("model_type", None)
    config = BertConfig(**raw)
    config._attn_implementation = "sdpa"
    model = BertForSequenceClassification(config)
    state = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state.pop("bert.embeddings.position_ids", None)
    model.load_state_dict(state, strict=True)
    model.train(False)
    return model
