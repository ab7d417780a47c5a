"""Engines score prepared requests; pure compute, no Kafka inside.

``load_engine`` builds the engine a configuration names; each engine lives in its own
module and is imported only when asked for, so the CLI stays light.
"""

from __future__ import annotations

from pathlib import Path

from stream_classifier.config import EngineConfig
from stream_classifier.engine.base import Engine, EngineError, Prepared, Scores

__all__ = ["Engine", "EngineError", "Prepared", "Scores", "load_engine"]


def load_engine(config: EngineConfig, max_batch_tokens: int) -> Engine:
    """Load the configured engine (model weights included); raises EngineError if it can't."""
    if config.kind == "nli":
        from stream_classifier.engine.hf_nli import HfNliEngine, is_transformers_classifier

        # A transformers sequence-classification checkpoint scores like transformers'
        # pipeline; anything else (ModelScope StructBERT dirs and ids) like ModelScope's.
        if is_transformers_classifier(Path(config.model).expanduser()):
            return HfNliEngine.load(config, max_batch_tokens=max_batch_tokens)
        from stream_classifier.engine.nli import NliEngine

        return NliEngine.load(config, max_batch_tokens=max_batch_tokens)
    if config.kind == "embedding":
        from stream_classifier.engine.embedding import EmbeddingEngine

        return EmbeddingEngine.load(config, max_batch_tokens=max_batch_tokens)
    raise EngineError(f"engine.kind={config.kind!r} is not available in this build")
