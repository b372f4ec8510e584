"""A 3D feature encoder this project trains itself, for FID/KID/MMD and feature-cosine memorization.

Nothing may be downloaded, and no public 3D medical feature network ships inside a package, so the
encoder is trained per data set: SimCLR-style contrastive learning (NT-Xent) on the real training
volumes in model space. Its augmentations are geometric only (random translation by crop, left-right
flip): the features become invariant to position but stay sensitive to noise, blur and intensity
shifts, which are what realism metrics must see. There is no normalisation layer for the same
reason (GroupNorm would divide an intensity shift away).

The feature vector holds, for each stage's activations, their spatial mean and their mean absolute
deviation from the 3x3x3 local mean (2 x (16 + 32 + 64) = 224 values): means follow intensity and
shape, local deviations texture (noise raises them, blur lowers them). A global standard deviation
would not do: it is dominated by the head/background contrast and barely moves with noise. The projection head used only for training starts with a
BatchNorm: the pooled features of one population differ little, and unscaled they give the
contrastive loss no gradient to work with. The encoder is saved as a model
folder; its `encoder_id` (hash of the weights) goes into every report that uses it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medgen.models.folder import read_model_folder, write_model_folder

FORMAT = "medgen-feature-encoder"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EncoderSettings:
    channels: tuple[int, ...] = (16, 32, 64)
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    temperature: float = 0.2
    max_shift: float = 0.1  # translation, as a fraction of each axis
    seed: int = 0


class FeatureEncoder(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), proj_dim: int = 32):
        super().__init__()
        stages, c_in = [], 1
        for c in channels:
            stages.append(
                nn.Sequential(
                    nn.Conv3d(c_in, c, 3, stride=2, padding=1),
                    nn.SiLU(),
                    nn.Conv3d(c, c, 3, padding=1),
                    nn.SiLU(),
                )
            )
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.dim = 2 * sum(channels)
        self.head = nn.Sequential(nn.BatchNorm1d(self.dim), nn.Linear(self.dim, 64), nn.SiLU(), nn.Linear(64, proj_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for stage in self.stages:
            x = stage(x)
            local = x - nn.functional.avg_pool3d(nn.functional.pad(x, (1,) * 6, mode="replicate"), 3, stride=1)
            pooled += [x.mean(dim=(2, 3, 4)), local.abs().mean(dim=(2, 3, 4))]
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class Encoder:
    net: FeatureEncoder
    encoder_id: str
    metadata: dict

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor, batch_size: int = 8) -> np.ndarray:
        """(N, X, Y, Z) or (N, 1, X, Y, Z) model-space images -> (N, dim) float64 features."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x.ndim == 4:
            x = x[:, None]
        self.net.eval()
        out = [self.net.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(out).double().numpy()


def _augment(x: torch.Tensor, g: torch.Generator, max_shift: float) -> torch.Tensor:
    """Random translation (reflect-pad, then crop back) and left-right flip, per sample."""
    out = []
    for v in x:
        pads = [max(1, int(round(n * max_shift))) for n in v.shape[1:]]
        p = torch.nn.functional.pad(v[None], [q for n in reversed(pads) for q in (n, n)], mode="replicate")[0]
        starts = [int(torch.randint(0, 2 * n + 1, (1,), generator=g)) for n in pads]
        c = p[
            :,
            starts[0] : starts[0] + v.shape[1],
            starts[1] : starts[1] + v.shape[2],
            starts[2] : starts[2] + v.shape[3],
        ]
        if torch.rand((), generator=g) < 0.5:
            c = c.flip(1)
        out.append(c)
    return torch.stack(out)


def _nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    z = nn.functional.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / temperature
    n = a.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return nn.functional.cross_entropy(sim, target)


def train_encoder(
    images: np.ndarray, out: str | Path, settings: EncoderSettings = EncoderSettings(), provenance: dict | None = None
) -> Encoder:
    """Train on (N, X, Y, Z) model-space training volumes; save to `out` (a model folder)."""
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))[:, None]
    net = FeatureEncoder(settings.channels)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    bs = min(settings.batch_size, len(x))
    losses = []
    for _ in range(settings.steps):
        idx = torch.randperm(len(x), generator=g)[:bs]
        batch = x[idx]
        loss = _nt_xent(
            net(_augment(batch, g, settings.max_shift)),
            net(_augment(batch, g, settings.max_shift)),
            settings.temperature,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.__dict__.items()},
        "n_train": int(len(x)),
        "input_shape": list(x.shape[2:]),
        "loss_first_last": [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))],
        "provenance": provenance or {},
    }
    write_model_folder(out, meta, {"encoder": net.state_dict()})
    return load_encoder(out)


def load_encoder(path: str | Path) -> Encoder:
    meta, states = read_model_folder(path, FORMAT, FORMAT_VERSION)
    net = FeatureEncoder(tuple(meta["settings"]["channels"]))
    net.load_state_dict(states["encoder"])
    encoder_id = hashlib.sha256(json.dumps(meta["files"], sort_keys=True).encode()).hexdigest()[:16]
    return Encoder(net=net.eval(), encoder_id=encoder_id, metadata=meta)
