"""Diversity: mean pairwise MS-SSIM within a set (high = alike; mode collapse drives it to 1).
Reported for the synthetic set beside the same figure for the real training set."""

from __future__ import annotations

import itertools

import numpy as np

from medgen.quality.metrics.image import ms_ssim


def mean_pairwise_ms_ssim(
    volumes: np.ndarray, max_pairs: int = 100, seed: int = 0, data_range: float = 1.0
) -> float | None:
    pairs = list(itertools.combinations(range(len(volumes)), 2))
    if not pairs:
        return None
    if len(pairs) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(pick)]
    return float(np.mean([ms_ssim(volumes[a], volumes[b], data_range=data_range) for a, b in pairs]))
