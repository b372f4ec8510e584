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


MAX_METADATA_BYTES = 1 << 20
_HEX64 = frozenset("0123456789abcdef")


def read_metadata(path: str | Path, what: str = "model folder") -> dict[str, Any]:
    """configs/metadata.json of a model folder, or one BundleError naming the folder and the reason."""
    path = Path(path)
    meta_path = path / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise BundleError(f"{path}: not a {what} (no configs/metadata.json)")
    try:
        if meta_path.stat().st_size > MAX_METADATA_BYTES:
            raise BundleError(f"{path}: configs/metadata.json is {meta_path.stat().st_size} bytes; not a metadata file")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except BundleError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{path}: configs/metadata.json cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: configs/metadata.json is not a JSON object")
    return meta


def _weight_file(path: Path, rel: Any, expected: Any) -> Path:
    """A weight file named by the metadata: a relative path under models/, inside the folder (no
    '..', no absolute path, no link out of it), with a SHA-256 recorded."""
    if not isinstance(rel, str) or not isinstance(expected, str) or len(expected) != 64 or set(expected) - _HEX64:
        raise BundleError(f"{path}: metadata 'files' must map relative paths to SHA-256 hex digests")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or p.parts[:1] != ("models",) or p.suffix != ".pt":
        raise BundleError(f"{path}: weight file {rel!r} is not models/<name>.pt inside the folder; refused")
    f = path / p
    root = path.resolve()
    if root not in f.resolve().parents:
        raise BundleError(f"{path}: weight file {rel!r} leads outside the folder (a link?); refused")
    return f


def read_model_folder(
    path: str | Path, fmt: str, fmt_version: int
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(metadata, state dicts by name) of a verified folder. Any failure is one BundleError."""
    import pickle

    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != fmt or meta.get("format_version") != fmt_version:
        raise BundleError(
            f"{path}: expected {fmt} v{fmt_version}, found {meta.get('format')} v{meta.get('format_version')}"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: metadata lists no weight files")
    states = {}
    for rel, expected in files.items():
        f = _weight_file(path, rel, expected)
        if not f.is_file() or sha256_file(f) != expected:
            raise BundleError(f"{path}: {rel} is missing or does not match the hash in its metadata")
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            # torch's own message would suggest weights_only=False: never, for a file from elsewhere
            raise BundleError(
                f"{path}: {rel} is not a plain tensor file (it holds objects a safe load refuses); not loaded"
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BundleError(f"{path}: {rel} is not a state dict of tensors")
        states[Path(rel).stem] = state
    return meta, states


def build_checked(path: Path, build: Any) -> Any:
    """Run `build()` (configs from metadata, networks, load_state_dict) turning whatever a bad
    metadata value makes it raise (KeyError, pydantic's ValidationError, a shape mismatch) into one
    BundleError naming the folder."""
    try:
        return build()
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BundleError(
            f"{path}: metadata or weights do not describe a usable model ({type(e).__name__}: {msg})"
        ) from e
