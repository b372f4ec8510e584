"""Builders for MONAI's networks and schedulers from medgen configs (we write glue, not layers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from monai.networks.nets import AutoencoderKL

from medgen.config import AutoencoderConfig, AutoencoderNetworkConfig, DiffusionNetworkConfig, ScoreNetworkConfig


def build_autoencoder(cfg: AutoencoderNetworkConfig) -> AutoencoderKL:
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        latent_channels=cfg.latent_channels,
        num_res_blocks=cfg.num_res_blocks,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.nonlocal_attention,
        with_decoder_nonlocal_attn=cfg.nonlocal_attention,
    )


def build_discriminator(cfg: AutoencoderConfig) -> nn.Module:
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(
        spatial_dims=3, num_layers_d=cfg.disc_layers, channels=cfg.disc_channels, in_channels=1, out_channels=1
    )


def _unet_shape(cfg: DiffusionNetworkConfig | ScoreNetworkConfig, in_channels: int, context_dim: int | None) -> dict:
    """The arguments a DiffusionModelUNet and its ControlNet share: one place, so a ControlNet is
    always shaped like the UNet whose encoder weights are copied into it."""
    return dict(
        spatial_dims=3,
        in_channels=in_channels,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
        with_conditioning=context_dim is not None,
        cross_attention_dim=context_dim,
        # memory-efficient attention (torch SDPA) where it matters; weights are the same either way
        use_flash_attention=torch.cuda.is_available(),
    )


def build_unet(
    cfg: DiffusionNetworkConfig | ScoreNetworkConfig, in_channels: int, context_dim: int | None = None
) -> nn.Module:
    """The diffusion UNet on `in_channels` latent channels, or (ScoreNetworkConfig, 1) the image-space score model.
    `context_dim`: a conditioned model's condition vector length (medgen.models.conditions),
    which its attention levels cross-attend to."""
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(out_channels=in_channels, **_unet_shape(cfg, in_channels, context_dim))


def build_controlnet(
    cfg: DiffusionNetworkConfig,
    in_channels: int,
    label_channels: int,
    embedding: tuple[int, ...],
    context_dim: int | None,
) -> nn.Module:
    """MONAI's ControlNet shaped like the diffusion UNet `cfg` builds (so the UNet's encoder
    weights copy into it), reading a `label_channels` one-hot label map at image resolution."""
    from monai.networks.nets import ControlNet

    return ControlNet(
        conditioning_embedding_in_channels=label_channels,
        conditioning_embedding_num_channels=embedding,
        **_unet_shape(cfg, in_channels, context_dim),
    )


def build_scheduler(cfg: DiffusionNetworkConfig, sampler: str | None = None):
    """The scheduler for training (sampler None) or for sampling with `sampler`.

    ddpm and ddim share a noise process (a model trained with one samples with either); rflow is
    rectified flow and samples only with rflow.
    """
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

    sampler = sampler or cfg.scheduler
    if (sampler == "rflow") != (cfg.scheduler == "rflow"):
        raise ValueError(f"a model trained with {cfg.scheduler} cannot sample with {sampler}")
    beta = dict(schedule=cfg.beta_schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    if sampler == "rflow":
        return RFlowScheduler(num_train_timesteps=cfg.num_train_timesteps, use_discrete_timesteps=False)
    if sampler == "ddim":
        return DDIMScheduler(cfg.num_train_timesteps, clip_sample=False, prediction_type=cfg.prediction, **beta)
    return DDPMScheduler(cfg.num_train_timesteps, clip_sample=False, prediction_type=cfg.prediction, **beta)


class KLAutoencoderStep(nn.Module):
    """encode -> reparameterise with *given* noise -> decode, as one forward.

    MONAI's AutoencoderKL draws its reparameterisation noise from the global RNG; passing it in
    keeps training reproducible and resumable, and one forward is what DDP can wrap.
    """

    def __init__(self, autoencoder: AutoencoderKL):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, sigma = self.autoencoder.encode(x)
        return self.autoencoder.decode(mu + sigma * eps), mu, sigma


def latent_shape(cfg: AutoencoderNetworkConfig, size: tuple[int, int, int]) -> tuple[int, int, int, int]:
    d = cfg.downsample
    return (cfg.latent_channels, size[0] // d, size[1] // d, size[2] // d)
