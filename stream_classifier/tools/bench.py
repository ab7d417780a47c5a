"""``stream-classifier bench``: our engine against the Hugging Face pipeline, same events.

Builds a random-weight StructBERT of a chosen shape (a generated 21128-token Chinese
vocabulary, saved like a ModelScope checkpoint and loaded through the engine's own loading
code) and the reference workload (docs/PERFORMANCE.md): Chinese-character texts with lognormal
lengths (median 60 tokens, sigma 0.7, clipped to 8..480), the template
``这篇文章的标题是{}``, labels of 2 to 5 characters. In one process it runs the Hugging
Face ``zero-shot-classification`` pipeline (fp16, ``batch_size=64`` on a GPU; fp32 on a
CPU) and our engine on the same events and prints one table: msgs/s, pairs/s, MFU against
a matrix-product peak measured here, peak GPU memory, speed-up, and the largest score
difference between the two.

The speed-up is only as good as the baseline's sample: the HF pipeline's rate moved between
68 and 181 msgs/s across runs of 500 messages (docs/PERFORMANCE.md). So by default the
pipeline is warmed up (:data:`BASELINE_WARMUP_MESSAGES`, not timed) and then timed on
:data:`MIN_BASELINE_MESSAGES` messages, or on all of ours where we run fewer; the table
gives every ratio with that sample size and marks one from a smaller sample as not to
quote.

``arch="deberta-v3"`` (``--arch deberta-v3``) runs the same workload on a random-weight
DeBERTa-v3 of the shape instead (``DebertaV2ForSequenceClassification``, relative attention
with 256 position buckets as in ``microsoft/deberta-v3-large``, a Unigram tokenizer over the
benchmark's characters built here), saved as a transformers checkpoint and loaded through
``load_engine``, so the :mod:`stream_classifier.engine.hf_nli` engine runs against the HF
pipeline on that same directory. Its FLOPs count DeBERTa's disentangled attention
(:meth:`Shape.flops`).

Needs only torch, transformers, numpy and the project's config module (no Kafka client).
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import platform
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch

from stream_classifier import startup
from stream_classifier.config import EngineConfig
from stream_classifier.engine import load_engine
from stream_classifier.engine.base import Engine, Prepared, Scores
from stream_classifier.engine.hf_nli import HfNliEngine, load_hf_classifier, load_hf_tokenizer
from stream_classifier.engine.nli import (
    UNUSED_CHECKPOINT_KEYS,
    Backend,
    NliEngine,
    load_state_dict,
    tokenizer_options,
)
from stream_classifier.preparing import prepare_all
from stream_classifier.startup import StartupClock, engine_summary

TEMPLATE = "这篇文章的标题是{}"
VOCAB_SIZE = 21128
CJK_FIRST = 0x4E00
#: Characters texts and labels are drawn from (all single tokens of the vocabulary).
TEXT_CHARS = 6000
MEDIAN_TOKENS = 60
SIGMA = 0.7
MIN_TOKENS, MAX_TOKENS = 8, 480
ID2LABEL = {0: "entailment", 1: "neutral", 2: "contradiction"}
#: The HF pipeline is timed on at least this many messages (or on all of ours where we run
#: fewer) for a speed-up worth quoting.
MIN_BASELINE_MESSAGES = 8000
#: Messages the HF pipeline runs before it is timed (cuBLAS handles and kernel choices,
#: the allocator's cache, the tokenizer's first calls).
BASELINE_WARMUP_MESSAGES = 512

Arch = Literal["structbert", "deberta-v3"]
ARCHS: tuple[Arch, ...] = ("structbert", "deberta-v3")
#: microsoft/deberta-v3-large's relative attention: 256 position buckets (2 x 256 relative
#: embeddings), no absolute positions, and its 128100-token vocabulary (tiny: the tokenizer's).
DEBERTA_POSITION_BUCKETS = 256
DEBERTA_VOCAB_SIZE = 128100
DEBERTA_MAX_LENGTH = 512


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    #: DeBERTa's relative attention span k (``position_buckets``); 0: absolute positions.
    position_buckets: int = 0

    @property
    def weights(self) -> int:
        """Non-embedding matrix weights (what the reference FLOP count F(L) counts)."""
        return self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)

    def flops(self, length: int) -> float:
        """Forward FLOPs of one pair of L = ``length`` tokens: matrices plus attention.

        BERT (docs/PERFORMANCE.md): ``F(L) = L * (2 W + 4 n d L)`` with W the non-embedding
        weights, n layers, d hidden: 2 FLOPs per weight per token, and per layer Q K^T and
        (attention) V, two L x L x d products of 2 L^2 d FLOPs each.

        DeBERTa (``position_buckets`` k > 0) adds, per layer, the disentangled attention
        of transformers' ``DisentangledSelfAttention``: the 2k relative embeddings are
        projected by the layer's own query and key matrices (``share_att_key``), then
        content-to-position ``c2p = Q_c K_r^T`` and position-to-content
        ``p2c = K_c Q_r^T``, each an (L x d) by (d x 2k) product over all heads (the
        model computes all 2k columns for every L, then gathers), 2 L (2k) d FLOPs each:
        ``F(L) = L * (2 W + 4 n d L + 8 n d k)``. Not counted: the projection of the 2k
        relative embeddings (2 x 2k x d^2 per layer, once per batch whatever its rows:
        0.1% of a 64k-token batch, 2% of a 64-pair pipeline batch), softmax, norms, the
        gathers and the classifier head (as for BERT).
        """
        per_token = 2 * self.weights + 4 * self.layers * self.hidden * length
        per_token += 8 * self.layers * self.hidden * self.position_buckets
        return float(length * per_token)


SHAPES = {
    "tiny": Shape(layers=4, hidden=312, heads=12, intermediate=1248),
    "base": Shape(layers=12, hidden=768, heads=12, intermediate=3072),
    "large": Shape(layers=24, hidden=1024, heads=16, intermediate=4096),
}


#: The engine a bench runs: StructBERT's (:mod:`stream_classifier.engine.nli`) or any HF NLI
#: model's.
BenchEngine = NliEngine | HfNliEngine


class Pending(Protocol):
    def result(self) -> list[Scores]: ...


@dataclass(frozen=True)
class Event:
    text: str
    labels: tuple[str, ...]


@dataclass
class Result:
    """One row of the table."""

    method: str
    labels: int
    messages: int
    seconds: float
    pairs: int
    flops: float
    peak_memory_gb: float | None
    msgs_per_s: float = 0.0
    pairs_per_s: float = 0.0
    mfu: float = 0.0
    speedup: float = 1.0
    max_score_diff: float | None = None
    max_diff_vs_fp32: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def finish(self, peak_flops: float) -> Result:
        self.msgs_per_s = self.messages / self.seconds
        self.pairs_per_s = self.pairs / self.seconds
        self.mfu = self.flops / self.seconds / peak_flops
        return self


@dataclass(frozen=True)
class BenchOptions:
    shape: str = "tiny"
    arch: Arch = "structbert"
    messages: int = 2000
    baseline_messages: int | None = None
    labels: tuple[int, ...] = (4, 10)
    device: str = "auto"
    max_batch_tokens: int = 65536
    batch_messages: int = 1024
    multi_label: bool = False
    backend: Backend = "auto"
    cuda_graphs: bool = True
    reference_messages: int = 200
    seed: int = 0


# -- the model and the workload ------------------------------------------------------------


def vocabulary() -> list[str]:
    """A BERT-Chinese-like vocabulary of 21128 entries: specials, CJK, ``##`` pieces."""
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
    specials += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(CJK_FIRST + i) for i in range(VOCAB_SIZE - len(specials))]
    pieces = specials + chars
    return pieces[:VOCAB_SIZE]


