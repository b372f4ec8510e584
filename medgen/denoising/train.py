"""Training the score model: denoising score matching on random 3D patches.

A patch x (intensities with the 99.5th percentile at 1) gets Gaussian noise of ratio sigma, drawn
log-uniformly in [sigma_min, sigma_max]; the network sees x_t = sqrt(abar) (x + sigma eps) at the
continuous time t(sigma) and predicts eps. Patches, flips and sigmas come from the step's
generator, so the shared loop's exact resume holds here too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgen.config import DenoiserConfig
from medgen.denoising.normalise import normalise
from medgen.denoising.patches import random_patches
from medgen.models.score import NoiseSchedule, build_score_unet, save_score_model
from medgen.training.loop import Part, Trainer, init_distributed, unwrap, wrap


def _pad_to(v: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    pads = []
    for n, p in zip(reversed(v.shape), reversed(patch)):
        extra = max(0, p - n)
        pads += [extra // 2, extra - extra // 2]
    return torch.nn.functional.pad(v, pads) if any(pads) else v


def train_denoiser(cfg, manifest: str | Path, run_dir: str | Path, *, device: str | None = None) -> Path:
    """`medgen train denoiser`: the accepted scans of the config's data section (preprocessed and
    cached like the LDM's, intensities 0..1 at the 99.5th percentile) train the score model."""
    from medgen.datasets.prepared import manifest_items, prepare
    from medgen.provenance import sha256_file

    cfg.require("data", "denoiser")
    items = manifest_items(manifest, cfg.data)
    prepared = prepare(items, cfg.data, Path(run_dir) / "cache")
    volumes = [normalise(v[0].numpy())[0] for v in prepared.images]
    provenance = {
        "command": "medgen train denoiser",
        "training_manifest_sha256": sha256_file(manifest),
        "training_data": [{"name": i["scan_id"], "sha256": i["sha256"]} for i in items],
        "config_name": cfg.name,
    }
    return train_score(cfg.denoiser, volumes, run_dir, device=device, provenance=provenance)


