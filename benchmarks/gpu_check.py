"""GPU check for the latent diffusion stage: a few hundred bf16 steps of the GPU config.

    python benchmarks/gpu_check.py [--config configs/brain_mri.yaml] [--steps 150] [--gen-config configs/ct.yaml]

Prints, naming the card: step time, peak memory, achieved TFLOP/s (FLOPs of one step counted by
torch's FlopCounterMode, divided by the measured step time) and its share of the card's dense bf16
peak, for the autoencoder and the diffusion UNet; then seconds per generated volume at the
generation config's size (128^3 for ct.yaml) for DDIM-50 and RFlow-30. Data are random tensors of
the configured shapes and weights are untrained: this measures speed, not quality.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def stage(name, cfg_train, part, step_fn, data, device, run: Path) -> dict:
    from medgen.training.loop import Dist, StepContext, Trainer, step_generator

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(run, cfg_train, [part], step_fn, data, Dist(device=device), name=name)

    def one_step():
        ctx = StepContext(0, 0, step_generator(0, 0, 0, 0, device), device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_fn(ctx, data[: cfg_train.batch_size].to(device))[part.name]
        loss.backward()
        part.optimizer.zero_grad(set_to_none=True)

    flops = count_flops(one_step)
    t0 = time.perf_counter()
    trainer.fit()
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sps = rows[-1]["sec_per_step"]
    return {
        "stage": name,
        "steps": cfg_train.steps,
        "batch": cfg_train.batch_size,
        "sec_per_step": sps,
        "wall_s": wall,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        "tflops": flops / sps / 1e12,
        "step_tflop": flops / 1e12,
    }


def main() -> None:
    from medgen.config import load_config
    from medgen.models.networks import KLAutoencoderStep, build_autoencoder, build_scheduler, build_unet, latent_shape
    from medgen.synthesis.train_autoencoder import kl_loss
    from medgen.synthesis.train_diffusion import diffusion_loss
    from medgen.training.loop import Part

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/brain_mri.yaml")
    ap.add_argument("--gen-config", default="configs/ct.yaml")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--device", default="cuda", help="cpu only for a dry run of this script")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    peak = peak_tflops(card)
    print(f"card: {card}, torch {torch.__version__}, dense bf16 peak {peak or 'unknown'} TFLOP/s")
    cfg = load_config(args.config)
    work = Path(tempfile.mkdtemp())
    n = 8
    g = torch.Generator().manual_seed(0)
    images = torch.rand((n, 1, *cfg.data.size), generator=g)
    acfg = cfg.autoencoder
    atrain = acfg.train.model_copy(
        update={"steps": args.steps, "log_every": args.steps // 3, "checkpoint_every": 10**6, "amp": "bf16"}
    )
    torch.manual_seed(0)
    mod = KLAutoencoderStep(build_autoencoder(acfg)).to(device)
    lat = latent_shape(acfg, cfg.data.size)

    def ae_step(ctx, x):
        recon, mu, sigma = mod(x, ctx.randn((x.shape[0], *lat)))
        return {"autoencoder": (recon.float() - x).abs().mean() + acfg.kl_weight * kl_loss(mu.float(), sigma.float())}

    results = [
        stage(
            "autoencoder",
            atrain,
            Part("autoencoder", mod, torch.optim.Adam(mod.parameters(), lr=1e-4)),
            ae_step,
            images,
            device,
            work / "ae",
        )
    ]
    if device.type == "cuda":
        torch.cuda.empty_cache()

    dcfg = cfg.diffusion
    dtrain = dcfg.train.model_copy(
        update={
            "steps": args.steps,
            "log_every": args.steps // 3,
            "checkpoint_every": 10**6,
            "amp": "bf16",
            "ema_decay": 0.9999,
        }
    )
    latents = torch.randn((n, *lat), generator=g)
    unet = build_unet(dcfg, acfg.latent_channels).to(device)
    sched = build_scheduler(dcfg)

    def dm_step(ctx, z0):
        return {
            "diffusion": diffusion_loss(
                unet, sched, dcfg.scheduler, dcfg.prediction, z0, ctx.randn(z0.shape), ctx.rand((z0.shape[0],))
            )
        }

    results.append(
        stage(
            "diffusion",
            dtrain,
            Part("diffusion", unet, torch.optim.AdamW(unet.parameters(), lr=1e-4), 0.9999),
            dm_step,
            latents,
            device,
            work / "dm",
        )
    )
    print(
        f"\n{'stage':<12} {'batch':>5} {'shape':>16} {'s/step':>8} {'peak GiB':>9} {'TFLOP/step':>10} {'TFLOP/s':>8} {'% of peak':>9}"
    )
    for r, shape in zip(results, ["1x" + "x".join(map(str, cfg.data.size)), "x".join(map(str, lat))]):
        share = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
        print(
            f"{r['stage']:<12} {r['batch']:>5} {shape:>16} {r['sec_per_step']:>8.3f} {r['peak_gib']:>9.1f} "
            f"{r['step_tflop']:>10.2f} {r['tflops']:>8.1f} {share:>9}"
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()

    from train_ldm import sampler_speed  # the sibling script (this folder is on sys.path)

    gcfg = load_config(args.gen_config)
    ae = build_autoencoder(gcfg.autoencoder).to(device).eval()
    print(
        f"\ngeneration at {gcfg.data.size} ({args.gen_config}, latent {latent_shape(gcfg.autoencoder, gcfg.data.size)}), batch 1, fp32 + TF32, incl. decode:"
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for label, sec in sampler_speed(gcfg, ae, 1.0, device):
        if not label.startswith("DDPM"):
            print(f"  {label:<10} {sec:.2f} s/volume")


if __name__ == "__main__":
    main()
