"""Stage 1: the KL autoencoder (L1 + KL, optional PatchGAN after a warm-up, optional local
perceptual network), validation PSNR/SSIM, and the latent scale factor (1 / std of latents)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from monai.networks.nets import AutoencoderKL

from medgen.config import PipelineConfig
from medgen.datasets.prepared import manifest_items, prepare
from medgen.datasets.preprocess import IntensityMap
from medgen.io.atomic import atomic_path, write_text_atomic
from medgen.models.networks import KLAutoencoderStep, build_autoencoder, build_discriminator, latent_shape
from medgen.provenance import sha256_json
from medgen.training.loop import Part, Trainer, digest, init_distributed, unwrap, wrap

STAGE_DIR = "autoencoder"


@dataclass
class AutoencoderStage:
    """A trained stage 1, as the diffusion stage and the bundle need it."""

    path: Path
    autoencoder: nn.Module
    scale_factor: float
    intensity: IntensityMap
    metrics: dict[str, float]
    weights_sha256: str


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent voxels, averaged over the batch (as MONAI's tutorials)."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


@torch.no_grad()
def reconstruction_metrics(
    ae: AutoencoderKL, images: torch.Tensor, device: torch.device, data_range: float
) -> dict[str, float]:
    """PSNR and SSIM (MONAI metrics) of deterministic reconstructions (decode of the latent mean)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr, ssim = PSNRMetric(max_val=data_range), SSIMMetric(spatial_dims=3, data_range=data_range, win_size=7)
    for x in images.split(1):
        x = x.to(device)
        r = ae.reconstruct(x).float().clamp(x.min(), x.max())
        psnr(r, x)
        ssim(r, x)
    return {"psnr": float(psnr.aggregate()), "ssim": float(ssim.aggregate())}


@torch.no_grad()
def latent_scale_factor(ae: AutoencoderKL, images: torch.Tensor, device: torch.device) -> float:
    """1 / std of the latent means over the training volumes (so diffusion sees unit-variance latents)."""
    z = torch.cat([ae.encode(x.to(device))[0].float().cpu() for x in images.split(1)])
    return float(1.0 / z.std().clamp_min(1e-6))


