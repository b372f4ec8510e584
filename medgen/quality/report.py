"""The quality report of a synthesis run: JSON (schema-validated), Markdown, montage, histograms.

Pictures are drawn with matplotlib's Agg backend (no display needed) and written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medgen.io.atomic import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from medgen.quality.gate import BatchResult, Reference
    from medgen.synthesis.runs import SynthesisRecord

FORMAT = "medgen-quality-report"
MONTAGE, HISTOGRAMS, MARKDOWN, JSON_REPORT = "montage.png", "histograms.png", "report.md", "report.json"


def report_dict(record: "SynthesisRecord", result: "BatchResult") -> dict:
    extra = result.extra
    return {
        "format": FORMAT,
        "format_version": 1,
        "generator_sha256": record.generator_sha256,
        "training_manifest_sha256": extra["training_manifest_sha256"],
        "reference_manifest_sha256": extra["reference_manifest_sha256"],
        "encoder_id": result.encoder_id,
        "sampling": {"sampler": record.sampler, "steps": record.steps, "seed": record.seed},
        "reference": {
            "n_train": result.n_train,
            "n_heldout": result.n_heldout,
            "heldout_splits": extra["heldout_splits"],
        },
        "gate": extra["gate"],
        "thresholds": result.thresholds,
        "calibration": result.calibration,
        "realism": result.realism,
        "realism_heldout_real": result.heldout_realism,
        "diversity": result.diversity,
        "batch": {
            "passed": result.passed,
            "reasons": result.reasons,
            "n_volumes": len(result.volumes),
            "n_passed": sum(v.passed for v in result.volumes),
        },
        "volumes": [
            {
                "name": v.name,
                "sha256": extra["volume_sha256"][v.name],
                "passed": v.passed,
                "reasons": v.reasons,
                "checks": v.checks,
                "nearest_train": v.nearest_train,
            }
            for v in result.volumes
        ],
        "files": {"markdown": MARKDOWN, "montage": MONTAGE, "histograms": HISTOGRAMS},
        **({"utility": extra["utility"]} if extra.get("utility") is not None else {}),
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def markdown(report: dict) -> str:
    b = report["batch"]
    lines = [
        "# Quality report",
        "",
        f"**Batch verdict: {'PASS' if b['passed'] else 'FAIL'}** — {b['n_passed']} of {b['n_volumes']} volumes pass the gate."
        + ("" if b["passed"] else " " + "; ".join(b["reasons"])),
        "",
        f"Generator `{report['generator_sha256'][:16]}`, sampler {report['sampling']['sampler']}-{report['sampling']['steps']}, "
        f"seed {report['sampling']['seed']}; reference: {report['reference']['n_train']} training and "
        f"{report['reference']['n_heldout']} held-out real volumes; feature encoder `{report['encoder_id']}`.",
        "",
        "## Realism (distance to the training set; lower is closer)",
        "",
        "| set | FID | KID | MMD | FRD | histogram W1 |",
        "|---|---|---|---|---|---|",
        "| synthetic | "
        + " | ".join(_fmt(report["realism"][k]) for k in ("fid", "kid", "mmd", "frd", "histogram_w1"))
        + " |",
        "| held-out real (baseline) | "
        + " | ".join(_fmt(report["realism_heldout_real"][k]) for k in ("fid", "kid", "mmd", "frd", "histogram_w1"))
        + " |",
        "",
        "## Diversity (mean pairwise MS-SSIM; lower is more diverse)",
        "",
        f"synthetic {_fmt(report['diversity']['synthetic_mean_pairwise_ms_ssim'])}, real training {_fmt(report['diversity']['real_mean_pairwise_ms_ssim'])}",
        "",
        "## Volumes",
        "",
        "| volume | verdict | nearest NCC | feature cosine | foreground | histogram W1 | radiomics z | reasons |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in report["volumes"]:
        c = v["checks"]
        lines.append(
            f"| {v['name']} | {'pass' if v['passed'] else 'FAIL'} | {_fmt(c.get('nearest_ncc'))} | {_fmt(c.get('nearest_feature_cosine'))} | "
            f"{_fmt(c.get('foreground_fraction'))} | {_fmt(c.get('histogram_w1'))} | {_fmt(c.get('radiomics_z'))} | {'; '.join(v['reasons'])} |"
        )
    t = report["thresholds"]
    lines += [
        "",
        f"Thresholds: NCC > {t['ncc']:.4f} or feature cosine > {t['feature_cosine']:.4f} = memorized (calibrated on held-out reals); "
        f"intensity in [{t['intensity_low']:.3g}, {t['intensity_high']:.3g}], foreground in [{t['foreground_low']:.3f}, {t['foreground_high']:.3f}], "
        f"histogram W1 <= {t['histogram_w1']:.4f} (model units)"
        + (
            f", radiomics distance <= {t['radiomics_z']:.2f} SD."
            if t["radiomics_z"] is not None
            else "; radiomics check off."
        ),
        "",
        f"![montage]({MONTAGE})",
        "",
        f"![histograms]({HISTOGRAMS})",
        "",
    ]
    if "utility" in report:
        lines += utility_markdown(report["utility"])
    return "\n".join(lines)


def utility_markdown(u: dict) -> list[str]:
    """The train-on-synthetic / test-on-real table, mask adherence and condition fidelity."""
    lines = ["## Utility (does the synthetic set teach anything real?)", ""]
    seg = u.get("segmentation")
    if seg:
        values = seg["values"]
        lines += [
            f"Segmentation Dice on {seg['n_real_test']} held-out real pairs of a small UNet trained for "
            f"{seg['steps']} steps on {seg['n_real_train']} real and/or {seg['n_synthetic']} synthetic pairs"
            + (
                f" (real + synthetic: {seg['real_fraction']:.0%} real in each batch):"
                if seg.get("real_fraction")
                else ":"
            ),
            "",
            "| trained on | " + " | ".join(f"label {v}" for v in values) + " |",
            "|---|" + "---|" * len(values),
        ]
        for name in ("real", "synthetic", "real+synthetic"):
            lines.append(f"| {name} | " + " | ".join(_fmt(seg[f"dice_{name}"][v]) for v in values) + " |")
        lines += [
            "",
            f"Synthetic-only / real-only Dice: {_fmt(seg['synthetic_to_real'])}. Mask adherence (real-trained UNet "
            f"on the samples vs the maps they were asked to follow): {_fmt(seg['mask_adherence_mean'])}.",
            "",
        ]
    for col, c in (u.get("conditions") or {}).items():
        lines.append(
            f"Condition {col}={c.get('asked')}: a CNN trained on real scans scores {c['metric']} "
            f"{_fmt(c['synthetic'])} on the samples, {_fmt(c['heldout_real'])} on held-out real scans"
            + (f" (chance {_fmt(c['chance'])})." if c.get("chance") else ".")
        )
    for why in u.get("skipped", []):
        lines.append(f"- not measured: {why}")
    return lines + [""]


def _mid_slices(v: np.ndarray) -> list[np.ndarray]:
    x, y, z = (n // 2 for n in v.shape)
    return [np.rot90(v[:, :, z]), np.rot90(v[:, y, :]), np.rot90(v[x, :, :])]


PLANES = ("axial", "coronal", "sagittal")  # _mid_slices' order (RAS model space)


def montage(
    path: Path,
    names: list[str],
    volumes: np.ndarray,
    neighbours: list[np.ndarray | None],
    passed: list[bool],
    max_rows: int = 8,
    *,
    nearest: list[tuple[str | None, float | None]] | None = None,
    labels: list[np.ndarray | None] | None = None,
) -> None:
    """Mid-slices (axial, coronal, sagittal) of each sample beside its nearest training volume,
    on one grey scale (model units, bar at the right); `nearest`: that volume's scan id and NCC;
    `labels`: the map a sample was asked to follow, drawn as outlines over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(len(names), max_rows)
    fig, axes = plt.subplots(max(rows, 1), 6, figsize=(12.6, 2.2 * max(rows, 1)), squeeze=False)
    shown = None
    for r in range(rows):
        near, lab = neighbours[r], labels[r] if labels is not None else None
        pics: list[np.ndarray | None] = [*_mid_slices(np.nan_to_num(volumes[r]))]
        pics += _mid_slices(near) if near is not None else [None] * 3
        outlines: list[np.ndarray | None] = [*_mid_slices(lab)] if lab is not None else [None] * 3
        for c, img in enumerate(pics):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if img is not None:
                shown = ax.imshow(img, cmap="gray", vmin=0, vmax=1)
                line = outlines[c] if c < 3 else None
                if line is not None and line.any():
                    values = sorted(int(v) for v in np.unique(line) if v > 0)
                    for k, v in enumerate(values):
                        ax.contour(line == v, levels=[0.5], linewidths=0.6, colors=[f"C{k % 10}"])
            if r == 0:
                ax.set_xlabel(PLANES[c % 3], fontsize=7)
                ax.xaxis.set_label_position("top")
        axes[r][0].set_ylabel(f"{names[r]}\n{'pass' if passed[r] else 'FAIL'}", fontsize=8)
        near_id, ncc = nearest[r] if nearest is not None else (None, None)
        title = "nearest training volume" + (f": {near_id}" if near_id else "")
        axes[r][3].set_title(title + (f", NCC {ncc:.3f}" if ncc is not None else ""), fontsize=7, loc="left")
        if labels is not None and labels[r] is not None:
            axes[r][0].set_title("outlines: the label map it followed", fontsize=7, loc="left")
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes[:, -1].tolist(), fraction=0.04, pad=0.02)
        bar.set_label("intensity (model units)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def histograms(path: Path, names: list[str], volumes: np.ndarray, train: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-0.1, 1.3, 71)
    ax.hist(train.ravel(), bins=bins, density=True, histtype="stepfilled", alpha=0.3, color="k", label="training (all)")
    for name, v in zip(names, volumes):
        if np.all(np.isfinite(v)):
            ax.hist(v.ravel(), bins=bins, density=True, histtype="step", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("intensity (model units)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def write_report_files(
    out: Path,
    record: "SynthesisRecord",
    result: "BatchResult",
    volumes: np.ndarray,
    ref: "Reference",
    labels: list[np.ndarray | None] | None = None,
) -> Path:
    """Write the pictures, the Markdown, then the JSON last (its presence means the set is complete)."""
    import jsonschema

    from medgen.io.schemas import load_schema

    out.mkdir(parents=True, exist_ok=True)
    report = report_dict(record, result)
    jsonschema.validate(report, load_schema("quality_report"))
    index = {n: i for i, n in enumerate(ref.train_ids)}
    neighbours = [ref.train[index[v.nearest_train]] if v.nearest_train in index else None for v in result.volumes]
    names = [v.name for v in result.volumes]
    nearest = [(v.nearest_train, v.checks.get("nearest_ncc")) for v in result.volumes]
    montage(
        out / MONTAGE, names, volumes, neighbours, [v.passed for v in result.volumes], nearest=nearest, labels=labels
    )
    histograms(out / HISTOGRAMS, names, volumes, ref.train)
    write_text_atomic(out / MARKDOWN, markdown(report))
    return write_text_atomic(out / JSON_REPORT, json.dumps(report, indent=1, allow_nan=False))
