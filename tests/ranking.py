"""Comparing our scores with a reference pipeline's."""

from __future__ import annotations

from typing import Any

import pytest

from stream_classifier.engine.base import Scores


def assert_same_ranking(result: Scores, expected: dict[str, list[Any]]) -> None:
    """Same scores within 1e-5, same order except among ties closer than 1e-6 (the
    reference's own order of tied labels depends on float32 noise in its batch rows)."""
    assert dict(zip(result.labels, result.scores, strict=True)) == pytest.approx(
        dict(zip(expected["labels"], expected["scores"], strict=True)), abs=1e-5
    )
    for ours, theirs, score in zip(
        result.labels, expected["labels"], expected["scores"], strict=True
    ):
        if ours != theirs:
            tied = expected["scores"][expected["labels"].index(ours)]
            assert abs(tied - score) < 1e-6, (result.labels, expected["labels"])
