"""The JSON Schemas every file medgen writes is checked against (manifest, quality report,
provenance sidecar), read once from the package (medgen/schemas, a copy of data_schemas/)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    text = resources.files("medgen").joinpath("schemas", f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def validate(doc: Any, name: str) -> None:
    """Raise jsonschema.ValidationError when `doc` does not follow schema `name`."""
    import jsonschema

    jsonschema.validate(doc, load_schema(name))
