"""Random training patches, shared by supervised score training (medgen.denoising.train) and
self-supervised adaptation (medgen.denoising.adapt), so that both cut and flip alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def random_patches(items: Sequence[Sequence[torch.Tensor]], patch: Sequence[int], ctx) -> list[torch.Tensor]:
    """One random patch of each item (a corner, then a flip per axis, drawn in that order from the
    step's keyed RNG `ctx`, so a rebuilt model draws the same patches); every tensor of an item
    (an image and its mask) is cut and flipped alike. One [B, 1, *patch] tensor per position."""
    b = len(items)
    corner = ctx.rand((b, 3))
    flips = ctx.rand((b, 3)) < 0.5
    out: list[list[torch.Tensor]] = [[] for _ in items[0]]
    for k, tensors in enumerate(items):
        c = [int(f * (n - p + 1)) for f, n, p in zip(corner[k].tolist(), tensors[0].shape, patch)]
        sl = tuple(slice(o, o + p) for o, p in zip(c, patch))
        dims = [a for a in range(3) if flips[k, a]]
        for j, t in enumerate(tensors):
            x = t[sl]
            out[j].append(torch.flip(x, dims) if dims else x)
    return [torch.stack(o)[:, None] for o in out]
