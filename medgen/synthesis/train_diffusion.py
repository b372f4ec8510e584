"""Stage 2: a diffusion UNet on scaled latents of the frozen autoencoder (epsilon or v prediction
with DDPM/DDIM, or rectified flow), with EMA; the result is saved as one generator bundle."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medgen.config import ConditioningConfig, PipelineConfig
from medgen.datasets.prepared import manifest_items, prepare, source_kind
from medgen.models.bundle import save_generator
from medgen.models.conditions import ConditionSpace
from medgen.models.networks import build_scheduler, build_unet, latent_shape
from medgen.provenance import sha256_file, sha256_json
from medgen.synthesis.train_autoencoder import load_autoencoder_stage
from medgen.training.loop import Part, Trainer, init_distributed, unwrap, wrap

STAGE_DIR = "diffusion"
GENERATOR_DIR = "generator"


@torch.no_grad()
def encode_latents(ae, images: torch.Tensor, scale: float, device: torch.device) -> torch.Tensor:
    """Scaled latent means of the training volumes (encoded once: the autoencoder is frozen)."""
    return torch.cat([ae.encode(x.to(device))[0].float().cpu() for x in images.split(1)]) * scale


def diffusion_loss(
    unet,
    scheduler,
    kind: str,
    prediction: str,
    z0: torch.Tensor,
    noise: torch.Tensor,
    u: torch.Tensor,
    context: torch.Tensor | None = None,
    residuals: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]] | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE of the network's prediction for z0 noised at times drawn from `u` ~ U[0, 1);
    `context`: a conditioned model's [B, 1, dim] condition vectors; `residuals(zt, t)`: a
    ControlNet's additional residuals for the UNet (medgen.synthesis.train_controlnet);
    `weights` [B, 1, *latent]: per latent voxel, prediction and target both multiplied by it
    (MAISI's ControlNet weighted loss, which makes small structures count)."""
    T = scheduler.num_train_timesteps
    if kind == "rflow":
        t = u * T  # continuous time; x_t = (1 - t/T) x0 + t/T noise, velocity target x0 - noise
        target = z0 - noise
    else:
        t = (u * T).long().clamp_max(T - 1)
        target = noise if prediction == "epsilon" else scheduler.get_velocity(z0, noise, t)
    zt = scheduler.add_noise(z0, noise, t)
    extra: dict[str, Any] = {} if context is None else {"context": context}
    if residuals is not None:
        extra |= residuals(zt, t)
    pred = unet(zt, timesteps=t, **extra).float()
    if weights is not None:
        pred, target = pred * weights, target * weights
    return torch.nn.functional.mse_loss(pred, target)


def drop_conditions(
    space: ConditionSpace, vectors: torch.Tensor, u_all: torch.Tensor, u_col: torch.Tensor, cfg: ConditioningConfig
) -> torch.Tensor:
    """Condition dropout: a sample loses its whole condition with probability cfg.dropout (the
    unconditional model classifier-free guidance needs), else each column with cfg.column_dropout
    (so a request may leave columns open). u_all [B] and u_col [B, columns] are uniform draws."""
    keep = torch.ones_like(vectors)
    for j, sl in enumerate(space.slices()):
        keep[:, sl] = (u_col[:, j : j + 1] >= cfg.column_dropout).to(vectors.dtype)
    keep = keep * (u_all[:, None] >= cfg.dropout).to(vectors.dtype)
    return vectors * keep


def training_conditions(
    cfg: PipelineConfig, manifest: str | Path, scan_ids: list[str], run_dir: str | Path
) -> tuple[ConditionSpace, torch.Tensor, list[int], dict[str, Any]]:
    """The condition vector of each training scan, the scans to train on (a scan whose subject the
    covariates config drops is left out), and a summary for the bundle's provenance: how many
    scans had each level, the observed range of each continuous column (no per-scan values)."""
    from medgen.datasets.covariates import load_covariates

    dcfg = cfg.diffusion
    assert dcfg is not None and dcfg.conditioning is not None and cfg.covariates is not None
    space = ConditionSpace.from_config(cfg.covariates, dcfg.conditioning.columns)
    table = load_covariates(cfg.covariates, manifest, salt=cfg.ingest.salt if cfg.ingest else None)
    keep = [i for i, sid in enumerate(scan_ids) if sid not in table.dropped]
    vectors = torch.stack([space.encode(table.values.get(scan_ids[i])) for i in keep])
    summary: dict[str, Any] = {
        "scans": len(keep),
        "without_covariates": sum(scan_ids[i] not in table.values for i in keep),
    }
    for c in space.columns:
        got = [table.values[scan_ids[i]][c.name] for i in keep if scan_ids[i] in table.values]
        if c.kind == "categorical":
            summary[c.name] = {lvl: sum(v == lvl for v in got) for lvl in c.levels or []}
        else:
            nums = [float(v) for v in got]
            summary[c.name] = {"min": min(nums), "max": max(nums)} if nums else {}
    # the real scans' covariates beside the generator: what quality validation's condition
    # fidelity check trains on and scores held-out real scans with (scan ids only, no subject)
    from medgen.datasets.covariates import write_covariates

    write_covariates(table, cfg.covariates, Path(run_dir) / "covariates.csv")
    return space, vectors, keep, summary


