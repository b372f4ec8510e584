"""Stage 3 (optional): a ControlNet that makes the trained generator follow a label map.

Trained on the scans ingest paired with label maps (OUT/labels.csv), in latent space: the frozen
autoencoder encodes each image, the frozen diffusion UNet denoises it, and the ControlNet (a copy
of the UNet's encoder, initialised from its weights, as in MONAI's tutorials and MAISI) adds
residuals computed from the one-hot label map, so that the UNet's prediction fits the image that
goes with that map. A conditioned generator's ControlNet is trained with the empty condition, so
it adds layout while the covariates keep steering contrast and anatomy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from medgen.config import PipelineConfig
from medgen.datasets.prepared import manifest_items, prepare, prepare_labels
from medgen.errors import MedgenError
from medgen.models.bundle import load_generator
from medgen.models.controlnet import save_controlnet
from medgen.models.networks import build_controlnet, build_scheduler
from medgen.provenance import model_folder_sha256, sha256_json
from medgen.synthesis.train_diffusion import GENERATOR_DIR, diffusion_loss, encode_latents
from medgen.training.loop import Part, Trainer, init_distributed, unwrap, wrap

STAGE_DIR = "controlnet-train"
CONTROLNET_DIR = "controlnet"


def label_table(manifest: str | Path, scan_ids: list[str]) -> dict[int, str]:
    """value -> name over the training scans' label maps (labels.csv); a value named differently
    in two maps keeps the first name, the others are not guessed at."""
    from medgen.io.labels import read_label_rows

    rows = read_label_rows(Path(manifest).parent)
    table: dict[int, str] = {}
    for sid in scan_ids:
        for k, v in json.loads(rows[sid]["labels"]).items():
            table.setdefault(int(k), v)
    return table


def loss_weights(
    labels: torch.Tensor, values: list[int], weight: float, latent: tuple[int, ...]
) -> torch.Tensor | None:
    """[N, 1, *latent]: `weight` where a latent voxel's footprint holds any of `values`, else 1.
    Max-pooled, not nearest-sampled: a lesion smaller than one latent voxel still counts."""
    if weight == 1.0 or not values:
        return None
    hit = torch.zeros(labels.shape, dtype=torch.float32)
    for v in values:
        hit = torch.maximum(hit, (labels == v).float())
    pooled = torch.nn.functional.adaptive_max_pool3d(hit, latent)
    return 1.0 + (weight - 1.0) * pooled


def train_controlnet(
    cfg: PipelineConfig,
    manifest: str | Path,
    run_dir: str | Path,
    *,
    device: str | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train RUN/controlnet-train/ and write RUN/controlnet/ (returned), for RUN/generator/."""
    cfg.require("data", "autoencoder", "diffusion", "controlnet")
    ccfg, dcfg, data_cfg = cfg.controlnet, cfg.diffusion, cfg.data
    assert ccfg is not None and dcfg is not None and data_cfg is not None
    d = init_distributed(device)
    run_dir = Path(run_dir)
    items = manifest_items(manifest, data_cfg)
    labels, keep = prepare_labels(items, manifest, data_cfg)
    if not keep:
        raise MedgenError(
            f"{manifest}: no training scan has a paired label map (labels.csv); ingest scans with their "
            "*_dseg.nii.gz or DICOM SEG to train a ControlNet"
        )
    gen = load_generator(run_dir / GENERATOR_DIR, d.device)
    items = [items[i] for i in keep]
    train = prepare(items, data_cfg, run_dir / "cache")
    latents = encode_latents(gen.autoencoder, train.images, gen.scale_factor, d.device).to(d.device)
    table = label_table(manifest, [i["scan_id"] for i in items])
    values = sorted(v for v in set(torch.unique(labels).tolist()) if v > 0)
    table = {v: table.get(v, f"label {v}") for v in values}
    onehot = torch.stack([(labels[:, 0] == v).float() for v in values], 1).to(d.device)
    missing = sorted(set(ccfg.weighted_loss_labels) - set(values))
    if missing:
        raise MedgenError(
            f"controlnet.weighted_loss_labels {missing}: no training label map has them (labels: {values})"
        )
    weights = loss_weights(labels, ccfg.weighted_loss_labels, ccfg.weighted_loss, tuple(latents.shape[2:]))
    weights = weights.to(d.device) if weights is not None else None

    unet = gen.unet.train()  # frozen: no gradients into it, but gradients flow through it
    for q in unet.parameters():
        q.requires_grad_(False)
    space = gen.conditions
    torch.manual_seed(ccfg.train.seed)
    net = build_controlnet(
        dcfg, gen.autoencoder_cfg.latent_channels, len(values), ccfg.embedding_channels, space.dim if space else None
    )
    from monai.networks.utils import copy_model_state

    copy_model_state(net, unet.state_dict())  # the encoder half starts as the UNet's; the zero convs at 0
    model = wrap(net, d)
    part = Part("controlnet", model, torch.optim.AdamW(model.parameters(), lr=ccfg.train.lr), ccfg.train.ema_decay)
    scheduler = build_scheduler(gen.diffusion_cfg)
    empty = torch.zeros(1, 1, space.dim, device=d.device) if space else None

    def step_fn(ctx, index: torch.Tensor) -> dict[str, torch.Tensor]:
        z0 = latents[index]
        noise = ctx.randn(z0.shape)
        u = ctx.rand((z0.shape[0],))
        context = empty.expand(z0.shape[0], 1, empty.shape[2]) if empty is not None else None

        def residuals(zt: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
            extra = {} if context is None else {"context": context}
            down, mid = model(
                zt, timesteps=t, controlnet_cond=onehot[index], conditioning_scale=ccfg.conditioning_scale, **extra
            )
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        loss = diffusion_loss(
            unet,
            scheduler,
            gen.diffusion_cfg.scheduler,
            gen.diffusion_cfg.prediction,
            z0,
            noise,
            u,
            context,
            residuals,
            weights[index] if weights is not None else None,
        )
        return {"controlnet": loss}

    generator_sha = model_folder_sha256(gen.path)
    fingerprint = sha256_json(
        {
            "controlnet": ccfg.model_dump(mode="json"),
            "generator": generator_sha,
            "train": [i["sha256"] for i in items],
            "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
        }
    )
    trainer = Trainer(
        run_dir / STAGE_DIR,
        ccfg.train,
        [part],
        step_fn,
        torch.arange(len(items)),
        d,
        name="controlnet",
        fingerprint=fingerprint,
    )
    final = trainer.fit(stop_after=stop_after)
    out = run_dir / CONTROLNET_DIR
    if final < ccfg.train.steps or not d.is_main:
        return out
    final_state = part.ema if part.ema is not None else unwrap(model).state_dict()
    return save_controlnet(
        out,
        generator_sha256=generator_sha,
        values=values,
        table=table,
        embedding=ccfg.embedding_channels,
        scale=ccfg.conditioning_scale,
        state={k: v.detach().cpu() for k, v in final_state.items()},
        provenance={
            "train_items": [{"scan_id": i["scan_id"], "sha256": i["sha256"]} for i in items],
            "config_name": cfg.name,
            "ema": part.ema is not None,
        },
    )
