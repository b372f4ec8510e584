"""Do the realism metrics rank corruption, and does memorization flag copies and nothing else?

One run, CPU: a population of template brains (medgen.demo_data.template_population, the demo's
generator of pseudo-subjects) preprocessed into the demo's model space (32x40x32 at 6 mm) with
medgen's own preprocessing. Split: training (the reference, and the feature encoder's training
data), calibration (held-out reals that calibrate the gate) and evaluation (other held-out reals).
Each realism metric is computed against the training set for the evaluation set and for increasingly
corrupted copies of it (Gaussian noise, blur, intensity shift), and the gate's memorization check is
run on every set plus copies (exact and lightly noised) of training volumes.

    python benchmarks/metrics_validity.py [--n-train 40 --n-cal 12 --n-eval 24]

Set-level metrics need sets: with 8 evaluation volumes FID/KID/MMD cannot tell noise 0.02 from the
sampling spread of held-out reals; with 24 they can. Blur of 0.6 voxel is below what FID/KID see at
24 (the levels here start at 1 voxel).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgen.config import DataConfig, GateConfig, IntensityConfig  # noqa: E402
from medgen.datasets.prepared import prepare  # noqa: E402
from medgen.demo_data import template_population  # noqa: E402
from medgen.io.nifti import write_nifti
from medgen.quality.gate import assess, build_reference, realism  # noqa: E402
from medgen.quality.metrics.features import EncoderSettings, train_encoder  # noqa: E402

METRICS = ("fid", "kid", "mmd", "frd", "histogram_w1")
DATA = DataConfig(
    modality="MR",
    spacing=(6.0, 6.0, 6.0),
    size=(32, 40, 32),
    intensity=IntensityConfig(kind="percentile", lower=0.0, upper=99.5),
)


def population(n: int, seed: int, tmp: Path) -> np.ndarray:
    items = []
    for i, v in enumerate(template_population(n, seed=seed, spacing=3.0)):
        path = write_nifti(v, tmp / f"sub-{i:03d}.nii.gz")
        items.append({"image": str(path), "sha256": f"{seed}-{i}", "scan_id": f"sub-{i:03d}"})
    return prepare(items, DATA, tmp / "cache").images[:, 0].numpy()


def corruptions(x: np.ndarray, train: np.ndarray, rng: np.random.Generator) -> dict[str, list[tuple[str, np.ndarray]]]:
    return {
        "noise": [(f"noise {s}", x + rng.normal(0, s, x.shape).astype(np.float32)) for s in (0.02, 0.05, 0.1)],
        "blur": [(f"blur {s} vox", np.stack([gaussian_filter(v, s) for v in x])) for s in (1.0, 1.5, 2.0)],
        "shift": [(f"shift +{s}", x + s) for s in (0.05, 0.1, 0.2)],
        "copies": [
            ("train copies", train[: len(x)].copy()),
            (
                "train copies + noise 0.01",
                train[: len(x)] + rng.normal(0, 0.01, x[: len(train)].shape).astype(np.float32),
            ),
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-cal", type=int, default=12)
    ap.add_argument("--n-eval", type=int, default=24)
    ap.add_argument("--encoder-steps", type=int, default=EncoderSettings().steps)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vols = population(args.n_train + args.n_cal + args.n_eval, seed=7, tmp=Path(tmp))
        train = vols[: args.n_train]
        cal = vols[args.n_train : args.n_train + args.n_cal]
        held = vols[args.n_train + args.n_cal :]
        t1 = time.perf_counter()
        enc = train_encoder(train, Path(tmp) / "encoder", EncoderSettings(steps=args.encoder_steps))
        t2 = time.perf_counter()
    gate = GateConfig()
    ref = build_reference(train, cal, [f"train-{i:02d}" for i in range(len(train))], enc, gate)
    print(
        f"data {t1 - t0:.1f} s, encoder {t2 - t1:.1f} s ({enc.encoder_id}, NT-Xent "
        f"{enc.metadata['loss_first_last'][0]:.3f} -> {enc.metadata['loss_first_last'][1]:.3f}); "
        f"train {len(train)}, calibration {len(cal)}, evaluation {len(held)}"
    )
    print(
        f"memorization thresholds: NCC {ref.thresholds.ncc:.4f}, feature cosine {ref.thresholds.feature_cosine:.4f}\n"
    )

    rng = np.random.default_rng(0)
    sets = corruptions(held, train, rng)
    base = realism(held, ref)
    header = f"{'set':<28}" + "".join(f"{m:>13}" for m in METRICS) + f"{'memorized':>12}"

    def memorized(x: np.ndarray) -> tuple[int, float, float]:
        """(volumes flagged as memorized, highest NCC and feature cosine to a training volume)."""
        res = assess(x, [f"v{i}" for i in range(len(x))], ref, gate)
        flagged = sum(any(r.startswith("memorized") for r in v.reasons) for v in res.volumes)
        return (
            flagged,
            max(v.checks["nearest_ncc"] for v in res.volumes),
            max(v.checks["nearest_feature_cosine"] for v in res.volumes),
        )

    def row(name: str, r: dict, mem: tuple[int, float, float], n: int) -> str:
        return (
            f"{name:<28}"
            + "".join(f"{r[m]:>13.4g}" for m in METRICS)
            + f"{mem[0]:>8}/{n:<3}{mem[1]:>9.4f}{mem[2]:>9.4f}"
        )

    header += f"{'max NCC':>9}{'max cos':>9}"
    print(header)
    print("-" * len(header))
    mem = memorized(held)
    flagged = {"held-out real": mem[0]}
    print(row("held-out real", base, mem, len(held)))
    ok = True
    for family, levels in sets.items():
        prev = base
        for name, x in levels:
            r = realism(x, ref)
            mem = memorized(x)
            flagged[name] = mem[0]
            print(row(name, r, mem, len(x)))
            if family != "copies":
                for m in METRICS:
                    if not r[m] > prev[m]:
                        ok = False
                        print(f"  ! {m} does not rank {name} above the previous level")
                prev = r
    copies_ok = all(flagged[n] == len(held) for n, _ in sets["copies"])
    others_ok = all(v == 0 for k, v in flagged.items() if not k.startswith("train copies"))
    print(f"\nrealism metrics rank every corruption family in order: {'yes' if ok else 'NO'}")
    print(
        f"memorization flags every copy: {'yes' if copies_ok else 'NO'}; flags nothing else: {'yes' if others_ok else 'NO'}"
    )
    print(f"total {time.perf_counter() - t0:.1f} s")
    sys.exit(0 if ok and copies_ok and others_ok else 1)


if __name__ == "__main__":
    main()
