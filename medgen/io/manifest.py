"""The ingestion manifest: one CSV row per scan found, validated against its JSON Schema.

The schema (data_schemas/manifest.schema.json, shipped in the package as medgen/schemas) is the
single definition of a row; this module only builds, checks, writes and reads rows.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

from medgen.errors import ManifestError
from medgen.io.atomic import write_text_atomic
from medgen.io.schemas import load_schema
from medgen.text import neutralise_cell, restore_cell

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("train", "val", "test")


@functools.cache
def _validator():
    import jsonschema

    s = load_schema("manifest")
    jsonschema.Draft202012Validator.check_schema(s)
    return jsonschema.Draft202012Validator(s)


COLUMNS: tuple[str, ...] = tuple(load_schema("manifest")["required"])


def row_problems(row: dict[str, str]) -> str:
    """What the schema finds wrong with one row ('' when nothing)."""
    errors = sorted(_validator().iter_errors(row), key=lambda e: list(e.path))
    return "; ".join(f"{'/'.join(map(str, e.path)) or '(row)'}: {e.message}" for e in errors)


def validate_rows(rows: list[dict[str, str]], where: str = "manifest") -> None:
    """Raise ManifestError naming the first bad row and every problem in it."""
    v = _validator()
    for i, row in enumerate(rows):
        errors = sorted(v.iter_errors(row), key=lambda e: list(e.path))
        if errors:
            msgs = "; ".join(f"{'/'.join(map(str, e.path)) or '(row)'}: {e.message}" for e in errors)
            raise ManifestError(f"{where}: row {i + 1} ({row.get('scan_id', '?')}) does not match the schema: {msgs}")
    ids = [r["scan_id"] for r in rows]
    if len(ids) != len(set(ids)):
        raise ManifestError(f"{where}: duplicate scan_id")
    # No subject may fall into two splits.
    seen: dict[str, str] = {}
    for r in rows:
        if r["split"]:
            if seen.setdefault(r["subject_id"], r["split"]) != r["split"]:
                raise ManifestError(f"{where}: subject {r['subject_id']} appears in two splits")


def write_manifest(rows: list[dict[str, str]], path: str | Path) -> Path:
    """Validate, then write atomically (sorted by scan_id so re-runs give identical files)."""
    rows = sorted(rows, key=lambda r: r["scan_id"])
    validate_rows(rows, str(path))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows({k: neutralise_cell(v) for k, v in r.items()} for r in rows)
    return write_text_atomic(path, buf.getvalue())


def read_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{k: restore_cell(v) if isinstance(v, str) else v for k, v in r.items()} for r in csv.DictReader(f)]
    validate_rows(rows, str(path))
    return rows


def read_manifest(path: str | Path) -> "pd.DataFrame":
    """The manifest as a DataFrame of strings (validated against the schema first)."""
    import pandas as pd

    rows = read_rows(path)
    return pd.DataFrame(rows, columns=list(COLUMNS), dtype=str)


def assign_split(
    subject_id: str, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: str = "medgen"
) -> str:
    """Deterministic subject-level split: a hash of the subject picks the bucket.

    Hashing (rather than shuffling the list of subjects) keeps every subject's split stable when
    subjects are added, so a scan never moves from test into train between runs.
    """
    total = sum(fractions)
    u = int(hashlib.sha256(f"split:{seed}:{subject_id}".encode()).hexdigest()[:12], 16) / 16**12
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac / total
        if u < edge:
            return name
    return SPLITS[-1]
