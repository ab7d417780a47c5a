"""Any Hugging Face NLI cross-encoder, scoring exactly like transformers' zero-shot pipeline.

``engine.model`` is a directory holding a transformers ``AutoModelForSequenceClassification``
checkpoint trained on NLI (BERT, RoBERTa, DeBERTa-v2/v3, BART, ...) and its tokenizer. The
scores equal those of ``transformers.pipeline("zero-shot-classification")`` on the same
directory (fp32: within 1e-5, tests/test_engine_hf_nli.py), which differs from ModelScope's
StructBERT pipeline (:mod:`.nli`) in three ways:

- **Truncation is the pipeline's ``only_first``** against the tokenizer's
  ``model_max_length``: only the text (segment A) is cut, from the tokenizer's
  ``truncation_side``; if cutting the text cannot make the pair fit (the hypothesis alone
  fills the budget), nothing is cut at all (the pipeline retries without truncation when
  the tokenizer says "too short"), and a pair longer than the model's absolute positions
  is refused by ``prepare`` (the pipeline would fail on it). A tokenizer without
  ``model_max_length`` cuts nothing in the pipeline; here it cuts to the model's positions
  (where the pipeline would fail) or, for relative-position models (DeBERTa), nothing.
  ModelScope's StructBERT pipeline (:mod:`.nli`) cuts longest-first to 512 tokens instead,
  so a long label can be cut there, never here.
- **Special tokens and token types come from the tokenizer** (``[CLS] A [SEP] B [SEP]``
  for BERT and DeBERTa, ``<s> A </s></s> B </s>`` for RoBERTa and BART); token type ids
  reach the model only where the tokenizer produces them.
- **The logit columns come from the model's ``id2label``** (case-insensitive): entailment
  is the label starting with "entail", contradiction the one starting with "contradict"
  (or, in a two-class head such as ``entailment``/``not_entailment``, the other class).
  ``engine.entailment_index`` / ``engine.contradiction_index`` override them. The pipeline
  itself reads entailment the same way but takes contradiction by position (the last column
  when entailment is column 0, else column 0); the two agree on every common layout (MNLI's
  both orders, two-class heads), and where they don't this engine follows ``id2label`` and
  says so at load.

The scores are the pipeline's: single-label mode is a softmax of the entailment logits across
the message's labels; multi-label mode (and a message with one label) is, per label, the
softmax of (contradiction, entailment). Ties list the later label first, like the pipeline.

Like :mod:`.nli`, each text is tokenized once and each hypothesis once (kept in a cache
bounded by bytes), pair ids are assembled by concatenation, and all pairs of a micro-batch
run as length-sorted, padded batches bounded by the token budget
(:func:`.batches.padded_batches`), split in two on out-of-memory. There is no
padding-free path here: that stays with the BERT family.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from stream_classifier import startup
from stream_classifier.config import MAX_PAIR_TOKENS, EngineConfig
from stream_classifier.engine.base import (
    EngineError,
    Prepared,
    PrepareTask,
    Scores,
    prepare_each,
)
from stream_classifier.engine.cache import ByteBoundedCache
from stream_classifier.engine.shared import (
    HYPOTHESIS_CACHE_BYTES,
    PendingLogits,
    PendingScores,
    padded_plan,
    pick_device,
    pick_dtype,
    round_up,
    run_halving_on_oom,
    to_device,
)

log = logging.getLogger(__name__)

#: transformers' "no model_max_length" sentinel: above it the pipeline does not truncate.
LARGE_INTEGER = int(1e20)
#: Models whose absolute positions start after the padding index (RoBERTa's embeddings).
PADDING_OFFSET_POSITIONS = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm"}
)
#: Encoder-decoder classifiers that read the decoder state at the last end-of-sequence token.
EOS_HEAD_MODELS = frozenset({"BartForSequenceClassification", "MBartForSequenceClassification"})
#: Marks of a ModelScope checkpoint, which keeps the StructBERT engine (:mod:`.nli`).
MODELSCOPE_MODEL_TYPES = frozenset({"structbert"})


def is_transformers_classifier(model_dir: Path) -> bool:
    """Does ``model_dir`` hold a transformers sequence-classification checkpoint?

    A ModelScope checkpoint (``configuration.json``, or ``model_type: structbert``) does
    not: it keeps the StructBERT engine and its reference, ModelScope's pipeline.
    """
    config_path = model_dir / "config.json"
    if not model_dir.is_dir() or not config_path.is_file():
        return False
    if (model_dir / "configuration.json").is_file():
        return False
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(raw, dict) or raw.get("model_type") in MODELSCOPE_MODEL_TYPES:
        return False
    architectures = raw.get("architectures") or []
    return isinstance(raw.get("model_type"), str) and any(
        isinstance(name, str) and name.endswith("ForSequenceClassification")
        for name in architectures
    )


# -- which logit is entailment -------------------------------------------------------------


def nli_columns(
    id2label: Mapping[int, str],
    entailment_index: int | None = None,
    contradiction_index: int | None = None,
) -> tuple[int, int]:
    """The (entailment, contradiction) logit columns of a classifier with ``id2label``.

    Raises EngineError naming the labels and the override when either cannot be found.
    """
    count = len(id2label)
    names = ", ".join(f"{index}: {id2label[index]!r}" for index in sorted(id2label))
    if count < 2:
        raise EngineError(f"an NLI model needs at least 2 output labels, id2label is {{{names}}}")

    def find(prefix: str) -> list[int]:
        return [i for i, name in id2label.items() if str(name).lower().startswith(prefix)]

    entailment = entailment_index
    if entailment is None:
        found = find("entail")
        if len(found) != 1:
            raise EngineError(
                f"cannot tell the entailment column from the model's id2label {{{names}}}: "
                f"{'no' if not found else 'more than one'} label starts with 'entail'. Set "
                "engine.entailment_index (env STREAM_CLASSIFIER_ENGINE__ENTAILMENT_INDEX) "
                "to the column the model was trained to use for entailment"
            )
        entailment = found[0]
    contradiction = contradiction_index
    if contradiction is None:
        found = find("contradict")
        if len(found) == 1:
            contradiction = found[0]
        elif count == 2:
            contradiction = 1 - entailment
        else:
            raise EngineError(
                f"cannot tell the contradiction column from the model's id2label {{{names}}}: "
                "no single label starts with 'contradict'. Set engine.contradiction_index "
                "(env STREAM_CLASSIFIER_ENGINE__CONTRADICTION_INDEX)"
            )
    for what, index in (("entailment", entailment), ("contradiction", contradiction)):
        if not 0 <= index < count:
            raise EngineError(
                f"engine.{what}_index={index} is not a column of a {count}-label model "
                f"(id2label {{{names}}})"
            )
    if entailment == contradiction:
        raise EngineError(f"entailment and contradiction are the same column {entailment}")
    return entailment, contradiction


def pipeline_contradiction(entailment: int, count: int) -> int:
    """The contradiction column transformers' zero-shot pipeline uses: by position."""
    return count - 1 if entailment == 0 else 0