def build_model_dir(shape: Shape, directory: Path, seed: int) -> Path:
    """Save a random-weight StructBERT zero-shot checkpoint (ModelScope layout)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=512,
        type_vocab_size=2,
        num_labels=3,
        id2label=ID2LABEL,
        label2id={name: index for index, name in ID2LABEL.items()},
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # spread the scores so that a difference would show
        model.classifier.weight.normal_(0.0, 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    saved = config.to_dict()
    saved["model_type"] = "structbert"
    (directory / "config.json").write_text(json.dumps(saved, indent=1), encoding="utf-8")
    (directory / "vocab.txt").write_text("\n".join(vocabulary()) + "\n", encoding="utf-8")
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def deberta_pieces() -> list[str]:
    """A DeBERTa-v3-like Unigram vocabulary: its specials, then every character the
    workload uses (template included) and printable ASCII, each a piece of its own."""
    pieces = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", "\u2581"]
    chars = [chr(c) for c in range(0x21, 0x7F)]
    chars += [chr(CJK_FIRST + i) for i in range(TEXT_CHARS)]
    chars += [c for c in TEMPLATE.replace("{}", "") if c not in chars]
    return pieces + list(dict.fromkeys(chars))


def write_deberta_tokenizer(directory: Path) -> int:
    """Save a DeBERTa-v2/v3 tokenizer (``tokenizer.json`` + config), built offline.

    Like DeBERTa-v3's SentencePiece ``spm.model`` as converted by transformers: a Unigram
    model, whitespace normalised, a Metaspace pre-tokenizer, ``[CLS] A [SEP] B [SEP]``
    with token types 0 / 1. Returns its vocabulary size.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces = deberta_pieces()
    vocab = [
        (piece, 0.0 if i < 5 else (-2.0 if i == 5 else -10.0)) for i, piece in enumerate(pieces)
    ]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
            normalizers.NFKC(),
            normalizers.Strip(left=False, right=True),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="always", split=True
    )
    tokenizer.decoder = decoders.Metaspace(
        replacement="\u2581", prepend_scheme="always", split=True
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    tokenizer.add_special_tokens(pieces[:5])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {
        "tokenizer_class": "DebertaV2Tokenizer",
        "bos_token": "[CLS]",
        "cls_token": "[CLS]",
        "eos_token": "[SEP]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
        "do_lower_case": False,
        "split_by_punct": False,
        "model_max_length": DEBERTA_MAX_LENGTH,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=1), "utf-8")
    return len(pieces)


