"""The StructBERT NLI cross-encoder, scoring exactly like ModelScope's zero-shot pipeline.

Each (text, label) is one sentence pair ``[text, template.format(label)]`` (text is segment
A, hypothesis segment B), truncated longest-first to 512 tokens. Logit column 0 is
entailment and 2 contradiction, fixed by the reference pipeline. Single-label mode is a
softmax of the entailment logits across the message's labels; multi-label mode (and any
message with one label) is, per label, the softmax of (contradiction, entailment).

Speed comes from doing the reference's work once: each text is tokenized once and each
hypothesis once per process, pair ids are assembled by concatenation, and all pairs of a
micro-batch run as length-sorted batches bounded by a token budget (the memory bound).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from stream_classifier.config import MAX_PAIR_TOKENS, EngineConfig
from stream_classifier.engine.base import EngineError, Prepared, Scores

log = logging.getLogger(__name__)

ENTAILMENT = 0
CONTRADICTION = 2
#: Saved by the StructBERT checkpoints, not kept by transformers' BertModel.
UNUSED_CHECKPOINT_KEYS = ("bert.embeddings.position_ids",)
PAD_MULTIPLE = 8
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")


@dataclass(frozen=True)
class PairSet:
    """One message's sentence pairs, as token ids, already truncated like the reference."""

    input_ids: list[list[int]]
    segment_a_lengths: list[int]


def truncate_longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths after the Hugging Face tokenizers' ``longest_first`` pair truncation.

    ``budget`` is max_length minus the special tokens. The shorter sequence keeps its
    length if it fits in half, the longer one takes the rest; when both exceed half, the
    one that was longer gets the odd token (segment B on a tie).
    """
    if len_a + len_b <= budget:
        return len_a, len_b
    short, long_ = sorted((len_a, len_b))
    new_short = short
    new_long = max(short, budget - short)
    if new_short + new_long > budget:
        new_short = budget // 2
        new_long = new_short + budget % 2
    if len_a > len_b:
        return new_long, new_short
    return new_short, new_long


def round_up(length: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-length // multiple) * multiple


class NliEngine:
    """Zero-shot classification with a BERT-architecture NLI cross-encoder."""

    def __init__(
        self,
        model: BertForSequenceClassification,
        tokenizer: BertTokenizer,
        model_id: str,
        max_batch_tokens: int,
        max_length: int = MAX_PAIR_TOKENS,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_batch_tokens = max_batch_tokens
        self.max_length = max_length
        self.device = next(model.parameters()).device
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        #: Called with the number of rows whenever a batch ran out of memory and was split.
        self.on_out_of_memory: Callable[[int], None] = lambda rows: None
        self._hypothesis_ids = functools.lru_cache(maxsize=65536)(self._tokenize)

    @classmethod
    def load(cls, config: EngineConfig, max_batch_tokens: int) -> NliEngine:
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        model = load_classifier(model_dir, device, dtype)
        tokenizer = load_tokenizer(model_dir)
        return cls(model, tokenizer, config.model, max_batch_tokens)

    # -- CPU side --------------------------------------------------------------------------

    def _tokenize(self, text: str) -> tuple[int, ...]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return tuple(int(i) for i in ids)

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        text_ids = self._tokenize(text)
        budget = self.max_length - 3  # [CLS] A [SEP] B [SEP]
        pairs: list[list[int]] = []
        a_lengths: list[int] = []
        for label in labels:
            hyp_ids = self._hypothesis_ids(template.format(label))
            len_a, len_b = truncate_longest_first(len(text_ids), len(hyp_ids), budget)
            pairs.append(
                [self.cls_id, *text_ids[:len_a], self.sep_id, *hyp_ids[:len_b], self.sep_id]
            )
            a_lengths.append(len_a)
        tokens = sum(round_up(len(ids)) for ids in pairs)
        return Prepared(tuple(labels), multi_label, tokens, PairSet(pairs, a_lengths))

    # -- model side ------------------------------------------------------------------------

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        pair_sets = [_pair_set(item) for item in batch]
        flat = [ids for pair_set in pair_sets for ids in pair_set.input_ids]
        a_lengths = [n for pair_set in pair_sets for n in pair_set.segment_a_lengths]
        logits = self._logits(flat, a_lengths)
        results: list[Scores] = []
        start = 0
        for item in batch:
            stop = start + len(item.labels)
            results.append(score(item.labels, logits[start:stop], item.multi_label))
            start = stop
        return results

    def _logits(self, pairs: list[list[int]], a_lengths: list[int]) -> np.ndarray:
        """(entailment, contradiction) logits in fp32 for every pair, in input order."""
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]), reverse=True)
        out = torch.empty((len(pairs), 2), dtype=torch.float32, device=self.device)
        for rows in self._token_budget_batches(order, pairs):
            self._run_rows(rows, pairs, a_lengths, out)
        return out.cpu().numpy()

    def _token_budget_batches(self, order: list[int], pairs: list[list[int]]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        width = 0
        for index in order:
            length = round_up(len(pairs[index]))
            new_width = max(width, length)
            if current and new_width * (len(current) + 1) > self.max_batch_tokens:
                batches.append(current)
                current, new_width = [], length
            current.append(index)
            width = new_width
        if current:
            batches.append(current)
        return batches

    def _run_rows(
        self, rows: list[int], pairs: list[list[int]], a_lengths: list[int], out: torch.Tensor
    ) -> None:
        try:
            out[rows] = self._forward(rows, pairs, a_lengths)
        except torch.OutOfMemoryError as exc:
            if len(rows) == 1:
                raise EngineError("out of memory on a single sentence pair") from exc
            torch.cuda.empty_cache()
            self.on_out_of_memory(len(rows))
            log.warning("out of memory on %d pairs, splitting the batch in two", len(rows))
            half = len(rows) // 2
            self._run_rows(rows[:half], pairs, a_lengths, out)
            self._run_rows(rows[half:], pairs, a_lengths, out)

    def _forward(
        self, rows: list[int], pairs: list[list[int]], a_lengths: list[int]
    ) -> torch.Tensor:
        width = round_up(max(len(pairs[i]) for i in rows))
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        token_types = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, index in enumerate(rows):
            ids = pairs[index]
            input_ids[row, : len(ids)] = ids
            token_types[row, a_lengths[index] + 2 : len(ids)] = 1
            mask[row, : len(ids)] = 1
        tensors = [self._to_device(array) for array in (input_ids, token_types, mask)]
        with torch.inference_mode():
            logits: torch.Tensor = self.model(
                input_ids=tensors[0], token_type_ids=tensors[1], attention_mask=tensors[2]
            ).logits
        return logits[:, [ENTAILMENT, CONTRADICTION]].float()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def warmup(self) -> None:
        """Run one batch of the largest shape so a memory problem shows before consuming."""
        rows = max(1, self.max_batch_tokens // self.max_length)
        if self.device.type == "cpu":
            rows = 1
        pair = [self.cls_id] + [self.pad_id] * (self.max_length - 3) + [self.sep_id] * 2
        pairs = [pair] * rows
        self._logits(pairs, [self.max_length - 3] * rows)


def _pair_set(item: Prepared) -> PairSet:
    if not isinstance(item.payload, PairSet):
        raise EngineError("request was prepared by another engine")
    return item.payload


def score(labels: tuple[str, ...], logits: np.ndarray, multi_label: bool) -> Scores:
    """The reference pipeline's math on (entailment, contradiction) logits, in float64."""
    values = logits.astype(np.float64)
    if multi_label or len(labels) == 1:
        # softmax([contradiction, entailment])[entailment] == sigmoid(entail - contra)
        probabilities = 1.0 / (1.0 + np.exp(values[:, 1] - values[:, 0]))
    else:
        entailment = values[:, 0] - values[:, 0].max()
        exp = np.exp(entailment)
        probabilities = exp / exp.sum()
    order = sorted(range(len(labels)), key=lambda i: -probabilities[i])
    return Scores(
        labels=tuple(labels[i] for i in order),
        scores=tuple(float(probabilities[i]) for i in order),
    )


