"""Sentence pairs as flat numpy arrays, and how they are cut into token-budget batches.

Everything here is vectorised: a batch of thousands of pairs is gathered, and its
positions and token types computed, with a handful of numpy calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class PairArrays(Protocol):
    """Pairs back to back, as :class:`TokenBatch` holds them."""

    @property
    def ids(self) -> np.ndarray: ...
    @property
    def lengths(self) -> np.ndarray: ...
    @property
    def a_lengths(self) -> np.ndarray: ...


@dataclass(frozen=True)
class TokenBatch:
    """Pairs back to back: ``ids`` (int32, all tokens), ``lengths`` and segment-A lengths.

    Each pair is ``[CLS] A [SEP] B [SEP]``, so token type 1 starts at ``a_length + 2``.
    """

    ids: np.ndarray
    lengths: np.ndarray
    a_lengths: np.ndarray

    @classmethod
    def concatenate(cls, parts: Sequence[PairArrays]) -> TokenBatch:
        """The pairs of ``parts``, one after another."""
        return cls(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            np.concatenate([p.a_lengths for p in parts]),
        )

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.lengths.max())

    def offsets(self) -> np.ndarray:
        """Start of each pair and the end of the last one (``cu_seqlens``), int32."""
        offsets = np.zeros(self.rows + 1, dtype=np.int32)
        np.cumsum(self.lengths, out=offsets[1:])
        return offsets

    def positions(self) -> np.ndarray:
        """Position of every token inside its pair."""
        starts = np.repeat(self.offsets()[:-1], self.lengths)
        positions: np.ndarray = np.arange(self.tokens, dtype=np.int32) - starts
        return positions

    def token_types(self) -> np.ndarray:
        """0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``."""
        first_b = np.repeat(self.a_lengths + 2, self.lengths)
        types: np.ndarray = (self.positions() >= first_b).astype(np.int32)
        return types

    def take(self, rows: np.ndarray) -> TokenBatch:
        """The pairs ``rows`` (indices, any order), in that order."""
        offsets = self.offsets()
        lengths = self.lengths[rows]
        if rows.size and np.all(np.diff(rows) == 1):
            start, stop = int(offsets[rows[0]]), int(offsets[rows[-1] + 1])
            return TokenBatch(self.ids[start:stop], lengths, self.a_lengths[rows])
        new_starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        source = np.repeat(offsets[rows], lengths) + np.arange(int(lengths.sum())) - new_starts
        return TokenBatch(self.ids[source], lengths, self.a_lengths[rows])

    def halves(self) -> tuple[TokenBatch, TokenBatch]:
        half = self.rows // 2
        return self.take(np.arange(half)), self.take(np.arange(half, self.rows))


def packed_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Consecutive pairs whose real tokens add up to at most ``max_tokens`` (no padding)."""
    ends = np.cumsum(lengths, dtype=np.int64)
    batches: list[np.ndarray] = []
    start, done = 0, 0
    while start < lengths.shape[0]:
        stop = int(np.searchsorted(ends, done + max_tokens, side="right"))
        stop = max(stop, start + 1)
        batches.append(np.arange(start, stop))
        done = int(ends[stop - 1])
        start = stop
    return batches


def padded_batches(
    lengths: np.ndarray, max_tokens: int, multiple: int, narrowest: float = 0.0
) -> list[np.ndarray]:
    """Pairs sorted longest first, cut so that rows × padded width ≤ ``max_tokens``, and
    (``narrowest``) so that no pair is narrower than that fraction of its pass's widest."""
    widths = -(-lengths.astype(np.int64) // multiple) * multiple
    order = np.argsort(-widths, kind="stable")
    negated = -widths[order]  # ascending, for searchsorted
    batches: list[np.ndarray] = []
    start = 0
    while start < order.shape[0]:
        widest = int(-negated[start])
        stop = start + max(1, max_tokens // widest)
        # the pairs at least ``narrowest`` of the widest are a prefix of what is left
        wide_enough = start + int(np.searchsorted(negated[start:], -narrowest * widest, "right"))
        stop = min(stop, max(start + 1, wide_enough))
        batches.append(order[start:stop])
        start = stop
    return batches
