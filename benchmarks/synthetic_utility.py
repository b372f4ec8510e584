"""Is the demo's synthetic data useful? Train-on-synthetic / test-on-real, in one run.

On the demo population (MNI152 variants with SIMULATED lesions and tissue maps, see
medgen.demo_data.lesion_population), with the demo config's generator, conditioned on `lesion`,
and its ControlNet:

  1. segmentation: a small MONAI UNet trained on real training pairs, on synthetic pairs (each
     following one training subject's tissue map, lesion asked to match the map), and on both;
     Dice per label on the held-out real pairs (val + test)
  2. conditioning: a CNN trained on the real training scans predicts `lesion`; accuracy on held-out
     real scans and on samples asked for lesion=yes and lesion=no (no ControlNet there, so only
     the condition can put the lesion in)
  3. mask adherence: Dice of the real-trained UNet's segmentation of each sample against its map

    python benchmarks/synthetic_utility.py [--run demo_run/ldm] [--per-map 2] [--per-level 8] [--mask-guidance 1]

Uses RUN/generator and RUN/controlnet from `make demo` (or trains them, same config, if absent).
Goal (issue 14): synthetic-only Dice >= 80 % of real-only, real + synthetic >= real alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def with_steps(cfg, ae: int, diffusion: int, controlnet: int):
    """The same config with other training step counts (a fixed count each, never a time budget)."""

    def steps(section, n: int):
        every = min(section.train.checkpoint_every, n)
        return section.model_copy(
            update={"train": section.train.model_copy(update={"steps": n, "checkpoint_every": every})}
        )

    return cfg.model_copy(
        update={
            "autoencoder": steps(cfg.autoencoder, ae),
            "diffusion": steps(cfg.diffusion, diffusion),
            "controlnet": steps(cfg.controlnet, controlnet),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--run", type=Path, default=None, help="default: the config's run_dir/ldm")
    ap.add_argument("--per-map", type=int, default=2, help="samples per training tissue map")
    ap.add_argument("--per-level", type=int, default=8, help="samples per lesion level (conditioning check)")
    ap.add_argument("--steps", type=int, default=None, help="utility network steps (default: the config's)")
    ap.add_argument("--mask-guidance", type=float, default=1.0, help="guidance on the label map (1: as trained)")
    ap.add_argument("--guidance", type=float, default=3.0, help="guidance on the lesion condition of the pairs")
    ap.add_argument(
        "--train-steps",
        type=int,
        nargs=3,
        metavar=("AE", "DIFFUSION", "CONTROLNET"),
        default=None,
        help="train the demo architecture for these step counts into its own run folder "
        "(default demo_run/utility_ldm-AE-DIFFUSION-CONTROLNET) instead of using the demo's run",
    )
    args = ap.parse_args()

    import torch

    from medgen.config import UtilityConfig, load_config
    from medgen.datasets.covariates import load_covariates
    from medgen.datasets.prepared import manifest_items, prepare, prepare_labels
    from medgen.demo_data import build_sample_data
    from medgen.ingestion.run import IngestOptions, ingest
    from medgen.models.bundle import load_generator
    from medgen.models.controlnet import load_controlnet
    from medgen.quality.utility import Pairs, condition_fidelity, segmentation_utility
    from medgen.synthesis.sampler import generate

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    assert cfg.ingest and cfg.data and cfg.covariates and cfg.sample_data
    if args.train_steps:
        cfg = with_steps(cfg, *args.train_steps)
        tag = "-".join(str(n) for n in args.train_steps)
        run = args.run or cfg.orchestration.run_dir / f"utility_ldm-{tag}"
    else:
        run = args.run or cfg.orchestration.run_dir / "ldm"
    build_sample_data(cfg.sample_data)
    report = ingest(
        cfg.ingest.sources, cfg.ingest.out, options=IngestOptions.from_config(cfg.ingest), salt=cfg.ingest.salt
    )
    manifest = report.manifest_path
    if not (run / "controlnet" / "configs" / "metadata.json").exists():
        from medgen.synthesis.train_autoencoder import train_autoencoder
        from medgen.synthesis.train_controlnet import train_controlnet
        from medgen.synthesis.train_diffusion import train_diffusion

        train_autoencoder(cfg, manifest, run, device="cpu")
        train_diffusion(cfg, manifest, run, device="cpu")
        train_controlnet(cfg, manifest, run, device="cpu")
    gen = load_generator(run / "generator")
    cn = load_controlnet(run / "controlnet", gen)
    ucfg = cfg.quality.utility or UtilityConfig()
    if args.steps:
        ucfg = ucfg.model_copy(update={"steps": args.steps})

    train_items = manifest_items(manifest, cfg.data, cfg.data.splits)
    held_items = manifest_items(manifest, cfg.data, cfg.quality.heldout_splits)
    cache = Path(tempfile.mkdtemp(prefix="medgen-utility-"))
    tr_lab, tr_keep = prepare_labels(train_items, manifest, cfg.data)
    he_lab, he_keep = prepare_labels(held_items, manifest, cfg.data)
    train = prepare([train_items[i] for i in tr_keep], cfg.data, cache).images[:, 0].numpy()
    held = prepare([held_items[i] for i in he_keep], cfg.data, cache, "held-out").images[:, 0].numpy()
    table = load_covariates(cfg.covariates, manifest, salt=cfg.ingest.salt).values
    lesion_tr = [table[train_items[i]["scan_id"]]["lesion"] for i in tr_keep]
    lesion_he = [table[held_items[i]["scan_id"]]["lesion"] for i in he_keep]

    # 1 + 3: pairs following each training map, the condition matching the map
    maps = [m[0].numpy() for m in tr_lab]
    asked = [("yes" if (m == 3).any() else "no") for m in maps]
    synth_imgs, synth_maps = [], []
    seed = 0
    for m, level in zip(maps, asked):
        vols = generate(
            gen,
            args.per_map,
            steps=50,
            seed=seed,
            labels=m,
            controlnet=cn,
            condition={"lesion": level},
            guidance=args.guidance,
            mask_guidance=args.mask_guidance,
        )
        seed += 1
        synth_imgs += [gen.intensity.to_model(v.data) for v in vols]
        synth_maps += [m] * len(vols)
    values = sorted(int(v) for v in np.unique(tr_lab.numpy()) if v > 0)
    seg = segmentation_utility(
        Pairs(train, tr_lab[:, 0].numpy()),
        Pairs(np.stack(synth_imgs).astype(np.float32), np.stack(synth_maps)),
        Pairs(held, he_lab[:, 0].numpy()),
        values,
        ucfg,
    )
    # 2: samples asked for each level, no ControlNet
    cond_imgs, cond_asked = [], []
    for level in ("yes", "no"):
        vols = generate(gen, args.per_level, steps=50, seed=100, condition={"lesion": level}, guidance=3.0)
        cond_imgs += [gen.intensity.to_model(v.data) for v in vols]
        cond_asked += [level] * len(vols)
    fid = condition_fidelity(
        train,
        lesion_tr,
        held,
        lesion_he,
        np.stack(cond_imgs).astype(np.float32),
        cond_asked,
        "categorical",
        ["no", "yes"],
        ucfg,
    )

    names = {str(k): v for k, v in cn.table.items()}
    print(f"\n# Synthetic utility on the demo population ({time.perf_counter() - t0:.0f} s)\n")
    print(
        f"real train pairs {seg['n_real_train']}, synthetic pairs {seg['n_synthetic']} (mask guidance "
        f"{args.mask_guidance:g}, condition guidance {args.guidance:g}), held-out real pairs {seg['n_real_test']}; UNet {ucfg.steps} steps\n"
    )
    print("| trained on | " + " | ".join(names.get(v, v) for v in seg["values"]) + " | mean |")
    print("|---|" + "---|" * (len(seg["values"]) + 1))
    for k in ("real", "synthetic", "real+synthetic"):
        d = seg[f"dice_{k}"]
        vals = [x for x in d.values() if x is not None]
        print(
            f"| {k} | "
            + " | ".join(f"{d[v]:.3f}" if d[v] is not None else "-" for v in seg["values"])
            + f" | {np.mean(vals):.3f} |"
        )
    ratio = seg["synthetic_to_real"]
    both = np.mean([x for x in seg["dice_real+synthetic"].values() if x is not None])
    real = np.mean([x for x in seg["dice_real"].values() if x is not None])
    print(
        f"\nsynthetic-only / real-only Dice: {ratio:.2f} (goal >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'}); "
        f"real+synthetic - real: {both - real:+.3f} (goal >= 0: {'met' if both >= real else 'NOT met'})"
    )
    print(
        f"mask adherence (real-trained UNet on the samples vs their maps): mean Dice {seg['mask_adherence_mean']:.3f} "
        + json.dumps({names.get(k, k): round(v, 3) for k, v in seg["mask_adherence"].items() if v is not None})
    )
    # a direct look at the lesion, which the UNet segments poorly even on real scans: the mean
    # model-space intensity inside the asked lesion, against real scans' lesions and white matter
    lesion = [img[m == 3].mean() for img, m in zip(synth_imgs, synth_maps) if (m == 3).any()]
    real_lesion = [img[m[0] == 3].mean() for img, m in zip(train, tr_lab.numpy()) if (m == 3).any()]
    real_wm = np.mean([img[m[0] == 2].mean() for img, m in zip(train, tr_lab.numpy())])
    if lesion and real_lesion:
        print(
            f"inside the asked lesion: mean intensity {np.mean(lesion):.3f} (samples below 0.45: "
            f"{np.mean(np.asarray(lesion) < 0.45):.0%}); real lesions {np.mean(real_lesion):.3f}, real white matter {real_wm:.3f}"
        )
    print(
        f"\nlesion condition: accuracy of a real-trained CNN on held-out real {fid['heldout_real']:.2f} "
        f"({fid['n_real_test']} scans), on samples asked yes/no {fid['synthetic']:.2f} ({fid['n_synthetic']}), chance {fid['chance']:.2f}"
    )


if __name__ == "__main__":
    main()
