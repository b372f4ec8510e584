"""Stein's unbiased risk estimate (SURE): the denoiser's own error, without the clean scan.

For y = x + sigma n with white Gaussian n and a weakly differentiable estimate g(y),

    E ||g(y) - x||^2 / N = E[ ||g(y) - y||^2 / N - sigma^2 + 2 sigma^2 div g(y) / N ]

(Stein 1981). The divergence is estimated by one Monte-Carlo probe (Ramani, Blu & Unser 2008):
div g(y) ~ b . (g(y + eps b) - g(y)) / eps with b ~ N(0, I); over millions of voxels one probe is
enough. The input itself (g = identity) has SURE exactly sigma^2, which is what makes "never worse
than the input" checkable: a candidate is kept only when its estimated risk is below sigma^2.

Rician magnitude data: Gaussian SURE holds where the signal is well above the noise (there the
Rician distribution is Gaussian to first order), so for noise='rician' every sum is restricted to
voxels with y > 3 sigma and the estimate is reported as covering those voxels only.

Beyond the blend grid, the strengths also yield a SURE-LET estimate (Blu & Luisier 2007): the
linear combination of the input, the network output at each strength and that output smoothed at
LET_SMOOTHING voxels whose SURE is least. SURE is quadratic in the coefficients, so they come
from one small solve; being linear in the components, the divergence of the combination is the
same combination of the components' divergences, all read off the probe already run. It is one more candidate,
kept only when its SURE (post-processing included) is lowest: measured on a Shepp-Logan phantom
+0.41/+0.48 dB over the best blend at sigma 0.05/0.10 (the fit sharpens: output weight above 1,
a negative weight on the lightly smoothed output), +0.01-0.02 dB on real T1 and EPI. The mix has
weights of its own in each of up to LET_BANDS intensity bands (a further +0.84 to +0.98 dB on the
phantom, -0.01 to +0.07 on the real volumes; see `let_candidate`). Gaussian noise only: see
`select`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

PROBE_KEY = 0x53555245  # 'SURE'
BLEND = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))  # weights of the network output vs the input
LET_SMOOTHING = (0.6, 1.2)  # Gaussian widths (voxels) of the smoothed network outputs SURE-LET mixes in
LET_BANDS = 8  # intensity bands, each with its own SURE-LET weights (see let_candidate)
LET_VOXELS_PER_WEIGHT = 1000  # fewer bands on small scans (see let_bands)
LET_BAND_SMOOTHING = 1.0  # voxels: bands follow the smoothed output, not its noise


@dataclass(frozen=True)
class Candidate:
    """One output of the family: the network at `strength` x sigma, blended `weight` with the input."""

    strength: float
    weight: float
    risk: float  # SURE of the output's MSE, in the normalised units of y
    output: np.ndarray
    let: tuple[float, ...] | None = None  # SURE-LET: weights of (input, output per strength, smoothings), band mean
    let_strengths: tuple[float, ...] = ()  # SURE-LET: the strengths whose outputs it mixes
    let_bands: int = 1  # SURE-LET: intensity bands with weights of their own

    def describe(self) -> str:
        if self.let is None:
            return f"strength {self.strength:g}, weight {self.weight:g}"
        at = ", ".join(f"{m:g}" for m in self.let_strengths)
        bands = f" in {self.let_bands} intensity bands, mean" if self.let_bands > 1 else ","
        return f"SURE-LET over strength {at}{bands} weights {', '.join(f'{a:+.2f}' for a in self.let)}"


def sure(
    y: np.ndarray, g_y: np.ndarray, g_probe: np.ndarray, probe: np.ndarray, eps: float, sigma: float, mask=None
) -> float:
    """SURE of g's MSE per voxel, from g(y) and g(y + eps * probe)."""
    if mask is not None:
        y, g_y, g_probe, probe = y[mask], g_y[mask], g_probe[mask], probe[mask]
    n = y.size
    fit = float(np.sum((g_y.astype(np.float64) - y) ** 2)) / n
    div = float(np.sum(probe.astype(np.float64) * (g_probe - g_y))) / (eps * n)
    return fit - sigma**2 + 2.0 * sigma**2 * div


