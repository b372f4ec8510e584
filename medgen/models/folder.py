"""One-folder model storage shared by the generator and the score model (MONAI bundle style).

    FOLDER/configs/metadata.json   format, versions, configs, provenance, SHA-256 of every weight file
    FOLDER/models/<name>.pt        state dicts, loaded with torch.load(weights_only=True)

Written under a temporary name and swapped in, so a reader never sees half a folder; read back
only when every weight file matches the hash its metadata records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medgen.errors import BundleError
from medgen.io.atomic import replace_dir, staging_dir
from medgen.provenance import sha256_file


def versions() -> dict[str, str]:
    import monai

    import medgen

    return {"medgen": medgen.__version__, "torch": torch.__version__, "monai": monai.__version__}


def write_model_folder(path: str | Path, meta: dict[str, Any], states: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Save `states` as models/<name>.pt and `meta` (plus versions and file hashes) atomically."""
    path = Path(path)
    tmp = staging_dir(path)
    (tmp / "models").mkdir(parents=True)
    (tmp / "configs").mkdir()
    files = {}
    for name, state in states.items():
        f = tmp / "models" / f"{name}.pt"
        torch.save({k: v.detach().cpu() for k, v in state.items()}, f)
        files[f"models/{name}.pt"] = sha256_file(f)
    (tmp / "configs" / "metadata.json").write_text(
        json.dumps({**meta, "versions": versions(), "files": files}, indent=1)
    )
    return replace_dir(tmp, path)


def read_model_folder(
    path: str | Path, fmt: str, fmt_version: int
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(metadata, state dicts by name) of a verified folder."""
    path = Path(path)
    meta_path = path / "configs" / "metadata.json"
    if not meta_path.exists():
        raise BundleError(f"{path}: not a model folder (no configs/metadata.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != fmt or meta.get("format_version") != fmt_version:
        raise BundleError(
            f"{path}: expected {fmt} v{fmt_version}, found {meta.get('format')} v{meta.get('format_version')}"
        )
    states = {}
    for rel, expected in meta["files"].items():
        f = path / rel
        if not f.exists() or sha256_file(f) != expected:
            raise BundleError(f"{path}: {rel} is missing or does not match the hash in its metadata")
        states[Path(rel).stem] = torch.load(f, map_location="cpu", weights_only=True)
    return meta, states
