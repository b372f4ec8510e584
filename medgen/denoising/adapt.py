"""Self-supervised fine-tuning of the score model on noisy scans alone (no clean scan anywhere).

At level s the Tweedie denoiser is D(y) = y - s eps_hat(sqrt(abar) y, t(s)). Stein's unbiased risk
estimate of its MSE (medgen.denoising.sure) needs only y and s, and it is differentiable in the
network's weights, so it is a training loss (Soltanayev & Chun 2018, Metzler et al. 2018):

    L = mean (D(y) - y)^2 - s^2 + 2 s^2 mean b . (D(y + e b) - D(y)) / e,     b ~ N(0, I)

on random patches of each scan, at the scan's own noise level (given, or estimated by
`estimate_sigma`), divided by s^2 so that quiet and noisy scans weigh alike. Its expectation is the
true MSE against the unseen clean scan, so minimising it moves the prior towards the anatomy and
texture of the user's scans instead of towards their noise. SURE rather than recorrupted-to-
recorrupted (R2R) training: R2R trains the network at an inflated level s sqrt(1 + alpha^2) and
needs averaging over recorruptions at inference; SURE trains exactly the map that `denoise` runs.

For Rician magnitude data the loss covers the voxels above 3 s only, where the noise is Gaussian to
first order (the same restriction as the SURE selection at inference, which still guards the
adapted model's output: a fine-tuning that went wrong cannot make the scan worse than the input).

Two entry points: `adapt_to_scan` here (one scan, in memory: `medgen.denoise(..., adapt=steps)`)
and medgen.denoising.train.train_self_supervised (a manifest's scans, checkpointed and resumable
through the shared training loop: `medgen train denoiser --self-supervised`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from medgen.config import StageTrainConfig
from medgen.denoising.patches import random_patches
from medgen.models.score import NoiseSchedule, ScoreModel
from medgen.seeding import keyed_generator

PROBE_EPS = 0.02  # the probe's step, as a fraction of s: O(e^2) bias, far above fp32 rounding


@dataclass
class Draws:
    """The random draws of one step (the shared training loop's StepContext has the same two
    methods; this module is used at inference too, which must not import the training layer)."""

    generator: torch.Generator
    device: torch.device

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=self.device)

    def rand(self, shape) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=self.generator, device=self.device)


@dataclass
class NoisyScan:
    """One scan for the loss: normalised intensities (medgen.denoising.normalise), its noise level in
    those units, and where the loss applies (False where padding was added or SURE does not hold)."""

    data: torch.Tensor  # (X, Y, Z), at least `patch` along every axis (replicate-padded)
    sigma: float
    valid: torch.Tensor  # bool, same shape
    correlation: tuple[float, float, float] | None = None  # lag-1 per axis (medgen.denoising.correlated)


def noisy_scan(
    y: np.ndarray, sigma: float, patch: tuple[int, int, int], rician: bool, device, correlation=None
) -> NoisyScan:
    data = torch.as_tensor(np.ascontiguousarray(y, dtype=np.float32), device=device)
    valid = data > 3 * sigma if rician else torch.ones_like(data, dtype=torch.bool)
    pads = []
    for n, p in zip(reversed(data.shape), reversed(patch)):
        pads += [0, max(0, p - n)]
    if any(pads):  # padded voxels are not noisy data: the network sees them, the loss does not
        data = torch.nn.functional.pad(data[None, None], pads, mode="replicate")[0, 0]
        valid = torch.nn.functional.pad(valid, pads, value=False)
    return NoisyScan(data, float(sigma), valid, correlation)


def patch_shape(shapes: list[tuple[int, ...]], patch: tuple[int, int, int], down: int) -> tuple[int, int, int]:
    """The configured patch, narrowed per axis to the thinnest scan (rounded up to the UNet's
    downsampling), so a thin slab trains on slab-shaped patches rather than mostly padding."""
    return tuple(  # type: ignore[return-value]
        min(p, int(math.ceil(min(s[a] for s in shapes) / down) * down)) for a, p in enumerate(patch)
    )


def sure_loss(
    unet: torch.nn.Module, schedule: NoiseSchedule, scans: list[NoisyScan], idx: list[int], patch, ctx
) -> torch.Tensor:
    """SURE / s^2 of the Tweedie denoiser on one random patch (random flips) of each scans[i]."""
    b = len(idx)
    y, m = random_patches([(scans[i].data, scans[i].valid) for i in idx], patch, ctx)
    m = m.float()
    s = torch.tensor([scans[i].sigma for i in idx], device=y.device)
    t = schedule.time_of_torch(s)
    s5 = s[:, None, None, None, None]
    root_abar = (1.0 / (1.0 + s5**2)).sqrt()  # abar = 1 / (1 + s^2): see medgen.models.score
    probe = ctx.randn(y.shape)
    for k, i in enumerate(idx):
        rho = scans[i].correlation
        if rho is not None:  # a probe with the noise's covariance: SURE for correlated noise
            from medgen.denoising.correlated import color

            probe[k, 0] = color(probe[k, 0], rho)
    e = PROBE_EPS * s5
    both = torch.cat([y, y + e * probe])  # one forward pass for y and the probed y
    d = both - s5.repeat(2, 1, 1, 1, 1) * unet(root_abar.repeat(2, 1, 1, 1, 1) * both, timesteps=t.repeat(2)).float()
    g, gp = d[:b], d[b:]
    n = m.sum(dim=(1, 2, 3, 4)).clamp_min(1.0)
    fit = (((g - y) ** 2) * m).sum(dim=(1, 2, 3, 4)) / n
    div = ((probe * (gp - g)) * m).sum(dim=(1, 2, 3, 4)) / (e.flatten() * n)
    return ((fit - s**2 + 2 * s**2 * div) / s**2).mean()


def _fit(
    model: ScoreModel, scans: list[NoisyScan], patch, train: StageTrainConfig, device
) -> tuple[ScoreModel, list[float]]:
    """A plain loop (no checkpoints: one scan's adaptation takes seconds to minutes)."""
    unet = copy.deepcopy(model.unet).to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=train.lr)
    losses = []
    order = np.random.default_rng(train.seed)
    for step in range(train.steps):
        ctx = Draws(keyed_generator(f"adapt:{train.seed}:{step}", device), device)
        idx = [int(i) for i in order.integers(0, len(scans), train.batch_size)]
        loss = sure_loss(unet, model.schedule, scans, idx, patch, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), train.grad_clip)
        opt.step()
        losses.append(loss.item())
    unet.eval()
    meta = {**model.metadata, "adapted": {"steps": train.steps, "lr": train.lr, "seed": train.seed, "loss": "SURE"}}
    return ScoreModel(None, unet, model.cfg, model.schedule, meta), losses


def adapt_to_scan(
    model: ScoreModel,
    y: np.ndarray,
    sigma: float,
    *,
    steps: int,
    rician: bool = False,
    correlation: tuple[float, float, float] | None = None,
    lr: float = 1e-4,
    batch_size: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[ScoreModel, list[float]]:
    """A copy of `model` fine-tuned for `steps` on the normalised scan `y` with noise `sigma`; the
    losses (SURE / s^2 per step) come back too. The original model is not touched."""
    dev = torch.device(device)
    patch = patch_shape([y.shape], model.cfg.patch, model.downsample)
    scans = [noisy_scan(y, sigma, patch, rician, dev, correlation)]
    train = StageTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    return _fit(model, scans, patch, train, dev)
