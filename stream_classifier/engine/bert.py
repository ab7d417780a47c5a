"""A BERT sequence classifier and its WordPiece tokenizer, on torch and tokenizers alone.

Why not transformers' ``BertForSequenceClassification`` and ``BertTokenizer``: importing its
modeling code takes most of a replica's start-up (seconds of modules this engine never
runs: docs/PERFORMANCE.md, "Start-up"). The engine needs from it only the weights' layout
and, on the padded backend, one encoder pass. So this module holds the same parameters
under the same names (a transformers checkpoint loads into it with ``strict=True``) and
does the same arithmetic in eval mode; the tokenizer is built from the same
``tokenizers`` parts transformers' ``BertTokenizer`` assembles. Tests hold both to
transformers' (``tests/test_engine_bert.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn

#: The activations the encoder runs, by the names checkpoints give them in ``hidden_act``.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class ConfigError(ValueError):
    """config.json describes a model this encoder does not run (the field says which)."""


@dataclass(frozen=True)
class BertSettings:
    """The fields of a BERT ``config.json`` that shape the encoder."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    num_labels: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> BertSettings:
        """From a parsed config.json; the labels counted as transformers counts them."""
        try:
            labels = raw["id2label"] if "id2label" in raw else range(int(raw.get("num_labels", 2)))
            settings = cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw.get("hidden_size", 768)),
                num_hidden_layers=int(raw.get("num_hidden_layers", 12)),
                num_attention_heads=int(raw.get("num_attention_heads", 12)),
                intermediate_size=int(raw.get("intermediate_size", 3072)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                num_labels=len(labels),
                hidden_act=str(raw.get("hidden_act", "gelu")),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                pad_token_id=int(raw.get("pad_token_id") or 0),
                position_embedding_type=str(raw.get("position_embedding_type", "absolute")),
            )
        except KeyError as exc:
            raise ConfigError(f"config.json has no {exc.args[0]}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config.json: {exc}") from exc
        settings.check()
        return settings

    def check(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"hidden_act={self.hidden_act!r}: this encoder runs {', '.join(ACTIVATIONS)}"
            )
        if self.position_embedding_type != "absolute":
            raise ConfigError(
                f"position_embedding_type={self.position_embedding_type!r}: this encoder "
                "runs absolute position embeddings only"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )


def _parameter(*shape: int) -> nn.Parameter:
    """Uninitialised, on the CPU: the checkpoint's tensors replace it (``assign=True``).
    Not the meta device, whose Python reference kernels import sympy and torch._dynamo:
    seconds of a replica's start-up."""
    return nn.Parameter(torch.empty(shape), requires_grad=False)


class _Linear(nn.Module):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = _parameter(outputs, inputs)
        self.bias = _parameter(outputs)


class _LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = _parameter(size)
        self.bias = _parameter(size)
        self.eps = eps


class _Embedding(nn.Module):
    def __init__(self, rows: int, size: int) -> None:
        super().__init__()
        self.weight = _parameter(rows, size)


class _Embeddings(nn.Module):
    def __init__(self, settings: BertSettings) -> None:
        super().__init__()
        hidden = settings.hidden_size
        self.word_embeddings = _Embedding(settings.vocab_size, hidden)
        self.position_embeddings = _Embedding(settings.max_position_embeddings, hidden)
        self.token_type_embeddings = _Embedding(settings.type_vocab_size, hidden)
        self.LayerNorm = _LayerNorm(hidden, settings.layer_norm_eps)


class _SelfAttention(nn.Module):
    def __init__(self, settings: BertSettings) -> None:
        super().__init__()
        hidden = settings.hidden_size
        self.query = _Linear(hidden, hidden)
        self.key = _Linear(hidden, hidden)
        self.value = _Linear(hidden, hidden)


class _DenseNorm(nn.Module):
    """A projection back to the hidden size, then LayerNorm over it plus the residual."""

    def __init__(self, inputs: int, settings: BertSettings) -> None:
        super().__init__()
        self.dense = _Linear(inputs, settings.hidden_size)
        self.LayerNorm = _LayerNorm(settings.hidden_size, settings.layer_norm_eps)


class _Attention(nn.Module):
    def __init__(self, settings: BertSettings) -> None:
        super().__init__()
        self.self = _SelfAttention(settings)
        self.output = _DenseNorm(settings.hidden_size, settings)


