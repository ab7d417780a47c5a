"""Engines score prepared requests; pure compute, no Kafka inside.

``load_engine`` builds the engine a configuration names; each engine lives in its own
module and is imported only when asked for, so the CLI stays light.
"""

from __future__ import annotations

from pathlib import Path

from stream_classifier.config import EngineConfig
from stream_classifier.engine.base import Engine, EngineError, Prepared, Scores

__all__ = ["Engine", "EngineError", "Prepared", "Scores", "import_libraries", "load_engine"]


def import_libraries(config: EngineConfig) -> None:
    """Import what loading ``config``'s engine will use (the start-up clock times the imports
    apart from the load): torch and tokenizers for the StructBERT engine, transformers'
    model code as well (most of its import time) for the engines built on it. The CUDA
    context is started meanwhile, on a helper thread."""
    from stream_classifier.engine.shared import start_cuda

    start_cuda(config.device)  # on a helper thread, while the rest imports and loads
    from stream_classifier.engine import nli  # noqa: F401

    if config.kind == "embedding" or _transformers_checkpoint(config):
        from transformers import PreTrainedModel  # noqa: F401


def _transformers_checkpoint(config: EngineConfig) -> bool:
    from stream_classifier.engine.hf_nli import is_transformers_classifier

    return is_transformers_classifier(Path(config.model).expanduser())


def load_engine(config: EngineConfig, max_batch_tokens: int) -> Engine:
    """Load the configured engine (model weights included); raises EngineError if it can't."""
    if config.kind == "nli":
        # A transformers sequence-classification checkpoint scores like transformers'
        # pipeline; anything else (ModelScope StructBERT dirs and ids) like ModelScope's.
        if _transformers_checkpoint(config):
            from stream_classifier.engine.hf_nli import HfNliEngine

            return HfNliEngine.load(config, max_batch_tokens=max_batch_tokens)
        from stream_classifier.engine.nli import NliEngine

        return NliEngine.load(config, max_batch_tokens=max_batch_tokens)
    if config.kind == "embedding":
        from stream_classifier.engine.embedding import EmbeddingEngine

        return EmbeddingEngine.load(config, max_batch_tokens=max_batch_tokens)
    raise EngineError(f"engine.kind={config.kind!r} is not available in this build")