def train_score(
    cfg: DenoiserConfig,
    volumes: list[np.ndarray],
    run_dir: str | Path,
    *,
    device: str | None = None,
    stop_after: int | None = None,
    provenance: dict[str, Any] | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Train on normalised volumes (each >= 1 patch after padding); writes RUN/score_model.
    `init` starts from existing weights (fine-tuning); say so in `provenance`."""
    d = init_distributed(device)
    run = Path(run_dir)
    vols = [_pad_to(torch.as_tensor(v, dtype=torch.float32), cfg.patch).to(d.device) for v in volumes]
    schedule = NoiseSchedule(cfg)
    torch.manual_seed(cfg.train.seed)
    unet = build_score_unet(cfg)
    if init is not None:
        unet.load_state_dict(init)
    model = wrap(unet, d)
    part = Part("score", model, torch.optim.AdamW(model.parameters(), lr=cfg.train.lr), cfg.train.ema_decay)
    log_lo, log_hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)

    def step_fn(ctx, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        b = idx.shape[0]
        (x0,) = random_patches([(vols[int(i)],) for i in idx], cfg.patch, ctx)
        if cfg.augment is not None:
            from medgen.denoising.augment import augment

            x0 = augment(x0, cfg.augment, ctx)
        sigma = torch.exp(log_lo + ctx.rand((b,)) * (log_hi - log_lo))
        t = schedule.time_of_torch(sigma)
        scale = (1.0 / (1.0 + sigma**2)).sqrt()[:, None, None, None, None]
        eps = ctx.randn(x0.shape)
        xt = scale * (x0 + sigma[:, None, None, None, None] * eps)
        return {"score": torch.nn.functional.mse_loss(model(xt, timesteps=t).float(), eps)}

    index = torch.arange(len(vols), dtype=torch.long)
    trainer = Trainer(run / "score", cfg.train, [part], step_fn, index, d, name="score")
    final = trainer.fit(stop_after=stop_after)
    out = run / "score_model"
    if final < cfg.train.steps or not d.is_main:
        return out
    weights = part.ema if part.ema is not None else unwrap(model).state_dict()
    return save_score_model(out, cfg, weights, {**(provenance or {}), "steps": final, "seed": cfg.train.seed})


def train_self_supervised(
    cfg, manifest: str | Path, run_dir: str | Path, *, device: str | None = None, stop_after: int | None = None
) -> Path:
    """`medgen train denoiser --self-supervised`: the manifest's accepted scans (the config's data
    section selects them) fine-tune the model named by `self_supervised.init` (default: the shipped
    one) with the SURE loss; writes RUN/score_model, resumable from RUN/score_ss checkpoints.

    The scans are read on their own voxel grid (never resampled: interpolation would correlate the
    noise and change its level) and each gets its own sigma (given in the config, or estimated)."""
    from medgen.datasets.prepared import manifest_items
    from medgen.denoising.adapt import noisy_scan, patch_shape, sure_loss
    from medgen.denoising.denoiser import estimate_sigma
    from medgen.denoising.normalise import normalise
    from medgen.errors import MedgenError
    from medgen.io.load import load_volume
    from medgen.models.score import load_score_model
    from medgen.provenance import sha256_file

    cfg.require("data", "self_supervised")
    ss = cfg.self_supervised
    d = init_distributed(device)
    base = load_score_model(ss.init, device=d.device)
    items = manifest_items(manifest, cfg.data)
    if not items:
        raise MedgenError(f"{manifest}: no accepted scans match the config's data section: nothing to fine-tune on")
    rician = ss.noise == "rician"
    raw, sigmas = [], []
    for it in items:
        data = load_volume(it["image"]).data
        s_units = ss.sigma if ss.sigma is not None else estimate_sigma(data, ss.noise)
        y, lo, hi = normalise(data, s_units)
        raw.append(y)
        sigmas.append(s_units / (hi - lo))
    patch = patch_shape([r.shape for r in raw], base.cfg.patch, base.downsample)
    scans = [noisy_scan(r, s, patch, rician, d.device) for r, s in zip(raw, sigmas)]
    unet = base.unet.train()
    model = wrap(unet, d)
    part = Part("score", model, torch.optim.AdamW(model.parameters(), lr=ss.train.lr), ss.train.ema_decay)

    def step_fn(ctx, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score": sure_loss(model, base.schedule, scans, [int(i) for i in idx], patch, ctx)}

    index = torch.arange(len(scans), dtype=torch.long)
    run = Path(run_dir)
    final = Trainer(run / "score_ss", ss.train, [part], step_fn, index, d, name="score_ss").fit(stop_after=stop_after)
    out = run / "score_model"
    if final < ss.train.steps or not d.is_main:
        return out
    init_prov = base.metadata.get("provenance", {})
    provenance: dict[str, Any] = {
        "command": "medgen train denoiser --self-supervised",
        "loss": "SURE (self-supervised: noisy scans only)",
        "init": {  # named by what it is, never by where it lay on this machine
            "name": base.path.name if base.path is not None else "in-memory model",
            "command": init_prov.get("command"),
            "steps": init_prov.get("steps"),
            "seed": init_prov.get("seed"),
            "file_sha256": base.metadata.get("files", {}),
        },
        "training_manifest_sha256": sha256_file(manifest),
        "training_data": [
            {"name": i["scan_id"], "sha256": i["sha256"], "sigma": round(float(s), 6)} for i, s in zip(items, sigmas)
        ],
        "noise": ss.noise,
        "config_name": cfg.name,
        "steps": final,
        "seed": ss.train.seed,
    }
    weights = part.ema if part.ema is not None else unwrap(model).state_dict()
    return save_score_model(out, base.cfg, weights, provenance)