def build_deberta_dir(
    shape: Shape, directory: Path, seed: int, vocab_size: int | None = DEBERTA_VOCAB_SIZE
) -> Path:
    """Save a random-weight DeBERTa-v3 NLI checkpoint of ``shape`` (transformers layout).

    microsoft/deberta-v3-large's config apart from the shape: relative attention only
    (``position_buckets``, ``pos_att_type`` c2p and p2c, shared keys, no absolute
    positions, no token types); 3 NLI labels. ``vocab_size`` None: the tokenizer's.
    """
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    pieces = write_deberta_tokenizer(directory)
    config = DebertaV2Config(  # type: ignore[call-arg]
        vocab_size=vocab_size or pieces,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        hidden_act="gelu",
        max_position_embeddings=DEBERTA_MAX_LENGTH,
        type_vocab_size=0,
        relative_attention=True,
        position_buckets=shape.position_buckets or DEBERTA_POSITION_BUCKETS,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        layer_norm_eps=1e-7,
        pooler_hidden_size=shape.hidden,
        pooler_hidden_act="gelu",
        pad_token_id=0,
        num_labels=3,
        id2label=ID2LABEL,
        label2id={name: index for index, name in ID2LABEL.items()},
    )
    torch.manual_seed(seed)
    model = DebertaV2ForSequenceClassification(config)
    with torch.no_grad():  # spread the scores so that a difference would show
        model.classifier.weight.normal_(0.0, 0.1)
    model.save_pretrained(str(directory))
    return directory


def shape_of(options: BenchOptions) -> Shape:
    shape = SHAPES[options.shape]
    if options.arch == "deberta-v3":
        return replace(shape, position_buckets=DEBERTA_POSITION_BUCKETS)
    return shape


def make_events(count: int, labels: int, seed: int) -> list[Event]:
    """The reference workload (docs/PERFORMANCE.md); one topic, so every message carries the
    same label set."""
    rng = np.random.default_rng(seed)
    pool = np.array([chr(CJK_FIRST + i) for i in range(TEXT_CHARS)])
    lengths = rng.lognormal(math.log(MEDIAN_TOKENS), SIGMA, size=count)
    lengths = np.clip(np.rint(lengths), MIN_TOKENS, MAX_TOKENS).astype(int)
    names: list[str] = []
    while len(names) < labels:
        name = "".join(rng.choice(pool, size=int(rng.integers(2, 6))))
        if name not in names:
            names.append(name)
    return [Event("".join(rng.choice(pool, size=int(n))), tuple(names)) for n in lengths]


