"""Hashes and versions that tie an output to the code, model and data behind it."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_folder_sha256(path: str | Path) -> str:
    """A model folder's identity: the hash of its metadata, which records every weight file's hash."""
    return sha256_file(Path(path) / "configs" / "metadata.json")


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str | None]:
    """medgen's version, and the git commit when running from a checkout (None otherwise)."""
    import medgen

    commit = None
    root = Path(medgen.__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            )
            commit = out.stdout.strip() or None
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if commit and dirty.stdout.strip():
                commit += "-dirty"
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"medgen": medgen.__version__, "git_commit": commit}
