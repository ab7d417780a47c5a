"""``stream-classifier plan``: how many GPU replicas a target event rate needs.

From a sample of events, the labels and the hypothesis template it counts the tokens each
event puts through the encoder (one pair ``[CLS] text [SEP] hypothesis [SEP]`` per label,
cut to the model's pair length as the engine cuts it), turns them into FLOPs and divides
what a GPU does per second by them:

    F(L)               = L * (2 * W + 4 * n * d * L)    FLOPs of one pair of L tokens
    W                  = n * (4 * d^2 + 2 * d * i)       matrix weights: n layers, hidden d,
                                                         intermediate i
    FLOPs per event    = sum of F(L) over the event's pairs, averaged over the sample
    msgs/s per replica = peak fp16 * efficiency / FLOPs per event
    replicas           = ceil(target rate / (0.70 * msgs/s per replica))

``2 * W`` per token: every matrix weight is multiplied and added once; ``4 * n * d * L``
per token: in each layer Q K^T and attention times V, each L x d multiply-adds per token.
The same count as ``bench`` (``bench.Shape.flops``, docs/PERFORMANCE.md), so that a
measured rate turns into an efficiency without a conversion.

The peak is the data sheet's dense fp16 tensor rate (:data:`GPUS`). The efficiency is
measured: the engine's end-to-end rate (tokenizing included) on one H200 (2026-12-03,
``benchmarks/results/2026-12-03-h200/backends_ab_large_h200.json``) times that
workload's FLOPs per event, over the H200's peak, once per packed backend. A GPU of
compute capability 8.0 or newer runs packed flash attention, an older one (T4, V100)
packed memory-efficient attention, as the engine picks them at load
(``engine/packed.py``). Every row but the H200's assumes the engine reaches the same
fraction of that GPU's peak as on the H200: a prediction, and the table says so.
:data:`CHECKS` holds the measurements the calibration did not use, each with its
prediction. 70% is the autoscaling rule of thumb: a replica run hotter than that has no
room for a burst or for a replica lost.

Tools only (the runtime never imports this module); without ``--model`` or
``--reference-workload`` it imports neither torch nor transformers, so it answers in a
moment.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from stream_classifier.config import MAX_PAIR_TOKENS, TopicConfig
from stream_classifier.messages import (
    PLAIN_TEXT_FIELD,
    ClassifyRequest,
    Envelope,
    SourceRef,
    decode_event,
    parse_labels,
)

#: Exit codes, as the CLI's: 2 bad arguments or sample, 3 the model could not be read.
EXIT_USAGE = 2
EXIT_ENGINE = 3

#: The share of a GPU a replica may use at the target rate (the autoscaling rule of thumb).
MAX_UTILISATION = 0.70
#: Tokens in one forward pass for the memory estimate: ``processing.max_batch_tokens``'s
#: default.
PASS_TOKENS = 65_536
#: Tokens of one label where only the label count is given (the reference workload's
#: labels are 2 to 5 characters, one token each).
DEFAULT_LABEL_TOKENS = 3
#: ``[CLS] text [SEP] hypothesis [SEP]``.
SPECIAL_TOKENS = 3

Backend = Literal["packed-flash-graphs", "packed-efficient-graphs"]
FLASH: Backend = "packed-flash-graphs"
EFFICIENT: Backend = "packed-efficient-graphs"
#: Where the engine can take each packed kernel (``engine/packed.py``:
#: ``FLASH_MIN_CAPABILITY``, ``EFFICIENT_MIN_CAPABILITY``; tests/test_plan.py checks that
#: these agree, without this module importing torch).
FLASH_MIN_CAPABILITY = (8, 0)
EFFICIENT_MIN_CAPABILITY = (5, 0)


class PlanError(Exception):
    """A bad argument or sample: the message says which and why."""


# -- the GPUs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    name: str
    #: Dense fp16 tensor-core peak, TFLOP/s. Sheets from Ampere on also print twice this
    #: "with sparsity" (2:4 structured sparsity), which a dense encoder never uses.
    tflops: float
    #: The memory of each variant sold, GB; the smallest decides whether the model fits.
    memory_gb: tuple[int, ...]
    compute_capability: tuple[int, int]
    source: str


#: One row per GPU named in issue 21, from the vendor's data sheet (the SXM variant where
#: there are several). A10G: NVIDIA publishes no sheet for AWS's variant of the A10; 70 is
#: the dense fp16 tensor figure quoted for it by AWS-focused comparisons (e.g. Baseten,
#: "NVIDIA A10 vs A10G for ML model inference"), against the A10 sheet's 125: an
#: assumption, marked as one in its source.
GPUS: tuple[Gpu, ...] = (
    Gpu("T4", 65.0, (16,), (7, 5), "NVIDIA T4 data sheet: 65 TFLOPS mixed precision (FP16/FP32)"),
    Gpu(
        "V100",
        125.0,
        (16, 32),
        (7, 0),
        "NVIDIA V100 data sheet, SXM2: 125 TFLOPS tensor performance",
    ),
    Gpu(
        "A10G",
        70.0,
        (24,),
        (8, 6),
        "assumption: no NVIDIA sheet for the A10G; 70 TFLOPS dense fp16 tensor as quoted for "
        "AWS G5 (the A10 sheet says 125)",
    ),
    Gpu(
        "L4",
        121.0,
        (24,),
        (8, 9),
        "NVIDIA L4 data sheet: FP16 tensor core 242 TFLOPS with sparsity, 121 dense",
    ),
    Gpu(
        "A100",
        312.0,
        (40, 80),
        (8, 0),
        "NVIDIA A100 data sheet, SXM: FP16 tensor core 312 TFLOPS dense (624 with sparsity)",
    ),
    Gpu(
        "H100",
        989.0,
        (80,),
        (9, 0),
        "NVIDIA H100 data sheet, SXM: FP16 tensor core 1,979 TFLOPS with sparsity, 989 dense",
    ),
    Gpu(
        "H200",
        989.0,
        (141,),
        (9, 0),
        "NVIDIA H200 data sheet, SXM: FP16 tensor core 1,979 TFLOPS with sparsity, 989 dense",
    ),
)


def gpu_named(name: str) -> Gpu:
    """The table's GPU of that name, any case; a PlanError naming the table otherwise."""
    for gpu in GPUS:
        if gpu.name.lower() == name.strip().lower():
            return gpu
    names = ", ".join(gpu.name for gpu in GPUS)
    raise PlanError(f"unknown GPU {name!r}: the table has {names}")


