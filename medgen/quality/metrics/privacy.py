"""Memorization: how close each synthetic volume is to its nearest training volume.

Two similarities, both in [-1, 1]: normalised cross-correlation of the voxels (catches copies and
lightly altered copies) and cosine of z-scored encoder features (catches copies that moved a little).
Thresholds are calibrated on held-out real volumes, which the model never saw: a volume closer to
a training scan than held-out scans of the same population usually are is suspicious.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x - x.mean(1, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


@dataclass(frozen=True)
class Nearest:
    similarity: np.ndarray  # (N,) the best similarity of each query
    index: np.ndarray  # (N,) index of the nearest training item


def nearest_ncc(volumes: np.ndarray, train: np.ndarray) -> Nearest:
    """Normalised cross-correlation with every training volume (same model-space grid)."""
    s = _unit_rows(volumes) @ _unit_rows(train).T
    s = np.nan_to_num(s, nan=0.0)
    return Nearest(s.max(1), s.argmax(1))


def nearest_feature_cosine(feats: np.ndarray, train_feats: np.ndarray) -> Nearest:
    mu, sd = train_feats.mean(0), train_feats.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)

    def unit(x: np.ndarray) -> np.ndarray:
        z = (x - mu) / sd
        n = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.where(n > 0, n, 1.0)

    s = np.nan_to_num(unit(feats) @ unit(train_feats).T, nan=0.0)
    return Nearest(s.max(1), s.argmax(1))


def calibrate(heldout_similarity: np.ndarray, quantile: float, margin: float) -> float:
    """The `quantile` of held-out-to-training similarities, moved `margin` of the way to 1."""
    q = float(np.quantile(heldout_similarity, quantile))
    return q + margin * (1.0 - q)