# -- pairs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairLayout:
    """Where a tokenizer puts its special tokens around a pair: P A M B S, with token types."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    middle_types: tuple[int, ...]
    suffix_types: tuple[int, ...]
    a_type: int
    b_type: int

    @property
    def special_tokens(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @property
    def parts(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return self.prefix, self.middle, self.suffix

    @property
    def part_types(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return self.prefix_types, self.middle_types, self.suffix_types

    def ids(self, a: Sequence[int], b: Sequence[int]) -> list[int]:
        return [*self.prefix, *a, *self.middle, *b, *self.suffix]

    def types(self, len_a: int, len_b: int) -> list[int]:
        return [
            *self.prefix_types,
            *([self.a_type] * len_a),
            *self.middle_types,
            *([self.b_type] * len_b),
            *self.suffix_types,
        ]


def pair_layout(backend: Any) -> PairLayout:
    """Read the pair template off a ``tokenizers.Tokenizer``'s post-processor.

    Probes it with two short sequences, then checks the layout on other lengths; raises
    EngineError if the tokenizer does not put fixed special tokens around the pair.
    """
    probes = [("the first probe text", "a second"), ("x", "yes no maybe so"), ("", "")]
    encoded = [
        (backend.encode(a, add_special_tokens=False), backend.encode(b, add_special_tokens=False))
        for a, b in probes
    ]
    first_a, first_b = encoded[0]
    pair = backend.post_process(first_a, first_b, add_special_tokens=True)
    layout = _locate(list(pair.ids), list(pair.type_ids), list(first_a.ids), list(first_b.ids))
    if layout is None:
        raise EngineError("the tokenizer's pair encoding does not contain both sequences")
    for enc_a, enc_b in encoded:
        expected = backend.post_process(enc_a, enc_b, add_special_tokens=True)
        ids = layout.ids(enc_a.ids, enc_b.ids)
        types = layout.types(len(enc_a.ids), len(enc_b.ids))
        if list(expected.ids) != ids or list(expected.type_ids) != types:
            raise EngineError(
                "the tokenizer's pair template is not fixed special tokens around the two "
                "sequences; this engine cannot assemble its pairs"
            )
    return layout


def _locate(ids: list[int], types: list[int], a: list[int], b: list[int]) -> PairLayout | None:
    for start_a in range(len(ids) - len(a) + 1):
        if ids[start_a : start_a + len(a)] != a:
            continue
        end_a = start_a + len(a)
        for start_b in range(len(ids) - len(b), end_a - 1, -1):
            if ids[start_b : start_b + len(b)] != b:
                continue
            end_b = start_b + len(b)
            return PairLayout(
                prefix=tuple(ids[:start_a]),
                middle=tuple(ids[end_a:start_b]),
                suffix=tuple(ids[end_b:]),
                prefix_types=tuple(types[:start_a]),
                middle_types=tuple(types[end_a:start_b]),
                suffix_types=tuple(types[end_b:]),
                a_type=types[start_a] if a else 0,
                b_type=types[start_b] if b else 0,
            )
    return None


def truncate_only_first(len_a: int, len_b: int, budget: int | None) -> int:
    """Text length after the pipeline's ``only_first`` truncation (the hypothesis is kept).

    ``budget`` is ``model_max_length`` minus the special tokens (None: no limit). The
    ``tokenizers`` rule cuts the text only if it is longer than what must go; otherwise it
    fails ("too short") and the pipeline tokenizes again without truncation.
    """
    if budget is None or len_a + len_b <= budget:
        return len_a
    remove = len_a + len_b - budget
    return len_a - remove if len_a > remove else len_a


@dataclass(frozen=True)
class Pairs:
    """Sentence pairs back to back: token ids, token types and the length of each pair."""

    ids: np.ndarray
    types: np.ndarray
    lengths: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def input_ids(self) -> list[list[int]]:
        bounds = np.cumsum(self.lengths)
        return [chunk.tolist() for chunk in np.split(self.ids, bounds[:-1])]

    @property
    def token_type_ids(self) -> list[list[int]]:
        bounds = np.cumsum(self.lengths)
        return [chunk.tolist() for chunk in np.split(self.types, bounds[:-1])]

    def take(self, rows: np.ndarray) -> Pairs:
        """The pairs ``rows`` (indices, any order), in that order."""
        offsets = np.zeros(self.rows + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        lengths = self.lengths[rows]
        new_starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        source = np.repeat(offsets[rows], lengths) + np.arange(int(lengths.sum())) - new_starts
        return Pairs(self.ids[source], self.types[source], lengths)

    def halves(self) -> tuple[Pairs, Pairs]:
        half = self.rows // 2
        return self.take(np.arange(half)), self.take(np.arange(half, self.rows))

    @staticmethod
    def concatenate(parts: Sequence[Pairs]) -> Pairs:
        return Pairs(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.types for p in parts]),
            np.concatenate([p.lengths for p in parts]),
        )


class HfForward(Protocol):
    """Runs one batch of pairs; returns (entailment, contradiction) logits, fp32, on device."""

    def __call__(self, pairs: Pairs) -> torch.Tensor: ...


# -- the engine ----------------------------------------------------------------------------


class HfNliEngine:
    """Zero-shot classification with any transformers NLI cross-encoder (padded batches)."""

    backend = "padded"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        max_batch_tokens: int,
        entailment_index: int | None = None,
        contradiction_index: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device
        config = model.config
        id2label = {int(k): str(v) for k, v in config.id2label.items()}
        self.entailment, self.contradiction = nli_columns(
            id2label, entailment_index, contradiction_index
        )
        positional = pipeline_contradiction(self.entailment, len(id2label))
        if positional != self.contradiction:
            log.warning(
                "%s: contradiction is column %d (%r) by id2label; transformers' zero-shot "
                "pipeline would take column %d (%r) by position, so multi-label scores differ "
                "from that pipeline's on this model",
                model_id,
                self.contradiction,
                id2label[self.contradiction],
                positional,
                id2label[positional],
            )
        # A private copy of the Rust tokenizer with no truncation or padding of its own:
        # texts and hypotheses are encoded alone and the pair assembled here.
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = bool(
            getattr(tokenizer, "split_special_tokens", False)
        )
        self.layout = pair_layout(self._backend)
        #: The longest pair the model can take (None: no absolute position limit).
        self.capacity = position_capacity(config)
        max_length = int(tokenizer.model_max_length)
        #: The truncation length: the tokenizer's model_max_length, as in the pipeline.
        #: None: neither it nor the model sets one, nothing is cut.
        self.max_length: int | None = max_length if max_length <= LARGE_INTEGER else None
        if self.max_length is None and self.capacity is not None:
            # The pipeline would not cut and the model would fail on a longer pair: cut to
            # what the model takes instead (same scores wherever the pipeline gives one).
            self.max_length = self.capacity
            log.warning(
                "%s: the tokenizer sets no model_max_length; texts are cut (only_first) to "
                "pairs of the model's %d positions",
                model_id,
                self.capacity,
            )
        self.truncation_side = str(getattr(tokenizer, "truncation_side", "right"))
        pad_id = tokenizer.pad_token_id
        if pad_id is None:  # the pipeline pads with the end-of-sequence token then
            pad_id = tokenizer.eos_token_id
        self.pad_id = int(pad_id if pad_id is not None else 0)
        self.uses_token_types = "token_type_ids" in tokenizer.model_input_names
        #: Called with the number of rows whenever a batch ran out of memory and was split.
        self.on_out_of_memory: Callable[[int], None] = lambda rows: None
        #: Token ids of each hypothesis (``template.format(label)``), bounded by bytes:
        #: a topic that accepts per-event labels can bring any number of them.
        self._hypotheses: ByteBoundedCache[np.ndarray] = ByteBoundedCache(
            HYPOTHESIS_CACHE_BYTES, lambda ids: int(ids.nbytes)
        )
        #: The model call; tests replace it to inject faults.
        self.forward: HfForward = self._make_forward()

    @classmethod
    def load(cls, config: EngineConfig, max_batch_tokens: int) -> HfNliEngine:
        model_dir = Path(config.model).expanduser()
        if not is_transformers_classifier(model_dir):
            raise EngineError(
                f"engine.model: {model_dir} does not hold a transformers sequence-"
                "classification checkpoint (config.json with architectures "
                "[...ForSequenceClassification])"
            )
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        model = load_hf_classifier(model_dir, device, dtype)
        with startup.step("tokenizer"):
            tokenizer = load_hf_tokenizer(model_dir)
        return cls(
            model,
            tokenizer,
            config.model,
            max_batch_tokens,
            entailment_index=config.entailment_index,
            contradiction_index=config.contradiction_index,
        )

    def _make_forward(self) -> HfForward:
        eos_head = type(self.model).__name__ in EOS_HEAD_MODELS
        eos_id = self.model.config.eos_token_id
        if eos_head and eos_id not in (
            *self.layout.prefix,
            *self.layout.middle,
            *self.layout.suffix,
        ):
            raise EngineError(
                f"{self.model_id}: the classifier reads the end-of-sequence token {eos_id}, "
                "which the tokenizer does not put around a pair"
            )
        return ModelCall(
            self.model,
            self.pad_id,
            self.uses_token_types,
            (self.entailment, self.contradiction),
            eos_head,
        )

    # -- CPU side --------------------------------------------------------------------------

    def _hypothesis_ids(self, hypothesis: str) -> np.ndarray:
        """Its token ids, all of them: only the text of a pair is ever cut."""
        ids = self._hypotheses.get(hypothesis)
        if ids is None:
            ids = _encode(self._backend, hypothesis)
            self._hypotheses.put(hypothesis, ids)
        return ids

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        return self._prepared(_encode(self._backend, text), labels, template, multi_label)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of the text's tokens, for cutting windows (engine/windows.py)."""
        encoded = self._backend.encode(text, add_special_tokens=False)
        return [(int(start), int(end)) for start, end in encoded.offsets]

    def text_budget(self, hypotheses: Sequence[str]) -> int | None:
        """Text tokens a pair keeps uncut beside the longest of ``hypotheses`` (only the
        text is ever cut); None where nothing is cut (no length limit at all)."""
        if self.max_length is None:
            return None
        longest = max((len(self._hypothesis_ids(h)) for h in hypotheses), default=0)
        return max(1, self.max_length - self.layout.special_tokens - longest)

    def prepare_many(self, tasks: Sequence[PrepareTask]) -> list[Prepared | Exception]:
        """Every (text, labels, template, multi_label): the texts tokenized in one Rust
        ``encode_batch`` call (the interpreter lock released for all of it), then each
        event's pairs; a failure of one event is returned in its place."""
        encoded = self._backend.encode_batch([task[0] for task in tasks], add_special_tokens=False)
        return prepare_each([e.ids for e in encoded], tasks, self._prepared)

    def _prepared(
        self,
        token_ids: Sequence[int] | np.ndarray,
        labels: Sequence[str],
        template: str,
        multi_label: bool,
    ) -> Prepared:
        text_ids = np.asarray(token_ids, dtype=np.int32)
        layout = self.layout
        budget = None if self.max_length is None else self.max_length - layout.special_tokens
        prefix, middle, suffix = (np.array(part, dtype=np.int32) for part in layout.parts)
        prefix_types, middle_types, suffix_types = (
            np.array(part, dtype=np.int32) for part in layout.part_types
        )
        ids: list[np.ndarray] = []
        types: list[np.ndarray] = []
        lengths: list[int] = []
        for label in labels:
            hyp_ids = self._hypothesis_ids(template.format(label))
            len_a = truncate_only_first(len(text_ids), len(hyp_ids), budget)
            if self.truncation_side == "right":
                kept = text_ids[:len_a]
            else:
                kept = text_ids[len(text_ids) - len_a :]
            length = len_a + len(hyp_ids) + layout.special_tokens
            if self.capacity is not None and length > self.capacity:
                raise EngineError(
                    f"the pair of label {label!r} is {length} tokens, more than the model's "
                    f"{self.capacity} positions: its hypothesis is too long for the text to be "
                    "cut (only the text is ever cut, as in the transformers pipeline)"
                )
            ids += [prefix, kept, middle, hyp_ids, suffix]
            types += [
                prefix_types,
                np.full(len_a, layout.a_type, dtype=np.int32),
                middle_types,
                np.full(len(hyp_ids), layout.b_type, dtype=np.int32),
                suffix_types,
            ]
            lengths.append(length)
        pairs = Pairs(
            np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32),
            np.concatenate(types) if types else np.zeros(0, dtype=np.int32),
            np.array(lengths, dtype=np.int32),
        )
        tokens = sum(round_up(n) for n in lengths)
        return Prepared(tuple(labels), multi_label, tokens, pairs)

    # -- model side ------------------------------------------------------------------------

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        return self.classify_async(batch).result()

    def classify_async(self, batch: Sequence[Prepared], hold_tail: bool = False) -> PendingScores:
        """Queue every batch on the device and return at once; ``result()`` waits.

        Padded batches are sorted by length, so no pass is held back (``hold_tail`` is
        accepted and has no effect; :meth:`flush` has nothing to do)."""
        items = tuple(batch)
        if not items:
            return PendingScores(items, None, pipeline_score)
        everything = Pairs.concatenate([_pairs(item) for item in items])
        return PendingScores(items, self._launch(everything), pipeline_score)

    def flush(self) -> None:
        return None

    def logits(self, pairs: Pairs) -> np.ndarray:
        """(entailment, contradiction) logits in fp32 for every pair, in input order."""
        return self._launch(pairs).wait()

    def _launch(self, pairs: Pairs) -> PendingLogits:
        plan = padded_plan(pairs.lengths, self.max_batch_tokens, self.device)
        outputs: list[torch.Tensor] = []
        for rows in plan:
            self._run(pairs.take(rows), outputs)
        return PendingLogits.of(torch.cat(outputs), np.concatenate(plan))

    def _run(self, batch: Pairs, outputs: list[torch.Tensor]) -> None:
        run_halving_on_oom(
            batch, lambda b: self.forward(b), outputs, self.device, self.on_out_of_memory
        )

    def warmup(self) -> None:
        """Run the largest batch the budget allows (and a short one) before consuming."""
        longest = self.max_length or self.capacity or MAX_PAIR_TOKENS
        if self.capacity is not None:
            longest = min(longest, self.capacity)
        filler = self.tokenizer.unk_token_id
        filler = self.pad_id if filler is None else int(filler)
        body = max(1, longest - self.layout.special_tokens - 1)
        shapes = [
            (1 if self.device.type == "cpu" else max(1, self.max_batch_tokens // longest), body)
        ]
        if self.device.type != "cpu":
            shapes.append(
                (max(1, self.max_batch_tokens // 64), 64 - self.layout.special_tokens - 1)
            )
        for count, length in shapes:
            ids = self.layout.ids([filler] * length, [filler])
            types = self.layout.types(length, 1)
            self.logits(
                Pairs(
                    np.tile(np.array(ids, dtype=np.int32), count),
                    np.tile(np.array(types, dtype=np.int32), count),
                    np.full(count, len(ids), dtype=np.int32),
                )
            )


def pipeline_score(labels: tuple[str, ...], logits: np.ndarray, multi_label: bool) -> Scores:
    """The zero-shot pipeline's postprocess on (entailment, contradiction) logits.

    Its own arithmetic (``exp(x) / sum(exp(x))`` on float32, no max subtracted) and its
    order (``argsort`` reversed: the later of two equal scores first), so that labels whose
    float32 scores tie come out in the pipeline's order. Logits large enough to overflow
    that formula (the pipeline would return NaN) take the max-subtracted softmax instead.
    """
    values = logits.astype(np.float32)
    if multi_label or len(labels) == 1:
        chosen = values[:, [1, 0]]  # (contradiction, entailment) per label
        axis = -1
    else:
        chosen = values[:, 0]  # entailment, across the labels
        axis = 0
    with np.errstate(over="ignore", invalid="ignore"):
        exp = np.exp(chosen)
        probabilities = exp / exp.sum(axis, keepdims=True)
    if not np.all(np.isfinite(probabilities)):
        exp = np.exp(chosen - chosen.max(axis, keepdims=True))
        probabilities = exp / exp.sum(axis, keepdims=True)
    if probabilities.ndim == 2:
        probabilities = probabilities[:, 1]
    order = list(reversed(probabilities.argsort()))
    return Scores(
        labels=tuple(labels[i] for i in order),
        scores=tuple(float(probabilities[i]) for i in order),
    )


def _encode(backend: Any, text: str) -> np.ndarray:
    return np.array(backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def _pairs(item: Prepared) -> Pairs:
    if not isinstance(item.payload, Pairs):
        raise EngineError("request was prepared by another engine")
    return item.payload


def position_capacity(config: Any) -> int | None:
    """The longest input the model's position embeddings allow (None: relative only)."""
    if getattr(config, "position_biased_input", True) is False:
        return None  # DeBERTa-v2/v3: relative positions only
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if config.model_type in PADDING_OFFSET_POSITIONS:
        return limit - int(config.pad_token_id) - 1
    return limit


@dataclass(frozen=True)
class ModelCall:
    """The model on one right-padded batch, fed as the pipeline feeds it.

    The inputs are the tokenizer's ``model_input_names`` (token types only where it makes
    them); the result is the (entailment, contradiction) logits in fp32, left on the device.
    Holds no reference to the engine, so a dropped engine is freed at once.
    """

    model: Any
    pad_id: int
    uses_token_types: bool
    columns: tuple[int, int]
    #: BART-like: the classifier reads the last end-of-sequence token of each row.
    eos_head: bool

    def __call__(self, pairs: Pairs) -> torch.Tensor:
        inputs = self.inputs(pairs)
        logits = self._eos_head(inputs) if self.eos_head else self.model(**inputs).logits
        return logits[:, list(self.columns)].float()

    def inputs(self, pairs: Pairs) -> dict[str, torch.Tensor]:
        """Token ids, attention mask (and token types), padded to the longest pair."""
        width = round_up(int(pairs.lengths.max()))
        rows = np.repeat(np.arange(pairs.rows), pairs.lengths)
        starts = np.repeat(np.cumsum(pairs.lengths) - pairs.lengths, pairs.lengths)
        columns = np.arange(int(pairs.lengths.sum())) - starts
        stacked = np.zeros((3, pairs.rows, width), dtype=np.int64)
        stacked[0].fill(self.pad_id)
        stacked[0, rows, columns] = pairs.ids
        stacked[1, rows, columns] = 1
        stacked[2, rows, columns] = pairs.types
        on_device = to_device(stacked, next(self.model.parameters()).device)
        inputs = {"input_ids": on_device[0], "attention_mask": on_device[1]}
        if self.uses_token_types:
            inputs["token_type_ids"] = on_device[2]
        return inputs

    def _eos_head(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """BART's classifier head on each row's last ``</s>``.

        ``BartForSequenceClassification`` does the same but refuses a batch whose rows
        hold different numbers of ``</s>`` (a text containing the literal ``</s>``); the
        pipeline scores one pair at a time, so it never meets that. Every pair holds the
        layout's own ``</s>`` (checked at load), so each row has one to read.
        """
        hidden: torch.Tensor = self.model.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            use_cache=False,
        )[0]
        eos = inputs["input_ids"].eq(self.model.config.eos_token_id)
        positions = torch.arange(eos.shape[1], device=eos.device).expand_as(eos)
        last = torch.where(eos, positions, -1).amax(dim=1)
        sentence = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits: torch.Tensor = self.model.classification_head(sentence)
        return logits


# -- loading -------------------------------------------------------------------------------


def load_hf_classifier(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """``AutoModelForSequenceClassification`` from a local directory, in eval mode."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with startup.step("weights_read"):
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), dtype=dtype, local_files_only=True
            )
    except Exception as exc:  # noqa: BLE001 - any load failure means the same thing here
        raise EngineError(
            f"{model_dir}: cannot load a transformers sequence classifier "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    module: torch.nn.Module = model
    with startup.step("to_device"):
        module.to(device=device)
    module.train(False)
    return model


def load_hf_tokenizer(model_dir: Path) -> Any:
    """The directory's tokenizer through ``AutoTokenizer`` (what the pipeline loads)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure means the same thing here
        raise EngineError(
            f"{model_dir}: cannot load its tokenizer ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise EngineError(f"{model_dir}: the tokenizer has no tokenizers (Rust) backend")
    return tokenizer
