"""Is the uncertainty map worth trusting? Two checks against the true error (on data with a clean
reference): how often the error lies within k posterior standard deviations, and whether windows
with more uncertainty have more error (Spearman rank correlation over windows)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    coverage: float  # fraction of voxels with |error| <= k * std
    k: float
    rank_correlation: float  # Spearman of window-mean std vs window-mean |error|
    windows: int


def _window_means(a: np.ndarray, w: int) -> np.ndarray:
    n = [s // w for s in a.shape]
    a = a[: n[0] * w, : n[1] * w, : n[2] * w]
    return a.reshape(n[0], w, n[1], w, n[2], w).mean(axis=(1, 3, 5)).ravel()


def calibration(
    estimate: np.ndarray, std: np.ndarray, clean: np.ndarray, *, k: float = 2.0, window: int = 8
) -> Calibration:
    from scipy.stats import spearmanr

    err = np.abs(estimate.astype(np.float64) - clean)
    cover = float(np.mean(err <= k * std))
    e, s = _window_means(err, window), _window_means(std.astype(np.float64), window)
    rho = float(spearmanr(s, e).statistic) if e.size > 2 and np.ptp(s) > 0 else float("nan")
    return Calibration(cover, k, rho, int(e.size))
