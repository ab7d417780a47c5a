"""The contract between the service and an engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class EngineError(Exception):
    """The engine cannot load or cannot score (a bad model, a device failure)."""


@dataclass(frozen=True)
class Prepared:
    """A request tokenized by an engine, ready to score.

    ``tokens`` is its cost against ``max_batch_tokens``: the padded length of every
    sequence it puts through the model.
    """

    labels: tuple[str, ...]
    multi_label: bool
    tokens: int
    payload: object


#: One event's arguments to ``prepare``: text, labels, hypothesis template, multi-label.
PrepareTask = tuple[str, Sequence[str], str, bool]


def prepare_each(
    text_ids: Sequence[Sequence[int]],
    tasks: Sequence[PrepareTask],
    build: Callable[[Sequence[int], Sequence[str], str, bool], Prepared],
) -> list[Prepared | Exception]:
    """``build`` each task from its text's ids (tokenized together beforehand, in one call);
    an event whose ``build`` raises gets its exception in its place, the rest go on."""
    results: list[Prepared | Exception] = []
    for ids, (_, labels, template, multi_label) in zip(text_ids, tasks, strict=True):
        try:
            results.append(build(ids, labels, template, multi_label))
        except Exception as exc:  # noqa: BLE001 - that event's failure alone
            results.append(exc)
    return results


@dataclass(frozen=True)
class Scores:
    """Labels sorted by score, highest first, and their scores in the same order."""

    labels: tuple[str, ...]
    scores: tuple[float, ...]

    @property
    def top_label(self) -> str:
        return self.labels[0]


class Engine(Protocol):
    """Zero-shot classification: ``prepare`` each request once, ``classify`` them in batches."""

    #: The model identifier written into every output event.
    model_id: str

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        """Tokenize on the CPU; cheap enough to run in the consuming thread."""
        ...

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        """Score every prepared request, results in input order."""
        ...

    def warmup(self) -> None:
        """Run the largest batch the configuration allows once, before consuming."""
        ...
