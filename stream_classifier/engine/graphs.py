"""The packed forward pass replayed from CUDA graphs, one graph per pass shape.

Eagerly, one pass is a few hundred kernel launches, and the launching thread takes the
interpreter lock back after each one. In the service that thread shares the lock with the
Kafka thread, so every launch can wait up to Python's switch interval, and the GPU runs
dry. A replayed graph is one launch per pass, whatever the other threads do.

A graph has fixed shapes, so a pass is fitted into a bucket (:class:`Shape`):

- its tokens, rounded up to a sixteenth of the next power of two, less 8 (at most
  ``max_tokens``, the budget that bounds GPU memory); the extra tokens belong to no
  sequence. So a pass is padded by at most 1/16 of its tokens; in a large micro-batch only
  the last pass is short of the budget. The 8: on an H100 a pass of a multiple of 64
  tokens ran 3-5% slower than one of 8 fewer (cuBLAS picks other matrix kernels;
  ``benchmarks/graph_pass_profile.py``), so no bucket is one, and the engine fills its
  passes up to :func:`pass_budget`;
- its sequences, rounded up to a power of two, and to at least 1/64 of its tokens (so
  that full passes of pairs of 64 tokens or more on average share a count, and those of
  the reference workload's texts (docs/PERFORMANCE.md) the shape that the engine's
  warm-up captures); the extra sequences are empty;
- its longest sequence, rounded up to 128 (flash attention's block of queries, so the
  kernels get the same grid as the eager pass; a multiple of the memory-efficient kernel's
  block of 32 or 64 queries too, whose extra blocks find no query and return at once).

Both packed attention kernels (:data:`.packed.VARLEN_KERNELS`) take the fixed shapes the
same way: ``cu_seqlens`` on the device, the longest length as a number fixed at capture,
no host synchronisation. The padded SDPA inside the packed layout is not graphed: it
builds its grid from per-pass index tensors that a fixed shape does not have.

The rows of extra tokens and sequences hold garbage (attention never reads them into a
real sequence) and only the real sequences' logits are returned.

Every pass is replayed once its shape has a graph. A shape is captured on its second pass
(:data:`CAPTURE_ON_PASS`), so that everything lazy (compiled kernels, the stream's cuBLAS
workspace) exists before its capture and one-off shapes cost no capture. Before that, a
pass borrows a captured graph with room for it, at most a quarter larger in tokens
(:data:`BORROW_TOKENS`), and runs eagerly only where there is none: in a busy service an
eager pass or a capture held the engine thread for up to half a second on an H100, against
tens of milliseconds alone (docs/PERFORMANCE.md). A graph of the same tokens and sequences
and a longer longest length serves a shape for good: its extra query blocks find no query
and return at once, as the rounding to 128 already has them do. The engine's warm-up
captures the full passes of the reference workload's texts, and while the input is
saturated the engine keeps passes full (``NliEngine.classify_async``'s ``hold_tail``), so
few short shapes occur. All graphs share one memory pool: they run one after another on
one stream, so memory is that of the largest pass, as eagerly. At most :data:`MAX_GRAPHS`
are kept; a shape beyond them, or whose capture failed, runs eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from stream_classifier import startup
from stream_classifier.engine.batches import TokenBatch
from stream_classifier.engine.packed import Layout, PackedBert

log = logging.getLogger(__name__)

#: Buckets are this much short of a multiple of 64 tokens (see the module docstring).
OFF_64 = 8
#: Flash attention's block of queries (a multiple of the memory-efficient kernel's): the
#: longest sequence is rounded up to it.
LENGTH_STEP = 128
#: Fewest tokens and sequences of a bucket (also keeps sizes 0 and 1, which the compiler
#: specialises, out of the captured shapes).
MIN_TOKENS = 256
MIN_SEQUENCES = 8
#: Most graphs kept; passes of a shape beyond these run eagerly.
MAX_GRAPHS = 256
#: The pass of a shape that captures its graph (the ones before borrow a larger graph or
#: run eagerly).
CAPTURE_ON_PASS = 2
#: Most tokens, as a multiple of its own, of the graph a pass borrows until its own shape
#: is captured (:meth:`GraphedForward._graph_for`).
BORROW_TOKENS = 1.25


class Shape(NamedTuple):
    tokens: int
    sequences: int
    length: int


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def pass_budget(max_tokens: int) -> int:
    """The most tokens a graphed pass should hold: ``max_tokens``, or 8 fewer where it is a
    multiple of 64 (the full passes then share the bucket just under the budget)."""
    return max_tokens - OFF_64 if max_tokens % 64 == 0 and max_tokens > 64 else max_tokens


def bucket_tokens(tokens: int, max_tokens: int) -> int | None:
    """The smallest multiple of a sixteenth of ``tokens``' next power of two (at least 64),
    less 8, that holds ``tokens``; at most ``max_tokens``. None where the pass is over the
    budget (a pair longer than it)."""
    if tokens > max_tokens:
        return None
    step = max(64, _next_power_of_two(tokens + OFF_64) // 16)
    bucket = -(-(tokens + OFF_64) // step) * step - OFF_64
    return min(max(MIN_TOKENS - OFF_64, bucket), max_tokens)


def shape_of(batch: TokenBatch, max_tokens: int) -> Shape | None:
    """The bucket of ``batch``, or None where it runs eagerly."""
    tokens = bucket_tokens(batch.tokens, max_tokens)
    if tokens is None:
        return None
    floor = _next_power_of_two(tokens) // 64
    sequences = max(MIN_SEQUENCES, floor, _next_power_of_two(batch.rows))
    length = -(-batch.max_length // LENGTH_STEP) * LENGTH_STEP
    return Shape(tokens, sequences, length)


def static_inputs(batch: TokenBatch, shape: Shape) -> np.ndarray:
    """What a graph of ``shape`` reads, int32: ids, token types and positions (each padded
    to ``shape.tokens`` with zeros), then ``cu_seqlens`` padded with empty sequences."""
    size, used = shape.tokens, batch.tokens
    host = np.zeros(3 * size + shape.sequences + 1, dtype=np.int32)
    host[:used] = batch.ids
    host[size : size + used] = batch.token_types()
    host[2 * size : 2 * size + used] = batch.positions()
    offsets = batch.offsets()
    host[3 * size : 3 * size + offsets.shape[0]] = offsets
    host[3 * size + offsets.shape[0] :] = used
    return host


@dataclass
class _Graph:
    """One captured pass: its input buffer, its output, and the graph that links them."""

    shape: Shape
    inputs: torch.Tensor
    logits: torch.Tensor
    graph: torch.cuda.CUDAGraph | None


class GraphedForward:
    """Callable like :class:`PackedBert` (a :class:`TokenBatch` in, ``[pairs, 2]`` fp32 out),
    replaying a CUDA graph per :class:`Shape`. It runs on the caller's current stream, which
    must not be the default one (CUDA cannot capture there).

    ``capture=False`` runs the same fixed-shape pass without graphs: what a CPU test can
    check (padding, empty sequences, which rows come back).
    """

    def __init__(self, packed: PackedBert, max_tokens: int, capture: bool = True) -> None:
        if not packed.varlen:
            raise ValueError("graphed passes need a packed varlen kernel (flash or efficient)")
        self.packed = packed
        self.max_tokens = max_tokens
        self.capture = capture
        self.device = packed.device
        self._graphs: dict[Shape, _Graph | None] = {}
        self._passes: Counter[Shape] = Counter()
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        #: The packed layers' version the graphs were captured with.
        self._version = packed.version
        #: Shapes captured, shapes whose capture failed (they run eagerly), seconds spent.
        self.captured = 0
        self.failed = 0
        self.capture_s = 0.0

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        self.packed.adopt_compiled()
        if self.packed.version != self._version:  # the layers changed: recapture
            self._graphs.clear()
            self._passes.clear()
            self._version = self.packed.version
            # a pool whose graphs are all gone is released: capturing into it again fails
            # (CUDACachingAllocator's use_count assertion)
            self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        graph = self._graph_for(batch)
        if graph is None:
            return self.packed(batch)
        return self._replay(graph, batch)

    def _graph_for(self, batch: TokenBatch) -> _Graph | None:
        """The graph that runs ``batch`` (None: run it eagerly): its shape's own; else a
        graph of the same tokens and sequences with room for its longest length, for good;
        else its own, captured now if this is its shape's :data:`CAPTURE_ON_PASS`-th pass;
        else, until then, a graph with room for it of up to :data:`BORROW_TOKENS` times its
        tokens.

        Why borrow: in a busy service a pass run eagerly, and a capture, each held the
        engine thread for up to half a second where a replay takes well under a
        millisecond of it (docs/PERFORMANCE.md, "The current tree at 50-90%…"), and at a
        paced load most batches end in a pass of a shape not seen before.
        """
        shape = shape_of(batch, self.max_tokens)
        if shape is None:
            return None
        own = self._graphs.get(shape)
        if own is not None:
            return own
        longer = self._roomy(shape, shape.tokens, same_sequences=True)
        if longer is not None:
            return longer
        # No capture while the layers compile on the helper thread: its device work
        # breaks a capture, and graphs of the eager layers would be dropped soon anyway.
        # A shape whose capture failed (None) is not tried again.
        if shape not in self._graphs and not self.packed.compiling:
            self._passes[shape] += 1
            if self._passes[shape] >= CAPTURE_ON_PASS:
                self._graphs[shape] = self._new(shape)
                if self._graphs[shape] is not None:
                    return self._graphs[shape]
        return self._roomy(shape, int(shape.tokens * BORROW_TOKENS))

    def _roomy(self, shape: Shape, most_tokens: int, same_sequences: bool = False) -> _Graph | None:
        """The smallest captured graph with room for ``shape``, of at most ``most_tokens``
        (and of its sequences exactly, with ``same_sequences``)."""
        fits = [
            graph
            for graph in self._graphs.values()
            if graph is not None
            and shape.tokens <= graph.shape.tokens <= most_tokens
            and shape.sequences <= graph.shape.sequences
            and (graph.shape.sequences == shape.sequences or not same_sequences)
            and graph.shape.length >= shape.length
        ]
        return min(fits, key=lambda graph: graph.shape, default=None)

    def _replay(self, graph: _Graph, batch: TokenBatch) -> torch.Tensor:
        host = torch.from_numpy(static_inputs(batch, graph.shape))
        if self.device.type == "cuda":
            host = host.pin_memory()
        graph.inputs.copy_(host, non_blocking=True)
        if graph.graph is not None:
            graph.graph.replay()
        else:
            graph.logits = self.packed.compute(*self._views(graph.inputs, graph.shape))
        # a copy: the next replay of this graph overwrites its output (later on the stream)
        return graph.logits[: batch.rows].clone()

    def _new(self, shape: Shape) -> _Graph | None:
        if len(self._graphs) >= MAX_GRAPHS:
            return None
        started = time.perf_counter()
        try:
            graph = self._capture(shape) if self.capture else self._static(shape)
        except Exception as exc:  # noqa: BLE001 - an uncapturable shape runs eagerly
            self.failed += 1
            log.warning("no CUDA graph for passes of %s (%s); running them eagerly", shape, exc)
            return None
        finally:
            seconds = time.perf_counter() - started
            self.capture_s += seconds
            startup.record("graphs", seconds)  # the warm-up's captures, in start-up's clock
        self.captured += 1
        return graph

    def _views(self, inputs: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, Layout]:
        size = shape.tokens
        tokens = inputs[: 3 * size].view(3, size)
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        return tokens, Layout(inputs[3 * size :], shape.length, empty, empty)

    def _buffer(self, shape: Shape) -> torch.Tensor:
        size = 3 * shape.tokens + shape.sequences + 1
        return torch.zeros(size, dtype=torch.int32, device=self.device)

    def _static(self, shape: Shape) -> _Graph:
        inputs = self._buffer(shape)
        return _Graph(shape, inputs, torch.empty(0), None)

    def _capture(self, shape: Shape) -> _Graph:
        stream = torch.cuda.current_stream(self.device)
        if stream == torch.cuda.default_stream(self.device):
            raise RuntimeError("CUDA graphs are captured on a side stream, not the default one")
        inputs = self._buffer(shape)
        tokens, layout = self._views(inputs, shape)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the scorer's waiter thread may wait on events meanwhile
        graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
        try:
            logits = self.packed.compute(tokens, layout)
        except BaseException:
            with contextlib.suppress(Exception):  # broken already: report the first cause
                graph.capture_end()
            raise
        graph.capture_end()
        return _Graph(shape, inputs, logits, graph)