def make_probe(
    shape: tuple[int, ...], sigma: float, seed: int, correlation: tuple[float, float, float] | None = None
) -> tuple[np.ndarray, float]:
    """The Monte-Carlo probe b and its step eps, for g(y + eps b)."""
    # The probe's stream is keyed apart from every plain `default_rng(seed)`: a probe equal to the
    # noise (a phantom noised with default_rng(0), probed with seed 0) made the estimate 10x off.
    rng = np.random.default_rng(np.random.SeedSequence([seed, PROBE_KEY]))
    probe = rng.standard_normal(shape).astype(np.float32)
    if correlation is not None:  # SURE for correlated noise: a probe with the noise's covariance
        from medgen.denoising.correlated import color

        probe = color(probe, correlation).astype(np.float32)
    eps = 0.05 * sigma  # small against sigma (bias O(eps^2)), large against float32/bf16 rounding
    return probe, eps


def select(
    y: np.ndarray,
    network: Callable[[np.ndarray, float], np.ndarray],
    post: Callable[[np.ndarray], np.ndarray],
    sigma: float,
    strengths: tuple[float, ...],
    *,
    seed: int = 0,
    mask: np.ndarray | None = None,
    correlation: tuple[float, float, float] | None = None,
    let: bool = True,
) -> tuple[Candidate, list[Candidate]]:
    """The candidate of least estimated risk among the network at each strength blended with the
    input (weights BLEND), post-processed by `post` (clamps, Rician bias correction: part of the
    estimate, so part of what SURE measures). Weight 0 is the input itself, risk sigma^2.

    `network(z, s)` is the denoiser applied to z at noise level s; it is called twice per strength
    (at y and at the probed y + eps b). `correlation` (lag-1 per axis) makes the estimate hold for
    spatially correlated noise (medgen.denoising.correlated). `let`: add the SURE-LET candidate
    over all strengths (`let_candidate`); off for Rician data, where SURE is only approximate: there its
    extra freedom fitted the approximation (measured at Rician 0.10: -0.47 dB on a real T1, -0.13
    on a real EPI against the blend grid, even restricted to the voxels SURE covers: -0.17/-0.05).
    """
    probe, eps = make_probe(y.shape, sigma, seed, correlation)
    yp = y + eps * probe
    best = Candidate(0.0, 0.0, sigma**2, y)
    tried = [best]
    outputs = []
    for m in strengths:
        f, fp = network(y, m * sigma), network(yp, m * sigma)
        if let:
            outputs.append((m, f, fp))
        for w in BLEND[1:]:
            g = post(y + w * (f - y))
            gp = post(yp + w * (fp - yp))
            c = Candidate(m, float(w), sure(y, g, gp, probe, eps, sigma, mask), g)
            tried.append(replace(c, output=np.empty(0)))
            if c.risk < best.risk:
                best = c
    if outputs:
        c = let_candidate(y, yp, outputs, probe, eps, sigma, post, mask)
        tried.append(replace(c, output=np.empty(0)))
        if c.risk < best.risk:
            best = c
    return best, tried


def _let_components(z: np.ndarray, fs: list[np.ndarray], ref: int) -> list[np.ndarray]:
    from scipy.ndimage import gaussian_filter

    return [z, *fs, *(gaussian_filter(fs[ref], s, mode="nearest") for s in LET_SMOOTHING)]


