"""The preprocessing that defines a model's geometry and intensity space, as MONAI transforms.

LoadImaged (nibabel: the reader medgen's own volumes were written for; mixing readers between
training and inference flips axes silently) -> Orientationd(RAS) -> Spacingd -> intensity ->
ResizeWithPadOrCropd. The intensity map is recorded (`IntensityMap`) so generated volumes can be
returned in scanner units (HU for CT).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from medgen.config import DataConfig

PREPROCESS_VERSION = 1  # bump when the transform code changes meaning: it invalidates every cache


@dataclass(frozen=True)
class IntensityMap:
    """model = (units - in_lo) / (in_hi - in_lo) * (out_max - out_min) + out_min, and its inverse.

    For CT windows in_lo/in_hi are the window; for percentile scaling they are the median
    per-volume percentile values of the training set (a generated volume has no own scan).
    """

    kind: str
    in_lo: float
    in_hi: float
    out_min: float
    out_max: float

    def to_units(self, x: np.ndarray) -> np.ndarray:
        return (x - self.out_min) / (self.out_max - self.out_min) * (self.in_hi - self.in_lo) + self.in_lo

    def to_model(self, x: np.ndarray) -> np.ndarray:
        return (x - self.in_lo) / (self.in_hi - self.in_lo) * (self.out_max - self.out_min) + self.out_min

    def to_json(self) -> dict:
        return asdict(self)


def fingerprint(cfg: DataConfig) -> str:
    """Hash of everything that changes a preprocessed volume: the cache key of the transforms."""
    keys = {"v": PREPROCESS_VERSION, "spacing": cfg.spacing, "size": cfg.size, "intensity": cfg.intensity.model_dump()}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


class _RecordPercentiles:
    """Store the per-volume percentile values the intensity scaling uses (for the inverse map)."""

    def __init__(self, lower: float, upper: float):
        self.lower, self.upper = lower, upper

    def __call__(self, data: dict) -> dict:
        img = np.asarray(data["image"])
        lo, hi = np.percentile(img, [self.lower, self.upper])
        return {**data, "in_lo": float(lo), "in_hi": float(hi)}


class _RecordWindow:
    def __init__(self, lower: float, upper: float):
        self.lower, self.upper = lower, upper

    def __call__(self, data: dict) -> dict:
        return {**data, "in_lo": self.lower, "in_hi": self.upper}


def transforms(cfg: DataConfig):
    """The deterministic preprocessing chain (cached by PersistentDataset)."""
    import logging
    import warnings

    # LoadImage probes an optional GPU DICOM decoder we never use, and says so twice
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        return _compose(cfg)


def _compose(cfg: DataConfig):
    from monai import transforms as mt

    it = cfg.intensity
    record: _RecordWindow | _RecordPercentiles
    scale: mt.MapTransform
    if it.kind == "ct_window":
        record = _RecordWindow(it.lower, it.upper)
        scale = mt.ScaleIntensityRanged(
            "image", a_min=it.lower, a_max=it.upper, b_min=it.out_min, b_max=it.out_max, clip=True
        )
    else:
        record = _RecordPercentiles(it.lower, it.upper)
        scale = mt.ScaleIntensityRangePercentilesd(
            "image", lower=it.lower, upper=it.upper, b_min=it.out_min, b_max=it.out_max, clip=True
        )
    return mt.Compose(
        [
            mt.LoadImaged("image", reader="NibabelReader", image_only=True),
            mt.EnsureChannelFirstd("image"),
            mt.Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            mt.Spacingd("image", pixdim=cfg.spacing, mode="bilinear"),
            record,
            scale,
            mt.ResizeWithPadOrCropd("image", spatial_size=cfg.size, value=it.out_min),
            mt.EnsureTyped("image", track_meta=False),
        ]
    )


def label_transforms(cfg: DataConfig):
    """The same geometry chain for a label map on its scan's grid (what ingest stores): nearest
    neighbour, background 0, so label voxel v of the result lies where image voxel v does."""
    import logging
    import warnings

    from monai import transforms as mt

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        return _label_compose(cfg, mt)


def _label_compose(cfg: DataConfig, mt):
    return mt.Compose(
        [
            mt.LoadImaged("label", reader="NibabelReader", image_only=True),
            mt.EnsureChannelFirstd("label"),
            mt.Orientationd("label", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            mt.Spacingd("label", pixdim=cfg.spacing, mode="nearest"),
            mt.ResizeWithPadOrCropd("label", spatial_size=cfg.size, value=0),
            mt.EnsureTyped("label", track_meta=False),
        ]
    )


def model_affine(cfg: DataConfig) -> np.ndarray:
    """The RAS affine of a volume in model space: the configured spacing, centred on the origin."""
    from medgen.volume import centred_affine

    return centred_affine(cfg.spacing, cfg.size)
