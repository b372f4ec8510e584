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
weights of its own in each of up to LET_BANDS intensity bands, split into flat and edge voxels (a
further +1.0 to +1.2 dB on the phantom, +0.01 to +0.13 on the real volumes; see `let_candidate`).
Gaussian noise only: see `select`.
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
LET_EDGE = 2.0  # gradient (x sigma per voxel) at which a voxel is half edge, half flat


@dataclass(frozen=True)
class Candidate:
    """One output of the family: the network at `strength` x sigma, blended `weight` with the input."""

    strength: float
    weight: float
    risk: float  # SURE of the output's MSE, in the normalised units of y
    output: np.ndarray
    let: tuple[float, ...] | None = None  # SURE-LET: weights of (input, output per strength, smoothings), band mean
    let_strengths: tuple[float, ...] = ()  # SURE-LET: the strengths whose outputs it mixes
    let_bands: int = 1  # SURE-LET: bands (intensity x flat/edge) with weights of their own

    def describe(self) -> str:
        if self.let is None:
            return f"strength {self.strength:g}, weight {self.weight:g}"
        at = ", ".join(f"{m:g}" for m in self.let_strengths)
        bands = f" in {self.let_bands} bands, mean" if self.let_bands > 1 else ","
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


def let_bands(n_voxels: int, n_components: int, edges: bool = True) -> int:
    """How many intensity bands the fit can afford: at least LET_VOXELS_PER_WEIGHT voxels per
    fitted weight, at most LET_BANDS. Fitting k weights on the scan makes SURE optimistic by about
    2 sigma^2 k / N; measured with 12 bands on the 33x41x25 real T1 (12 x 5 weights, 570 voxels
    each) that overfit cost -0.14 dB at sigma 0.10, with 8 nothing."""
    per_band = n_components * (2 if edges else 1)
    return int(np.clip(n_voxels // (LET_VOXELS_PER_WEIGHT * per_band), 1, LET_BANDS))


@dataclass(frozen=True)
class _Bands:
    """Which bands each voxel belongs to, and how much: hat functions (a partition of unity) over
    the smoothed output's intensity in [0, 1], times (with `edges`) a flat/edge split by the local
    gradient against sigma. A voxel in intensity cell k is in up to four bands, in fixed slots:
    (k, flat), (k + 1, flat), (k, edge), (k + 1, edge)."""

    n: int  # intensity bands
    edges: bool
    cell: np.ndarray  # [*shape] (or [N] once picked) intensity cell of each voxel (0 .. max(n - 2, 0))
    weight: np.ndarray  # [*shape, slots] (or [N, slots]) membership in each slot's band

    @property
    def count(self) -> int:
        return self.n * (2 if self.edges else 1)

    def bands(self, cell: np.ndarray | int) -> list:
        ks = [cell] if self.n == 1 else [cell, cell + 1]
        return ks + [k + self.n for k in ks] if self.edges else ks

    def picked(self, pick: Callable[[np.ndarray], np.ndarray]) -> _Bands:
        slots = self.weight.shape[-1]
        return _Bands(
            self.n, self.edges, pick(self.cell), np.stack([pick(self.weight[..., j]) for j in range(slots)], 1)
        )


def _bands(f: np.ndarray, n: int, edges: bool, sigma: float) -> _Bands:
    from scipy.ndimage import gaussian_filter, gaussian_gradient_magnitude

    f = f.astype(np.float32)
    w = [np.ones(f.shape, np.float64)]
    k = np.zeros(f.shape, np.int64)
    if n > 1:
        u = np.clip(gaussian_filter(f, LET_BAND_SMOOTHING, mode="nearest"), 0.0, 1.0) * (n - 1)
        k = np.minimum(u.astype(np.int64), n - 2)
        t = (u - k).astype(np.float64)
        w = [1.0 - t, t]
    if edges:
        g = gaussian_gradient_magnitude(f, LET_BAND_SMOOTHING, mode="nearest").astype(np.float64) / sigma
        e = g**2 / (g**2 + LET_EDGE**2)
        w = [v * (1.0 - e) for v in w] + [v * e for v in w]
    return _Bands(n, edges, k, np.stack(w, axis=-1))


def _cells(c: np.ndarray, m: _Bands, nc: int):
    """Per intensity cell: the coefficients it touches and the components weighted by its active
    bands (voxels x slots * components). Working cell by cell keeps memory at the components' own
    (no copy per band) on a 512x512x64 series."""
    for cell in range(max(m.n - 1, 1)):
        sel = m.cell == cell
        if sel.any():
            cs = c[sel]
            v = np.hstack([m.weight[sel, j, None] * cs for j in range(m.weight.shape[1])])
            idx = np.concatenate([np.arange(b * nc, (b + 1) * nc) for b in m.bands(cell)])
            yield idx, v, sel


def _combine(comps: list[np.ndarray], a: np.ndarray, m: _Bands) -> np.ndarray:
    """sum over components and active bands of membership x band weight x component."""
    out = np.zeros(comps[0].shape, np.float64)
    for j, band in enumerate(m.bands(m.cell)):
        coef = a[band]  # [..., nc]: the weights of each voxel's band in slot j
        out += m.weight[..., j] * sum(coef[..., i] * c for i, c in enumerate(comps))
    return out.astype(np.float32)


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
    edges: bool = True,
) -> Candidate:
    """The SURE-optimal linear combination of the input, the network output at each strength
    (`outputs`: (strength, at y, at the probed yp)) and two smoothings of the one nearest strength 1,
    with its own weights in each band: intensity bands of the smoothed output (`bands`, default
    `let_bands`; hat functions, so the weights vary smoothly with intensity), each split (`edges`)
    into flat and edge voxels by the output's local gradient against sigma. Being linear in the
    weights, SURE is quadratic in them: (C^T C) a = C^T y - sigma^2 d, where the columns of C are
    the components times their band's membership and d their divergences. Memberships come from the
    output at y and at yp alike, so the probe's divergence includes how band membership moves with
    the data: the estimate stays unbiased. The weights are fitted before `post`; the risk
    reported is SURE of the post-processed output, like every other candidate's.

    Why bands: the best mix differs between background, dark and bright tissue, and between flat
    regions (smooth more) and edges (keep more). Measured on benchmarks/denoise.py's volumes,
    Gaussian 0.02 / 0.05 / 0.10, against one band: 8 intensity bands, Shepp-Logan +0.98 / +0.92 /
    +0.84 dB, real EPI -0.01 / -0.00 / +0.07, real T1 +0.00 / +0.02 / +0.02; the flat/edge split on
    top, a further +0.25 / +0.23 / +0.13, +0.03 / +0.04 / +0.06, +0.01 / +0.01 / +0.01. The cost:
    with 64 weights SURE turns optimistic, 2-7 % on the phantom (0.930 of the true MSE at 0.10),
    within 2.2 % on the real volumes; one band was within 1.6 %.
    More strengths mix more outputs at one more pair of network passes each: measured with
    strengths (0.6, 1) against (1,), both banded, at Gaussian 0.02 / 0.05 / 0.10: +0.10 / +0.14 /
    +0.25 dB on the Shepp-Logan phantom, +0.02 / +0.04 / +0.05 on the real EPI, +0.02 / 0 / 0 on
    the real T1 (before the bands: +0.34 / +0.26 dB on the phantom at 0.05 / 0.10)."""
    ms = [m for m, _, _ in outputs]
    ref = int(np.argmin([abs(m - 1.0) for m in ms]))
    comps = _let_components(y, [f for _, f, _ in outputs], ref)
    comps_p = _let_components(yp, [fp for _, _, fp in outputs], ref)
    pick = (lambda v: v[mask]) if mask is not None else (lambda v: v.reshape(-1))
    nc = len(comps)
    n_fit = int(mask.sum()) if mask is not None else y.size
    n = bands if bands is not None else let_bands(n_fit, nc, edges)
    m_y, m_p = _bands(comps[1 + ref], n, edges, sigma), _bands(comps_p[1 + ref], n, edges, sigma)
    target, b = pick(y).astype(np.float64), pick(probe).astype(np.float64)
    k = m_y.count * nc
    gram, rhs, div = np.zeros((k, k)), np.zeros(k), np.zeros(k)
    for cs, m, sign in ((comps, m_y, -1.0), (comps_p, m_p, 1.0)):
        c = np.stack([pick(v).astype(np.float64) for v in cs], axis=1)
        for idx, v, sel in _cells(c, m.picked(pick), nc):
            div[idx] += sign * (v.T @ b[sel]) / eps
            if sign < 0:
                gram[np.ix_(idx, idx)] += v.T @ v
                rhs[idx] += v.T @ target[sel]
    a = np.linalg.lstsq(gram, rhs - sigma**2 * div, rcond=None)[0].reshape(m_y.count, nc)  # lstsq: near-collinear
    g = post(_combine(comps, a, m_y))
    gp = post(_combine(comps_p, a, m_p))
    risk = sure(y, g, gp, probe, eps, sigma, mask)
    mean = a.mean(axis=0)
    return Candidate(ms[ref], float(1.0 - mean[0]), risk, g, tuple(float(w) for w in mean), tuple(ms), m_y.count)
