"""JSON Schemas of the message contracts and the topic configuration, from the models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stream_classifier.config import ServiceConfig, TopicConfig
from stream_classifier.messages import DeadLetterContext, InputEvent, ScoredEvent

SCHEMAS: dict[str, type[BaseModel]] = {
    "input.schema.json": InputEvent,
    "output.schema.json": ScoredEvent,
    "dead-letter.schema.json": DeadLetterContext,
    "topic-config.schema.json": TopicConfig,
    "config.schema.json": ServiceConfig,
}


def schema_text(model: type[BaseModel]) -> str:
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **model.model_json_schema(),
    }
    return json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


#: The scored event's Avro schema, as the service registers it for ``output_format: avro``
#: (register it under ``<output topic>-value`` where ``register_output_schemas`` is false).
AVRO_OUTPUT = "output.avsc"


def write_schemas(directory: Path) -> list[Path]:
    from stream_classifier.formats import output_schema_text

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        path = directory / name
        path.write_text(schema_text(model), encoding="utf-8")
        written.append(path)
    avro = directory / AVRO_OUTPUT
    avro.write_text(output_schema_text("avro") + "\n", encoding="utf-8")
    return [*written, avro]
