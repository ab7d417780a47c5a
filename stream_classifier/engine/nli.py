"""The StructBERT NLI cross-encoder, scoring exactly like ModelScope's zero-shot pipeline.

Each (text, label) is one sentence pair ``[text, template.format(label)]`` (text is segment
A, hypothesis segment B), truncated longest-first to 512 tokens (to the checkpoint's
``max_position_embeddings`` where that is smaller). Logit column 0 is entailment and 2
contradiction, fixed by the reference pipeline. Single-label mode is a softmax of the
entailment logits across the message's labels; multi-label mode (and any message with one
label) is, per label, the softmax of (contradiction, entailment).

Speed comes from doing the reference's work once and only the real tokens:

- each text is tokenized once and each hypothesis once per process; pair ids are
  assembled by concatenation (``prepare``);
- all pairs of a micro-batch are cut into batches bounded by a token budget (the memory
  bound), their tensors built with numpy in one go and copied from pinned memory;
- on a GPU in fp16/bf16 the encoder runs padding-free (:mod:`.packed`): the linear layers
  see only real tokens, attention runs over the packed sequences, and the last layer runs
  only the [CLS] rows. The attention kernel is variable-length flash attention where the
  GPU has it (Ampere and newer), else PyTorch's variable-length memory-efficient attention
  (a T4 or V100 too); each is taken only after a probe call at load passes. Where neither
  works (a CPU, a GPU older than sm_50, both probes failing) the encoder (:mod:`.bert`) runs
  on length-sorted, padded batches with SDPA attention; ``engine.backend`` says which, and
  the start-up log why the faster ones were not taken;
- with a packed kernel on a GPU each pass is replayed from a CUDA graph of its shape
  (:mod:`.graphs`): one launch instead of hundreds, so other Python threads cannot starve
  the GPU;
- batches are queued without synchronising; the logits come back in one copy.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

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
from stream_classifier.engine.batches import TokenBatch, packed_batches
from stream_classifier.engine.bert import (
    BertClassifier,
    BertSettings,
    ConfigError,
    WordPieceTokenizer,
)
from stream_classifier.engine.cache import ByteBoundedCache
from stream_classifier.engine.head import ClassifierHead
from stream_classifier.engine.packed import PackedBert
from stream_classifier.engine.shared import (
    CPU_BATCH_TOKENS,
    HYPOTHESIS_CACHE_BYTES,
    PendingLogits,
    PendingScores,
    padded_plan,
    pick_device,
    pick_dtype,
    round_up,
    run_halving_on_oom,
    to_device,
    wait_for_cuda,
)

log = logging.getLogger(__name__)

ENTAILMENT = 0
CONTRADICTION = 2
#: Saved by the StructBERT checkpoints, not a parameter of the encoder.
UNUSED_CHECKPOINT_KEYS = ("bert.embeddings.position_ids",)
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")

#: What to run:
#: "auto": the fastest that works here: packed with flash attention, else packed with
#: memory-efficient attention, else padded (each packed kernel only where the device should
#: have it and a probe call at load passes);
#: "flash", "efficient": packed with that kernel, an EngineError where it cannot run (so a
#: benchmark that asks for one measures that one);
#: "packed": padding-free with the fastest kernel that works, else padded SDPA inside the
#: packed layout;
#: "padded": the encoder (:mod:`.bert`) on length-sorted, padded batches, SDPA attention.
Backend = Literal["auto", "flash", "efficient", "packed", "padded"]
BACKENDS: tuple[Backend, ...] = ("auto", "flash", "efficient", "packed", "padded")
#: How the start-up log names each attention kernel.
KERNEL_NAMES = {"flash": "flash attention", "efficient": "memory-efficient attention"}


class Forward(Protocol):
    """Runs one token batch; returns (entailment, contradiction) logits, fp32, on device."""

    def __call__(self, batch: TokenBatch) -> torch.Tensor: ...


@dataclass(frozen=True)
class PairSet:
    """One message's sentence pairs as token ids, already truncated like the reference.

    ``ids`` holds the pairs back to back (``[CLS] A [SEP] B [SEP]`` each).
    """

    ids: np.ndarray
    lengths: np.ndarray
    a_lengths: np.ndarray

    @property
    def input_ids(self) -> list[list[int]]:
        bounds = np.cumsum(self.lengths)
        return [chunk.tolist() for chunk in np.split(self.ids, bounds[:-1])]

    @property
    def segment_a_lengths(self) -> list[int]:
        return [int(n) for n in self.a_lengths]


def truncate_longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths after the reference tokenizer's ``longest_first`` pair truncation.

    ``budget`` is max_length minus the special tokens. This is the Python BertTokenizer's
    rule (transformers 4.x, which ModelScope's pipeline uses): cut the longer sequence down
    to the shorter one, then split what is left to remove between the two, the extra token
    coming off segment B. The Rust tokenizer differs when both are cut (it keeps the odd
    token on the longer one), which moves scores by up to 0.2, so the engine does not use it.
    """
    remove = len_a + len_b - budget
    if remove <= 0:
        return len_a, len_b
    first = min(abs(len_a - len_b), remove)
    second = remove - first
    if len_a > len_b:
        return len_a - first - second // 2, len_b - (second - second // 2)
    return len_a - second // 2, len_b - (first + second - second // 2)


