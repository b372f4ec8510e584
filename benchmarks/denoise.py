"""Denoising quality and speed: ours vs a tuned Gaussian filter, scikit-image NLM and BM4D.

    pip install -e .[bench]          # bm4d: closed-source, non-commercial, benchmarks only
    python benchmarks/denoise.py [--sigmas 0.02 0.05 0.10] [--posterior-samples 2]

Held-out volumes (never in the default model's training data): nibabel's anatomical.nii (real T1,
33x41x25 at 2 mm), the central 64x64x24 of frame 0 of nibabel's example4d.nii.gz (real EPI), and
the 64^3 MR Shepp-Logan phantom (phantominator). Each is scaled to its 99.5th percentile = 1;
Gaussian noise y = x + s n, Rician y = |x + s n1 + i s n2|, s in --sigmas. Columns: PSNR, SURE's
own prediction of that PSNR (Gaussian rows of the SURE-tuned outputs: SURE is in the output, so it
is what a user sees), SSIM, PSNR in the foreground (clean > 0.1), seconds per megavoxel.

Rows: the Gaussian filter and NLM tuned with the clean volume (oracle: their best case); BM4D with
the true sigma; ours: 'untuned' (the network alone, true sigma), 'tweedie' (SURE-tuned, sigma
estimated from the noisy scan), '(true s)' (SURE-tuned, true sigma; bf16 where the CPU has it
natively, and once more in fp32), 'adapted xN' (N steps of self-supervised fine-tuning on the noisy
scan itself first, Gaussian 0.05/0.10 only: --adapt-steps), and the posterior mean.

Then real scanner noise on a real repeat pair (the two frames of example4d): noise2noise MSE of
noisy / BM4D / ours, the sigma from one scan vs from the pair, and the noise's spatial correlation;
and the posterior uncertainty map's calibration against the true error (coverage of 2 std,
Spearman over windows) on the held-out volumes.

Caveat: the two real volumes are themselves noisy (their own noise is ~0.05 and ~0.025 of the 99.5th
percentile by the wavelet MAD), so PSNR against them rewards a method for keeping their intrinsic
noise: estimated-sigma rows remove it and are scored down.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def volumes() -> dict[str, np.ndarray]:
    import nibabel as nib
    import phantominator

    from medgen.demo_data import _package_dir

    data = _package_dir("nibabel") / "tests" / "data"
    t1 = np.asarray(nib.load(data / "anatomical.nii").get_fdata(), np.float32)
    epi = np.asarray(nib.load(data / "example4d.nii.gz").get_fdata(), np.float32)[32:96, 16:80, :, 0]
    m0, _, _ = phantominator.mr_shepp_logan((64, 64, 64), zlims=(-0.8, 0.8))
    out = {"T1 (nibabel)": t1, "EPI (nibabel)": epi, "Shepp-Logan": np.asarray(m0, np.float32)}
    return {k: np.clip(v, 0, None) / np.percentile(v, 99.5) for k, v in out.items()}


def add_noise(x: np.ndarray, s: float, kind: str, rng) -> np.ndarray:
    if kind == "gaussian":
        return (x + s * rng.standard_normal(x.shape)).astype(np.float32)
    return np.sqrt((x + s * rng.standard_normal(x.shape)) ** 2 + (s * rng.standard_normal(x.shape)) ** 2).astype(
        np.float32
    )


def scores(est: np.ndarray, x: np.ndarray) -> tuple[float, float, float]:
    from skimage.metrics import structural_similarity

    def psnr(a, b):
        return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-12)))

    fg = x > 0.1
    win = min(7, *[n if n % 2 else n - 1 for n in x.shape])
    return psnr(est, x), float(structural_similarity(est, x, data_range=1.0, win_size=win)), psnr(est[fg], x[fg])


def tuned_gaussian(y, x, s):
    from scipy.ndimage import gaussian_filter

    return max((gaussian_filter(y, w) for w in (0.5, 0.7, 1.0, 1.4)), key=lambda e: scores(e, x)[0])


def tuned_nlm(y, x, s):
    from skimage.restoration import denoise_nl_means

    return max(
        (denoise_nl_means(y, h=h * s, sigma=s, patch_size=3, patch_distance=4, fast_mode=True) for h in (0.6, 0.9)),
        key=lambda e: scores(e, x)[0],
    )


def bm4d_true_sigma(y, x, s):
    import bm4d

    return np.asarray(bm4d.bm4d(y, sigma_psd=s), np.float32)


def main() -> None:
    import torch

    from medgen.denoising.denoiser import denoise_detailed
    from medgen.models.score import load_score_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.05, 0.10])
    ap.add_argument("--noise", nargs="+", default=["gaussian", "rician"])
    ap.add_argument("--posterior-samples", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration-samples", type=int, default=4, help="posterior samples for the calibration table")
    ap.add_argument("--adapt-steps", type=int, default=60, help="per-scan self-supervised steps (0: skip)")
    ap.add_argument("--model", type=Path, default=None, help="score model folder (default: the shipped one)")
    ap.add_argument("--calibration-only", action="store_true", help="only the uncertainty calibration table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sm = load_score_model(args.model)
    if args.calibration_only:
        calibration_table(sm, args.calibration_samples)
        return
    try:
        import bm4d  # noqa: F401

        have_bm4d = True
    except ImportError:
        have_bm4d = False
        print("bm4d is not installed (pip install -e .[bench]): its rows are skipped")
    rng = np.random.default_rng(0)
    gains: dict[tuple[str, float], list[float]] = {}
    speed: dict[str, list[float]] = {}
    header = f"{'volume':<14} {'noise':<8} {'sigma':>5}  {'method':<22} {'PSNR':>6} {'SURE':>6} {'SSIM':>6} {'fgPSNR':>6} {'s/Mvox':>8}"
    for name, x in volumes().items():
        mvox = x.size / 1e6
        for kind in args.noise:
            for s in args.sigmas:
                y = add_noise(x, s, kind, rng)
                print(
                    header if name and kind == args.noise[0] and s == args.sigmas[0] else "",
                    end="\n" if name and kind == args.noise[0] and s == args.sigmas[0] else "",
                )
                methods = {
                    "noisy input": lambda: y,
                    "gaussian (tuned)": lambda: tuned_gaussian(y, x, s),
                    "NLM (tuned)": lambda: tuned_nlm(y, x, s),
                }
                if have_bm4d:
                    methods["BM4D (true s)"] = lambda: bm4d_true_sigma(y, x, s)

                def ours(**kw):
                    r = denoise_detailed(y, model=sm, noise=kind, device="cpu", **kw)
                    if r.risk is not None and r.risk.reliable and kind == "gaussian":
                        sure_psnr[0] = 10 * np.log10(1.0 / max(r.risk.mse_output, 1e-12))
                    return r.volume.data

                methods["ours untuned (true s)"] = lambda: ours(sigma=s, tune=False, precision="bf16")
                methods["ours tweedie"] = lambda: ours(precision="bf16")
                methods["ours (true s)"] = lambda: ours(sigma=s, precision="bf16")
                methods["ours (true s) fp32"] = lambda: ours(sigma=s, precision="fp32")
                if args.adapt_steps and kind == "gaussian" and s >= 0.05:
                    methods[f"ours adapted x{args.adapt_steps}"] = lambda: ours(sigma=s, adapt=args.adapt_steps)
                methods[f"ours post. x{args.posterior_samples}"] = lambda: ours(
                    method="posterior", n_samples=args.posterior_samples, max_steps=16
                )
                row = {}
                for m, fn in methods.items():
                    t0 = time.perf_counter()
                    sure_psnr = [float("nan")]
                    est = fn()
                    sec = time.perf_counter() - t0
                    p, ss, fp = scores(np.asarray(est, np.float32), x)
                    row[m] = p
                    if m != "noisy input":
                        speed.setdefault(m, []).append(sec / mvox)
                    sp = f"{sure_psnr[0]:>6.2f}" if np.isfinite(sure_psnr[0]) else f"{'':>6}"
                    print(
                        f"{name:<14} {kind:<8} {s:>5.2f}  {m:<22} {p:>6.2f} {sp} {ss:>6.3f} {fp:>6.2f} {sec / mvox if m != 'noisy input' else 0:>8.2f}",
                        flush=True,
                    )
                if have_bm4d:
                    for ours in [k for k in row if k.startswith("ours") and "post." not in k]:
                        gains.setdefault((ours, kind, s), []).append(row[ours] - row["BM4D (true s)"])
    print("\nours minus BM4D, PSNR dB (mean over volumes; per volume in brackets):")
    for (ours, kind, s), g in sorted(gains.items()):
        print(f"  {ours:<22} {kind:<8} sigma {s:.2f}: {np.mean(g):+.2f} dB  ({', '.join(f'{v:+.2f}' for v in g)})")
    print("\nseconds per megavoxel (median over cases):")
    for m, v in speed.items():
        print(f"  {m:<22} {np.median(v):8.2f}")
    if have_bm4d:
        print(f"  BM4D / ours tweedie: {np.median(speed['BM4D (true s)']) / np.median(speed['ours tweedie']):.1f}x")

    repeats(sm, have_bm4d, args.adapt_steps)
    calibration_table(sm, args.calibration_samples)


def calibration_table(sm, samples: int) -> None:
    """Is the posterior standard deviation map worth trusting on held-out volumes? The fraction of
    voxels whose true error lies within 2 std, and the Spearman correlation of window-mean std with
    window-mean |error| (8^3 windows; 4^3 for volumes under 40 voxels a side). Posterior with the
    true sigma, `samples` samples of 16 steps; the map as the samples spread (raw, tune=False) and
    scaled by SURE (the default)."""
    from medgen.denoising.calibration import calibration
    from medgen.denoising.denoiser import denoise_detailed

    print(f"\nuncertainty calibration (posterior x{samples}, 16 steps, true sigma, Gaussian):")
    print(f"  {'volume':<14} {'sigma':>5}  {'2 std raw':>10} {'2 std SURE':>10} {'Spearman':>9} {'windows':>8}")
    rng = np.random.default_rng(1)
    for name, x in volumes().items():
        for s in (0.05, 0.10):
            y = add_noise(x, s, "gaussian", rng)
            kw = dict(model=sm, sigma=s, method="posterior", n_samples=samples, max_steps=16, device="cpu")
            w = 8 if min(x.shape) >= 40 else 4
            raw, r = denoise_detailed(y, tune=False, **kw), denoise_detailed(y, **kw)
            assert r.std is not None and raw.std is not None
            c_raw = calibration(raw.volume.data, raw.std.data, x, window=w)
            cal = calibration(r.volume.data, r.std.data, x, window=w)
            print(
                f"  {name:<14} {s:>5.2f}  {c_raw.coverage:>10.3f} {cal.coverage:>10.3f} {cal.rank_correlation:>9.3f} {cal.windows:>8}",
                flush=True,
            )


def repeats(sm, have_bm4d: bool, adapt_steps: int) -> None:
    """Real scanner noise: the two frames of nibabel's example4d.nii.gz are two acquisitions of
    one EPI stack, so E|D(f0) - f1|^2 = MSE(D(f0), x) + sigma^2 (f1's noise is independent of
    f0's): lower is better, and 'noisy' is |f0 - f1|^2. BM4D gets the sigma measured from the two
    frames (it has no estimator of its own); ours runs with its single-scan estimate and with that.
    Also the noise's spatial correlation: lag-1 autocorrelation of f0 - f1 per axis."""
    import nibabel as nib

    from medgen.demo_data import _package_dir
    from medgen.denoising.correlated import correlation_from_repeats
    from medgen.denoising.denoiser import denoise_detailed, estimate_sigma, estimate_sigma_from_repeats

    epi = np.asarray(nib.load(_package_dir("nibabel") / "tests" / "data" / "example4d.nii.gz").get_fdata(), np.float32)
    scale = np.percentile(epi[..., 0], 99.5)
    f0, f1 = epi[..., 0] / scale, epi[..., 1] / scale
    d = f0 - f1
    d = d - d.mean()
    corr = [
        float(np.sum(np.take(d, range(1, d.shape[a]), a) * np.take(d, range(d.shape[a] - 1), a)) / np.sum(d * d))
        for a in range(3)
    ]
    s, s_rep = estimate_sigma(f0), estimate_sigma_from_repeats(f0, f1)
    print(
        f"\nreal repeats: example4d frames 0 and 1 ({f0.shape}), sigma of the 99.5th percentile: "
        f"{s:.4f} estimated from frame 0 alone, {s_rep:.4f} from the two frames"
    )
    print("  noise lag-1 autocorrelation per axis (f0 - f1): " + ", ".join(f"{c:+.3f}" for c in corr))
    rows = {"noisy (f0 vs f1)": f0}
    if have_bm4d:
        rows["BM4D (sigma from repeats)"] = np.asarray(__import__("bm4d").bm4d(f0, sigma_psd=s_rep), np.float32)
    rows["ours (sigma est.)"] = denoise_detailed(f0, model=sm, device="cpu").volume.data
    rows["ours (sigma from repeats)"] = denoise_detailed(f0, model=sm, sigma=s_rep, device="cpu").volume.data
    rho = correlation_from_repeats(f0, f1)
    rows["ours (sigma + correlation, repeats)"] = denoise_detailed(
        f0, model=sm, sigma=s_rep, noise_correlation=rho, device="cpu"
    ).volume.data
    if adapt_steps:
        rows[f"ours adapted x{adapt_steps} (repeats)"] = denoise_detailed(
            f0, model=sm, sigma=s_rep, device="cpu", adapt=adapt_steps
        ).volume.data
    base = float(np.mean((f0 - f1) ** 2))
    for k, v in rows.items():
        n2n = float(np.mean((v - f1) ** 2))
        print(f"  {k:<34} noise2noise MSE {n2n:.7f}  ({'=' if v is f0 else ('<' if n2n < base else '>')} noisy)")


if __name__ == "__main__":
    main()
