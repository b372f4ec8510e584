"""Latent diffusion training speed: medgen's loop vs a plain MONAI-tutorial loop, and sampler speed.

    python benchmarks/train_ldm.py [--config configs/demo.yaml] [--steps 30] [--device cpu|cuda]

Same networks, same batch size, same run. The plain loop is what MONAI's 3D LDM tutorial does:
a `Dataset` with the preprocessing transforms (loaded and resampled every step, no cache), fp32,
`AutoencoderKL.forward` for stage 1 and `LatentDiffusionInferer` (encoding every step) for stage 2.
Ours: preprocessed volumes cached once, latents encoded once, bf16 autocast on GPU (fp32 on CPU),
via `medgen.training.loop.Trainer`. Data: synthetic smooth 'heads' written as NIfTI at 2x the config's
resolution, so the plain loop pays a realistic load-and-resample cost. Then samples/s for
DDPM-1000, DDIM-50 and RFlow-30 at the config's size (untrained weights: timing only).
Read the ratios; these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_items(cfg, n: int, root: Path) -> list[dict]:
    import nibabel as nib

    spacing = np.array(cfg.data.spacing) / 2
    shape = tuple(int(s) for s in np.array(cfg.data.size) * 2)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    items = []
    for i in range(n):
        rng = np.random.default_rng(i)
        r = rng.uniform(0.6, 0.85, 3).astype(np.float32)
        vol = (((g / r[:, None, None, None]) ** 2).sum(0) < 1) * (500 + 300 * np.cos(6 * g[0] + i) * np.sin(5 * g[1]))
        path = root / f"s{i}.nii"
        nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([*spacing, 1.0])), path)
        items.append({"image": str(path), "sha256": f"{i:064x}", "scan_id": f"s{i}"})
    return items


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(loader, steps: int, device, opt, loss_fn) -> float:
    """Median seconds per step of a tutorial-style loop, counting the time the loader took."""
    times, step = [], 0
    while step < steps:
        it = iter(loader)
        while step < steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            loss = loss_fn(batch["image"].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t0)
            step += 1
    return float(np.median(times[2:]))


def plain_autoencoder(cfg, items, steps, device) -> float:
    """MONAI tutorial style: DataLoader over an uncached Dataset, fp32, AutoencoderKL.forward."""
    from monai.data import DataLoader, Dataset

    from medgen.datasets.preprocess import transforms
    from medgen.models.networks import build_autoencoder
    from medgen.synthesis.train_autoencoder import kl_loss

    torch.manual_seed(0)
    ae = build_autoencoder(cfg.autoencoder).to(device)
    loader = DataLoader(Dataset(items, transforms(cfg.data)), batch_size=cfg.autoencoder.train.batch_size, shuffle=True)

    def loss_fn(x):
        recon, mu, sigma = ae(x)
        return (recon - x).abs().mean() + cfg.autoencoder.kl_weight * kl_loss(mu, sigma)

    return plain_loop(loader, steps, device, torch.optim.Adam(ae.parameters(), lr=cfg.autoencoder.train.lr), loss_fn)


def plain_diffusion(cfg, items, ae, scale, steps, device) -> float:
    """MONAI tutorial style: LatentDiffusionInferer encodes every batch, fp32."""
    from monai.data import DataLoader, Dataset
    from monai.inferers import LatentDiffusionInferer

    from medgen.datasets.preprocess import transforms
    from medgen.models.networks import build_scheduler, build_unet, latent_shape

    torch.manual_seed(0)
    unet = build_unet(cfg.diffusion, cfg.autoencoder.latent_channels).to(device)
    sched = build_scheduler(cfg.diffusion)
    inferer = LatentDiffusionInferer(sched, scale_factor=scale)
    loader = DataLoader(Dataset(items, transforms(cfg.data)), batch_size=cfg.diffusion.train.batch_size, shuffle=True)
    lat = latent_shape(cfg.autoencoder, cfg.data.size)

    def loss_fn(x):
        noise = torch.randn((x.shape[0], *lat), device=device)
        t = torch.randint(0, sched.num_train_timesteps, (x.shape[0],), device=device).long()
        pred = inferer(inputs=x, autoencoder_model=ae, diffusion_model=unet, noise=noise, timesteps=t)
        return torch.nn.functional.mse_loss(pred.float(), noise.float())

    return plain_loop(loader, steps, device, torch.optim.Adam(unet.parameters(), lr=cfg.diffusion.train.lr), loss_fn)


def ours(cfg, items, steps, device, run: Path) -> tuple[float, float, object, float]:
    """medgen's Trainer for both stages; returns (ae s/step, diffusion s/step, autoencoder, scale)."""
    from medgen.datasets.prepared import prepare
    from medgen.models.networks import KLAutoencoderStep, build_autoencoder, build_scheduler, build_unet, latent_shape
    from medgen.synthesis.train_autoencoder import kl_loss, latent_scale_factor
    from medgen.synthesis.train_diffusion import diffusion_loss, encode_latents
    from medgen.training.loop import Dist, Part, Trainer

    d = Dist(device=device)
    t0 = time.perf_counter()
    data = prepare(items, cfg.data, run / "cache")
    prep = time.perf_counter() - t0
    acfg = cfg.autoencoder.model_copy(
        update={
            "train": cfg.autoencoder.train.model_copy(
                update={"steps": steps, "log_every": steps // 2, "checkpoint_every": 10**6}
            )
        }
    )
    torch.manual_seed(0)
    ae = build_autoencoder(acfg)
    mod = KLAutoencoderStep(ae).to(device)
    lat = latent_shape(acfg, cfg.data.size)

    def ae_step(ctx, x):
        recon, mu, sigma = mod(x, ctx.randn((x.shape[0], *lat)))
        return {"autoencoder": (recon.float() - x).abs().mean() + acfg.kl_weight * kl_loss(mu.float(), sigma.float())}

    Trainer(
        run / "ae",
        acfg.train,
        [Part("autoencoder", mod, torch.optim.Adam(mod.parameters(), lr=acfg.train.lr))],
        ae_step,
        data.images,
        d,
    ).fit()
    ae_sps = last_interval(run / "ae")
    ae.eval()
    scale = latent_scale_factor(ae, data.images, device)
    latents = encode_latents(ae, data.images, scale, device)
    dcfg = cfg.diffusion.model_copy(
        update={
            "train": cfg.diffusion.train.model_copy(
                update={"steps": steps, "log_every": steps // 2, "checkpoint_every": 10**6, "ema_decay": None}
            )
        }
    )
    unet = build_unet(dcfg, acfg.latent_channels).to(device)
    sched = build_scheduler(dcfg)

    def dm_step(ctx, z0):
        return {
            "diffusion": diffusion_loss(
                unet, sched, dcfg.scheduler, dcfg.prediction, z0, ctx.randn(z0.shape), ctx.rand((z0.shape[0],))
            )
        }

    Trainer(
        run / "dm",
        dcfg.train,
        [Part("diffusion", unet, torch.optim.Adam(unet.parameters(), lr=dcfg.train.lr))],
        dm_step,
        latents,
        d,
    ).fit()
    print(f"(ours: one-off preprocessing of {len(items)} volumes {prep:.1f} s, cached for every later run)")
    return ae_sps, last_interval(run / "dm"), ae, scale


def last_interval(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return float(rows[-1]["sec_per_step"])  # the second half of the run: warm caches, no compile


def sampler_speed(cfg, ae, scale, device) -> list[tuple[str, float]]:
    from medgen.datasets.preprocess import IntensityMap
    from medgen.models.bundle import Generator
    from medgen.models.networks import build_unet
    from medgen.synthesis.sampler import generate

    out = []
    for sampler, steps in (("ddpm", 1000), ("ddim", 50), ("rflow", 30)):
        dcfg = cfg.diffusion.model_copy(update={"scheduler": "rflow" if sampler == "rflow" else "ddpm"})
        torch.manual_seed(0)
        gen = Generator(
            path=Path("untrained"),
            autoencoder=ae,
            unet=build_unet(dcfg, cfg.autoencoder.latent_channels).to(device).eval(),
            scale_factor=scale,
            autoencoder_cfg=cfg.autoencoder,
            diffusion_cfg=dcfg,
            data_cfg=cfg.data,
            intensity=IntensityMap("percentile", 0.0, 1.0, 0.0, 1.0),
            modality="MR",
            units="a.u.",
            metadata={
                "latent_shape": [
                    cfg.autoencoder.latent_channels,
                    *(n // cfg.autoencoder.downsample for n in cfg.data.size),
                ]
            },
        )
        generate(gen, 1, sampler=sampler, steps=2, device=device)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        generate(gen, 1, sampler=sampler, steps=steps, device=device)
        sync(device)
        out.append((f"{sampler.upper()}-{steps}", time.perf_counter() - t0))
    return out


def main() -> None:
    from medgen.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = load_config(args.config)
    work = Path(tempfile.mkdtemp(prefix="medgen-ldm-bench-"))
    items = synthetic_items(cfg, args.volumes, work)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"config {args.config}: {cfg.data.size} volumes, batch AE {cfg.autoencoder.train.batch_size} / "
        f"diffusion {cfg.diffusion.train.batch_size}, {args.steps} steps each, on {name}"
    )
    ae_ours, dm_ours, ae, scale = ours(cfg, items, args.steps, device, work / "ours")
    ae_plain = plain_autoencoder(cfg, items, args.steps, device)
    dm_plain = plain_diffusion(cfg, items, ae, scale, args.steps, device)
    vox = int(np.prod(cfg.data.size))
    print(f"\n{'stage':<12} {'loop':<6} {'s/step':>8} {'Mvox/s':>8} {'speed-up':>9}")
    for stage, (plain, mine), bs in (
        ("autoencoder", (ae_plain, ae_ours), cfg.autoencoder.train.batch_size),
        ("diffusion", (dm_plain, dm_ours), cfg.diffusion.train.batch_size),
    ):
        print(f"{stage:<12} {'plain':<6} {plain:>8.3f} {bs * vox / plain / 1e6:>8.2f} {'1.00x':>9}")
        print(f"{stage:<12} {'medgen':<6} {mine:>8.3f} {bs * vox / mine / 1e6:>8.2f} {plain / mine:>8.2f}x")
    print(f"\n{'sampler':<10} {'s/volume':>9} {'volumes/s':>10}   (size {cfg.data.size}, batch 1, incl. decode)")
    for label, sec in sampler_speed(cfg, ae, scale, device):
        print(f"{label:<10} {sec:>9.2f} {1 / sec:>10.3f}")


if __name__ == "__main__":
    main()
