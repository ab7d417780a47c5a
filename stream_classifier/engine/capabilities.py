"""What an engine can do beyond the :class:`~stream_classifier.engine.base.Engine` contract,
declared as Protocols and read once, when the service is assembled.

Every engine prepares and classifies. Some can do more, and the stages built around them
use it: queue a micro-batch on the device and return (the pipelined scorer), tokenize a
whole chunk in one call, rebuild their tokenizer in worker processes, embed the label
hypotheses once (``prime``), report out-of-memory splits, and name their device.
:meth:`Capabilities.of` answers each question once, so the assembly and its log say what
was found, instead of the stages probing attributes at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

from stream_classifier.engine.base import Engine, Prepared, PrepareTask


@runtime_checkable
class Pipelined(Protocol):
    """Queues a micro-batch and returns before the device is done with it (with
    ``hold_tail``, keeping its last partial pass for the next batch; ``flush`` queues it)."""

    def classify_async(self, batch: Sequence[Prepared], hold_tail: bool = False) -> Any: ...
    def flush(self) -> None: ...


@runtime_checkable
class ChunkPreparing(Protocol):
    """Tokenizes many events in one call (one Rust ``encode_batch``), a failure in place."""

    def prepare_many(self, tasks: Sequence[PrepareTask]) -> list[Prepared | Exception]: ...


@runtime_checkable
class ProcessPreparing(Protocol):
    """Can rebuild its tokenizer side in another process (tokenizer worker processes)."""

    def preparer_factory(self) -> Any: ...


@runtime_checkable
class Primed(Protocol):
    """Embeds each topic's label hypotheses once, before consuming."""

    def prime(self, labels: Sequence[str], template: str) -> None: ...


@runtime_checkable
class OomReporting(Protocol):
    """Splits a batch that ran out of GPU memory, and says so (a metric counts it)."""

    on_out_of_memory: Callable[[int], None]


@runtime_checkable
class CompilingLater(Protocol):
    """Can warm up eagerly and compile on a helper thread, taking the compiled layers once
    ready (the service's start: it scores sooner)."""

    def warmup_eagerly(self) -> None: ...
    def compile_in_background(self) -> Any: ...


@dataclass(frozen=True)
class Capabilities:
    pipelined: bool
    chunk_preparing: bool
    process_preparing: bool
    primed: bool
    oom_reporting: bool
    compiling_later: bool
    #: The engine's device is a CUDA device.
    cuda: bool

    @classmethod
    def of(cls, engine: Engine) -> Capabilities:
        device = getattr(engine, "device", None)
        return cls(
            pipelined=isinstance(engine, Pipelined),
            chunk_preparing=isinstance(engine, ChunkPreparing),
            process_preparing=isinstance(engine, ProcessPreparing),
            primed=isinstance(engine, Primed),
            oom_reporting=isinstance(engine, OomReporting),
            compiling_later=isinstance(engine, CompilingLater),
            cuda=getattr(device, "type", None) == "cuda",
        )

    def describe(self) -> str:
        found = [field.name for field in fields(self) if getattr(self, field.name)]
        return ", ".join(found) or "none beyond prepare and classify"
