"""The engine's own BERT encoder and tokenizer against transformers' (the reference the
scores were proven with), and the start-up they exist for: no transformers import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers_reference import reference_model, reference_tokenizer

from stream_classifier.config import EngineConfig
from stream_classifier.engine import EngineError
from stream_classifier.engine.bert import WordPieceTokenizer
from stream_classifier.engine.nli import NliEngine, load_classifier_and_head

TEXTS = [
    "快递太慢了，三天还没到！",
    "Délivery was LATE, café closed!!",
    "mixed 中文 and English 123 [SEP] [CLS] [mask]",
    "emoji 😀 and tabs\tnew\nlines\u200b zero width, control \x07 char",
    "ÀÉÎÕÜ ﬁ ligature Ⅻ",
    "",
]
OPTIONS = [
    {},
    {"do_lower_case": False},
    {"strip_accents": True},
    {"do_lower_case": True, "strip_accents": False},
    {"tokenize_chinese_chars": False},
]


@pytest.mark.parametrize("options", OPTIONS, ids=[json.dumps(o) for o in OPTIONS])
def test_the_tokenizer_is_transformers_bert_tokenizer(
    tiny_model: Path, options: dict[str, bool]
) -> None:
    ours = WordPieceTokenizer.from_vocab(tiny_model / "vocab.txt", **options)
    theirs = reference_tokenizer(tiny_model, **options)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(
        theirs.backend_tokenizer.to_str()
    )
    assert (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id) == (
        theirs.cls_token_id,
        theirs.sep_token_id,
        theirs.pad_token_id,
    )
    for text in TEXTS:
        expected = theirs(text, "这篇文章的标题是{}", truncation=True, max_length=512)
        assert (
            ours.backend_tokenizer.encode(text, "这篇文章的标题是{}").ids == (expected["input_ids"])
        )


def test_the_encoder_computes_transformers_hidden_states_and_logits(tiny_model: Path) -> None:
    """Padded rows and unpadded batches (transformers passes no mask then), fp32."""
    ours, head = load_classifier_and_head(tiny_model, torch.device("cpu"), torch.float32)
    theirs = reference_model(tiny_model)
    tokenizer = reference_tokenizer(tiny_model)
    for texts in (TEXTS[:4], TEXTS[:1] * 3):
        encoded = tokenizer(
            texts, ["这篇文章的标题是旅游"] * len(texts), padding=True, return_tensors="pt"
        )
        with torch.inference_mode():
            expected = theirs(**encoded, output_hidden_states=True)
            hidden = ours.encode(
                encoded["input_ids"], encoded["token_type_ids"], encoded["attention_mask"]
            )
            logits = head(hidden[:, 0])
        real = encoded["attention_mask"].bool()
        np.testing.assert_allclose(
            hidden[real].numpy(), expected.hidden_states[-1][real].numpy(), rtol=0, atol=1e-5
        )
        np.testing.assert_allclose(
            logits.numpy(), expected.logits[:, [0, 2]].numpy(), rtol=0, atol=1e-5
        )


def test_loading_the_engine_imports_no_transformers(tiny_model: Path) -> None:
    """transformers' model code is most of a replica's import time; the StructBERT engine
    loads, warms up and scores without it."""
    script = (
        "import sys\n"
        "from stream_classifier.config import EngineConfig\n"
        "from stream_classifier.engine import import_libraries, load_engine\n"
        f"config = EngineConfig(model={str(tiny_model)!r}, device='cpu')\n"
        "import_libraries(config)\n"
        "engine = load_engine(config, 2048)\n"
        "engine.warmup()\n"
        "engine.classify([engine.prepare('快递太慢了', ['物流', '价格'], '{}', False)])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("hidden_act", "swish", "hidden_act='swish'"),
        ("position_embedding_type", "relative_key", "position_embedding_type"),
        ("vocab_size", None, "vocab_size"),
        ("num_attention_heads", 5, "not a multiple of num_attention_heads=5"),
    ],
)
def test_a_config_the_encoder_cannot_run_fails_at_load_naming_the_field(
    tiny_model: Path, tmp_path: Path, field: str, value: object, says: str
) -> None:
    for name in ("vocab.txt", "pytorch_model.bin"):
        shutil.copy(tiny_model / name, tmp_path / name)
    config = json.loads((tiny_model / "config.json").read_text("utf-8"))
    if value is None:
        del config[field]
    else:
        config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config), "utf-8")
    with pytest.raises(EngineError, match=says):
        NliEngine.load(EngineConfig(model=str(tmp_path), device="cpu"), 2048)
