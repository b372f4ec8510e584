"""From a manifest to batches: select rows, preprocess once (cached on disk), sample by step.

The cache lives under `cache_dir/<transform fingerprint>/`, and MONAI's PersistentDataset keys each
item by a hash of its dict, which carries the source content hash: an edited transform or a changed
file can never be served from a stale cache.
"""

from __future__ import annotations

import fnmatch
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medgen.config import DataConfig
from medgen.datasets.preprocess import IntensityMap, fingerprint, transforms
from medgen.errors import MedgenError, NoTrainingDataError
from medgen.io.manifest import read_rows

if TYPE_CHECKING:
    import torch


def manifest_items(manifest: str | Path, cfg: DataConfig, splits: Sequence[str] | None = None) -> list[dict]:
    """Accepted rows of the wanted splits/modality/sources, as {'image', 'sha256', 'scan_id'} items."""
    manifest = Path(manifest)
    rows = read_rows(manifest)
    wanted = set(splits if splits is not None else cfg.splits)
    items = []
    for r in rows:
        if r["status"] != "accepted" or r["split"] not in wanted:
            continue
        if cfg.modality and r["modality"] != cfg.modality:
            continue
        if not any(fnmatch.fnmatch(r["source"], pat) for pat in cfg.include):
            continue
        items.append({"image": str(manifest.parent / r["output_path"]), "sha256": r["sha256"], "scan_id": r["scan_id"]})
    return sorted(items, key=lambda i: i["scan_id"])


def source_kind(manifest: str | Path, items: list[dict], cfg: DataConfig) -> tuple[str, str]:
    """(modality, units) of the scans `items` name, as their manifest rows record them: a generator
    makes what it was trained on. Scans of several units cannot train one model."""
    rows = {r["scan_id"]: r for r in read_rows(Path(manifest))}
    picked = [rows[i["scan_id"]] for i in items if i["scan_id"] in rows]
    modalities = sorted({r["modality"] for r in picked if r["modality"]})
    units = sorted({r["units"] for r in picked if r["units"]})
    if len(units) > 1:
        raise MedgenError(
            f"{manifest}: the training scans come in several units ({', '.join(units)}); select one kind with data.modality / data.include"
        )
    modality = cfg.modality or (modalities[0] if len(modalities) == 1 else "OT")
    return modality, units[0] if units else "a.u."


def dataset(items: list[dict], cfg: DataConfig, cache_dir: str | Path):
    from monai.data import PersistentDataset

    return PersistentDataset(items, transform=transforms(cfg), cache_dir=Path(cache_dir) / fingerprint(cfg))


@dataclass
class Prepared:
    """Preprocessed training volumes, held in memory as one (N, 1, *size) float32 tensor."""

    images: "torch.Tensor"
    items: list[dict]
    intensity: IntensityMap


def prepare(items: list[dict], cfg: DataConfig, cache_dir: str | Path, what: str = "training") -> Prepared:
    """Preprocess (or load from cache) every item. Small data sets fit in memory; the training loop
    then samples batches by step index, which is what makes resume exact."""
    import torch

    if not items:
        raise NoTrainingDataError(
            f"no accepted {what} scans match the data config (modality={cfg.modality}, splits={cfg.splits}, include={cfg.include})"
        )
    ds = dataset(items, cfg, cache_dir)
    if cfg.num_workers > 0:
        from torch.utils.data import DataLoader

        # spawned workers: a fork inside a threaded host (Prefect, a notebook kernel) can hang
        loader = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, multiprocessing_context="spawn")
        loaded = list(loader)
    else:
        loaded = [ds[i] for i in range(len(ds))]
    images = torch.stack([torch.as_tensor(d["image"]).float() for d in loaded])
    lo = statistics.median(d["in_lo"] for d in loaded)
    hi = statistics.median(d["in_hi"] for d in loaded)
    imap = IntensityMap(cfg.intensity.kind, float(lo), float(hi), cfg.intensity.out_min, cfg.intensity.out_max)
    return Prepared(images=images, items=items, intensity=imap)


class StepSampler:
    """Batch indices as a pure function of (seed, step, micro-batch, rank): a resumed run sees the
    exact batches an uninterrupted run would have seen, with no sampler state to save."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    def indices(self, step: int, micro: int, grad_accum: int) -> list[int]:
        start = (step * grad_accum + micro) * self.batch_size * self.world + self.rank * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, within = divmod(pos, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(perm[within]))
        return out


def prepare_labels(items: list[dict], manifest: str | Path, cfg: DataConfig) -> tuple["torch.Tensor", list[int]]:
    """The label maps ingest paired with `items`' scans, in model geometry ([N, 1, X, Y, Z] int64),
    and the positions in `items` that have one (scans without labels are left out by the caller)."""
    import torch

    from medgen.datasets.preprocess import label_transforms
    from medgen.io.labels import read_label_rows

    rows = read_label_rows(Path(manifest).parent)
    chain = label_transforms(cfg)
    keep, maps = [], []
    for n, item in enumerate(items):
        row = rows.get(item["scan_id"])
        if row is None:
            continue
        lab = chain({"label": str(Path(manifest).parent / row["label_path"])})["label"]
        maps.append(torch.as_tensor(lab).round().long())
        keep.append(n)
    return (torch.stack(maps) if maps else torch.zeros(0, 1, *cfg.size, dtype=torch.long)), keep
