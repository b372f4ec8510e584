"""A trained ControlNet as one folder beside the generator it steers (same layout and safety as
the generator bundle: metadata + state dict, loaded with weights_only, hashes checked).

    CONTROLNET/configs/metadata.json   the label table (value -> name), which value is which input
                                       channel, the network config, and the hash of the generator
                                       it was trained on (it steers that generator only)
    CONTROLNET/models/controlnet.pt
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medgen.errors import ConditionError
from medgen.models.bundle import Generator
from medgen.models.folder import BundleError, build_checked, read_model_folder, write_model_folder

FORMAT = "medgen-controlnet"
FORMAT_VERSION = 1


@dataclass
class ControlNetModel:
    path: Path
    net: nn.Module
    values: list[int]  # label value of each input channel
    table: dict[int, str]
    scale: float
    metadata: dict[str, Any]

    def one_hot(self, labels: np.ndarray | torch.Tensor, where: str = "label map") -> torch.Tensor:
        """[K, X, Y, Z] float input for a label map in model geometry; a label the ControlNet was
        not trained on is refused (it would silently read as background)."""
        lab = torch.as_tensor(np.asarray(labels)).long()
        while lab.ndim > 3 and lab.shape[0] == 1:
            lab = lab[0]
        unknown = sorted(set(torch.unique(lab).tolist()) - {0, *self.values})
        if unknown:
            known = ", ".join(f"{v} ({self.table.get(v, 'unnamed')})" for v in self.values)
            raise ConditionError(f"{where}: label(s) {unknown} were not in the ControlNet's training labels: {known}")
        return torch.stack([(lab == v).float() for v in self.values])


def save_controlnet(
    path: str | Path,
    *,
    generator_sha256: str,
    values: list[int],
    table: dict[int, str],
    embedding: tuple[int, ...],
    scale: float,
    state: dict[str, torch.Tensor],
    provenance: dict[str, Any],
) -> Path:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator_sha256": generator_sha256,
        "labels": {
            "values": values,
            "table": {str(k): v for k, v in table.items()},
            "encoding": "one-hot, channel i = label values[i]",
        },
        "embedding_channels": list(embedding),
        "conditioning_scale": scale,
        "provenance": provenance,
    }
    return write_model_folder(path, meta, {"controlnet": state})


def load_controlnet(path: str | Path, generator: Generator, device: str | torch.device = "cpu") -> ControlNetModel:
    """Load a ControlNet for `generator`; one trained on another generator is refused."""
    from medgen.models.networks import build_controlnet
    from medgen.provenance import model_folder_sha256

    path = Path(path)
    meta, states = read_model_folder(path, FORMAT, FORMAT_VERSION)
    if meta.get("generator_sha256") != model_folder_sha256(generator.path):
        raise BundleError(f"{path}: this ControlNet was trained on another generator than {generator.path}")

    def build() -> ControlNetModel:
        values = [int(v) for v in meta["labels"]["values"]]
        space = generator.conditions
        net = build_controlnet(
            generator.diffusion_cfg,
            generator.autoencoder_cfg.latent_channels,
            len(values),
            tuple(meta["embedding_channels"]),
            space.dim if space else None,
        )
        net.load_state_dict(states["controlnet"])
        return ControlNetModel(
            path=path,
            net=net.to(device).eval(),
            values=values,
            table={int(k): v for k, v in meta["labels"]["table"].items()},
            scale=float(meta["conditioning_scale"]),
            metadata=meta,
        )

    return build_checked(path, build)
