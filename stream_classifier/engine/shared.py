"""What the engines share: device and dtype choice, padding, out-of-memory halving, and
logits on their way back from the device."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, Self, TypeVar

import numpy as np
import torch

from stream_classifier.engine.base import EngineError, Prepared, Scores
from stream_classifier.engine.batches import padded_batches

log = logging.getLogger(__name__)

PAD_MULTIPLE = 8
#: Token budget per batch on a CPU: larger batches stop fitting the caches
#: (docs/PERFORMANCE.md, "The service on a GPU", its list of device defaults).
CPU_BATCH_TOKENS = 8192
#: On a CPU, each padded pass's narrowest pair is at least this fraction of its widest: a
#: CPU computes padding as it computes tokens, and a pass of a few rows costs it little
#: more per token than a full one, so a small batch of mixed lengths, cut only by the
#: budget, spent about as long on padding as on its tokens (docs/PERFORMANCE.md).
CPU_NARROWEST = 0.9
#: Memory for tokenized hypotheses (ids cut to what a pair can hold, and their keys).
HYPOTHESIS_CACHE_BYTES = 64 << 20


def padded_plan(lengths: np.ndarray, budget: int, device: torch.device) -> list[np.ndarray]:
    """The padded passes over pairs of these lengths (:func:`.batches.padded_batches`),
    with a CPU's budget and width bound."""
    if device.type == "cpu":
        return padded_batches(lengths, min(budget, CPU_BATCH_TOKENS), PAD_MULTIPLE, CPU_NARROWEST)
    return padded_batches(lengths, budget, PAD_MULTIPLE)


def round_up(length: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-length // multiple) * multiple


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"engine.device={name} but no CUDA device is available")
    return device


#: The CUDA context being created on a helper thread (:func:`start_cuda`), if it is.
_cuda_context: threading.Thread | None = None


def start_cuda(name: str) -> None:
    """Create the CUDA context of ``engine.device`` on a helper thread, where it is CUDA.

    Why: the start-up has other work to do meanwhile (its remaining imports, the Kafka
    check, reading the weights), so the context costs it nothing where creating one is slow;
    :func:`wait_for_cuda` waits for it before the first tensor goes to the device.
    """
    global _cuda_context
    try:
        device = pick_device(name)
    except EngineError:
        return  # the load says so
    if device.type != "cuda" or _cuda_context is not None:
        return
    _cuda_context = threading.Thread(
        target=_create_context, args=(device,), name="cuda-context", daemon=True
    )
    _cuda_context.start()


def _create_context(device: torch.device) -> None:
    with contextlib.suppress(Exception):  # a failure shows again, properly, at the load
        torch.empty(1, device=device)


def wait_for_cuda(device: torch.device) -> None:
    """The CUDA context exists once this returns (created here if no helper thread did)."""
    if device.type != "cuda":
        return
    if _cuda_context is not None:
        _cuda_context.join()
    torch.empty(1, device=device)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """One host-to-device copy, from pinned memory and without waiting, on a GPU."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class Halvable(Protocol):
    """A batch of sentence pairs that can be cut in two (TokenBatch, hf_nli's Pairs)."""

    @property
    def rows(self) -> int: ...
    def halves(self) -> tuple[Self, Self]: ...


H = TypeVar("H", bound=Halvable)


def run_halving_on_oom(
    batch: H,
    forward: Callable[[H], torch.Tensor],
    outputs: list[torch.Tensor],
    device: torch.device,
    on_out_of_memory: Callable[[int], None],
) -> None:
    """Queue one batch's forward pass; on out-of-memory split it in two and retry each."""
    try:
        with torch.inference_mode():
            outputs.append(forward(batch))
        return
    except torch.OutOfMemoryError as exc:
        if batch.rows == 1:
            raise EngineError("out of memory on a single sentence pair") from exc
    if device.type == "cuda":
        torch.cuda.empty_cache()
    on_out_of_memory(batch.rows)
    log.warning("out of memory on %d pairs, splitting the batch in two", batch.rows)
    first, second = batch.halves()
    run_halving_on_oom(first, forward, outputs, device, on_out_of_memory)
    run_halving_on_oom(second, forward, outputs, device, on_out_of_memory)


class PendingLogits:
    """Logits still on their way back: one non-blocking copy into pinned memory, started
    once every pass with the batch's pairs is queued (:meth:`queued`; for a batch whose
    last pass was held back, at the engine's next launch)."""

    def __init__(self, order: np.ndarray) -> None:
        self._order = order
        self._parts: list[torch.Tensor] = []
        self._event: torch.cuda.Event | None = None
        self._host: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    @classmethod
    def of(cls, on_device: torch.Tensor, order: np.ndarray) -> PendingLogits:
        """A batch queued whole: ``on_device`` holds every row (in ``order``)."""
        pending = cls(order)
        pending.queued([on_device])
        return pending

    def add(self, rows: Sequence[torch.Tensor]) -> None:
        """The logits of the batch's next rows (on the device, maybe not computed yet)."""
        self._parts += rows

    def queued(self, rows: Sequence[torch.Tensor] = ()) -> None:
        """With its last ``rows``, every row is queued: start the copy back (on the
        current stream)."""
        parts, self._parts = [*self._parts, *rows], []
        on_device = parts[0] if len(parts) == 1 else torch.cat(parts)
        if on_device.device.type == "cuda":
            self._host = torch.empty(on_device.shape, dtype=on_device.dtype, pin_memory=True)
            self._host.copy_(on_device, non_blocking=True)
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()
        else:
            self._host = on_device
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        """A pass with some of its rows failed: ``wait()`` raises ``error``."""
        self._error = error
        self._ready.set()

    def wait(self) -> np.ndarray:
        """The logits in input order (blocks until the device is done)."""
        self._ready.wait()
        if self._error is not None:
            raise self._error
        if self._event is not None:
            self._event.synchronize()
        assert self._host is not None
        gathered = self._host.numpy()
        result = np.empty_like(gathered)
        result[self._order] = gathered
        return result


class PendingScores:
    """The scores of a queued micro-batch; ``result()`` blocks until they are ready.
    ``score`` turns one request's rows of (entailment, contradiction) logits into its
    scores, as the engine's reference pipeline does."""

    def __init__(
        self,
        items: tuple[Prepared, ...],
        logits: PendingLogits | None,
        score: Callable[[tuple[str, ...], np.ndarray, bool], Scores],
    ) -> None:
        self._items = items
        self._logits = logits
        self._score = score

    def result(self) -> list[Scores]:
        if self._logits is None:
            return []
        logits = self._logits.wait()
        results: list[Scores] = []
        start = 0
        for item in self._items:
            stop = start + len(item.labels)
            results.append(self._score(item.labels, logits[start:stop], item.multi_label))
            start = stop
        return results