def backend_for(gpu: Gpu) -> Backend:
    """The packed backend the engine takes on ``gpu`` (a probe call at load confirms it)."""
    if gpu.compute_capability >= FLASH_MIN_CAPABILITY:
        return FLASH
    if gpu.compute_capability >= EFFICIENT_MIN_CAPABILITY:
        return EFFICIENT
    raise PlanError(f"{gpu.name}: compute capability below 5.0 has no packed kernel")


# -- the model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    max_positions: int = 512
    type_vocab: int = 2

    @property
    def matrix_weights(self) -> int:
        """W: the non-embedding matrix weights, what the FLOP count counts (302 M, large)."""
        return self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)

    @property
    def parameters(self) -> int:
        """Every parameter of a BERT sequence classifier (for memory): embeddings, layers
        with biases and norms, pooler, a 3-way head."""
        h, i = self.hidden, self.intermediate
        embeddings = (self.vocab + self.max_positions + self.type_vocab) * h + 2 * h
        layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        return embeddings + self.layers * layer + h * h + h + 3 * h + 3

    @property
    def max_pair_tokens(self) -> int:
        """The engine cuts a pair to 512 tokens, or to the checkpoint's positions if fewer."""
        return min(MAX_PAIR_TOKENS, self.max_positions)

    def pair_flops(self, length: int) -> float:
        """F(L) = L * (2 W + 4 n d L) (the module's docstring)."""
        return float(length * (2 * self.matrix_weights + 4 * self.layers * self.hidden * length))


#: The default model, damo/nlp_structbert_zero-shot-classification_chinese-large: BERT-large
#: with a 21,128-entry Chinese vocabulary (as ``bench --shape large`` builds it).
STRUCTBERT_LARGE = ModelShape(
    name="StructBERT-large (built-in shape)",
    layers=24,
    hidden=1024,
    intermediate=4096,
    heads=16,
    vocab=21128,
)


