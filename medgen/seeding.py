"""Seeded random streams keyed by what they are for, so a sample or a training step draws the same
numbers whatever the batch size, the number of processes or the order things run in."""

from __future__ import annotations

import hashlib

import torch


def keyed_generator(key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded from SHA-256 of `key` (e.g. 'sample:SEED:INDEX')."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