# -- measuring -----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large dense matrix product: 8192³ fp16 on a GPU, 2048³ fp32 on a CPU."""
    size, dtype, repeats = (
        (8192, torch.float16, 10) if device.type == "cuda" else (2048, torch.float32, 5)
    )
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    return 2.0 * size**3 / min(times)  # the best run: a peak, not a typical product


def reset_memory(device: torch.device) -> float:
    """Free what can be freed, restart the peak count; returns the GB still allocated."""
    gc.collect()
    if device.type != "cuda":
        return 0.0
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 1e9


def peak_memory_gb(device: torch.device, others_gb: float = 0.0) -> float | None:
    """Peak allocated GPU memory, less ``others_gb`` held by things not being measured."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9 - others_gb


def weights_gb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9


def run_baseline(
    model_dir: Path,
    events: Sequence[Event],
    device: torch.device,
    multi_label: bool,
    arch: Arch = "structbert",
) -> tuple[list[dict[str, float]], float, float | None]:
    """The Hugging Face pipeline: fp16, batch_size=64 on a GPU; fp32, batch 1 on a CPU.

    Warmed up on the first :data:`BASELINE_WARMUP_MESSAGES` events (untimed), then timed on
    all of ``events``."""
    from transformers import pipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    others = reset_memory(device)  # the baseline's own model counts, nothing else does
    if arch == "deberta-v3":  # the checkpoint as AutoModel/AutoTokenizer load it
        model, tokenizer = (
            load_hf_classifier(model_dir, device, dtype),
            load_hf_tokenizer(model_dir),
        )
    else:
        model, tokenizer = transformers_bert(model_dir, device, dtype)
    classifier = pipeline(
        "zero-shot-classification",
        model=model,
        tokenizer=tokenizer,
        device=device,
        batch_size=64 if device.type == "cuda" else 1,
    )
    texts = [event.text for event in events]
    kwargs = {"hypothesis_template": TEMPLATE, "multi_label": multi_label}
    classifier(texts[:BASELINE_WARMUP_MESSAGES], candidate_labels=list(events[0].labels), **kwargs)
    synchronize(device)
    start = time.perf_counter()
    outputs = classifier(texts, candidate_labels=list(events[0].labels), **kwargs)
    synchronize(device)
    seconds = time.perf_counter() - start
    memory = peak_memory_gb(device, others)
    del classifier, model
    scores = [dict(zip(o["labels"], o["scores"], strict=True)) for o in outputs]
    return scores, seconds, memory


def micro_batches(
    engine: BenchEngine, events: Sequence[Event], size: int, multi_label: bool
) -> Iterator[list[Prepared]]:
    """Each chunk prepared as the service prepares what one consume() returned (public: the
    scripts in benchmarks/ measure the engine on the same micro-batches)."""
    for start in range(0, len(events), size):
        tasks = [(e.text, e.labels, TEMPLATE, multi_label) for e in events[start : start + size]]
        prepared = prepare_all(engine, tasks)
        failed = [result for result in prepared if isinstance(result, Exception)]
        if failed:
            raise failed[0]
        yield cast(list[Prepared], prepared)


def run_ours(
    engine: BenchEngine, events: Sequence[Event], batch_messages: int, multi_label: bool
) -> tuple[list[Scores], float]:
    """Texts to scores, pipelined: a thread tokenizes micro-batch k+2 while k+1 is queued
    on the device behind k, whose scores are read back meanwhile."""
    prepared: queue.Queue[list[Prepared] | None] = queue.Queue(maxsize=2)

    def produce() -> None:
        for chunk in micro_batches(engine, events, batch_messages, multi_label):
            prepared.put(chunk)
        prepared.put(None)

    start = time.perf_counter()
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    scores = run_two_deep(engine, iter(prepared.get, None))
    producer.join()
    return scores, time.perf_counter() - start


def run_prepared(
    engine: BenchEngine, chunks: Sequence[list[Prepared]]
) -> tuple[list[Scores], float]:
    """The model side alone: already tokenized micro-batches, queued two deep."""
    start = time.perf_counter()
    scores = run_two_deep(engine, chunks)
    return scores, time.perf_counter() - start


def run_two_deep(engine: BenchEngine, chunks: Iterable[list[Prepared]]) -> list[Scores]:
    """Each micro-batch queued behind the one still running, whose scores are read back
    meanwhile; as in the service, a micro-batch queued behind another may hold its last,
    partial pass back for the next one's first pairs (``hold_tail``)."""
    scores: list[Scores] = []
    pending: Pending | None = None
    for chunk in chunks:
        queued = engine.classify_async(chunk, hold_tail=pending is not None)
        if pending is not None:
            scores.extend(pending.result())
        pending = queued
    engine.flush()
    if pending is not None:
        scores.extend(pending.result())
    return scores


