"""A padding-free BERT classifier forward pass over packed token batches.

Same weights and the same arithmetic as ``transformers.BertForSequenceClassification``
(eval mode), reorganised for speed:

- the tokens of all pairs sit in one ``[tokens, hidden]`` matrix, so every linear layer
  runs on real tokens only (no padding rows);
- query, key and value are one matrix product (weights concatenated at load);
- attention runs over the packed sequences (``cu_seqlens``) with one of two kernels:
  PyTorch's variable-length flash attention where the GPU and the build have it (Ampere and
  newer, :func:`flash_unavailable`), else its memory-efficient attention (the CUTLASS
  kernel, which takes the same ``cu_seqlens`` and runs on sm_50 and newer, so a T4 or V100
  keeps the packed layout; :func:`efficient_unavailable`). Where neither runs, a padded
  scaled-dot-product attention inside the same packed layout (the CPU tests use it; it
  pads every sequence of a pass to the longest, so the engine prefers its padded backend,
  which sorts pairs by length first);
- the classifier reads only [CLS], so the last layer runs its attention queries, output
  projection and feed-forward on the [CLS] rows alone, and the head (:mod:`.head`) runs in
  fp32 on those rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F

from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.bert import BertClassifier
from stream_classifier.engine.head import ClassifierHead
from stream_classifier.startup import freeze_heap

log = logging.getLogger(__name__)

#: Logged when the layers start compiling on a helper thread (benchmarks wait for the end).
COMPILE_STARTED = "compiling the encoder layers on a helper thread"

LayerFn = Callable[[torch.Tensor, "LayerWeights", "Layout"], torch.Tensor]
#: The attention kernel of a pass: variable-length flash, variable-length memory-efficient,
#: or padded SDPA inside the packed layout.
Attention = Literal["flash", "efficient", "sdpa"]
#: The kernels that take packed sequences (``cu_seqlens``), fastest first.
VARLEN_KERNELS: tuple[Attention, ...] = ("flash", "efficient")
#: PyTorch's flash attention kernels are built for Ampere (sm_80) and newer only: a T4
#: (sm_75) or V100 (sm_70) has none.
FLASH_MIN_CAPABILITY = (8, 0)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
#: PyTorch's memory-efficient attention (from xformers' CUTLASS kernels) is built for
#: Maxwell (sm_50) and newer; bf16 only from sm_80, where it has bf16 tensor cores.
EFFICIENT_MIN_CAPABILITY = (5, 0)
EFFICIENT_BF16_CAPABILITY = (8, 0)
#: Half precision only, like flash: the engine runs fp32 only on a CPU (or when asked for),
#: and an fp32 GPU pass through this kernel has not been measured here.
EFFICIENT_DTYPES = (torch.float16, torch.bfloat16)


def flash_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why variable-length flash attention cannot run here, or None where it should.

    Capability alone is not proof (a build may still lack the kernel): the engine also
    makes one probe call at load before it relies on it.
    """
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if dtype not in FLASH_DTYPES:
        return f"the model is {str(dtype).removeprefix('torch.')}, flash needs float16/bfloat16"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this PyTorch build has no flash attention"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FLASH_MIN_CAPABILITY:
        return (
            f"the GPU has compute capability {major}.{minor}, flash attention needs "
            f"{FLASH_MIN_CAPABILITY[0]}.{FLASH_MIN_CAPABILITY[1]} or newer"
        )
    return None