def train_autoencoder(
    cfg: PipelineConfig,
    manifest: str | Path,
    run_dir: str | Path,
    *,
    device: str | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train stage 1 into RUN/autoencoder/ and return that folder."""
    cfg.require("data", "autoencoder")
    acfg, dcfg = cfg.autoencoder, cfg.data
    assert acfg is not None and dcfg is not None
    d = init_distributed(device)
    run = Path(run_dir) / STAGE_DIR
    run.mkdir(parents=True, exist_ok=True)
    cache = Path(run_dir) / "cache"
    train = prepare(manifest_items(manifest, dcfg), dcfg, cache)
    val_items = manifest_items(manifest, dcfg, dcfg.val_splits)
    val = prepare(val_items, dcfg, cache, "validation") if val_items else train
    data_range = dcfg.intensity.out_max - dcfg.intensity.out_min

    torch.manual_seed(acfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts)
    ae = build_autoencoder(acfg)
    step_module = wrap(KLAutoencoderStep(ae), d)
    parts = [
        Part(
            "autoencoder",
            step_module,
            torch.optim.Adam(step_module.parameters(), lr=acfg.train.lr),
            acfg.train.ema_decay,
        )
    ]
    disc = None
    if acfg.adv_weight > 0:
        disc = wrap(build_discriminator(acfg), d)
        parts.append(Part("discriminator", disc, torch.optim.Adam(disc.parameters(), lr=acfg.disc_lr)))
    perceptual = None
    if acfg.perceptual is not None:
        perceptual = torch.jit.load(str(acfg.perceptual.torchscript), map_location=d.device).eval()
        for p in perceptual.parameters():
            p.requires_grad_(False)
    from monai.losses import PatchAdversarialLoss

    adv_loss = PatchAdversarialLoss(criterion="least_squares")
    lat = latent_shape(acfg, dcfg.size)

    def step_fn(ctx, x: torch.Tensor) -> dict[str, torch.Tensor]:
        recon, mu, sigma = step_module(x, ctx.randn((x.shape[0], *lat)))
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        kl = kl_loss(mu.float(), sigma.float())
        loss = l1 + acfg.kl_weight * kl
        out = {"l1": l1, "kl": kl}
        if perceptual is not None:
            p = (perceptual(recon) - perceptual(x)).abs().mean()
            loss = loss + acfg.perceptual.weight * p  # type: ignore[union-attr]
            out["perceptual"] = p
        if disc is not None and ctx.step >= acfg.adv_start:
            # the generator's term goes through the bare discriminator: no DDP sync, no D gradients
            g_adv = adv_loss(unwrap(disc)(recon.contiguous())[-1], target_is_real=True, for_discriminator=False)
            loss = loss + acfg.adv_weight * g_adv
            fake = disc(recon.detach().contiguous())[-1]
            real = disc(x.contiguous())[-1]
            d_loss = 0.5 * (
                adv_loss(fake, target_is_real=False, for_discriminator=True)
                + adv_loss(real, target_is_real=True, for_discriminator=True)
            )
            out["adv_g"] = g_adv
            out["discriminator"] = acfg.adv_weight * d_loss
        out["autoencoder"] = loss
        return out

    def validate(step: int) -> dict[str, float]:
        # every rank computes (MONAI's metrics all-gather their buffers when a process group exists)
        return reconstruction_metrics(ae, val.images, d.device, data_range)

    fingerprint = sha256_json(
        {
            "autoencoder": acfg.model_dump(mode="json"),
            "data": dcfg.model_dump(mode="json"),
            "train": [i["sha256"] for i in train.items],
            "val": [i["sha256"] for i in val_items],
        }
    )
    trainer = Trainer(
        run, acfg.train, parts, step_fn, train.images, d, validate=validate, name="autoencoder", fingerprint=fingerprint
    )
    final = trainer.fit(stop_after=stop_after)
    if final < acfg.train.steps:
        return run
    if parts[0].ema is not None:  # the EMA weights are the ones kept
        unwrap(step_module).load_state_dict(parts[0].ema)
    ae.eval()
    metrics = reconstruction_metrics(ae, val.images, d.device, data_range)
    scale = latent_scale_factor(ae, train.images, d.device)
    if d.world > 1:
        (run / f"weights_rank{d.rank}.sha256").write_text(digest(ae))
    if d.is_main:
        with atomic_path(run / "autoencoder.pt") as tmp:
            torch.save(ae.state_dict(), tmp)
        stage = {
            "scale_factor": scale,
            "intensity": train.intensity.to_json(),
            "metrics": metrics,
            "validated_on": "val split" if val is not train else "training volumes (no val split matched)",
            "train_items": [{"scan_id": i["scan_id"], "sha256": i["sha256"]} for i in train.items],
            "weights_sha256": digest(ae),
        }
        write_text_atomic(run / "stage.json", json.dumps(stage, indent=1))
    return run


def load_autoencoder_stage(cfg: PipelineConfig, run_dir: str | Path, device: torch.device) -> AutoencoderStage:
    from medgen.errors import MedgenError

    run = Path(run_dir) / STAGE_DIR
    if not (run / "stage.json").exists():
        raise MedgenError(
            f"{run}: no trained autoencoder here; run `medgen train autoencoder` for this run folder first"
        )
    stage = json.loads((run / "stage.json").read_text())
    ae = build_autoencoder(cfg.autoencoder)  # type: ignore[arg-type]
    ae.load_state_dict(torch.load(run / "autoencoder.pt", map_location=device, weights_only=True))
    ae.to(device).eval()
    return AutoencoderStage(
        run,
        ae,
        float(stage["scale_factor"]),
        IntensityMap(**stage["intensity"]),
        stage["metrics"],
        stage["weights_sha256"],
    )