def max_difference(ours: Sequence[Scores], theirs: Sequence[dict[str, float]]) -> float:
    worst = 0.0
    for mine, other in zip(ours, theirs, strict=False):
        for label, value in zip(mine.labels, mine.scores, strict=True):
            worst = max(worst, abs(value - other[label]))
    return worst


def as_dicts(scores: Sequence[Scores]) -> list[dict[str, float]]:
    return [dict(zip(s.labels, s.scores, strict=True)) for s in scores]


def pair_lengths(engine: BenchEngine, events: Sequence[Event]) -> list[int]:
    lengths: list[int] = []
    for event in events:
        pairs = engine.prepare(event.text, event.labels, TEMPLATE, False).payload
        lengths.extend(int(n) for n in getattr(pairs, "lengths"))  # noqa: B009
    return lengths


# -- one bench -----------------------------------------------------------------------------


@dataclass
class Context:
    options: BenchOptions
    shape: Shape
    model_dir: Path
    device: torch.device
    peak_flops: float
    engine: BenchEngine
    warmup_s: float


def bench_labels(context: Context, labels: int) -> list[Result]:
    """Baseline and ours for one label count, on the same events."""
    options, device, engine = context.options, context.device, context.engine
    events = make_events(options.messages, labels, options.seed + labels)
    baseline_count = baseline_messages(options)
    lengths = pair_lengths(engine, events)
    per_message = labels

    theirs, base_s, base_memory = run_baseline(
        context.model_dir, events[:baseline_count], device, options.multi_label, options.arch
    )
    base_pairs = lengths[: baseline_count * per_message]
    baseline = Result(
        method=_baseline_name(device),
        labels=labels,
        messages=baseline_count,
        seconds=base_s,
        pairs=len(base_pairs),
        flops=sum(context.shape.flops(n) for n in base_pairs),
        peak_memory_gb=base_memory,
        extra={"warmup_messages": float(min(BASELINE_WARMUP_MESSAGES, baseline_count))},
    ).finish(context.peak_flops)

    flops = sum(context.shape.flops(n) for n in lengths)
    others = reset_memory(device) - weights_gb(engine.model)
    scores, ours_s = run_ours(engine, events, options.batch_messages, options.multi_label)
    ours = _our_result(context, "", labels, ours_s, len(events), lengths, flops, others)
    ours.speedup = ours.msgs_per_s / baseline.msgs_per_s
    ours.extra["baseline_messages"] = float(baseline_count)
    ours.max_score_diff = max_difference(scores, theirs)
    _compare_with_fp32(context, events, scores, theirs, baseline, ours)

    chunks = list(micro_batches(engine, events, options.batch_messages, options.multi_label))
    others = reset_memory(device) - weights_gb(engine.model)
    _, model_s = run_prepared(engine, chunks)
    model_only = _our_result(
        context, ", pre-tokenized", labels, model_s, len(events), lengths, flops, others
    )
    model_only.speedup = model_only.msgs_per_s / baseline.msgs_per_s
    model_only.extra["baseline_messages"] = float(baseline_count)
    return [baseline, ours, model_only]