def efficient_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why variable-length memory-efficient attention cannot run here, or None where it
    should. As for flash, the engine also probes it at load before relying on it (a build
    may lack the kernel: there is no availability query for it)."""
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if dtype not in EFFICIENT_DTYPES:
        name = str(dtype).removeprefix("torch.")
        return (
            f"the model is {name}, the engine runs memory-efficient attention in float16/bfloat16"
        )
    major, minor = torch.cuda.get_device_capability(device)
    need = EFFICIENT_BF16_CAPABILITY if dtype == torch.bfloat16 else EFFICIENT_MIN_CAPABILITY
    if (major, minor) < need:
        what = "in bfloat16 " if dtype == torch.bfloat16 else ""
        return (
            f"the GPU has compute capability {major}.{minor}, memory-efficient attention "
            f"{what}needs {need[0]}.{need[1]} or newer"
        )
    return None


def unavailable(kernel: Attention, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``kernel`` cannot run here, or None (padded SDPA runs everywhere)."""
    if kernel == "flash":
        return flash_unavailable(device, dtype)
    if kernel == "efficient":
        return efficient_unavailable(device, dtype)
    return None


def flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_queries: torch.Tensor,
    cu_keys: torch.Tensor,
    max_queries: int,
    max_keys: int,
    scale: float,
) -> torch.Tensor:
    """PyTorch's variable-length flash attention forward (no dropout, not causal)."""
    result = torch.ops.aten._flash_attention_forward(
        query,
        key,
        value,
        cu_queries,
        cu_keys,
        max_queries,
        max_keys,
        0.0,
        False,
        False,
        scale=scale,
    )
    return cast(torch.Tensor, result[0])


def efficient_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_queries: torch.Tensor,
    cu_keys: torch.Tensor,
    max_queries: int,
    max_keys: int,
    scale: float,
) -> torch.Tensor:
    """PyTorch's memory-efficient attention forward over packed sequences, ``[T, H, D]`` in
    and out (the kernel wants a batch of one: ``[1, T, H, D]``; no bias, dropout or mask)."""
    result = torch.ops.aten._efficient_attention_forward(
        query.unsqueeze(0),
        key.unsqueeze(0),
        value.unsqueeze(0),
        None,
        cu_queries,
        cu_keys,
        max_queries,
        max_keys,
        0.0,
        0,
        False,
        scale=scale,
    )
    return cast(torch.Tensor, result[0][0])


@dataclass(frozen=True)
class LayerWeights:
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    norm1: tuple[torch.Tensor, torch.Tensor]
    up_weight: torch.Tensor
    up_bias: torch.Tensor
    down_weight: torch.Tensor
    down_bias: torch.Tensor
    norm2: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Where each sequence's tokens are: ``cu`` (int32 offsets) and the longest length.

    ``rows``/``columns`` place the packed tokens in a padded ``[sequences, max_len]`` grid
    (only the padded SDPA attention uses them).
    """

    cu: torch.Tensor
    max_len: int
    rows: torch.Tensor
    columns: torch.Tensor

    @property
    def sequences(self) -> int:
        return int(self.cu.shape[0]) - 1


def _fuse_qkv(attention: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One [3·hidden, hidden] matrix; the model's own q/k/v become views of it (no copy)."""
    projections = (attention.query, attention.key, attention.value)
    weight = torch.cat([p.weight for p in projections]).contiguous()
    bias = torch.cat([p.bias for p in projections])
    size = projections[0].weight.shape[0]
    for index, projection in enumerate(projections):
        rows = slice(index * size, (index + 1) * size)
        projection.weight = torch.nn.Parameter(weight[rows], requires_grad=False)
        projection.bias = torch.nn.Parameter(bias[rows], requires_grad=False)
    return weight, bias


def _layer_weights(layer: Any) -> LayerWeights:
    qkv_weight, qkv_bias = _fuse_qkv(layer.attention.self)
    out = layer.attention.output
    return LayerWeights(
        qkv_weight=qkv_weight,
        qkv_bias=qkv_bias,
        out_weight=out.dense.weight,
        out_bias=out.dense.bias,
        norm1=(out.LayerNorm.weight, out.LayerNorm.bias),
        up_weight=layer.intermediate.dense.weight,
        up_bias=layer.intermediate.dense.bias,
        down_weight=layer.output.dense.weight,
        down_bias=layer.output.dense.bias,
        norm2=(layer.output.LayerNorm.weight, layer.output.LayerNorm.bias),
    )


