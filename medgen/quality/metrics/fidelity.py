"""Realism: distances between a set of synthetic volumes and a set of real ones.

- FID: Fréchet distance of encoder features (MONAI's `compute_frechet_distance`). Covariances get
  a small ridge first: with tens of volumes and 224 features they are singular, and MONAI's own
  fallback prints instead of raising.
- KID: unbiased polynomial-kernel MMD² of the features (Bińkowski et al.); MONAI has no KID.
- MMD: unbiased MMD² of z-scored features with the distance-induced kernel (Sejdinovic et al.
  2013; it equals half the energy distance). A Gaussian kernel saturates once two sets are far apart
  and then ranks strong corruptions at random. Not MONAI's `MMDMetric`: that one is linear-kernel on images, i.e. it compares
  only the mean volumes.
- FRD: Fréchet distance of interpretable radiomics features (first-order statistics and 3D GLCM
  texture of the foreground), z-scored with the reference set's statistics, in the spirit of the
  Fréchet Radiomics Distance.
- Histogram W1: Wasserstein distance between the pooled intensity distributions of whole volumes
  (background included: a foreground threshold would let a shifted background count as tissue).

FID and KID see features z-scored with the reference set's statistics: the encoder's raw feature
scales differ by orders of magnitude between stages, and unscaled the widest one drowns the rest.

All inputs are model-space arrays (N, X, Y, Z) with intensities in [0, 1]-ish, so distances are
comparable across runs of one model.
"""

from __future__ import annotations

import numpy as np

FOREGROUND = 0.05  # model-space intensity above which a voxel counts as foreground
GLCM_LEVELS = 16


def _frechet(a: np.ndarray, b: np.ndarray, ridge: float = 1e-6) -> float:
    import torch
    from monai.metrics.fid import compute_frechet_distance

    def stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        cov = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
        return torch.as_tensor(x.mean(0)), torch.as_tensor(np.atleast_2d(cov) + ridge * np.eye(x.shape[1]))

    (m1, s1), (m2, s2) = stats(a), stats(b)
    return max(0.0, float(compute_frechet_distance(m1, s1, m2, s2)))


def fid(feat_x: np.ndarray, feat_ref: np.ndarray) -> float:
    return _frechet(*_zscore(feat_x, feat_ref))


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = len(kxx), len(kyy)
    sx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) if m > 1 else 0.0
    sy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) if n > 1 else 0.0
    return float(sx + sy - 2 * kxy.mean())


def kid(feat_x: np.ndarray, feat_ref: np.ndarray) -> float:
    feat_x, feat_ref = _zscore(feat_x, feat_ref)
    d = feat_x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1.0) ** 3

    return _mmd2_unbiased(k(feat_x, feat_x), k(feat_ref, feat_ref), k(feat_x, feat_ref))


def _zscore(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = ref.mean(0), ref.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return (x - mu) / sd, (ref - mu) / sd


def mmd(feat_x: np.ndarray, feat_ref: np.ndarray) -> float:
    x, y = _zscore(feat_x, feat_ref)

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(0.0, (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T))

    # k(a, b) = (|a| + |b| - |a - b|) / 2: the kernel terms in |a|, |b| cancel in the unbiased MMD²
    return _mmd2_unbiased(-dist(x, x) / 2, -dist(y, y) / 2, -dist(x, y) / 2)


def foreground(volume: np.ndarray) -> np.ndarray:
    return volume > FOREGROUND


def _glcm_features(volume: np.ndarray, mask: np.ndarray) -> list[float]:
    """Contrast, homogeneity, energy and correlation of a 3D grey-level co-occurrence matrix
    (offsets of one voxel along each axis, symmetric, pooled). Hand-written: scikit-image's
    `graycomatrix` is 2D only and per-slice matrices would miss through-plane texture."""
    q = np.clip((volume * GLCM_LEVELS).astype(np.int64), 0, GLCM_LEVELS - 1)
    glcm = np.zeros((GLCM_LEVELS, GLCM_LEVELS))
    for axis in range(3):
        a = np.moveaxis(q, axis, 0)
        m = np.moveaxis(mask, axis, 0)
        pair = m[:-1] & m[1:]
        idx = a[:-1][pair] * GLCM_LEVELS + a[1:][pair]
        glcm += np.bincount(idx, minlength=GLCM_LEVELS**2).reshape(GLCM_LEVELS, GLCM_LEVELS)
    glcm = glcm + glcm.T
    total = glcm.sum()
    if total == 0:
        return [0.0, 0.0, 0.0, 0.0]
    p = glcm / total
    i, j = np.indices(p.shape)
    mu = (i * p).sum()
    var = ((i - mu) ** 2 * p).sum()
    corr = float((((i - mu) * (j - mu)) * p).sum() / var) if var > 1e-12 else 1.0
    return [float(((i - j) ** 2 * p).sum()), float((p / (1.0 + np.abs(i - j))).sum()), float((p**2).sum()), corr]


RADIOMICS_NAMES = (
    "fg_fraction",
    "mean",
    "std",
    "skewness",
    "kurtosis",
    "p10",
    "p50",
    "p90",
    "entropy",
    "glcm_contrast",
    "glcm_homogeneity",
    "glcm_energy",
    "glcm_correlation",
)


def radiomics(volume: np.ndarray) -> np.ndarray:
    """Interpretable per-volume features (names in RADIOMICS_NAMES) of the foreground."""
    mask = foreground(volume)
    v = volume[mask].astype(np.float64)
    if v.size < 10:
        return np.array([mask.mean(), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=np.float64)
    mean, std = v.mean(), v.std()
    z = (v - mean) / std if std > 0 else np.zeros_like(v)
    hist, _ = np.histogram(v, bins=32, range=(0.0, 1.5))
    p = hist[hist > 0] / v.size
    first = [
        mask.mean(),
        mean,
        std,
        (z**3).mean(),
        (z**4).mean() - 3,
        *np.percentile(v, [10, 50, 90]),
        float(-(p * np.log2(p)).sum()),
    ]
    return np.array(first + _glcm_features(volume, mask), dtype=np.float64)


def frd(rad_x: np.ndarray, rad_ref: np.ndarray) -> float:
    x, y = _zscore(rad_x, rad_ref)
    return _frechet(x, y)


def histogram_w1(volumes: np.ndarray, reference_values: np.ndarray) -> float:
    """W1 between the pooled intensities of `volumes` and a reference sample (`pooled_values`)."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(pooled_values(volumes), reference_values))


def volume_w1(volume: np.ndarray, reference_values: np.ndarray) -> float:
    return histogram_w1(volume[None], reference_values)


def pooled_values(volumes: np.ndarray, max_values: int = 200_000, seed: int = 0) -> np.ndarray:
    """A fixed-size random sample of the voxel intensities of a set of volumes."""
    vals = np.asarray(volumes).ravel()
    if vals.size > max_values:
        vals = np.random.default_rng(seed).choice(vals, max_values, replace=False)
    return vals.astype(np.float64)