def baseline_messages(options: BenchOptions) -> int:
    """How many events the HF pipeline is timed on: ``baseline_messages`` where given,
    else :data:`MIN_BASELINE_MESSAGES`; never more than ours."""
    return min(options.baseline_messages or MIN_BASELINE_MESSAGES, options.messages)


def quotable(baseline_count: int, our_messages: int) -> bool:
    """Whether a speed-up over a baseline of ``baseline_count`` messages may be quoted: it
    ran on at least :data:`MIN_BASELINE_MESSAGES`, or on every message we ran."""
    return baseline_count >= min(MIN_BASELINE_MESSAGES, our_messages)


def _our_result(
    context: Context,
    note: str,
    labels: int,
    seconds: float,
    messages: int,
    lengths: list[int],
    flops: float,
    others_gb: float,
) -> Result:
    engine = context.engine
    return Result(
        method=f"stream-classifier ({engine.backend}, {_dtype_name(engine)}{note})",
        labels=labels,
        messages=messages,
        seconds=seconds,
        pairs=len(lengths),
        flops=flops,
        peak_memory_gb=peak_memory_gb(context.device, others_gb),
        extra={"warmup_s": context.warmup_s, "weights_gb": weights_gb(engine.model)},
    ).finish(context.peak_flops)


def _compare_with_fp32(
    context: Context,
    events: Sequence[Event],
    ours: Sequence[Scores],
    theirs: Sequence[dict[str, float]],
    baseline: Result,
    result: Result,
) -> None:
    """Both against the same model in fp32 (the fidelity bar), on the first events."""
    options = context.options
    if context.device.type != "cuda" or options.reference_messages <= 0:
        return
    fp32 = EngineConfig(model=str(context.model_dir), device=options.device, dtype="float32")
    engine: Engine
    if options.arch == "deberta-v3":
        engine = load_engine(fp32, options.max_batch_tokens)
    else:
        engine = NliEngine.load(fp32, options.max_batch_tokens, backend="padded")
    count = min(options.reference_messages, len(events))
    prepared = [
        engine.prepare(e.text, e.labels, TEMPLATE, options.multi_label) for e in events[:count]
    ]
    reference = engine.classify(prepared)
    del engine, prepared
    result.max_diff_vs_fp32 = max_difference(reference, as_dicts(ours[:count]))
    baseline.max_diff_vs_fp32 = max_difference(reference, theirs[:count])


def _baseline_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "HF pipeline (fp16, batch_size=64)"
    return "HF pipeline (fp32, default batch)"


def _dtype_name(engine: BenchEngine) -> str:
    return str(next(engine.model.parameters()).dtype).removeprefix("torch.")


def prepare_context(
    options: BenchOptions, directory: Path, clock: StartupClock | None = None
) -> Context:
    """The model built and loaded, then warmed up, as ``run`` does: each step timed on
    ``clock`` (the engine's loaders report their own steps to it)."""
    clock = clock or StartupClock()
    with clock.active():
        with clock.step("model_setup"):
            shape, model_dir, engine = _load(options, directory)
        device = engine.device
        start = time.perf_counter()
        with clock.step("warmup"):
            engine.warmup()
            synchronize(device)
        warmup_s = time.perf_counter() - start
    peak = matmul_peak(device)
    return Context(options, shape, model_dir, device, peak, engine, warmup_s)


def _load(options: BenchOptions, directory: Path) -> tuple[Shape, Path, BenchEngine]:
    """The random model written to ``directory`` and loaded as the service loads it."""
    shape = shape_of(options)
    engine: BenchEngine
    if options.arch == "deberta-v3":
        if options.backend not in ("auto", "padded"):
            raise ValueError("the DeBERTa engine (engine/hf_nli.py) has only padded batches")
        vocab = None if options.shape == "tiny" else DEBERTA_VOCAB_SIZE
        with startup.step("random_model"):  # bench's own: written before it is loaded
            model_dir = build_deberta_dir(
                shape, directory / f"deberta-v3-{options.shape}", options.seed, vocab
            )
        config = EngineConfig(model=str(model_dir), device=options.device)
        loaded = load_engine(config, options.max_batch_tokens)  # what the service runs
        if not isinstance(loaded, HfNliEngine):
            raise TypeError(f"load_engine gave {type(loaded).__name__}, not HfNliEngine")
        engine = loaded
    else:
        with startup.step("random_model"):
            model_dir = build_model_dir(
                shape, directory / f"structbert-{options.shape}", options.seed
            )
        config = EngineConfig(
            model=str(model_dir), device=options.device, cuda_graphs=options.cuda_graphs
        )
        engine = NliEngine.load(config, options.max_batch_tokens, backend=options.backend)
    return shape, model_dir, engine