class PackedBert:
    """Callable: a :class:`TokenBatch` in, ``[pairs, 2]`` fp32 (entailment, contradiction)."""

    def __init__(
        self,
        model: BertClassifier,
        head: ClassifierHead | None = None,
        compile_layers: bool = True,
        attention: Attention | None = None,
    ) -> None:
        """``attention``: the kernel; by default the first of :data:`VARLEN_KERNELS` that
        :func:`unavailable` finds nothing against, else padded SDPA."""
        config = model.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("packed forward supports absolute position embeddings only")
        if config.hidden_act != "gelu":
            raise ValueError(f"packed forward supports hidden_act=gelu, not {config.hidden_act}")
        embeddings = model.bert.embeddings
        self.device = embeddings.word_embeddings.weight.device
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.eps = float(config.layer_norm_eps)
        self.word = embeddings.word_embeddings.weight
        self.position = embeddings.position_embeddings.weight
        self.token_type = embeddings.token_type_embeddings.weight
        self.embedding_norm = (embeddings.LayerNorm.weight, embeddings.LayerNorm.bias)
        with torch.no_grad():
            self.layers = [_layer_weights(layer) for layer in model.bert.encoder.layer]
        self.head = head if head is not None else ClassifierHead.of(model)
        dtype = embeddings.word_embeddings.weight.dtype
        if attention is None:
            usable = [k for k in VARLEN_KERNELS if unavailable(k, self.device, dtype) is None]
            attention = usable[0] if usable else "sdpa"
        self.compile_layers = compile_layers
        #: One encoder layer: eager, until the compiled one (:meth:`compile_in_background`)
        #: is adopted. Compiled once (dynamic shapes) for all 24 layers, it fuses bias+GELU
        #: and residual+LayerNorm into single kernels.
        self.layer: LayerFn = self._layer
        self._compiled = False
        #: Changes whenever ``layer`` does: CUDA graphs captured before hold the old kernels.
        self.version = 0
        self._compiler: threading.Thread | None = None
        #: The compiled layer once the helper thread has it, and for which kernel.
        self._ready: tuple[Attention, LayerFn] | None = None
        self.attention: Attention = attention
        self.use(attention)

    @property
    def flash(self) -> bool:
        return self.attention == "flash"

    @property
    def varlen(self) -> bool:
        """Attention over the packed sequences themselves (what CUDA graphs need)."""
        return self.attention in VARLEN_KERNELS

    def use(self, attention: Attention) -> None:
        """Attend with ``attention`` from now on, eagerly: the engine moves to the next
        kernel when one fails its probe at load."""
        self.attention = attention
        self.layer, self._compiled = self._layer, False
        self.version += 1

    @property
    def compile_wanted(self) -> bool:
        """Compile where it pays: a varlen kernel on a GPU. Padded SDPA runs uncompiled (its
        grid scatter is what the CPU tests check, and it is the last resort, not a fast
        path)."""
        return self.compile_layers and self.varlen and self.device.type == "cuda"

    @property
    def compiling(self) -> bool:
        """The helper thread is compiling (its compiled layer not taken yet)."""
        return self._compiler is not None and self._compiler.is_alive()

    def compile_in_background(self) -> threading.Thread | None:
        """Compile the layer on a helper thread, which runs it once on small passes; passes
        run eagerly meanwhile and take the compiled layer at the start of the first pass
        after it is ready (:meth:`adopt_compiled`).

        Why: compiling takes seconds, most of a cold start's model set-up, and costs only a
        few per cent of the steady rate when skipped, so a replica scores eagerly at once
        rather than wait for it (docs/PERFORMANCE.md, "Start-up").
        """
        if not self.compile_wanted or self._compiler is not None:
            return None
        self._compiler = threading.Thread(
            target=self._compile, args=(self.attention,), name="compile-layers", daemon=True
        )
        log.info(COMPILE_STARTED)
        self._compiler.start()
        return self._compiler

    def _compile(self, attention: Attention) -> None:
        started = time.perf_counter()
        try:
            compiled = cast(LayerFn, torch.compile(self._layer, dynamic=True))
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # type: ignore[no-untyped-call]
            with torch.inference_mode(), _on(stream):  # as the engine's passes run
                for hidden, layout in self._compile_samples():
                    compiled(hidden, self.layers[0], layout)
            if stream is not None:
                stream.synchronize()
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop scoring
            log.warning("torch.compile of the encoder layers failed (%s); they stay eager", exc)
            return
        freeze_heap()  # the compiler's objects, before any scoring pass waits on a walk of them
        self._ready = (attention, compiled)
        log.info(
            "encoder layers compiled on a helper thread in %.1f s; passes use them from now on",
            time.perf_counter() - started,
        )

    def _compile_samples(self) -> list[tuple[torch.Tensor, Layout]]:
        """Two sequences (16 tokens and the longest) per longest length the engine's
        passes are rounded to (graphs.py), so no length compiles on the scoring thread."""
        width = self.heads * self.head_dim
        dtype = self.word.dtype
        samples = []
        positions = int(self.position.shape[0])
        for longest in range(128, positions + 1, 128) or [positions]:
            cu = torch.tensor([0, 16, 16 + longest], dtype=torch.int32, device=self.device)
            hidden = torch.randn(16 + longest, width, dtype=dtype, device=self.device)
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            samples.append((hidden, Layout(cu, longest, empty, empty)))
        return samples

    def adopt_compiled(self) -> None:
        """Run the compiled layer from now on, if the helper thread has it ready (called at
        the start of a pass, on the scoring thread)."""
        ready, self._ready = self._ready, None
        if ready is not None and ready[0] == self.attention:
            self.layer, self._compiled = ready[1], True
            self.version += 1

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        self.adopt_compiled()
        tokens, layout = self._upload(batch)
        return self.compute(tokens, layout)

    def compute(self, tokens: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The pass on uploaded inputs: ``tokens`` ``[3, T]`` (ids, token types, positions).

        Tokens after ``layout.cu[-1]`` belong to no sequence and sequences may be empty (a
        CUDA graph's fixed shapes, :mod:`.graphs`): their rows hold garbage that never
        reaches a real sequence's row.
        """
        hidden = self._embed(tokens)
        # an empty sequence at the very end starts at T: read any row, its result is unused
        cls_rows = layout.cu[:-1].long().clamp(max=tokens.shape[1] - 1)
        for layer in self.layers[:-1]:
            hidden = self._run_layer(hidden, layer, layout)
        cls_hidden = self._last_layer(hidden, self.layers[-1], layout, cls_rows)
        return self.head(cls_hidden)

    # -- inputs ------------------------------------------------------------------------

    def _upload(self, batch: TokenBatch) -> tuple[torch.Tensor, Layout]:
        """One host-to-device copy: ids, token types, positions and the offsets."""
        offsets = batch.offsets()
        host = np.concatenate([batch.ids, batch.token_types(), batch.positions(), offsets])
        tensor = torch.from_numpy(host)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        on_device = tensor.to(self.device, non_blocking=True)
        tokens = on_device[: 3 * batch.tokens].view(3, batch.tokens)
        cu = on_device[3 * batch.tokens :]
        rows, columns = self._grid(batch, offsets)
        return tokens, Layout(cu, batch.max_length, rows, columns)

    def _grid(self, batch: TokenBatch, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.varlen:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return empty, empty
        rows = np.repeat(np.arange(batch.rows), batch.lengths)
        columns = np.arange(batch.tokens) - np.repeat(offsets[:-1], batch.lengths)
        return torch.from_numpy(rows).to(self.device), torch.from_numpy(columns).to(self.device)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # Same order of additions as BertEmbeddings: words + token types, then positions.
        hidden = F.embedding(tokens[0], self.word) + F.embedding(tokens[1], self.token_type)
        hidden = hidden + F.embedding(tokens[2], self.position)
        return F.layer_norm(hidden, hidden.shape[-1:], *self.embedding_norm, self.eps)

    # -- encoder -----------------------------------------------------------------------

    def _run_layer(
        self, hidden: torch.Tensor, weights: LayerWeights, layout: Layout
    ) -> torch.Tensor:
        if not self._compiled:
            return self._layer(hidden, weights, layout)
        try:
            return self.layer(hidden, weights, layout)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop scoring
            log.warning("torch.compile failed (%s); running the layers eagerly", exc)
            self.layer, self._compiled = self._layer, False
            return self._layer(hidden, weights, layout)

    def _layer(self, hidden: torch.Tensor, weights: LayerWeights, layout: Layout) -> torch.Tensor:
        qkv = F.linear(hidden, weights.qkv_weight, weights.qkv_bias)
        qkv = qkv.view(hidden.shape[0], 3, self.heads, self.head_dim)
        context = self._attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], layout, layout)
        return self._rest(hidden, context, weights)

    def _last_layer(
        self,
        hidden: torch.Tensor,
        weights: LayerWeights,
        layout: Layout,
        cls_rows: torch.Tensor,
    ) -> torch.Tensor:
        """The last layer for the [CLS] rows only: all keys and values, [CLS] queries."""
        qkv = F.linear(hidden, weights.qkv_weight, weights.qkv_bias)
        qkv = qkv.view(hidden.shape[0], 3, self.heads, self.head_dim)
        query = qkv[cls_rows, 0]
        sequences = layout.sequences
        cls_layout = Layout(
            torch.arange(sequences + 1, dtype=torch.int32, device=self.device),
            1,
            torch.arange(sequences, device=self.device),
            torch.zeros(sequences, dtype=torch.long, device=self.device),
        )
        context = self._attend(query, qkv[:, 1], qkv[:, 2], cls_layout, layout)
        return self._rest(hidden[cls_rows], context, weights)

    def _rest(
        self, hidden: torch.Tensor, context: torch.Tensor, weights: LayerWeights
    ) -> torch.Tensor:
        """Attention output projection, feed-forward, both residual LayerNorms."""
        attended = F.linear(context.reshape(hidden.shape), weights.out_weight, weights.out_bias)
        hidden = F.layer_norm(attended + hidden, hidden.shape[-1:], *weights.norm1, self.eps)
        up = F.gelu(F.linear(hidden, weights.up_weight, weights.up_bias))
        down = F.linear(up, weights.down_weight, weights.down_bias)
        return F.layer_norm(down + hidden, hidden.shape[-1:], *weights.norm2, self.eps)

    # -- attention ---------------------------------------------------------------------

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        queries: Layout,
        keys: Layout,
    ) -> torch.Tensor:
        """Attention of each query sequence over its own key sequence, ``[tokens, H, D]``."""
        if self.attention == "sdpa":
            return self._padded_attention(query, key, value, queries, keys)
        # module globals looked up per call: the CPU tests stand in for the kernels
        kernel = flash_varlen if self.attention == "flash" else efficient_varlen
        return kernel(
            query, key, value, queries.cu, keys.cu, queries.max_len, keys.max_len, self.scale
        )

    def _padded_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        queries: Layout,
        keys: Layout,
    ) -> torch.Tensor:
        def grid(packed: torch.Tensor, layout: Layout) -> torch.Tensor:
            shape = (layout.sequences, layout.max_len, self.heads, self.head_dim)
            padded = packed.new_zeros(shape)
            padded[layout.rows, layout.columns] = packed
            return padded.transpose(1, 2)

        mask = torch.zeros(keys.sequences, keys.max_len, dtype=torch.bool, device=self.device)
        mask[keys.rows, keys.columns] = True
        context = F.scaled_dot_product_attention(
            grid(query, queries),
            grid(key, keys),
            grid(value, keys),
            attn_mask=mask[:, None, None, :],
            scale=self.scale,
        )
        return context.transpose(1, 2)[queries.rows, queries.columns]


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
