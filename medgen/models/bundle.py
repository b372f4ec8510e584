"""A trained generator as one folder, MONAI-bundle style, loaded with `weights_only=True`.

    GENERATOR/configs/metadata.json   networks, scheduler, scale factor, preprocessing (spacing,
                                      size, affine, intensity map), versions, provenance, file hashes
    GENERATOR/models/autoencoder.pt   state dict
    GENERATOR/models/diffusion.pt     state dict (EMA weights when trained with EMA)

Everything needed to generate in the model's geometry and units is in the folder; nothing is
pickled code, so loading never executes anything from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from monai.networks.nets import AutoencoderKL

from medgen.config import (
    AutoencoderConfig,
    AutoencoderNetworkConfig,
    DataConfig,
    DiffusionConfig,
    DiffusionNetworkConfig,
)
from medgen.datasets.preprocess import IntensityMap, model_affine
from medgen.models.conditions import ConditionSpace
from medgen.models.folder import (  # noqa: F401 (BundleError re-exported)
    BundleError,
    build_checked,
    read_metadata,
    read_model_folder,
    write_model_folder,
)

FORMAT = "medgen-generator"
FORMAT_VERSION = 1


@dataclass
class Generator:
    path: Path
    autoencoder: AutoencoderKL
    unet: nn.Module
    scale_factor: float
    autoencoder_cfg: AutoencoderNetworkConfig
    diffusion_cfg: DiffusionNetworkConfig
    data_cfg: DataConfig
    intensity: IntensityMap
    modality: str
    units: str
    metadata: dict[str, Any]
    conditions: ConditionSpace | None = None  # None: an unconditioned model

    @property
    def affine(self) -> np.ndarray:
        return model_affine(self.data_cfg)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["latent_shape"])


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
    conditions: ConditionSpace | None = None,
) -> Path:
    """Write the generator folder (atomically; see medgen.models.folder). A conditioned model
    records its columns, their levels or ranges and the encoding, so a request can be checked."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
    }
    if conditions is not None:
        meta["conditioning"] = conditions.to_json()
    return write_model_folder(path, meta, {"autoencoder": autoencoder_state, "diffusion": diffusion_state})


def generator_metadata(path: str | Path) -> dict[str, Any]:
    """A generator folder's configs/metadata.json (no weights loaded): what validation, export and
    the flows need to know about a model without building its networks."""
    return read_metadata(path, "generator folder")


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load and verify a generator folder (file hashes must match its metadata)."""

    path = Path(path)
    meta, states = read_model_folder(path, FORMAT, FORMAT_VERSION)
    return build_checked(path, lambda: _build_generator(path, meta, states, device))


def _build_generator(path: Path, meta: dict[str, Any], states: dict[str, Any], device) -> Generator:
    from medgen.models.networks import build_autoencoder, build_unet

    acfg = AutoencoderNetworkConfig.from_metadata(meta["autoencoder"])
    dcfg = DiffusionNetworkConfig.model_validate(meta["diffusion"])
    data_cfg = DataConfig.model_validate(meta["preprocessing"]["data"])
    conditions = ConditionSpace.from_json(meta["conditioning"]) if "conditioning" in meta else None
    ae = build_autoencoder(acfg)
    unet = build_unet(dcfg, acfg.latent_channels, conditions.dim if conditions else None)
    ae.load_state_dict(states["autoencoder"])
    unet.load_state_dict(states["diffusion"])
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
        conditions=conditions,
    )