def run_bench(options: BenchOptions, clock: StartupClock | None = None) -> dict[str, Any]:
    """Run every label count; the report as a JSON-ready dict, with the start-up steps
    (``startup``: seconds per step, those inside another taken out of it)."""
    clock = clock or StartupClock()
    with tempfile.TemporaryDirectory(prefix="stream-classifier-bench-") as tmp:
        context = prepare_context(options, Path(tmp), clock)
        results = [row for n in options.labels for row in bench_labels(context, n)]
    return {
        "options": asdict(options),
        "environment": environment(context.device),
        "peak_tflops": context.peak_flops / 1e12,
        "startup": dict(clock.steps),
        "results": [asdict(row) for row in results],
    }


def transformers_bert(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """A StructBERT/BERT directory as transformers' ``BertForSequenceClassification`` and
    ``BertTokenizer``: what its zero-shot pipeline (the baseline) takes. The engine itself
    loads the same weights into its own encoder (``engine/bert.py``)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    raw.pop("model_type", None)
    config = BertConfig(**raw)
    config._attn_implementation = "sdpa"
    model = BertForSequenceClassification(config)
    state = load_state_dict(model_dir)
    for key in UNUSED_CHECKPOINT_KEYS:
        state.pop(key, None)
    model.load_state_dict(state, strict=True)
    module: torch.nn.Module = model
    module.to(device=device, dtype=dtype).train(False)
    tokenizer = BertTokenizer(vocab=str(model_dir / "vocab.txt"), **tokenizer_options(model_dir))
    return model, tokenizer


def environment(device: torch.device) -> dict[str, str]:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": name or platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def format_table(report: dict[str, Any]) -> str:
    header = (
        "| method | labels | msgs | msgs/s | pairs/s | MFU | peak GPU GB | speed-up "
        "| max abs score diff vs HF | vs fp32 |"
    )
    lines = [
        f"{report['environment']['device']}, peak {report['peak_tflops']:.2f} TFLOP/s "
        f"(measured), {report['options'].get('arch', 'structbert')} "
        f"shape {report['options']['shape']}",
        header,
        "|" + " --- |" * 10,
    ]
    small: set[int] = set()
    for row in report["results"]:
        memory = "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f}"
        diff = "-" if row["max_score_diff"] is None else f"{row['max_score_diff']:.1e}"
        ref = "-" if row["max_diff_vs_fp32"] is None else f"{row['max_diff_vs_fp32']:.1e}"
        speedup = f"{row['speedup']:.1f}x"
        sample = row.get("extra", {}).get("baseline_messages")
        if sample is not None:
            speedup += f" (HF: {int(sample):,} msgs)"
            if not quotable(int(sample), int(row["messages"])):
                speedup += " *"
                small.add(int(sample))
        lines.append(
            f"| {row['method']} | {row['labels']} | {row['messages']} "
            f"| {row['msgs_per_s']:,.1f} | {row['pairs_per_s']:,.0f} | {row['mfu']:.3f} "
            f"| {memory} | {speedup} | {diff} | {ref} |"
        )
    if small:
        lines.append(
            f"* the HF pipeline ran on {', '.join(f'{n:,}' for n in sorted(small))} messages, "
            f"fewer than {MIN_BASELINE_MESSAGES:,} and fewer than ours: do not quote that ratio"
        )
    if "startup" in report:
        lines.append(f"start-up (seconds): {engine_summary(report['startup'])}")
    return "\n".join(lines)


def main(options: BenchOptions, json_path: str | None, clock: StartupClock | None = None) -> int:
    report = run_bench(options, clock)
    print(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0