class _Dense(nn.Module):
    """One projection named ``dense`` (the intermediate layer's and the pooler's)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.dense = _Linear(inputs, outputs)


class _Layer(nn.Module):
    def __init__(self, settings: BertSettings) -> None:
        super().__init__()
        self.attention = _Attention(settings)
        self.intermediate = _Dense(settings.hidden_size, settings.intermediate_size)
        self.output = _DenseNorm(settings.intermediate_size, settings)


class _Encoder(nn.Module):
    def __init__(self, settings: BertSettings) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(settings) for _ in range(settings.num_hidden_layers))


class _Bert(nn.Module):
    def __init__(self, settings: BertSettings) -> None:
        super().__init__()
        self.embeddings = _Embeddings(settings)
        self.encoder = _Encoder(settings)
        self.pooler = _Dense(settings.hidden_size, settings.hidden_size)


class BertClassifier(nn.Module):
    """The parameters of ``BertForSequenceClassification``, named as transformers names them."""

    def __init__(self, settings: BertSettings) -> None:
        super().__init__()
        self.config = settings
        self.bert = _Bert(settings)
        self.classifier = _Linear(settings.hidden_size, settings.num_labels)

    def encode(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The last hidden states ``[rows, width, hidden]`` of a padded batch (eval mode:
        no dropout); ``attention_mask`` is 1 on real tokens. Attention is SDPA with the
        padding masked as keys, or unmasked where no row is padded, as transformers runs
        it."""
        settings = self.config
        embeddings = self.bert.embeddings
        width = int(input_ids.shape[1])
        positions = torch.arange(width, device=input_ids.device)[None, :]
        hidden = _embed(embeddings.word_embeddings, input_ids) + _embed(
            embeddings.token_type_embeddings, token_type_ids
        )
        hidden = hidden + _embed(embeddings.position_embeddings, positions)
        hidden = _norm(embeddings.LayerNorm, hidden)
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        activation = ACTIVATIONS[settings.hidden_act]
        for layer in self.bert.encoder.layer:
            hidden = _layer(
                cast(_Layer, layer), hidden, mask, settings.num_attention_heads, activation
            )
        return hidden


def _layer(
    layer: _Layer,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    heads: int,
    activation: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One encoder layer, as transformers' ``BertLayer`` computes it in eval mode."""
    rows, width, size = hidden.shape
    head_dim = size // heads
    attention = layer.attention.self

    def split(projection: _Linear) -> torch.Tensor:
        return _linear(projection, hidden).view(rows, width, heads, head_dim).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        split(attention.query),
        split(attention.key),
        split(attention.value),
        attn_mask=mask,
        dropout_p=0.0,
        scale=1.0 / math.sqrt(head_dim),
    )
    context = context.transpose(1, 2).contiguous().reshape(rows, width, size)
    out = layer.attention.output
    attended = _norm(out.LayerNorm, _linear(out.dense, context) + hidden)
    inner = activation(_linear(layer.intermediate.dense, attended))
    return _norm(layer.output.LayerNorm, _linear(layer.output.dense, inner) + attended)


def _embed(table: _Embedding, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, table.weight)


def _linear(projection: _Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, projection.weight, projection.bias)


def _norm(norm: _LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps)


@dataclass(frozen=True)
class WordPieceTokenizer:
    """BERT's WordPiece tokenizer (``backend_tokenizer`` does the work) and its special ids:
    what the engine reads of transformers' ``BertTokenizer``, assembled from the same parts."""

    backend_tokenizer: Tokenizer
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int

    @classmethod
    def from_vocab(
        cls,
        vocab_file: Path,
        do_lower_case: bool = True,
        tokenize_chinese_chars: bool = True,
        strip_accents: bool | None = None,
    ) -> WordPieceTokenizer:
        vocab = read_vocab(vocab_file)
        missing = [token for token in SPECIAL_TOKENS if token not in vocab]
        if missing:
            raise ConfigError(f"{vocab_file} lacks {', '.join(missing)}")
        tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=tokenize_chinese_chars,
            strip_accents=strip_accents,
            lowercase=do_lower_case,
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        # Special tokens in a text are matched whole, before normalising, as transformers'
        # tokenizer adds them.
        tokenizer.add_special_tokens(
            [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
        )
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return cls(tokenizer, vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"])


def read_vocab(vocab_file: Path) -> dict[str, int]:
    """vocab.txt: one token per line, its id the line's index (a repeated token keeps its
    last line's id, as transformers' ``load_vocab`` keeps it)."""
    with vocab_file.open(encoding="utf-8") as lines:
        return {line.rstrip("\n"): index for index, line in enumerate(lines)}
