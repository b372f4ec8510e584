"""Spatially correlated noise: measure it, and make SURE hold for it.

Real scanner noise is often not white: k-space filtering, partial Fourier and interpolation
correlate neighbouring voxels (measured on nibabel's example4d EPI, the difference of its two frames
has lag-1 autocorrelation +0.18 and +0.32 in-plane, -0.01 across slices). For noise n with
covariance sigma^2 C, SURE becomes

    E ||g(y) - x||^2 / N = E[ ||g(y) - y||^2 / N - sigma^2 + 2 sigma^2 tr(C J_g) / N ],

and tr(C J_g) is estimated by the same one-probe formula with a probe that has covariance C
(b^T C J b = (Lb)^T J (Lb) in expectation for C = L L^T). So a correlated-noise model only changes
how the probe is drawn; the selection (medgen.denoising.sure) and the self-supervised loss
(medgen.denoising.adapt) then optimise the true error under that noise, not under white noise.

The model is separable, one lag-1 correlation rho per axis: white noise filtered along each axis by
the kernel [c, 1, c] / sqrt(1 + 2 c^2), whose lag-1 autocorrelation is 2c / (1 + 2c^2) = rho (so
|rho| <= 0.7), unit variance, periodic boundaries (np.roll / torch.roll: the same in both).
"""

from __future__ import annotations

import math

import numpy as np

MAX_RHO = 0.7  # the largest lag-1 correlation the [c, 1, c] kernel reaches is 1/sqrt(2)


def kernel_c(rho: float) -> float:
    rho = float(np.clip(rho, -MAX_RHO, MAX_RHO))
    if abs(rho) < 1e-6:
        return 0.0
    return (1.0 - math.sqrt(max(1.0 - 2.0 * rho * rho, 0.0))) / (2.0 * rho)


def color(z, rho: tuple[float, float, float], axes: tuple[int, int, int] = (0, 1, 2)):
    """White unit noise z (numpy array or torch tensor) -> noise with lag-1 correlation rho[a] along
    axes[a], still of unit variance."""
    for r, ax in zip(rho, axes):
        c = kernel_c(r)
        if c == 0.0:
            continue
        if isinstance(z, np.ndarray):
            z = (z + c * (np.roll(z, 1, axis=ax) + np.roll(z, -1, axis=ax))) / math.sqrt(1 + 2 * c * c)
        else:
            z = (z + c * (z.roll(1, dims=ax) + z.roll(-1, dims=ax))) / math.sqrt(1 + 2 * c * c)
    return z


def correlation_from_repeats(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Lag-1 autocorrelation of the noise per axis, from two acquisitions of the same scan (their
    difference is noise only); voxel pairs where either scan is blank (exact zero) are left out."""
    from medgen.denoising.background import measured_in_all

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = measured_in_all(a, b)
    d = np.where(keep, a - b, 0.0)
    d = np.where(keep, d - d[keep].mean(), 0.0)
    out = []
    for ax in range(3):
        n = d.shape[ax]
        lo, hi = np.take(d, range(n - 1), ax), np.take(d, range(1, n), ax)
        both = np.take(keep, range(n - 1), ax) & np.take(keep, range(1, n), ax)
        den = math.sqrt(float(np.sum(lo[both] ** 2)) * float(np.sum(hi[both] ** 2)))
        out.append(float(np.sum(lo[both] * hi[both]) / den) if den > 0 else 0.0)
    return (out[0], out[1], out[2])