# -- loading -------------------------------------------------------------------------------


def resolve_model_dir(model: str, cache_dir: str | None) -> Path:
    """A local directory as it is, or a ModelScope id fetched through ModelScope's cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or model.startswith("."):
        raise EngineError(f"engine.model: local model directory {model} does not exist")
    if model.count("/") != 1:
        raise EngineError(
            f"engine.model={model!r} is neither a directory nor a ModelScope id (owner/name)"
        )
    return _snapshot_download(model, cache_dir)


def _snapshot_download(model_id: str, cache_dir: str | None) -> Path:
    from modelscope.hub.snapshot_download import snapshot_download

    try:
        return Path(snapshot_download(model_id, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing here
        raise EngineError(
            f"cannot fetch model {model_id!r} from ModelScope ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Without network access, download it elsewhere and set "
            "engine.model (env STREAM_CLASSIFIER_ENGINE__MODEL) to the absolute path of a "
            "directory holding config.json, vocab.txt and pytorch_model.bin"
        ) from exc


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"engine.device={name} but no CUDA device is available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_classifier(
    model_dir: Path, device: torch.device, dtype: torch.dtype
) -> BertForSequenceClassification:
    """Build a BertForSequenceClassification (SDPA attention) from a StructBERT/BERT dir."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise EngineError(f"{model_dir} has no config.json")
    raw: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    raw.pop("model_type", None)
    config = BertConfig(**raw)
    config._attn_implementation = "sdpa"
    if (config.num_labels or 0) < 3:
        raise EngineError(
            f"{model_dir}: an NLI model needs 3 output labels, config has {config.num_labels}"
        )
    state = _load_state_dict(model_dir)
    for key in UNUSED_CHECKPOINT_KEYS:
        state.pop(key, None)
    with torch.device("meta"):
        model = BertForSequenceClassification(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise EngineError(f"{model_dir}: weights do not fit a BERT classifier: {exc}") from exc
    model.bert.embeddings.register_buffer(
        "position_ids",
        torch.arange(config.max_position_embeddings).expand((1, -1)),
        persistent=False,
    )
    if hasattr(model.bert.embeddings, "token_type_ids"):
        model.bert.embeddings.register_buffer(
            "token_type_ids",
            torch.zeros((1, config.max_position_embeddings), dtype=torch.long),
            persistent=False,
        )
    module: torch.nn.Module = model
    module.to(device=device, dtype=dtype)
    module.train(False)
    return model


def _load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return dict(loaded)
    raise EngineError(f"{model_dir} has none of {', '.join(WEIGHT_FILES)}")


def load_tokenizer(model_dir: Path) -> BertTokenizer:
    vocab = model_dir / "vocab.txt"
    if not vocab.is_file():
        raise EngineError(f"{model_dir} has no vocab.txt")
    options: dict[str, Any] = {}
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        saved = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        for key in ("do_lower_case", "tokenize_chinese_chars", "strip_accents"):
            if key in saved:
                options[key] = saved[key]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return BertTokenizer(vocab=str(vocab), **options)