def let_bands(n_voxels: int, n_components: int) -> int:
    """How many intensity bands the fit can afford: at least LET_VOXELS_PER_WEIGHT voxels per
    fitted weight, at most LET_BANDS. Fitting k weights on the scan makes SURE optimistic by about
    2 sigma^2 k / N; measured with 12 bands on the 33x41x25 real T1 (12 x 5 weights, 570 voxels
    each) that overfit cost -0.14 dB at sigma 0.10, with 8 nothing."""
    return int(np.clip(n_voxels // (LET_VOXELS_PER_WEIGHT * n_components), 1, LET_BANDS))


def _hats(f: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each voxel's cell and position in it on n hat functions (a partition of unity) over the
    smoothed network output in [0, 1]: band weights w_k = 1 - t, w_k+1 = t."""
    from scipy.ndimage import gaussian_filter

    u = np.clip(gaussian_filter(f.astype(np.float32), LET_BAND_SMOOTHING, mode="nearest"), 0.0, 1.0) * (n - 1)
    k = np.minimum(u.astype(np.int64), n - 2)
    return k, (u - k).astype(np.float64)


def _cells(c: np.ndarray, k: np.ndarray | None, t: np.ndarray | None, n: int):
    """Per cell: the coefficients it touches and the components weighted by its two active bands
    (voxels x 2 components); one cell of unweighted components when n = 1. Working cell by cell keeps
    memory at the components' own (no n-fold copy) on a 512x512x64 series."""
    nc = c.shape[1]
    if n == 1 or k is None or t is None:
        yield slice(0, nc), c, slice(None)
        return
    for cell in range(n - 1):
        sel = k == cell
        if sel.any():
            ts, cs = t[sel, None], c[sel]
            yield slice(cell * nc, (cell + 2) * nc), np.hstack([(1.0 - ts) * cs, ts * cs]), sel


def _combine(comps: list[np.ndarray], a: np.ndarray, hats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    if hats is None:
        return sum(w * c for w, c in zip(a[0], comps, strict=True)).astype(np.float32)
    k, t = hats
    return sum(c * ((1.0 - t) * a[k, i] + t * a[k + 1, i]) for i, c in enumerate(comps)).astype(np.float32)


def let_candidate(
    y: np.ndarray,
    yp: np.ndarray,
    outputs: list[tuple[float, np.ndarray, np.ndarray]],
    probe: np.ndarray,
    eps: float,
    sigma: float,
    post: Callable[[np.ndarray], np.ndarray],
    mask: np.ndarray | None = None,
    bands: int | None = None,
) -> Candidate:
    """The SURE-optimal linear combination of the input, the network output at each strength
    (`outputs`: (strength, at y, at the probed yp)) and two smoothings of the one nearest strength 1,
    with its own weights in each intensity band of the smoothed output (`bands`, default
    `let_bands`; hat functions, so the weights vary smoothly with intensity). Being linear in the
    weights, SURE is quadratic in them: (C^T C) a = C^T y - sigma^2 d, where the columns of C are
    the components times their band's hat and d their divergences. The hats are computed from the
    output at y and at yp alike, so the probe's divergence includes how band membership moves with
    the data: the estimate stays unbiased. The weights are fitted before `post`; the risk
    reported is SURE of the post-processed output, like every other candidate's.

    Why bands: the best mix differs between background, dark and bright tissue (the network
    under-smooths flat regions at one intensity and blurs edges at another). Measured on
    benchmarks/denoise.py's volumes, Gaussian 0.02 / 0.05 / 0.10, 8 bands against one: Shepp-Logan
    +0.98 / +0.92 / +0.84 dB, real EPI -0.01 / -0.00 / +0.07, real T1 +0.00 / +0.02 / +0.02.
    More strengths mix more outputs at one more pair of network passes each: measured with
    strengths (0.6, 1) against (1,), both banded, at Gaussian 0.02 / 0.05 / 0.10: +0.10 / +0.14 /
    +0.25 dB on the Shepp-Logan phantom, +0.02 / +0.04 / +0.05 on the real EPI, +0.02 / 0 / 0 on
    the real T1 (before the bands: +0.34 / +0.26 dB on the phantom at 0.05 / 0.10)."""
    ms = [m for m, _, _ in outputs]
    ref = int(np.argmin([abs(m - 1.0) for m in ms]))
    comps = _let_components(y, [f for _, f, _ in outputs], ref)
    comps_p = _let_components(yp, [fp for _, _, fp in outputs], ref)
    pick = (lambda v: v[mask]) if mask is not None else (lambda v: v.ravel())
    nc = len(comps)
    n_fit = int(mask.sum()) if mask is not None else y.size
    n = bands if bands is not None else let_bands(n_fit, nc)
    hats = _hats(comps[1 + ref], n) if n > 1 else None
    hats_p = _hats(comps_p[1 + ref], n) if n > 1 else None
    target, b = pick(y).astype(np.float64), pick(probe).astype(np.float64)
    k = n * nc
    gram, rhs, div = np.zeros((k, k)), np.zeros(k), np.zeros(k)
    for cs, h, sign in ((comps, hats, -1.0), (comps_p, hats_p, 1.0)):
        c = np.stack([pick(v).astype(np.float64) for v in cs], axis=1)
        kk, tt = (pick(h[0]), pick(h[1])) if h is not None else (None, None)
        for sl, v, sel in _cells(c, kk, tt, n):
            div[sl] += sign * (v.T @ b[sel]) / eps
            if sign < 0:
                gram[sl, sl] += v.T @ v
                rhs[sl] += v.T @ target[sel]
    a = np.linalg.lstsq(gram, rhs - sigma**2 * div, rcond=None)[0].reshape(n, nc)  # near-collinear: lstsq
    g = post(_combine(comps, a, hats))
    gp = post(_combine(comps_p, a, hats_p))
    risk = sure(y, g, gp, probe, eps, sigma, mask)
    mean = a.mean(axis=0)
    return Candidate(ms[ref], float(1.0 - mean[0]), risk, g, tuple(float(w) for w in mean), tuple(ms), n)