def train_diffusion(
    cfg: PipelineConfig,
    manifest: str | Path,
    run_dir: str | Path,
    *,
    device: str | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train stage 2 into RUN/diffusion/ and write the generator bundle RUN/generator/ (returned)."""
    cfg.require("data", "autoencoder", "diffusion")
    acfg, dcfg, data_cfg = cfg.autoencoder, cfg.diffusion, cfg.data
    assert acfg is not None and dcfg is not None and data_cfg is not None
    d = init_distributed(device)
    run_dir = Path(run_dir)
    stage1 = load_autoencoder_stage(cfg, run_dir, d.device)
    train = prepare(manifest_items(manifest, data_cfg), data_cfg, run_dir / "cache")
    items = train.items
    latents = encode_latents(stage1.autoencoder, train.images, stage1.scale_factor, d.device)
    space: ConditionSpace | None = None
    vectors = torch.zeros(len(items), 0)
    summary: dict[str, Any] = {}
    if dcfg.conditioning is not None:
        space, vectors, keep, summary = training_conditions(cfg, manifest, [i["scan_id"] for i in items], run_dir)
        latents, items = latents[keep], [items[i] for i in keep]
    ccfg = dcfg.conditioning

    torch.manual_seed(dcfg.train.seed)
    unet = build_unet(dcfg, acfg.latent_channels, space.dim if space else None)
    model = wrap(unet, d)
    part = Part("diffusion", model, torch.optim.AdamW(model.parameters(), lr=dcfg.train.lr), dcfg.train.ema_decay)
    scheduler = build_scheduler(dcfg)

    # The trainer draws batches of scan numbers; latents and conditions are gathered by them.
    latents, vectors = latents.to(d.device), vectors.to(d.device)

    def step_fn(ctx, index: torch.Tensor) -> dict[str, torch.Tensor]:
        z0 = latents[index]
        noise = ctx.randn(z0.shape)
        u = ctx.rand((z0.shape[0],))
        context = None
        if space is not None and ccfg is not None:
            dropped = drop_conditions(
                space, vectors[index], ctx.rand((z0.shape[0],)), ctx.rand((z0.shape[0], len(space.columns))), ccfg
            )
            context = space.context(dropped)
        return {"diffusion": diffusion_loss(model, scheduler, dcfg.scheduler, dcfg.prediction, z0, noise, u, context)}

    fingerprint = sha256_json(
        {
            "diffusion": dcfg.model_dump(mode="json"),
            "data": data_cfg.model_dump(mode="json"),
            "train": [i["sha256"] for i in items],
            "autoencoder": stage1.weights_sha256,  # a retrained stage 1 means new latents
            "conditions": hashlib.sha256(vectors.cpu().numpy().tobytes()).hexdigest() if space else None,
        }
    )
    index = torch.arange(len(items))
    trainer = Trainer(
        run_dir / STAGE_DIR, dcfg.train, [part], step_fn, index, d, name="diffusion", fingerprint=fingerprint
    )
    final = trainer.fit(stop_after=stop_after)
    bundle = run_dir / GENERATOR_DIR
    if final < dcfg.train.steps or not d.is_main:
        return bundle
    weights = part.ema if part.ema is not None else unwrap(model).state_dict()
    manifest_sha = sha256_file(manifest)
    modality, units = source_kind(manifest, items, data_cfg)
    save_generator(
        bundle,
        autoencoder_cfg=acfg,
        diffusion_cfg=dcfg,
        data_cfg=data_cfg,
        intensity=stage1.intensity,
        scale_factor=stage1.scale_factor,
        latent_shape=latent_shape(acfg, data_cfg.size),
        autoencoder_state=stage1.autoencoder.state_dict(),
        diffusion_state={k: v.detach().cpu() for k, v in weights.items()},
        modality=modality,
        units=units,
        provenance={
            "training_manifest_sha256": manifest_sha,
            "training_manifest": str(Path(manifest).resolve()),  # where validation finds the real reference volumes
            "train_items": [{"scan_id": i["scan_id"], "sha256": i["sha256"]} for i in items],
            "autoencoder_metrics": stage1.metrics,
            "config_name": cfg.name,
            "config_sha256": hashlib.sha256(cfg.model_dump_json().encode()).hexdigest(),
            "ema": part.ema is not None,
            **({"training_conditions": summary} if space else {}),
        },
        conditions=space,
    )
    return bundle
