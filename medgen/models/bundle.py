"""A trained generator as one folder, MONAI-bundle style, loaded with `weights_only=True`.

    GENERATOR/configs/metadata.json   networks, scheduler, scale factor, preprocessing (spacing,
                                      size, affine, intensity map), versions, provenance, file hashes
    GENERATOR/models/autoencoder.pt   state dict
    GENERATOR/models/diffusion.pt     state dict (EMA weights when trained with EMA)

Everything needed to generate in the model's geometry and units is in the folder; nothing is
pickled code, so loading never executes anything from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import medgen
from medgen.config import AutoencoderConfig, DataConfig, DiffusionConfig
from medgen.errors import MedgenError
from medgen.preprocess import IntensityMap, model_affine

FORMAT = "medgen-generator"
FORMAT_VERSION = 1


class BundleError(MedgenError):
    """A generator folder that is incomplete, altered, or of an unknown format."""


@dataclass
class Generator:
    path: Path
    autoencoder: nn.Module
    unet: nn.Module
    scale_factor: float
    autoencoder_cfg: AutoencoderConfig
    diffusion_cfg: DiffusionConfig
    data_cfg: DataConfig
    intensity: IntensityMap
    modality: str
    units: str
    metadata: dict[str, Any]

    @property
    def affine(self) -> np.ndarray:
        return model_affine(self.data_cfg)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["latent_shape"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_generator(
    path: str | Path,
    *,
    autoencoder_cfg: AutoencoderConfig,
    diffusion_cfg: DiffusionConfig,
    data_cfg: DataConfig,
    intensity: IntensityMap,
    scale_factor: float,
    latent_shape: tuple[int, ...],
    autoencoder_state: dict[str, torch.Tensor],
    diffusion_state: dict[str, torch.Tensor],
    modality: str,
    units: str,
    provenance: dict[str, Any],
) -> Path:
    """Write the folder under a temporary name, then swap it in: a reader never sees half a bundle."""
    import monai

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    (tmp / "models").mkdir(parents=True)
    (tmp / "configs").mkdir()
    torch.save(autoencoder_state, tmp / "models" / "autoencoder.pt")
    torch.save(diffusion_state, tmp / "models" / "diffusion.pt")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"medgen": medgen.__version__, "torch": torch.__version__, "monai": monai.__version__},
        "modality": modality,
        "units": units,
        "scale_factor": scale_factor,
        "latent_shape": list(latent_shape),
        "preprocessing": {
            "data": data_cfg.model_dump(mode="json"),
            "intensity": intensity.to_json(),
            "affine": model_affine(data_cfg).tolist(),
        },
        "autoencoder": autoencoder_cfg.model_dump(mode="json", exclude={"train", "perceptual"}),
        "diffusion": diffusion_cfg.model_dump(mode="json", exclude={"train"}),
        "provenance": provenance,
        "files": {f"models/{n}": _sha256(tmp / "models" / n) for n in ("autoencoder.pt", "diffusion.pt")},
    }
    (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=1))
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load and verify a generator folder (file hashes must match its metadata)."""
    from medgen.models.networks import build_autoencoder, build_unet

    path = Path(path)
    meta_path = path / "configs" / "metadata.json"
    if not meta_path.exists():
        raise BundleError(f"{path}: not a generator folder (no configs/metadata.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: unknown format {meta.get('format')} v{meta.get('format_version')}")
    for rel, expected in meta["files"].items():
        f = path / rel
        if not f.exists() or _sha256(f) != expected:
            raise BundleError(f"{path}: {rel} is missing or does not match the hash in its metadata")
    train_stub = {"train": {"steps": 1}}
    acfg = AutoencoderConfig.model_validate({**meta["autoencoder"], **train_stub})
    dcfg = DiffusionConfig.model_validate({**meta["diffusion"], **train_stub})
    data_cfg = DataConfig.model_validate(meta["preprocessing"]["data"])
    ae, unet = build_autoencoder(acfg), build_unet(dcfg, acfg.latent_channels)
    ae.load_state_dict(torch.load(path / "models" / "autoencoder.pt", map_location="cpu", weights_only=True))
    unet.load_state_dict(torch.load(path / "models" / "diffusion.pt", map_location="cpu", weights_only=True))
    return Generator(
        path=path,
        autoencoder=ae.to(device).eval(),
        unet=unet.to(device).eval(),
        scale_factor=float(meta["scale_factor"]),
        autoencoder_cfg=acfg,
        diffusion_cfg=dcfg,
        data_cfg=data_cfg,
        intensity=IntensityMap(**meta["preprocessing"]["intensity"]),
        modality=meta["modality"],
        units=meta["units"],
        metadata=meta,
    )
