"""The noise-conditional score model: network, noise schedule, and its one-folder bundle.

    MODEL/configs/metadata.json   network + schedule config, normalisation rule, versions,
                                  provenance (command, data list with hashes, seed), file hashes
    MODEL/models/score.pt         state dict (EMA weights), loaded with weights_only=True

The schedule maps a noise-to-signal ratio sigma to a diffusion time: x_t = sqrt(abar) (x + sigma n)
with abar = 1 / (1 + sigma^2), and t the (continuous) time where the schedule's abar equals it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medgen.config import ScoreNetworkConfig
from medgen.models.folder import build_checked, read_model_folder, write_model_folder

FORMAT = "medgen-score-model"
FORMAT_VERSION = 1
DEFAULT_MODEL = "denoiser_default"


def build_score_unet(cfg: ScoreNetworkConfig) -> nn.Module:
    from medgen.models.networks import build_unet

    return build_unet(cfg, 1)


class NoiseSchedule:
    """abar(t) of the configured DDPM betas, interpolated to continuous t."""

    def __init__(self, cfg: ScoreNetworkConfig):
        from monai.networks.schedulers import DDPMScheduler

        sched = DDPMScheduler(
            cfg.num_train_timesteps, schedule=cfg.beta_schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end
        )
        self.abar = sched.alphas_cumprod.double().numpy()
        self.ratio = np.sqrt((1 - self.abar) / self.abar)  # noise-to-signal ratio at each integer t
        self.t = np.arange(len(self.abar), dtype=np.float64)

    def time_of(self, sigma: float | np.ndarray) -> np.ndarray:
        """Continuous diffusion time whose noise ratio is `sigma` (clamped to the schedule)."""
        return np.interp(np.log(sigma), np.log(self.ratio), self.t)

    def abar_of(self, t: float | np.ndarray) -> np.ndarray:
        return np.interp(t, self.t, self.abar)

    def time_of_torch(self, sigma: torch.Tensor) -> torch.Tensor:
        """`time_of` for tensors (training draws sigmas on the device)."""
        log_r = torch.as_tensor(np.log(self.ratio), dtype=torch.float32, device=sigma.device)
        ls = torch.log(sigma).clamp(log_r[0], log_r[-1])
        i = torch.searchsorted(log_r, ls).clamp(1, len(log_r) - 1)
        w = (ls - log_r[i - 1]) / (log_r[i] - log_r[i - 1])
        return (i - 1).float() + w

    @property
    def sigma_range(self) -> tuple[float, float]:
        return float(self.ratio[0]), float(self.ratio[-1])


@dataclass
class ScoreModel:
    path: Path | None
    unet: nn.Module
    cfg: ScoreNetworkConfig
    schedule: NoiseSchedule
    metadata: dict[str, Any]

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.channels) - 1)


def save_score_model(
    path: str | Path, cfg: ScoreNetworkConfig, state: dict[str, torch.Tensor], provenance: dict[str, Any]
) -> Path:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "denoiser": cfg.model_dump(mode="json", exclude={"train", "augment"}),  # training-only settings: in provenance
        "normalisation": "intensities scaled so the 99.5th percentile is 1 (and the 0.5th is 0 when values go negative); sigma is in those units",
        "provenance": provenance,
    }
    return write_model_folder(path, meta, {"score": state})


def default_model_path() -> Path:
    return Path(str(resources.files("medgen").joinpath("weights", DEFAULT_MODEL)))


def load_score_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> ScoreModel:
    """Load a score-model folder (the shipped default when `path` is None), checking file hashes."""
    path = Path(path) if path is not None else default_model_path()
    meta, states = read_model_folder(path, FORMAT, FORMAT_VERSION)

    def build() -> ScoreModel:
        cfg = ScoreNetworkConfig.model_validate(meta["denoiser"])
        unet = build_score_unet(cfg)
        unet.load_state_dict(states["score"])
        return ScoreModel(path, unet.to(device).eval(), cfg, NoiseSchedule(cfg), meta)

    return build_checked(path, build)
