"""Does a synthetic set teach anything real? Three measurements, each against real held-out scans.

    segmentation utility   train-on-synthetic, test-on-real: one small MONAI UNet trained on the
                           synthetic image+label pairs, one on real pairs, one on both, each
                           scored by Dice per label on held-out real pairs (MAISI's headline)
    mask adherence         does a sample follow the map it was asked for: the real-trained UNet
                           segments each synthetic image, Dice against the asked map
    condition fidelity     does a sample show the condition it was asked for: a small MONAI
                           Regressor-style CNN trained on real scans predicts the condition of
                           the synthetic ones (accuracy, or MAE), beside its score on held-out real

The networks are tiny and trained for a fixed number of steps with fixed seeds, so the figures
are comparable between runs of one configuration; they measure the data, not the best network
one could build. Everything is in model space (the generator's grid and intensity map).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medgen.config import UtilityConfig


@dataclass
class Pairs:
    images: np.ndarray  # [N, X, Y, Z] model intensities
    labels: np.ndarray  # [N, X, Y, Z] integer label values


def _segmenter(n_out: int, cfg: UtilityConfig) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=n_out,
        channels=tuple(cfg.channels),
        strides=(2,) * (len(cfg.channels) - 1),
        num_res_units=1,
    )


def _classes(labels: np.ndarray, values: list[int]) -> torch.Tensor:
    """Label values -> class indices 0..K (0 background; a value not in `values` is background)."""
    out = np.zeros(labels.shape, np.int64)
    for k, v in enumerate(values, 1):
        out[labels == v] = k
    return torch.from_numpy(out)


def train_segmenter(pairs: Pairs, values: list[int], cfg: UtilityConfig, n_real: int | None = None) -> torch.nn.Module:
    """A small UNet (DiceCE loss) trained on `pairs` for cfg.steps steps, seeded. With `n_real`
    (the first n_real pairs are real, the rest synthetic) each batch item is real with probability
    cfg.real_fraction: pooled uniformly, a synthetic set several times the real one would crowd the
    real pairs out of training (the way synthetic data is used in practice is at a fixed mix)."""
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = _segmenter(len(values) + 1, cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    x_all = torch.from_numpy(pairs.images[:, None].astype(np.float32))
    y_all = _classes(pairs.labels, values)[:, None]
    net.train()
    mixed = n_real is not None and cfg.real_fraction is not None and 0 < n_real < len(x_all)
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x_all), (min(cfg.batch_size, len(x_all)),), generator=g)
        if mixed:
            assert n_real is not None and cfg.real_fraction is not None
            real = torch.rand(len(idx), generator=g) < cfg.real_fraction
            from_real = torch.randint(0, n_real, idx.shape, generator=g)
            from_synth = torch.randint(n_real, len(x_all), idx.shape, generator=g)
            idx = torch.where(real, from_real, from_synth)
        x, y = x_all[idx], y_all[idx]
        flip = torch.rand(3, generator=g) < 0.5  # the only augmentation: flips, the same for image and map
        dims = [d + 2 for d in range(3) if flip[d]]
        if dims:
            x, y = x.flip(dims), y.flip(dims)
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def segment(net: torch.nn.Module, images: np.ndarray, values: list[int]) -> np.ndarray:
    """Label maps (label values) predicted for [N, X, Y, Z] images."""
    x = torch.from_numpy(images[:, None].astype(np.float32))
    cls = torch.cat([net(b).argmax(1) for b in x.split(4)]).numpy()
    lut = np.array([0, *values])
    return lut[cls]


def dice_per_label(pred: np.ndarray, truth: np.ndarray, values: list[int]) -> dict[str, float | None]:
    """Mean Dice over volumes, per label (MONAI's DiceMetric; a label absent from both in a volume
    does not count for that volume); None when no volume holds that label."""
    from monai.metrics import DiceMetric

    p = torch.nn.functional.one_hot(_classes(pred, values), len(values) + 1).permute(0, 4, 1, 2, 3).float()
    t = torch.nn.functional.one_hot(_classes(truth, values), len(values) + 1).permute(0, 4, 1, 2, 3).float()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    dice = metric(p, t)
    assert isinstance(dice, torch.Tensor)
    per = dice.numpy()  # [N, K], NaN where the label is in neither
    out: dict[str, float | None] = {}
    for k, v in enumerate(values):
        col = per[:, k]
        out[str(v)] = float(np.nanmean(col)) if np.isfinite(col).any() else None
    return out


def mean_dice(d: dict[str, float | None]) -> float | None:
    vals = [x for x in d.values() if x is not None]
    return float(np.mean(vals)) if vals else None


def segmentation_utility(
    real_train: Pairs, synthetic: Pairs, real_test: Pairs, values: list[int], cfg: UtilityConfig
) -> dict:
    """Dice per label on `real_test` of a UNet trained on real, synthetic and real + synthetic
    pairs; and mask adherence (the real-trained UNet on the synthetic images vs their maps)."""
    both = Pairs(
        np.concatenate([real_train.images, synthetic.images]), np.concatenate([real_train.labels, synthetic.labels])
    )
    out: dict = {"values": [str(v) for v in values], "n_real_train": len(real_train.images)}
    out |= {"n_synthetic": len(synthetic.images), "n_real_test": len(real_test.images), "steps": cfg.steps}
    out["real_fraction"] = cfg.real_fraction
    nets = {}
    for name, pairs in (("real", real_train), ("synthetic", synthetic), ("real+synthetic", both)):
        n_real = len(real_train.images) if name == "real+synthetic" else None
        nets[name] = train_segmenter(pairs, values, cfg, n_real)
        out[f"dice_{name}"] = dice_per_label(segment(nets[name], real_test.images, values), real_test.labels, values)
    real, synth = mean_dice(out["dice_real"]), mean_dice(out["dice_synthetic"])
    out["synthetic_to_real"] = synth / real if real and synth is not None else None
    adherence = dice_per_label(segment(nets["real"], synthetic.images, values), synthetic.labels, values)
    out["mask_adherence"] = adherence
    out["mask_adherence_mean"] = mean_dice(adherence)
    return out


def _regressor(n_out: int, shape: tuple[int, ...], cfg: UtilityConfig) -> torch.nn.Module:
    from monai.networks.nets import Regressor

    chans = tuple(cfg.channels)
    return Regressor(in_shape=(1, *shape), out_shape=(n_out,), channels=chans, strides=(2,) * len(chans))


def condition_fidelity(
    real_train: np.ndarray,
    train_values: list,
    real_test: np.ndarray,
    test_values: list,
    synthetic: np.ndarray,
    asked: list,
    kind: str,
    levels: list[str] | None,
    cfg: UtilityConfig,
) -> dict:
    """A CNN trained on real scans predicts one condition; its accuracy (categorical) or MAE
    (continuous) on held-out real scans and on synthetic scans against what they were asked for."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    categorical = kind == "categorical"
    lv = list(levels or [])
    net = _regressor(len(lv) if categorical else 1, real_train.shape[1:], cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    x_all = torch.from_numpy(real_train[:, None].astype(np.float32))
    if categorical:
        y_all = torch.tensor([lv.index(v) for v in train_values])
    else:
        ys = np.asarray(train_values, dtype=np.float64)
        mu, sd = float(ys.mean()), float(ys.std() or 1.0)
        y_all = torch.tensor((ys - mu) / sd, dtype=torch.float32)
    net.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x_all), (min(cfg.batch_size, len(x_all)),), generator=g)
        opt.zero_grad()
        out = net(x_all[idx])
        if categorical:
            loss = torch.nn.functional.cross_entropy(out, y_all[idx])
        else:
            loss = torch.nn.functional.mse_loss(out[:, 0], y_all[idx])
        loss.backward()
        opt.step()
    net.eval()

    @torch.no_grad()
    def score(images: np.ndarray, truth: list) -> float | None:
        if not len(images):
            return None
        out = torch.cat([net(b) for b in torch.from_numpy(images[:, None].astype(np.float32)).split(4)])
        if categorical:
            pred = [lv[i] for i in out.argmax(1).tolist()]
            return float(np.mean([p == str(t) for p, t in zip(pred, truth)]))
        pred_v = out[:, 0].numpy() * sd + mu
        return float(np.mean(np.abs(pred_v - np.asarray(truth, dtype=np.float64))))

    metric = "accuracy" if categorical else "mae"
    return {
        "metric": metric,
        "heldout_real": score(real_test, test_values),
        "synthetic": score(synthetic, asked),
        "n_real_train": len(real_train),
        "n_real_test": len(real_test),
        "n_synthetic": len(synthetic),
        "chance": (1.0 / len(lv)) if categorical and lv else None,
    }
