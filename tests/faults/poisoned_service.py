"""`stream-classifier run` with an engine that raises on texts holding POISON.

The real service process and model; only the NLI engine's ``prepare``, ``prepare_many``
(what the service calls, one chunk per consume) and ``classify`` are wrapped, the way a
model that crashes on some inputs would behave. Used by the fault suite's poison-event
test.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from stream_classifier import cli
from stream_classifier.engine.base import Prepared, Scores
from stream_classifier.engine.nli import NliEngine

MARKER = "POISON"
_prepare = NliEngine.prepare
_prepare_many = NliEngine.prepare_many
_classify = NliEngine.classify


@dataclasses.dataclass(frozen=True)
class Poisoned:
    payload: object


def prepare(
    self: NliEngine, text: str, labels: Sequence[str], template: str, multi_label: bool
) -> Prepared:
    prepared = _prepare(self, text, labels, template, multi_label)
    if MARKER in text:
        return dataclasses.replace(prepared, payload=Poisoned(prepared.payload))
    return prepared


def prepare_many(
    self: NliEngine, tasks: Sequence[tuple[str, Sequence[str], str, bool]]
) -> list[Prepared | Exception]:
    results = _prepare_many(self, tasks)
    return [
        dataclasses.replace(result, payload=Poisoned(result.payload))
        if isinstance(result, Prepared) and MARKER in task[0]
        else result
        for result, task in zip(results, tasks, strict=True)
    ]


def classify(self: NliEngine, batch: Sequence[Prepared]) -> list[Scores]:
    if any(isinstance(prepared.payload, Poisoned) for prepared in batch):
        raise ValueError(f"the model cannot score this text ({MARKER})")
    return _classify(self, batch)


NliEngine.prepare = prepare  # type: ignore[method-assign]
NliEngine.prepare_many = prepare_many  # type: ignore[method-assign]
NliEngine.classify = classify  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
