"""Atomic file writes: write under a temporary name in the same folder, then rename.

A reader (or a re-run after a crash) never sees a half-written file: either the old content, the
new content, or nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".partial-"


def _suffixes(path: Path) -> str:
    # Keep '.nii.gz' whole so writers that choose a format by suffix (nibabel) still see it.
    name = path.name
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}{_suffixes(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def staging_dir(final: str | Path) -> Path:
    """A hidden sibling folder name to build `final` in before `replace_dir` swaps it in."""
    final = Path(final)
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Swap the finished folder `tmp` into place as `final` (a model folder, an exported series): a
    reader sees the old folder or the new one, never half of either."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