def read_model_shape(model_dir: Path) -> ModelShape:
    """The shape in a Hugging Face ``config.json``; the plan is calibrated on the StructBERT
    engine only, so a transformers classifier (the ``hf_nli`` engine) is refused."""
    from stream_classifier.engine.hf_nli import is_transformers_classifier

    path = model_dir / "config.json"
    if not model_dir.is_dir() or not path.is_file():
        raise PlanError(f"--model {model_dir}: not a model directory with a config.json")
    if is_transformers_classifier(model_dir):
        raise PlanError(
            f"--model {model_dir}: a transformers classifier runs on the hf_nli engine "
            "(padded batches only), which the plan is not calibrated for; it plans the "
            "StructBERT/BERT engine"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ModelShape(
            name=str(model_dir),
            layers=int(raw["num_hidden_layers"]),
            hidden=int(raw["hidden_size"]),
            intermediate=int(raw["intermediate_size"]),
            heads=int(raw["num_attention_heads"]),
            vocab=int(raw["vocab_size"]),
            max_positions=int(raw.get("max_position_embeddings", 512)),
            type_vocab=int(raw.get("type_vocab_size", 2)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{path}: not a BERT config ({type(exc).__name__}: {exc})") from exc


# -- counting tokens -----------------------------------------------------------------------

#: The code points BERT's basic tokenizer splits into one token each (its
#: ``_is_chinese_char``: CJK unified ideographs and their extensions, compatibility
#: ideographs).
_CJK = (
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f"
)
_PIECES = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+|[^\\w\\s]")

ESTIMATE_RULE = (
    "one per CJK character, per word (run of letters or digits) and per punctuation mark"
)


def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` without a tokenizer: where BERT's basic tokenizer splits (each CJK
    character, each word, each punctuation mark), one token each. Exact for the reference
    workload (CJK only) and for common words; WordPiece splits a rare word into more, so
    for such text this is a lower bound (``--model`` counts with the real tokenizer)."""
    return len(_PIECES.findall(text))


@dataclass(frozen=True)
class TokenCounter:
    """How many tokens each text is, and how the table should name the method."""

    name: str
    count: Callable[[Sequence[str]], list[int]]


def estimated_counter() -> TokenCounter:
    return TokenCounter(
        f"estimated ({ESTIMATE_RULE})",
        lambda texts: [estimate_tokens(text) for text in texts],
    )


def model_counter(model_dir: Path) -> TokenCounter:
    """The engine's own tokenizer and call (``nli.load_tokenizer``, ``nli.tokenize_many``):
    the ids the service would put in each pair, before truncation."""
    from stream_classifier.engine.nli import load_tokenizer, tokenize_many

    tokenizer = load_tokenizer(model_dir)
    return TokenCounter(
        f"the tokenizer of {model_dir}",
        lambda texts: [len(ids) for ids in tokenize_many(tokenizer, list(texts))],
    )


def pair_length(text_tokens: int, hypothesis_tokens: int, max_tokens: int) -> int:
    """Tokens of one pair after the engine's longest-first truncation, which removes just
    enough of the two segments to fit ``max_tokens`` with the 3 special tokens."""
    return min(text_tokens + hypothesis_tokens, max_tokens - SPECIAL_TOKENS) + SPECIAL_TOKENS


# -- the sample ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The texts read from a sample, and what was skipped (with the first reason)."""

    source: str
    texts: tuple[str, ...]
    skipped: int = 0
    first_problem: str | None = None


def read_sample(path: Path, text_field: str | None) -> Sample:
    """Each non-blank line one event, its text read as the service reads it
    (:func:`decode_event`: the field, or the whole line for ``$value``; texts over the
    topic's default ``max_text_chars`` cut to it). Without ``text_field``: ``text`` where
    the first line is a JSON object, else whole lines. Lines the service would dead-letter
    are skipped and counted."""
    try:
        numbered = list(enumerate(path.read_text(encoding="utf-8").splitlines(), start=1))
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"cannot read {path}: {exc}") from exc
    lines = [(number, line) for number, line in numbered if line.strip()]
    if not lines:
        raise PlanError(f"{path}: no events")
    field = text_field or ("text" if _is_json_object(lines[0][1]) else PLAIN_TEXT_FIELD)
    topic = TopicConfig(
        input="plan", output="plan.out", dead_letter="plan.dlq", labels=["plan"], text_field=field
    )
    texts: list[str] = []
    problems: list[str] = []
    for number, line in lines:
        source = SourceRef(topic="plan", partition=0, offset=number)
        decoded = decode_event(Envelope(source, None, line.encode(), [], 0.0), topic)
        if isinstance(decoded, ClassifyRequest):
            texts.append(decoded.text)
        else:
            problems.append(f"line {number}: {decoded.reason}")
    if not texts:
        raise PlanError(f"{path}: no event has a text ({problems[0]})")
    first = problems[0] if problems else None
    return Sample(str(path), tuple(texts), len(problems), first)


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


#: Events and seed of the H200 calibration run (``benchmarks/backends_ab.py``: 16,000
#: events, ``make_events(messages, labels, seed + labels)`` with seed 0).
REFERENCE_EVENTS = 16_000


def reference_sample(labels: int) -> tuple[Sample, list[str], str]:
    """The reference workload as the calibration run drew it: texts, labels, template."""
    from stream_classifier.tools import bench  # torch, numpy: only for this option

    events = bench.make_events(REFERENCE_EVENTS, labels, labels)
    sample = Sample(
        f"the reference workload ({REFERENCE_EVENTS:,} events of bench.make_events, seed {labels})",
        tuple(event.text for event in events),
    )
    return sample, list(events[0].labels), bench.TEMPLATE


# -- the workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The sample as the encoder sees it: every event's pair lengths."""

    sample: Sample
    labels: int
    template: str
    tokenizer: str
    pairs: tuple[tuple[int, ...], ...]

    @property
    def events(self) -> int:
        return len(self.pairs)

    @property
    def tokens_per_event(self) -> float:
        return sum(sum(lengths) for lengths in self.pairs) / self.events

    @property
    def longest_pair(self) -> int:
        return max(max(lengths) for lengths in self.pairs)

    def flops_per_event(self, shape: ModelShape) -> float:
        total = sum(shape.pair_flops(n) for lengths in self.pairs for n in lengths)
        return total / self.events


def hypothesis_tokens(
    labels: list[str] | int, template: str, label_tokens: int, counter: TokenCounter
) -> list[int]:
    """Tokens of each label's hypothesis ``template.format(label)``; for a label count, the
    template's own tokens plus ``label_tokens`` for each."""
    if isinstance(labels, int):
        return [counter.count([template.format("")])[0] + label_tokens] * labels
    return counter.count([template.format(label) for label in labels])


def measure_workload(
    sample: Sample,
    labels: list[str] | int,
    template: str,
    label_tokens: int,
    counter: TokenCounter,
    shape: ModelShape,
) -> Workload:
    hypotheses = hypothesis_tokens(labels, template, label_tokens, counter)
    limit = shape.max_pair_tokens
    pairs = tuple(
        tuple(pair_length(text, hypothesis, limit) for hypothesis in hypotheses)
        for text in counter.count(sample.texts)
    )
    return Workload(sample, len(hypotheses), template, counter.name, pairs)


# -- calibration and checks ----------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """A measured end-to-end rate of a workload whose FLOPs per event are known."""

    what: str
    gpu: str
    backend: Backend
    msgs_per_s: float
    flops_per_event: float
    tokens_per_event: float
    source: str


_H200_AB = "benchmarks/results/2026-12-03-h200/backends_ab_large_h200.json"
#: What the efficiencies are measured on: ``benchmarks/backends_ab.py --shape large
#: --labels 4 --messages 16000 --rounds 2`` on one H200, 2026-12-03, each backend's
#: end-to-end rate the median of its two rounds; 16,000 events at 4 labels, 363.05 tokens
#: and 2.2389e11 FLOPs per event (bench's count, the same formula as here).
CALIBRATION: dict[Backend, Measurement] = {
    FLASH: Measurement(
        "H200, packed flash, 16,000 events at 4 labels (2026-12-03)",
        "H200",
        FLASH,
        1929.6955300720374,
        223_889_832_960.0,
        363.0545,
        _H200_AB,
    ),
    EFFICIENT: Measurement(
        "H200, packed memory-efficient (flash not used), same events (2026-12-03)",
        "H200",
        EFFICIENT,
        1921.4814273140155,
        223_889_832_960.0,
        363.0545,
        _H200_AB,
    ),
}

#: Measurements the calibration did not use, each predicted from it: another H200 run on
#: other events, and an H100 (the same 989 TFLOP/s on its sheet) at 4 and at 10 labels.
#: Older code for the H100 (2026-11-26); all packed flash, the large shape.
CHECKS: tuple[Measurement, ...] = (
    Measurement(
        "H200, bench, 8,000 other events at 4 labels (2026-12-03)",
        "H200",
        FLASH,
        1882.8890382294937,
        228_116_150_968.32,
        369.8775,
        "benchmarks/results/2026-12-03-h200/bench_large_h200.json",
    ),
    Measurement(
        "H100 SXM, bench, the same 16,000 events at 4 labels (2026-11-26)",
        "H100",
        FLASH,
        1966.0534139750794,
        223_889_832_960.0,
        363.0545,
        "benchmarks/results/2026-11-26-h100/bench_large_held_h100.json",
    ),
    Measurement(
        "H100 SXM, bench, 16,000 events at 10 labels (2026-11-26)",
        "H100",
        FLASH,
        794.6983364186789,
        557_764_242_554.88,
        904.51875,
        "benchmarks/results/2026-11-26-h100/bench_large_held_h100.json",
    ),
)


#: The fastest end-to-end rate measured (H100, 4 labels): a prediction above it leans on
#: the FLOP count alone, where short texts may make the CPU side (the prepare stage: 7,471
#: msgs/s on a 2-core machine, benchmarks/results/2026-11-26-cpu/prepare_ab_cpu.json) the
#: bound instead.
MEASURED_MAX_MSGS_PER_S = max(m.msgs_per_s for m in (*CALIBRATION.values(), *CHECKS))


def efficiency(backend: Backend) -> float:
    """The engine's end-to-end FLOP rate on ``backend`` as a share of the dense peak."""
    measured = CALIBRATION[backend]
    peak = gpu_named(measured.gpu).tflops * 1e12
    return measured.msgs_per_s * measured.flops_per_event / peak


def predicted_rate(gpu: Gpu, flops_per_event: float) -> float:
    """msgs/s of one replica on ``gpu``: peak * efficiency / FLOPs per event."""
    return gpu.tflops * 1e12 * efficiency(backend_for(gpu)) / flops_per_event


def replicas_for(rate: float, per_replica: float) -> int:
    """Replicas that carry ``rate`` with each under :data:`MAX_UTILISATION` (at least one);
    the tolerance keeps an exact multiple from rounding up on float noise."""
    return max(1, math.ceil(rate / (MAX_UTILISATION * per_replica) - 1e-9))


@dataclass(frozen=True)
class Check:
    what: str
    predicted: float
    measured: float
    source: str

    @property
    def error(self) -> float:
        """predicted / measured - 1."""
        return self.predicted / self.measured - 1.0


def checks() -> list[Check]:
    return [
        Check(m.what, predicted_rate(gpu_named(m.gpu), m.flops_per_event), m.msgs_per_s, m.source)
        for m in CHECKS
    ]


# -- the plan ------------------------------------------------------------------------------


def memory_needed_gb(shape: ModelShape, tokens: int = PASS_TOKENS) -> float:
    """fp16 weights plus one pass's activations: layers run one after another, so one
    layer's input plus its feed-forward intermediate before and after GELU, for ``tokens``
    tokens (1.21 GB for large at 65,536; measured on an H100: 0.94 GB over the weights in
    bench, 1.13 GB for the worst input)."""
    activations = tokens * (shape.hidden + 2 * shape.intermediate) * 2
    return (shape.parameters * 2 + activations) / 1e9


@dataclass(frozen=True)
class Row:
    gpu: str
    backend: Backend
    tflops: float
    msgs_per_s: float
    replicas: int
    #: "measured": this GPU's efficiency was measured (the rate scales it to the workload's
    #: FLOPs); "prediction, checked": assumed, and a run on this GPU agreed (CHECKS);
    #: "prediction": assumed, nothing measured on this GPU.
    basis: str
    memory_needed_gb: float
    memory_gb: tuple[int, ...]
    fits: bool
    #: Above :data:`MEASURED_MAX_MSGS_PER_S`: no run this fast has checked the model.
    beyond_measured: bool


def basis_of(gpu: Gpu, backend: Backend) -> str:
    if CALIBRATION[backend].gpu == gpu.name:
        return "measured"
    if any(m.gpu == gpu.name for m in CHECKS):
        return "prediction, checked"
    return "prediction"


def plan_rows(gpus: Sequence[Gpu], shape: ModelShape, flops: float, rate: float) -> list[Row]:
    memory = memory_needed_gb(shape)
    rows = []
    for gpu in gpus:
        backend = backend_for(gpu)
        per_replica = predicted_rate(gpu, flops)
        rows.append(
            Row(
                gpu=gpu.name,
                backend=backend,
                tflops=gpu.tflops,
                msgs_per_s=per_replica,
                replicas=replicas_for(rate, per_replica),
                basis=basis_of(gpu, backend),
                memory_needed_gb=memory,
                memory_gb=gpu.memory_gb,
                fits=memory <= min(gpu.memory_gb),
                beyond_measured=per_replica > MEASURED_MAX_MSGS_PER_S,
            )
        )
    return rows


@dataclass(frozen=True)
class Plan:
    rate: float
    shape: ModelShape
    workload: Workload
    rows: list[Row]
    checks: list[Check]


def make_plan(
    workload: Workload, shape: ModelShape, rate: float, gpus: Sequence[Gpu] = GPUS
) -> Plan:
    flops = workload.flops_per_event(shape)
    return Plan(rate, shape, workload, plan_rows(gpus, shape, flops, rate), checks())


# -- output --------------------------------------------------------------------------------


def format_plan(plan: Plan) -> str:
    workload, shape = plan.workload, plan.shape
    sample = workload.sample
    skipped = f"; {sample.skipped} skipped, first: {sample.first_problem}" if sample.skipped else ""
    lines = [
        f"target: {plan.rate:,.0f} events/s, each replica under {MAX_UTILISATION:.0%} busy",
        f"sample: {workload.events:,} events from {sample.source}{skipped}",
        f"labels: {workload.labels}, template {workload.template!r}; tokens {workload.tokenizer}",
        f"per event: {workload.tokens_per_event:,.1f} tokens in {workload.labels} pairs "
        f"(longest pair {workload.longest_pair}), {workload.flops_per_event(shape):.4g} FLOPs",
        f"model: {shape.name}: {shape.layers} layers, hidden {shape.hidden}, intermediate "
        f"{shape.intermediate}, vocab {shape.vocab:,}; {shape.parameters / 1e6:,.1f} M "
        f"parameters, W = {shape.matrix_weights / 1e6:,.1f} M",
        "",
        f"| GPU | dense fp16 TFLOP/s | backend | msgs/s per replica | replicas for "
        f"{plan.rate:,.0f}/s | basis | memory needed / GPU GB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in plan.rows:
        memory = f"{row.memory_needed_gb:.1f} / {'/'.join(str(g) for g in row.memory_gb)}"
        memory += "" if row.fits else " (does not fit)"
        mark = " *" if row.beyond_measured else ""
        lines.append(
            f"| {row.gpu} | {row.tflops:,.0f} | {row.backend} | {row.msgs_per_s:,.0f}{mark} "
            f"| {row.replicas} | {row.basis} | {memory} |"
        )
    if any(row.beyond_measured for row in plan.rows):
        lines.append(
            f"* above the fastest rate measured end to end ({MEASURED_MAX_MSGS_PER_S:,.0f} "
            "msgs/s): only the FLOP count says so; the CPU side (the prepare stage: 7,471 "
            "msgs/s on a 2-core machine, benchmarks/results/2026-11-26-cpu/prepare_ab_cpu.json) "
            "may bound it first"
        )
    lines += ["", *_calibration_lines(), *_check_lines(plan.checks)]
    return "\n".join(lines)


def _calibration_lines() -> list[str]:
    lines = ["efficiency (end-to-end FLOP/s over the dense peak), measured:"]
    for backend, measured in CALIBRATION.items():
        lines.append(
            f"  {backend}: {efficiency(backend):.3f} from {measured.msgs_per_s:,.0f} msgs/s, "
            f"{measured.what} ({measured.source})"
        )
    lines.append(
        "  every other GPU: the same efficiency assumed (prediction); memory: fp16 weights + "
        f"activations of one {PASS_TOKENS:,}-token pass"
    )
    return lines


def _check_lines(results: Sequence[Check]) -> list[str]:
    lines = ["checks, runs the calibration did not use (predicted / measured msgs/s):"]
    for check in results:
        lines.append(
            f"  {check.what}: {check.predicted:,.0f} / {check.measured:,.0f} "
            f"({check.error:+.1%}; {check.source})"
        )
    return lines


def plan_json(plan: Plan) -> dict[str, Any]:
    workload = plan.workload
    return {
        "target_events_per_s": plan.rate,
        "max_utilisation": MAX_UTILISATION,
        "workload": {
            "source": workload.sample.source,
            "events": workload.events,
            "skipped": workload.sample.skipped,
            "labels": workload.labels,
            "template": workload.template,
            "tokenizer": workload.tokenizer,
            "tokens_per_event": workload.tokens_per_event,
            "longest_pair": workload.longest_pair,
            "flops_per_event": workload.flops_per_event(plan.shape),
        },
        "model": {
            **asdict(plan.shape),
            "parameters": plan.shape.parameters,
            "matrix_weights": plan.shape.matrix_weights,
        },
        "rows": [asdict(row) for row in plan.rows],
        "efficiency": {backend: efficiency(backend) for backend in CALIBRATION},
        "calibration": {backend: asdict(m) for backend, m in CALIBRATION.items()},
        "checks": [{**asdict(check), "error": check.error} for check in plan.checks],
    }


# -- the command ---------------------------------------------------------------------------


def parse_label_arg(text: str) -> list[str] | int:
    """``--labels``: a count (``4``) or the labels themselves (``a,b,c``)."""
    if text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise PlanError("--labels: at least one label")
        return count
    labels = parse_labels(text)
    if not labels:
        raise PlanError("--labels: a count or comma-separated labels")
    return labels


def _inputs(args: argparse.Namespace) -> tuple[Sample, list[str] | int, str]:
    """The sample, labels and template the arguments name."""
    labels = parse_label_arg(args.labels)
    if args.reference_workload == (args.sample is not None):
        raise PlanError("give a sample file or --reference-workload (one of them)")
    if args.reference_workload:
        if not isinstance(labels, int):
            raise PlanError("--reference-workload draws its own labels: give --labels a count")
        return reference_sample(labels)
    if args.template.count("{}") != 1:
        raise PlanError("--template must contain '{}' exactly once")
    return read_sample(args.sample, args.text_field), labels, args.template


def build_plan(args: argparse.Namespace) -> Plan:
    if not args.rate > 0:
        raise PlanError("--rate must be above 0 events/s")
    label_tokens = DEFAULT_LABEL_TOKENS if args.label_tokens is None else args.label_tokens
    if label_tokens < 0:
        raise PlanError("--label-tokens must be 0 or more")
    gpus = GPUS if args.gpu is None else (gpu_named(args.gpu),)
    sample, labels, template = _inputs(args)
    if args.model is None:
        shape, counter = STRUCTBERT_LARGE, estimated_counter()
    else:
        shape = read_model_shape(Path(args.model))
        counter = model_counter(Path(args.model))
    workload = measure_workload(sample, labels, template, label_tokens, counter, shape)
    return make_plan(workload, shape, args.rate, gpus)


def command(args: argparse.Namespace) -> int:
    """Run ``stream-classifier plan``; print the table (or JSON); return the exit code.

    ``args`` is what the CLI parsed (``cli._add_plan_arguments``), so that building the
    command line does not import this module."""
    from stream_classifier.engine.base import EngineError

    try:
        plan = build_plan(args)
    except PlanError as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EngineError as exc:
        print(f"plan: --model: {exc}", file=sys.stderr)
        return EXIT_ENGINE
    if args.json:
        print(json.dumps(plan_json(plan), ensure_ascii=False, indent=1))
    else:
        print(format_plan(plan))
    return 0
