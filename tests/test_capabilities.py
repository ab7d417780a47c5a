"""What the assembly finds an engine can do, read once (Capabilities.of)."""

from __future__ import annotations

from pathlib import Path

from stream_classifier.config import EngineConfig
from stream_classifier.engine.capabilities import Capabilities
from stream_classifier.engine.nli import NliEngine


def test_the_nli_engine_declares_what_the_stages_use(tiny_model: Path) -> None:
    engine = NliEngine.load(EngineConfig(model=str(tiny_model), device="cpu"), 4096)
    found = Capabilities.of(engine)
    assert found.pipelined and found.chunk_preparing and found.process_preparing
    assert found.oom_reporting
    assert not found.primed  # only the embedding engine embeds label hypotheses ahead
    assert not found.cuda
    assert "pipelined" in found.describe()


def test_a_bare_engine_has_no_capability_beyond_the_contract() -> None:
    class Bare:
        model_id = "bare"

    found = Capabilities.of(Bare())  # type: ignore[arg-type]
    assert found.describe() == "none beyond prepare and classify"
