"""Seconds per 256^3 volume for Tweedie and for posterior sampling (4 samples) on the GPU.

python benchmarks/gpu_denoise.py [--model medgen/weights/denoiser_default] [--sigma 0.05]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    from scipy.ndimage import gaussian_filter

    from medgen.denoising.denoiser import denoise_detailed
    from medgen.models.score import load_score_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--sw-batch", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu only for a dry run of this script")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sm = load_score_model(args.model, device=dev)
    rng = np.random.default_rng(0)
    n = args.size
    x = gaussian_filter(rng.random((n, n, n), dtype=np.float32), 4)
    x = (x - x.min()) / (np.percentile(x, 99.5) - x.min())
    y = x + args.sigma * rng.standard_normal(x.shape, dtype=np.float32)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{name}: {n}^3 volume ({n**3 / 1e6:.1f} Mvox), sigma {args.sigma}, 64^3 windows, batch {args.sw_batch}")
    denoise_detailed(y[:64, :64, :64], model=sm, sigma=args.sigma, device=dev)  # warm-up
    for method, k in (("tweedie", 1), ("posterior", 4)):
        sync()
        t0 = time.perf_counter()
        r = denoise_detailed(
            y, model=sm, sigma=args.sigma, method=method, n_samples=k, device=dev, sw_batch_size=args.sw_batch
        )
        sync()
        sec = time.perf_counter() - t0
        err = float(np.sqrt(np.mean((r.volume.data - x) ** 2)))
        print(
            f"  {method:<9} x{k}: {sec:6.2f} s per volume ({sec / (n**3 / 1e6):.3f} s/Mvox), RMSE {err:.4f} vs noise {args.sigma}"
        )


if __name__ == "__main__":
    main()
