"""Paired metrics between two volumes of the same shape: PSNR, SSIM, MS-SSIM, MAE (MONAI's).

MS-SSIM is sized to the volume: MONAI's defaults (kernel 11, five levels) need every axis > 160,
so the number of levels and the kernel shrink until the coarsest level still holds a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass(frozen=True)
class MsSsimParams:
    kernel_size: int
    weights: tuple[float, ...]


def ms_ssim_params(shape: tuple[int, ...]) -> MsSsimParams:
    """The largest kernel (7, 5, 3), then the most levels (up to 5), that `shape` supports (a
    3-voxel kernel sees too little structure to be worth extra levels).

    Two conditions: the coarsest level (size / 2^(L-1)) must hold the kernel, and MONAI's own
    guard (size // (L-1)^2 > kernel - 1) must pass."""
    n = min(shape)
    for k in (7, 5, 3):
        for levels in (5, 4, 3, 2):
            if n // 2 ** (levels - 1) >= k and n // max(1, (levels - 1)) ** 2 > k - 1:
                w = np.array(DEFAULT_MS_WEIGHTS[:levels])
                return MsSsimParams(k, tuple(float(x) for x in w / w.sum()))
    raise ValueError(f"volume of shape {shape} is too small for MS-SSIM (needs every axis >= 6)")


def _t(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return t.reshape(1, 1, *t.shape[-3:]) if t.ndim == 3 else t


def _value(out) -> float:
    """A MONAI metric's result as a float (its call is typed to return tensors or lists of them)."""
    assert isinstance(out, torch.Tensor)
    return float(out.mean())


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> float:
    from monai.metrics import PSNRMetric

    return _value(PSNRMetric(max_val=data_range)(_t(pred), _t(ref)))


def ssim(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> float:
    from monai.metrics import SSIMMetric

    win = max(3, min(7, min(np.shape(ref)[-3:]) // 2 * 2 - 1))
    return _value(SSIMMetric(spatial_dims=3, data_range=data_range, win_size=win)(_t(pred), _t(ref)))


def ms_ssim(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> float:
    from monai.metrics import MultiScaleSSIMMetric

    p = ms_ssim_params(np.shape(ref)[-3:])
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=p.kernel_size, weights=p.weights)
    return _value(metric(_t(pred), _t(ref)))


def mae(pred: np.ndarray, ref: np.ndarray) -> float:
    from monai.metrics import MAEMetric

    return _value(MAEMetric()(_t(pred), _t(ref)))


def paired_metrics(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> dict[str, float]:
    return {
        "psnr": psnr(pred, ref, data_range),
        "ssim": ssim(pred, ref, data_range),
        "ms_ssim": ms_ssim(pred, ref, data_range),
        "mae": mae(pred, ref),
    }
