"""Augmenting clean training patches for the score model (config `denoiser.augment`).

The shipped model's clean data is one averaged T1 template, variants of it and phantoms, so the
prior has seen one contrast and almost no real texture. Each patch is changed, on the fly and from
the training step's own generator (so exact resume still holds), by an intensity scale, a gamma
curve, sometimes an inverted tissue contrast (bright background-free T2-like images), a smooth
multiplicative bias field and a blur along one axis (thick slices). All are cheap tensor ops on the
batch; elastic deformation is left out (its cost per patch is a resampling of the whole patch).
"""

from __future__ import annotations

import math

import torch

from medgen.config import DenoiseAugmentConfig


def augment(x: torch.Tensor, cfg: DenoiseAugmentConfig, ctx) -> torch.Tensor:
    """x: (B, 1, X, Y, Z) clean patches, intensities ~0..1; returns the same shape."""
    b = x.shape[0]
    dev = x.device
    on = (ctx.rand((b,)) < cfg.p).float()[:, None, None, None, None]
    out = x.clamp_min(0)
    lg0, lg1 = math.log(cfg.gamma[0]), math.log(cfg.gamma[1])
    gamma = torch.exp(lg0 + ctx.rand((b,)) * (lg1 - lg0))[:, None, None, None, None]
    out = out.clamp_min(1e-6) ** gamma
    inv = (ctx.rand((b,)) < cfg.invert).float()[:, None, None, None, None]
    fg = (out > 0.05).float()
    out = inv * (fg * (1.05 - out).clamp_min(0)) + (1 - inv) * out
    # linear log-bias across the patch: exp(slope . (position - centre))
    grids = torch.meshgrid(*[torch.linspace(-0.5, 0.5, n, device=dev) for n in x.shape[2:]], indexing="ij")
    slope = ctx.randn((b, 3)) * cfg.bias
    field = sum(slope[:, a, None, None, None] * grids[a][None] for a in range(3))
    out = out * torch.exp(field)[:, None]
    # blur along one random axis (a thick-slice acquisition)
    sd = float(ctx.rand((1,))) * cfg.blur
    if sd > 0.2:
        r = max(1, int(math.ceil(2.5 * sd)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=dev, dtype=torch.float32) / sd) ** 2)
        k = k / k.sum()
        axis = int(ctx.rand((1,)) * 3) % 3
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        out = torch.nn.functional.conv3d(torch.nn.functional.pad(out, pad, mode="replicate"), k.view(shape))
    scale = cfg.scale[0] + ctx.rand((b,))[:, None, None, None, None] * (cfg.scale[1] - cfg.scale[0])
    out = out * scale
    return on * out + (1 - on) * x
