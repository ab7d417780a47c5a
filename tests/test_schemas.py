from __future__ import annotations

from pathlib import Path

from stream_classifier.schemas import SCHEMAS, schema_text

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def test_committed_schemas_match_the_models() -> None:
    for name, model in SCHEMAS.items():
        committed = (SCHEMA_DIR / name).read_text(encoding="utf-8")
        assert committed == schema_text(model), f"schemas/{name} drifted: run `make schemas`"


def test_no_stale_schema_files() -> None:
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(SCHEMAS)


def test_the_committed_avro_output_schema_matches_the_model() -> None:
    from stream_classifier.formats import output_schema_text
    from stream_classifier.schemas import AVRO_OUTPUT

    committed = (SCHEMA_DIR / AVRO_OUTPUT).read_text(encoding="utf-8")
    assert committed == output_schema_text("avro") + "\n", (
        "schemas/output.avsc drifted: `make schemas`"
    )
