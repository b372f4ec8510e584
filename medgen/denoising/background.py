"""Where a scan holds no measurement at all: a background set to exactly one value.

Skull-stripped and scanner-masked scans (nibabel's example4d EPI: 61 % zeros) and zero-padded ones
hold no noise there; the sigma estimate, SURE and the output leave such a region out.
"""

from __future__ import annotations

import numpy as np

BLANK_FRACTION = 0.05  # of voxels exactly equal to the scan's minimum: a masked background


def masked_background(data: np.ndarray) -> np.ndarray | None:
    """Where a scan holds no measurement: voxels exactly at 0 (or at its minimum, e.g. -1024 HU
    padding), when there are many of them (a skull-stripped or scanner-masked background, zero
    padding). None when there is no such region (a noisy background never sits at one value)."""
    for value in (0.0, float(data.min())):
        blank = data == value
        if blank.mean() > BLANK_FRACTION:
            return blank
    return None


def measured_in_all(*scans: np.ndarray) -> np.ndarray:
    """Voxels that are measured (not in a masked background) in every one of `scans`: where two
    repeats can be compared."""
    keep = np.ones(scans[0].shape, bool)
    for x in scans:
        blank = masked_background(x)
        if blank is not None:
            keep &= ~blank
    return keep
