"""A stub engine with honest semantics for window tests: it reads a bounded number of
tokens of each text, like a model reads its 512, and a label scores high exactly when
the tokens it read hold that label's keyword.

The tiny test checkpoints have random weights, so they cannot tell a harmful sentence
from a harmless one; this engine can, and it loses what lies past its budget the way a
real one does, which is what windows are for.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from stream_classifier.engine.base import Prepared, Scores

#: Tokens of a text the engine reads (a pair's budget, less the hypothesis).
READ_TOKENS = 200
#: label -> the keyword whose presence in what was read makes it score high ("harmless"
#: scores high where none was read).
KEYWORDS = {"violence": "kill", "spam": "buy"}
WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Read:
    """What the engine read of a text: its first ``READ_TOKENS`` words, lowercased."""

    words: tuple[str, ...]


class KeywordEngine:
    """See the module docstring. Implements the engine contract and the window side."""

    model_id = "keyword-stub"

    def __init__(self, read_tokens: int = READ_TOKENS, seconds_per_event: float = 0.0) -> None:
        self.read_tokens = read_tokens
        #: How long scoring takes per event: a capacity, for tests of what goes first.
        self.seconds_per_event = seconds_per_event
        #: Every text this engine was asked to read, in order (windows included).
        self.texts: list[str] = []
        #: The first word of every text scored, in the order scored.
        self.scored: list[str] = []

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [match.span() for match in WORD.finditer(text)]

    def text_budget(self, hypotheses: Sequence[str]) -> int | None:
        longest = max((len(WORD.findall(h)) for h in hypotheses), default=0)
        return self.read_tokens - longest

    def prepare(
        self, text: str, labels: Sequence[str], template: str, multi_label: bool
    ) -> Prepared:
        self.texts.append(text)
        words = tuple(w.lower().strip(".,!?") for w in WORD.findall(text))
        kept = words[: self.text_budget([template.format(label) for label in labels])]
        return Prepared(tuple(labels), multi_label, len(kept), Read(kept))

    def classify(self, batch: Sequence[Prepared]) -> list[Scores]:
        if self.seconds_per_event:
            time.sleep(self.seconds_per_event * len(batch))
        for item in batch:
            assert isinstance(item.payload, Read)
            self.scored.append(item.payload.words[0] if item.payload.words else "")
        return [self._score(item) for item in batch]

    def _score(self, item: Prepared) -> Scores:
        assert isinstance(item.payload, Read)
        words = item.payload.words
        clean = not any(keyword in words for keyword in KEYWORDS.values())
        logits = [
            4.0 if KEYWORDS.get(label) in words or (label == "harmless" and clean) else -3.0
            for label in item.labels
        ]
        if item.multi_label or len(item.labels) == 1:
            values = [1.0 / (1.0 + math.exp(-x)) for x in logits]
        else:
            exp = [math.exp(x) for x in logits]
            values = [x / sum(exp) for x in exp]
        order = sorted(range(len(values)), key=lambda i: -values[i])
        return Scores(tuple(item.labels[i] for i in order), tuple(values[i] for i in order))

    def warmup(self) -> None:
        pass


def long_post(sentences: int = 60, last: str = "I will kill you tomorrow.") -> str:
    """About 3,000 characters of harmless talk (50 characters a sentence), then ``last``."""
    harmless = [f"Sentence {i} is about the weather and the garden." for i in range(sentences)]
    return " ".join([*harmless, last])
