"""Whose files are these? Output folders medgen may write into, and what it may replace there.

A user's `--out` can be the scan they are denoising, a folder of their own files, or medgen's own
earlier output. Only the last may be replaced. A folder medgen wrote holds a small record
(`.medgen-output.json`: which command, which files); without one, a non-empty folder is the user's
and is refused unless `overwrite=True`, which still replaces only the files of medgen's record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from medgen.errors import OutputExistsError
from medgen.io.atomic import write_text_atomic
from medgen.text import printable

RECORD = ".medgen-output.json"


def _overlaps(out: Path, inputs: Iterable[Path]) -> Path | None:
    o = out.resolve()
    for i in inputs:
        ia = i.resolve()
        if ia == o or o in ia.parents:
            return i
    return None


def own_files(folder: Path, writer: str) -> list[str]:
    """Files (relative names) that `writer` recorded writing into `folder`; [] when it recorded none."""
    rec = folder / RECORD
    try:
        body = json.loads(rec.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(body, dict) or body.get("writer") != writer:
        return []
    files = body.get("files", [])
    return [f for f in files if isinstance(f, str) and ".." not in Path(f).parts and not Path(f).is_absolute()]


def check_output(out: Path, *, inputs: Sequence[Path], writer: str, overwrite: bool, is_folder: bool) -> list[str]:
    """Refuse an output that is (or holds) an input, or one that holds what medgen did not write.

    Returns the files of medgen's own earlier output there (for the caller to replace).
    """
    clash = _overlaps(out, inputs)
    if clash is not None:
        raise OutputExistsError(
            f"{printable(str(out))}: the output is the input {printable(str(clash))} (or holds it); "
            "writing there would destroy the source: choose another --out"
        )
    if not is_folder:
        if out.exists() and not overwrite and out.name not in own_files(out.parent, writer):
            raise OutputExistsError(
                f"{printable(str(out))} exists and medgen did not write it; pass --overwrite to replace it, "
                "or choose another --out"
            )
        return []
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{printable(str(out))} is a file, not a folder")
    if not out.exists():
        return []
    mine = own_files(out, writer)
    theirs = [p for p in out.iterdir() if p.name != RECORD and p.name not in {Path(f).parts[0] for f in mine}]
    if theirs and not overwrite:
        raise OutputExistsError(
            f"{printable(str(out))} is not empty and medgen did not write it ({len(theirs)} item(s), e.g. "
            f"{printable(theirs[0].name)}); choose an empty --out, or pass --overwrite (which replaces only "
            "medgen's own earlier output there)"
        )
    return mine


def record_output(folder: Path, files: Iterable[str], writer: str, *, add: bool = False) -> Path:
    """Record the files `writer` wrote into `folder` (`add`: beside those it recorded before)."""
    names = set(files) | (set(own_files(folder, writer)) if add else set())
    return write_text_atomic(folder / RECORD, json.dumps({"writer": writer, "files": sorted(names)}, indent=1))
