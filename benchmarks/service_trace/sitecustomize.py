"""A tracer for the service on a GPU or a CPU (diagnostics only, never imported by the
package).

Python imports ``sitecustomize`` at start-up from ``sys.path``; ``run.sh`` puts this folder
there and sets ``SC_TRACE`` to a JSON path. Once ``stream_classifier.service`` is imported,
the engine stage's methods are wrapped to record, for every forward pass, when the engine
thread launched it (host clock) and when the device ran it (two CUDA events on the engine's
stream, placed on the host clock by one synchronised reference event; on a CPU, the host
clock around the pass); every launch and return of a micro-batch or piece (events, the
batch's priority, the piece's index), every submission (events, priority), every CUDA
graph capture, and every pass run without a graph (tokens, longest sequence, whether
through the compiled layers: a first pass of a new shape there is where a recompile would
show), and every garbage collection (its generation and how many objects it freed: a full
collection stops every thread). With ``SC_TRACE_NO_FREEZE`` set, ``gc.freeze`` does
nothing, for an A/B of the frozen heap. The JSON is written when the scorer shuts down
(the service's SIGTERM drain). ``analyze.py`` reads it. Also each inline tokenizing
(``InlinePreparer.flush``, on the Kafka thread). The Kafka thread's loop: every turn, and
inside it every consume (messages, and how many from topics named ``*live*``: the
priority benchmark's), every wait on the engine stage, and every write of finished
batches.
"""

from __future__ import annotations

import builtins
import gc
import json
import os
import time
from typing import Any

_PATH = os.environ.get("SC_TRACE")


def _install() -> None:
    import torch

    from stream_classifier import pending, preparing, scoring, service, source
    from stream_classifier.engine import graphs, nli, packed

    record: dict[str, list[Any]] = {
        "passes": [],
        "launch": [],
        "back": [],
        "submit": [],
        "captures": [],
        "eager": [],
        "gc": [],
        "prepare": [],
        "turn": [],
        "consume": [],
        "wait_engine": [],
        "write": [],
    }
    reference: dict[str, Any] = {}

    cuda = torch.cuda.is_available()

    def stamp(stream: Any) -> Any:
        """A CUDA event on ``stream``; on a CPU, the host clock (the pass ran in the call)."""
        if not cuda:
            return time.monotonic()
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record(stream)
        return event

    def wrap(cls: Any, name: str, note: Any) -> None:
        inner = getattr(cls, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            return note(self, lambda: inner(self, *args, **kwargs), *args)

        setattr(cls, name, wrapper)

    def run_pass(engine: Any, call: Any, batch: Any, *_: Any) -> Any:
        stream = getattr(engine, "stream", None)
        if not reference and cuda:
            reference["event"] = stamp(stream)
            torch.cuda.synchronize()
            reference["host"] = time.monotonic()
        started = time.monotonic()
        begin = stamp(stream)
        result = call()
        end = stamp(stream)
        record["passes"].append([started, time.monotonic(), batch.tokens, batch.rows, begin, end])
        return result

    def piece_note(piece: Any, *_: Any) -> list[int]:
        """Events, the batch's priority and the piece's index in its batch."""
        return [len(piece.requests), piece.job.priority, piece.index]

    def timed(key: str, size: Any) -> Any:
        def note(_self: Any, call: Any, *args: Any) -> Any:
            started = time.monotonic()
            result = call()
            record[key].append([started, time.monotonic(), size(*args)])
            return result

        return note

    def submitted(_self: Any, call: Any, requests: Any, *_: Any) -> Any:
        record["submit"].append([time.monotonic(), len(requests), scoring.priority_of(requests)])
        return call()

    def tokenized(preparer: Any, call: Any, *_: Any) -> Any:
        before = len(preparer._submitted) + preparer.deferred()
        started = time.monotonic()
        result = call()
        events = before - preparer.deferred()
        if events:
            record["prepare"].append([started, time.monotonic(), events])
        return result

    def eager_pass(forward: Any, call: Any, batch: Any, *_: Any) -> Any:
        started = time.monotonic()
        result = call()
        ended = time.monotonic()
        compiled = bool(forward._compiled)
        record["eager"].append([started, ended, batch.tokens, batch.max_length, compiled])
        return result

    def consumed(_self: Any, call: Any, *_: Any) -> Any:
        started = time.monotonic()
        messages = call()
        live = sum(1 for m in messages if "live" in (m.topic() or ""))
        record["consume"].append([started, time.monotonic(), len(messages), live])
        return messages

    def shutdown(_self: Any, call: Any, *_: Any) -> Any:
        result = call()
        if cuda:
            torch.cuda.synchronize()
        base: Any = reference.get("event")  # None only if no pass ran (then unused)
        passes = []
        for started, ended, tokens, rows, begin, end in record["passes"]:
            if cuda:
                on_device = [reference["host"] + base.elapsed_time(e) / 1e3 for e in (begin, end)]
            else:
                on_device = [begin, end]
            passes.append([started, ended, tokens, rows, *on_device])
        with open(str(_PATH), "w", encoding="utf-8") as file:
            json.dump({**record, "passes": passes}, file)
        return result

    collecting: list[float] = []

    def collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting[:] = [time.monotonic()]
        elif collecting:
            record["gc"].append(
                [collecting[0], time.monotonic(), info["generation"], info["collected"]]
            )

    gc.callbacks.append(collection)
    if os.environ.get("SC_TRACE_NO_FREEZE"):
        gc.freeze = lambda: None
    wrap(nli.NliEngine, "_run", run_pass)
    wrap(graphs.GraphedForward, "_new", timed("captures", lambda shape: list(shape)))
    wrap(scoring.PipelinedScorer, "_launch", timed("launch", piece_note))
    wrap(scoring.PipelinedScorer, "_scored", timed("back", lambda back: piece_note(back.piece)))
    wrap(packed.PackedBert, "__call__", eager_pass)
    wrap(scoring.PipelinedScorer, "submit", submitted)
    wrap(preparing.InlinePreparer, "flush", tokenized)
    wrap(scoring.PipelinedScorer, "shutdown", shutdown)
    wrap(service.Service, "turn", timed("turn", lambda: 0))
    wrap(service.Service, "_write_scored", timed("write", lambda *_: 0))
    wrap(pending.PendingBatches, "wait_for_engine", timed("wait_engine", lambda t: t))
    wrap(source.KafkaSource, "consume", consumed)


if _PATH:
    _import = builtins.__import__
    _installed: list[bool] = []

    def _hook(name: str, *args: Any, **kwargs: Any) -> Any:
        module = _import(name, *args, **kwargs)
        if not _installed and name == "stream_classifier.service":
            _installed.append(True)
            _install()
        return module

    builtins.__import__ = _hook