class PairTokenizer:
    """The engine's CPU side: each text tokenized once, each hypothesis once (cached), pairs
    assembled by concatenation with the reference's truncation. Holds no model, so a worker
    process can run it (see :meth:`NliEngine.preparer_factory`)."""

    def __init__(self, tokenizer: WordPieceTokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        #: Token ids of each hypothesis (``template.format(label)``), at most a pair's budget.
        self._hypotheses: ByteBoundedCache[np.ndarray] = ByteBoundedCache(
            HYPOTHESIS_CACHE_BYTES, lambda ids: int(ids.nbytes)
        )

    def _hypothesis_ids(self, hypothesis: str) -> np.ndarray:
        """Its token ids, cut to the pair budget: longest-first truncation never keeps more
        of a sequence than that, so the cut of every pair is the same as from all its ids."""
        ids = self._hypotheses.get(hypothesis)
        if ids is None:
            ids = np.array(tokenize_many(self.tokenizer, [hypothesis])[0], dtype=np.int32)
            ids = ids[: self.max_length - 3]
            self._hypotheses.put(hypothesis, ids)
        return ids

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        result = self.prepare_many([(text, tuple(labels), template, multi_label)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of the text's tokens, for cutting windows (engine/windows.py)."""
        encoded = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        return [(int(start), int(end)) for start, end in encoded.offsets]

    def text_budget(self, hypotheses: Sequence[str]) -> int | None:
        """Text tokens a pair keeps uncut beside the longest of ``hypotheses``: longest-first
        truncation cuts nothing while both fit ``max_length`` with the 3 special tokens."""
        longest = max((len(self._hypothesis_ids(h)) for h in hypotheses), default=0)
        return max(1, self.max_length - 3 - longest)

    def prepare_many(self, tasks: Sequence[PrepareTask]) -> list[Prepared | Exception]:
        """Every (text, labels, template, multi_label): the texts tokenized in one call
        that releases the interpreter lock, then each event's pairs assembled; a failure
        of one event's assembly is returned in its place."""
        texts = tokenize_many(self.tokenizer, [task[0] for task in tasks])
        return prepare_each(texts, tasks, self._pairs)

    def _pairs(
        self, ids: Sequence[int], labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        text_ids = np.array(ids, dtype=np.int32)
        budget = self.max_length - 3  # [CLS] A [SEP] B [SEP]
        cls_id = np.array([self.cls_id], dtype=np.int32)
        sep_id = np.array([self.sep_id], dtype=np.int32)
        pieces: list[np.ndarray] = []
        lengths: list[int] = []
        a_lengths: list[int] = []
        for label in labels:
            hyp_ids = self._hypothesis_ids(template.format(label))
            len_a, len_b = truncate_longest_first(len(text_ids), len(hyp_ids), budget)
            pieces += (cls_id, text_ids[:len_a], sep_id, hyp_ids[:len_b], sep_id)
            lengths.append(len_a + len_b + 3)
            a_lengths.append(len_a)
        pair_set = PairSet(
            np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32),
            np.array(lengths, dtype=np.int32),
            np.array(a_lengths, dtype=np.int32),
        )
        tokens = sum(round_up(n) for n in lengths)
        return Prepared(tuple(labels), multi_label, tokens, pair_set)


@dataclass(frozen=True)
class PairTokenizerFactory:
    """Builds a :class:`PairTokenizer`; picklable (the tokenizer travels, the model does not)."""

    tokenizer: WordPieceTokenizer
    max_length: int

    def __call__(self) -> PairTokenizer:
        return PairTokenizer(self.tokenizer, self.max_length)


class NliEngine:
    """Zero-shot classification with a BERT-architecture NLI cross-encoder."""

    def __init__(
        self,
        model: BertClassifier,
        tokenizer: WordPieceTokenizer,
        model_id: str,
        max_batch_tokens: int,
        max_length: int = MAX_PAIR_TOKENS,
        backend: Backend = "auto",
        compile_layers: bool = True,
        head: ClassifierHead | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        #: The pooler and classifier in fp32 (the checkpoint's weights where given).
        self.head = head if head is not None else ClassifierHead.of(model)
        self.compile_layers = compile_layers
        self.cuda_graphs = cuda_graphs
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_batch_tokens = max_batch_tokens
        #: The reference's 512, or fewer where the checkpoint has fewer positions (a longer
        #: pair would index past the position embeddings).
        self.max_length = min(max_length, int(model.config.max_position_embeddings))
        self.device = next(model.parameters()).device
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        #: Called with the number of rows whenever a batch ran out of memory and was split.
        self.on_out_of_memory: Callable[[int], None] = lambda rows: None
        #: The CPU side (``prepare``), which a worker process can rebuild without the model.
        self.pairs = PairTokenizer(tokenizer, self.max_length)
        self.dtype = next(model.parameters()).dtype
        #: Why each faster backend was not taken ("flash attention: ..."), for the log.
        self.backend_notes: list[str] = []
        with startup.step("probes"):
            forward, chosen = self._make_forward(backend)
        #: What runs: "packed-flash", "packed-efficient" (each with "-graphs" where its passes
        #: are replayed from CUDA graphs), "packed-sdpa" or "padded-sdpa"; "cpu-" first on a
        #: CPU.
        self.backend: str = chosen
        self._packed = chosen.removeprefix("cpu-").startswith("packed")
        #: Most tokens in one forward pass: the budget, or just under it for CUDA graphs.
        self.pass_tokens = max_batch_tokens
        if chosen.endswith("-graphs"):
            from stream_classifier.engine.graphs import pass_budget

            self.pass_tokens = pass_budget(max_batch_tokens)
        #: The model call; tests replace it to inject faults.
        self.forward: Forward = forward
        #: All of the engine's device work runs on its own stream (a CUDA graph cannot be
        #: captured on the default one).
        self.stream: torch.cuda.Stream | None = None
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        #: The pass held back by ``classify_async(..., hold_tail=True)``.
        self._tail: _Segment | None = None

    @classmethod
    def load(
        cls, config: EngineConfig, max_batch_tokens: int, backend: Backend = "auto"
    ) -> NliEngine:
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        model, head = load_classifier_and_head(model_dir, device, dtype)
        with startup.step("tokenizer"):
            tokenizer = load_tokenizer(model_dir)
        engine = cls(
            model,
            tokenizer,
            config.model,
            max_batch_tokens,
            backend=backend,
            head=head,
            cuda_graphs=config.cuda_graphs,
            compile_layers=config.compile_layers,
        )
        log.info(
            "NLI model %s: backend %s%s, %s on %s, pairs of up to %d tokens",
            model_dir,
            engine.backend,
            f" (not taken: {'; '.join(engine.backend_notes)})" if engine.backend_notes else "",
            str(dtype).removeprefix("torch."),
            device,
            engine.max_length,
        )
        return engine

    def _make_forward(self, backend: Backend) -> tuple[Forward, str]:
        """The forward pass to run and its name (see ``backend``).

        Each packed kernel is tried in turn (flash, then memory-efficient): taken where the
        device should have it (:func:`.packed.unavailable`) and one small probe batch runs
        through it at load. Why one was passed over goes to ``backend_notes`` (and the log:
        a warning for a failed probe, which should not happen on a supported GPU).
        """
        where = "cpu-" if self.device.type == "cpu" else ""
        padded = functools.partial(padded_forward, self.model, self.head, self.pad_id)
        if backend == "padded":
            return padded, where + "padded-sdpa"
        from stream_classifier.engine import packed

        kernels: tuple[packed.Attention, ...] = packed.VARLEN_KERNELS
        if backend == "flash" or backend == "efficient":
            kernels = (backend,)
        last = "padded SDPA" if backend == "auto" else "packed SDPA"
        forward: packed.PackedBert | None = None
        for index, kernel in enumerate(kernels):
            name = KERNEL_NAMES[kernel]
            following = [KERNEL_NAMES[k] for k in kernels[index + 1 :]]
            instead = following[0] if following else last
            problem = packed.unavailable(kernel, self.device, self.dtype)
            if problem is None:
                if forward is None:
                    forward = packed.PackedBert(
                        self.model, self.head, compile_layers=self.compile_layers, attention=kernel
                    )
                else:
                    forward.use(kernel)
                problem = self._probe(forward)
                if problem is None:
                    return self._graphed(forward)
                self.backend_notes.append(f"{name} failed its probe at load ({problem})")
                log.warning("%s failed its probe at load (%s); using %s", name, problem, instead)
            else:
                self.backend_notes.append(f"no {name}: {problem}")
                if self.device.type == "cuda" and self.dtype != torch.float32:
                    log.info("no %s (%s); using %s", name, problem, instead)
        if backend in ("flash", "efficient"):
            raise EngineError(f"backend {backend!r} asked for, but {self.backend_notes[-1]}")
        if backend == "auto":
            if self.device.type == "cuda" and self.dtype != torch.float32:
                log.warning(
                    "no packed attention kernel works here (%s); using padded SDPA",
                    "; ".join(self.backend_notes),
                )
            return padded, where + "padded-sdpa"
        if forward is None:
            forward = packed.PackedBert(
                self.model, self.head, compile_layers=self.compile_layers, attention="sdpa"
            )
        else:
            forward.use("sdpa")
        return forward, where + "packed-sdpa"

    def _graphed(self, forward: PackedBert) -> tuple[Forward, str]:
        """A packed varlen forward, replayed from CUDA graphs where the engine may use them."""
        name = ("cpu-" if self.device.type == "cpu" else "") + f"packed-{forward.attention}"
        if not self.cuda_graphs:
            return forward, name
        from stream_classifier.engine.graphs import GraphedForward

        capture = self.device.type == "cuda"
        return GraphedForward(forward, self.max_batch_tokens, capture), name + "-graphs"

    def _probe(self, forward: Forward) -> str | None:
        """Run two short pairs of different lengths; why that failed, or None."""
        lengths = [min(16, self.max_length), min(9, self.max_length)]
        pairs = [self._filler_pairs(1, length) for length in lengths]
        batch = TokenBatch(
            np.concatenate([p.ids for p in pairs]),
            np.concatenate([p.lengths for p in pairs]),
            np.concatenate([p.a_lengths for p in pairs]),
        )
        try:
            with torch.inference_mode():
                logits = forward(batch).float().cpu()  # .cpu() waits: kernel errors show here
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means: do not rely on it
            return f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        if logits.shape != (2, 2) or not bool(torch.isfinite(logits).all()):
            return f"it returned {logits.tolist()} for two short pairs"
        return None

    def _filler_pairs(self, count: int, length: int) -> TokenBatch:
        """``count`` pairs ``[CLS] [PAD]… [SEP] [SEP]`` of ``length`` tokens."""
        body = np.full(length - 3, self.pad_id, dtype=np.int32)
        pair = np.concatenate([[self.cls_id], body, [self.sep_id, self.sep_id]])
        return TokenBatch(
            np.tile(pair.astype(np.int32), count),
            np.full(count, length, dtype=np.int32),
            np.full(count, length - 3, dtype=np.int32),
        )

    # -- CPU side --------------------------------------------------------------------------

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        return self.pairs.prepare(text, labels, template, multi_label)

    def prepare_many(self, tasks: Sequence[PrepareTask]) -> list[Prepared | Exception]:
        return self.pairs.prepare_many(tasks)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self.pairs.token_spans(text)

    def text_budget(self, hypotheses: Sequence[str]) -> int | None:
        return self.pairs.text_budget(hypotheses)

    def preparer_factory(self) -> PairTokenizerFactory:
        """A picklable callable that builds this engine's ``prepare`` side (no model) in
        another process: what :class:`~stream_classifier.preparing.ProcessPreparer` runs."""
        return PairTokenizerFactory(self.tokenizer, self.max_length)

    # -- model side ------------------------------------------------------------------------

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        return self.classify_async(batch).result()

    def classify_async(self, batch: Sequence[Prepared], hold_tail: bool = False) -> PendingScores:
        """Queue every batch on the device and return at once; ``result()`` waits.

        The caller can prepare (or queue) the next micro-batch while this one runs. With
        ``hold_tail`` (the caller has another micro-batch to queue next), the packed
        backends hold back a last forward pass short of the budget; it runs with the next
        call's first pairs, so that every pass of a stream of large micro-batches is full
        (the padded backend sorts pairs by length and holds nothing back). The caller must
        then call ``classify_async`` again, or :meth:`flush`, for this ``result()`` to come.
        """
        items = tuple(batch)
        if not items:
            return PendingScores(items, None, score)
        everything = TokenBatch.concatenate([pair_set(item) for item in items])
        return PendingScores(items, self._launch(everything, hold_tail), score)

    def flush(self) -> None:
        """Queue the pass held back by ``classify_async(..., hold_tail=True)``, if any."""
        tail, self._tail = self._tail, None
        if tail is not None:
            with self._on_stream():
                self._launch_packed([tail], self._pass_budget(), hold_tail=False)

    def logits(self, pairs: TokenBatch) -> np.ndarray:
        """(entailment, contradiction) logits in fp32 for every pair, in input order."""
        return self._launch(pairs).wait()

    def _pass_budget(self) -> int:
        return (
            min(self.pass_tokens, CPU_BATCH_TOKENS)
            if self.device.type == "cpu"
            else self.pass_tokens
        )

    def _on_stream(self) -> AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def _launch(self, pairs: TokenBatch, hold_tail: bool = False) -> PendingLogits:
        budget = self._pass_budget()
        with self._on_stream():
            if not self._packed:
                plan = padded_plan(pairs.lengths, budget, self.device)
                outputs: list[torch.Tensor] = []
                for rows in plan:
                    self._run(pairs.take(rows), outputs)
                return PendingLogits.of(torch.cat(outputs), np.concatenate(plan))
            pending = PendingLogits(np.arange(pairs.rows))
            tail, self._tail = self._tail, None
            segments = [(pending, pairs)] if tail is None else [tail, (pending, pairs)]
            self._launch_packed(segments, budget, hold_tail)
            return pending

    def _launch_packed(self, segments: list[_Segment], budget: int, hold_tail: bool) -> None:
        """Queue the passes over every segment's pairs, one after another; each segment's
        logits go to its owner, whose copy back is queued right after the pass with its
        last rows. With ``hold_tail``, a last pass that holds only the last segment's pairs
        and is not the only one is kept in ``self._tail`` instead."""
        everything = TokenBatch.concatenate([pairs for _, pairs in segments])
        plan = packed_batches(everything.lengths, budget)
        last_owner, last_pairs = segments[-1]
        held: np.ndarray | None = None
        if hold_tail and len(plan) > 1 and plan[-1][0] >= everything.rows - last_pairs.rows:
            held = plan.pop()
        launched = _LaunchedRows()
        ends = np.cumsum([pairs.rows for _, pairs in segments])
        finished = 0  # owners (before the last) whose rows are all queued
        try:
            for rows in plan:
                outputs: list[torch.Tensor] = []
                self._run(everything.take(rows), outputs)
                launched.extend(outputs)
                while finished < len(segments) - 1 and ends[finished] <= launched.count:
                    start = int(ends[finished - 1]) if finished else 0
                    segments[finished][0].queued(launched.slices(start, int(ends[finished])))
                    finished += 1
        except BaseException as exc:
            for owner, _ in segments[finished:]:
                owner.fail(exc)  # a held tail's batch too: its caller scores it again
            raise
        start = int(ends[-2]) if len(segments) > 1 else 0
        if held is None:
            last_owner.queued(launched.slices(start, launched.count))
        else:
            last_owner.add(launched.slices(start, launched.count))
            self._tail = (last_owner, everything.take(held))

    def _run(self, batch: TokenBatch, outputs: list[torch.Tensor]) -> None:
        run_halving_on_oom(
            batch, lambda b: self.forward(b), outputs, self.device, self.on_out_of_memory
        )

    def warmup(self) -> None:
        """Run the largest batch the budget allows (and a short one) before consuming.

        A memory problem shows here rather than on the first message, and lazily built
        kernels are ready. Where the layers compile (``PackedBert.compile_in_background``),
        this waits for them and warms up again with them: what a benchmark measures is the
        steady state.
        """
        self.warmup_eagerly()
        compiling = self.compile_in_background()
        if compiling is not None:
            compiling.join()
            self._warm_shapes()

    def warmup_eagerly(self) -> None:
        """The warm-up without compiling (the service's start: it scores seconds sooner,
        then compiles on a helper thread, :meth:`compile_in_background`)."""
        self._warm_shapes()

    def compile_in_background(self) -> threading.Thread | None:
        """Compile the packed layers on a helper thread (returned, where they compile);
        passes take them once ready."""
        packed = getattr(self.forward, "packed", self.forward)
        return packed.compile_in_background() if isinstance(packed, PackedBert) else None

    def _warm_shapes(self) -> None:
        longest = self.max_length
        rows = 1 if self.device.type == "cpu" else max(1, self.pass_tokens // longest)
        shapes = [(rows, longest)]
        if self.device.type != "cpu":
            shapes.append((max(1, self.pass_tokens // 64), 64))
        for count, length in shapes:
            self.logits(self._filler_pairs(count, length))
        if self.device.type == "cuda" and self.backend.endswith("-graphs"):
            # the first pass ran eagerly (graphs.py): the largest one's graph too, then give
            # back what the eager passes cached (the graphs keep their own pool)
            self.logits(self._filler_pairs(*shapes[0]))
            torch.cuda.empty_cache()


#: One batch's pairs in a launch (or the pass it held back), and whose logits they are.
_Segment = tuple[PendingLogits, TokenBatch]


class _LaunchedRows:
    """The logits of a launch's passes so far, as queued: rows numbered across passes."""

    def __init__(self) -> None:
        self._parts: list[tuple[int, torch.Tensor]] = []
        self.count = 0

    def extend(self, outputs: Sequence[torch.Tensor]) -> None:
        for output in outputs:
            self._parts.append((self.count, output))
            self.count += int(output.shape[0])

    def slices(self, start: int, stop: int) -> list[torch.Tensor]:
        """Rows ``start`` to ``stop``, as views of the passes' outputs."""
        views = []
        for first, output in self._parts:
            low, high = max(start, first), min(stop, first + int(output.shape[0]))
            if low < high:
                views.append(output[low - first : high - first])
        return views


def tokenize_many(tokenizer: WordPieceTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The ids of each text without special tokens, from the Rust tokenizer's
    ``encode_batch``: the same ids as ``tokenizer(text)`` (its wrapper calls it too), minus
    the wrapper's Python work per text, and with the interpreter lock released for the whole
    call (a single ``encode`` holds it)."""
    encoded = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [encoding.ids for encoding in encoded]


def padded_forward(
    model: BertClassifier, head: ClassifierHead, pad_id: int, batch: TokenBatch
) -> torch.Tensor:
    """The encoder on one padded batch (width: longest pair, rounded up to 8),
    then the fp32 head on its [CLS] rows."""
    device = next(model.parameters()).device
    width = round_up(batch.max_length)
    rows = np.repeat(np.arange(batch.rows), batch.lengths)
    columns = batch.positions()
    input_ids = np.full((batch.rows, width), pad_id, dtype=np.int64)
    input_ids[rows, columns] = batch.ids
    token_types = np.zeros((batch.rows, width), dtype=np.int64)
    token_types[rows, columns] = batch.token_types()
    mask = np.zeros((batch.rows, width), dtype=np.int64)
    mask[rows, columns] = 1
    stacked = to_device(np.stack([input_ids, token_types, mask]), device)
    hidden = model.encode(stacked[0], stacked[1], stacked[2])
    return head(hidden[:, 0])


def pair_set(item: Prepared) -> PairSet:
    """The token ids of a request this engine prepared (public: benchmarks feed them to the
    forward pass directly); a request another engine prepared is an error."""
    if not isinstance(item.payload, PairSet):
        raise EngineError("request was prepared by another engine")
    return item.payload


def score(labels: tuple[str, ...], logits: np.ndarray, multi_label: bool) -> Scores:
    """The reference pipeline's postprocess on (entailment, contradiction) logits.

    Same arithmetic as the reference (scipy's softmax on float32 logits) and the same order:
    it reverses ``argsort`` of those float32 scores. Computing in float64 would order labels
    whose float32 scores tie (saturated at 1.0, or underflowed to 0.0) differently, and
    numpy's argsort is not stable, so the tie order is whatever that call gives.
    """
    values = logits.astype(np.float32)
    if multi_label or len(labels) == 1:
        # softmax([contradiction, entailment])[entailment], per label
        pairs = values[:, [1, 0]]
        exp = np.exp(pairs - np.max(pairs, axis=-1, keepdims=True))
        probabilities = (exp / np.sum(exp, axis=-1, keepdims=True))[:, 1]
    else:
        exp = np.exp(values[:, 0] - np.max(values[:, 0]))
        probabilities = exp / np.sum(exp)
    order = probabilities.argsort()[::-1]
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


def load_classifier_and_head(
    model_dir: Path, device: torch.device, dtype: torch.dtype
) -> tuple[BertClassifier, ClassifierHead]:
    """The model in ``dtype`` and its head in fp32, from the checkpoint's own weights."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise EngineError(f"{model_dir} has no config.json")
    try:
        config = BertSettings.of(json.loads(config_path.read_text(encoding="utf-8")))
    except (ValueError, ConfigError) as exc:
        raise EngineError(f"{config_path}: {exc}") from exc
    if config.num_labels < 3:
        raise EngineError(
            f"{model_dir}: an NLI model needs 3 output labels, config has {config.num_labels}"
        )
    with startup.step("weights_read"):
        state = load_state_dict(model_dir)
    for key in UNUSED_CHECKPOINT_KEYS:
        state.pop(key, None)
    model = BertClassifier(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise EngineError(f"{model_dir}: weights do not fit a BERT classifier: {exc}") from exc
    with startup.step("cuda_init"):  # the context, apart from the copies
        wait_for_cuda(device)
    head = ClassifierHead.of(model, device)  # before the cast: the checkpoint's precision
    module: torch.nn.Module = model
    with startup.step("to_device"):
        module.to(device=device, dtype=dtype)
    module.train(False)
    return model, head


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
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


def load_tokenizer(model_dir: Path) -> WordPieceTokenizer:
    vocab = model_dir / "vocab.txt"
    if not vocab.is_file():
        raise EngineError(f"{model_dir} has no vocab.txt")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return WordPieceTokenizer.from_vocab(vocab, **tokenizer_options(model_dir))
    except ConfigError as exc:
        raise EngineError(str(exc)) from exc


def tokenizer_options(model_dir: Path) -> dict[str, Any]:
    """What the directory's tokenizer_config.json says of lower-casing, Chinese characters
    and accents (transformers' ``BertTokenizer`` defaults otherwise)."""
    options: dict[str, Any] = {}
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        saved = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        for key in ("do_lower_case", "tokenize_chinese_chars", "strip_accents"):
            if key in saved:
                options[key] = saved[key]
    return options
