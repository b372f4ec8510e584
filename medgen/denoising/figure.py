"""The picture of a denoising: noisy / denoised / residual / uncertainty, mid-slices of each plane.

A reader should see in one image what was removed (the residual should look like noise, not
anatomy) and what the estimate expects to have gained (SURE). Drawn with matplotlib's Agg backend
and written atomically, like the quality report's montage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgen.io.atomic import atomic_path
from medgen.volume import Volume


def _mid_slices(data: np.ndarray) -> list[np.ndarray]:
    """Sagittal, coronal, axial mid-slices of a RAS-ordered array, oriented for display."""
    i, j, k = (n // 2 for n in data.shape)
    return [np.rot90(data[i, :, :]), np.rot90(data[:, j, :]), np.rot90(data[:, :, k])]


def write_figure(
    noisy: Volume, denoised: Volume, path: str | Path, *, std: Volume | None = None, title: str = ""
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    canon_noisy, canon_out = noisy.as_closest_canonical(), denoised.as_closest_canonical()
    columns = [
        ("noisy", canon_noisy.data),
        ("denoised", canon_out.data),
        ("residual (noisy - denoised)", canon_noisy.data - canon_out.data),
    ]
    if std is not None:
        columns.append(("posterior std", std.as_closest_canonical().data))
    lo, hi = np.percentile(canon_noisy.data, [0.5, 99.5])
    r = float(np.percentile(np.abs(columns[2][1]), 99.5)) or 1.0
    fig, axes = plt.subplots(3, len(columns), figsize=(3.0 * len(columns), 8.4), squeeze=False)
    for c, (name, data) in enumerate(columns):
        for row, sl in enumerate(_mid_slices(data)):
            ax = axes[row][c]
            if name.startswith("residual"):
                im = ax.imshow(sl, cmap="coolwarm", vmin=-r, vmax=r)
            elif name.startswith("posterior"):
                im = ax.imshow(sl, cmap="magma")
            else:
                im = ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(("sagittal", "coronal", "axial")[row], fontsize=9)
            if row == 2:
                fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.05, pad=0.04, label=noisy.meta.units)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def figure_title(name: str, sigma: float, units: str, risk) -> str:
    if risk is None:
        gain = ""
    elif risk.gain_db is None:
        gain = "; SURE: no reliable gain estimate (sigma probably too high)"
    else:
        gain = f"; SURE: expected PSNR gain {risk.gain_db:+.2f} dB ({risk.covers})"
    return f"{name}: sigma {sigma:.4g} {units}{gain}"
