"""Generation: noise -> reverse diffusion in latent space -> decode -> volumes in scanner units.

Sample i of seed s is a function of (s, i) only, whatever the batch size: its initial noise and
every stochastic step draw from its own generator, and scheduler steps run per sample (the network
still runs batched). Large volumes decode with MONAI's sliding-window inference over the latent,
so memory stays bounded by the window, not the volume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from medgen.errors import ConditionError, SamplingError
from medgen.models.bundle import Generator
from medgen.models.controlnet import ControlNetModel
from medgen.models.networks import build_scheduler
from medgen.seeding import keyed_generator
from medgen.volume import Volume, VolumeMeta


def sample_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """Sample `index` of `seed` has its own stream: the same volume in any batch or subset."""
    return keyed_generator(f"sample:{seed}:{index}", device)


@torch.no_grad()
def decode(gen: Generator, z: torch.Tensor, roi: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Latents (already divided by the scale factor) -> images; sliding windows when `roi` is
    smaller than the latent, with Gaussian blending across overlaps."""
    ae = gen.autoencoder
    if roi is None or all(r >= n for r, n in zip(roi, z.shape[2:])):
        return ae.decode(z)
    from monai.inferers import sliding_window_inference

    # Windows need context: keep `roi` at >= ~3/4 of the latent or >= 24 latent voxels per axis.
    out = sliding_window_inference(z, roi_size=roi, sw_batch_size=1, predictor=ae.decode, overlap=0.5, mode="gaussian")
    assert isinstance(out, torch.Tensor)  # a tensor predictor gives a tensor (MONAI also allows tuples, dicts)
    return out


Residuals = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], dict[str, Any]]


def guided(
    unet,
    z: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor | None,
    cond: torch.Tensor | None,
    guidance: float,
    residuals: Residuals | None = None,
    mask_guidance: float = 1.0,
) -> torch.Tensor:
    """The network's output, with classifier-free guidance when a condition is asked for:
    out_u + w (out_c - out_u), out_u seeing the empty condition `context` and out_c `cond`.
    w = 1 is the plain conditional model; w = 0 (or no condition) the unconditional one, which is
    then evaluated alone, so it is exactly the unconditional path. `residuals(z, t, context)`: a
    ControlNet's additions, computed for each branch with that branch's context.

    `mask_guidance` m != 1 guides the label map too, as a second classifier-free term: the
    unconditional output without the ControlNet, out_0, joins, and
    out = out_0 + m (out_u - out_0) + w (out_c - out_u) (m = 1: exactly the above; one more
    UNet pass per step)."""

    def run(x: torch.Tensor, tt: torch.Tensor, ctx: torch.Tensor | None, res: Residuals | None) -> torch.Tensor:
        extra = {} if ctx is None else {"context": ctx}
        if res is not None:
            extra |= res(x, tt, ctx)
        return unet(x, timesteps=tt, **extra)

    def both(res: Residuals | None) -> tuple[torch.Tensor, torch.Tensor]:  # (out_u, out_c), one batched pass
        assert context is not None and cond is not None
        out_u, out_c = run(torch.cat([z, z]), torch.cat([t, t]), torch.cat([context, cond]), res).chunk(2)
        return out_u, out_c

    def plain(res: Residuals | None) -> torch.Tensor:  # the branches of condition guidance
        if context is None:
            return run(z, t, None, res)
        if cond is None or guidance == 0:
            return run(z, t, context, res)
        if guidance == 1:
            return run(z, t, cond, res)
        out_u, out_c = both(res)
        return out_u + guidance * (out_c - out_u)

    if residuals is None or mask_guidance == 1:
        return plain(residuals)
    if mask_guidance == 0:  # the ControlNet ignored: the plain generator, same draws
        return plain(None)
    out_0 = run(z, t, context, None)
    if context is None or cond is None or guidance == 0:
        return out_0 + mask_guidance * (plain(residuals) - out_0)
    out_u, out_c = both(residuals)
    return out_0 + mask_guidance * (out_u - out_0) + guidance * (out_c - out_u)


@torch.no_grad()
def denoise_latents(
    gen: Generator,
    z: torch.Tensor,
    gens: list[torch.Generator],
    sampler: str,
    steps: int,
    cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    control: tuple[ControlNetModel, torch.Tensor] | None = None,
    mask_guidance: float = 1.0,
) -> torch.Tensor:
    """Reverse diffusion from noise `z`; `cond`: the [dim] condition vector of a conditioned model;
    `control`: a ControlNet and the one-hot label maps [B, K, X, Y, Z] it makes the sample follow."""
    residuals: Residuals | None = None
    if control is not None:
        cn, maps = control

        def residuals(x: torch.Tensor, tt: torch.Tensor, ctx: torch.Tensor | None) -> dict[str, Any]:
            m = maps if x.shape[0] == maps.shape[0] else torch.cat([maps] * (x.shape[0] // maps.shape[0]))
            extra = {} if ctx is None else {"context": ctx}
            down, mid = cn.net(x, timesteps=tt, controlnet_cond=m, conditioning_scale=cn.scale, **extra)
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    space = gen.conditions
    context = cond_b = None
    if space is not None:
        context = torch.zeros(z.shape[0], 1, space.dim, device=z.device)
        if cond is not None:
            cond_b = cond.to(z.device).expand(z.shape[0], space.dim).reshape(z.shape[0], 1, space.dim)
    sched = build_scheduler(gen.diffusion_cfg, sampler)
    device = z.device
    if sampler == "rflow":
        sched.set_timesteps(steps, device=device, input_img_size_numel=int(np.prod(z.shape[2:])))
    else:
        sched.set_timesteps(steps, device=device)
    timesteps = list(sched.timesteps)
    nexts = timesteps[1:] + [torch.zeros_like(timesteps[0])]
    for t, t_next in zip(timesteps, nexts):
        tt = torch.full((z.shape[0],), float(t) if sampler == "rflow" else int(t), device=device)
        out = guided(
            gen.unet, z, tt if sampler == "rflow" else tt.long(), context, cond_b, guidance, residuals, mask_guidance
        )
        parts = []
        for b in range(z.shape[0]):
            if sampler == "rflow":
                nz, _ = sched.step(out[b : b + 1], t, z[b : b + 1], t_next)
            elif sampler == "ddim":
                nz, _ = sched.step(out[b : b + 1], int(t), z[b : b + 1], eta=0.0, generator=gens[b])
            else:
                nz, _ = sched.step(out[b : b + 1], int(t), z[b : b + 1], generator=gens[b])
            parts.append(nz)
        z = torch.cat(parts)
    return z


def label_inputs(controlnet: ControlNetModel, labels: Any, n: int, size: tuple[int, ...]) -> torch.Tensor:
    """[n, K, X, Y, Z] one-hot inputs from one label map (for every sample) or a list of n."""
    maps = list(labels) if isinstance(labels, (list, tuple)) else [labels] * n
    if len(maps) != n:
        raise ConditionError(f"{len(maps)} label maps for {n} samples: give one map, or one per sample")
    out = []
    for i, m in enumerate(maps):
        arr = np.asarray(m.data if isinstance(m, Volume) else m)
        if tuple(arr.shape[-3:]) != size:
            raise ConditionError(
                f"label map {i}: shape {tuple(arr.shape)} is not the model's grid {size} "
                "(put it in model geometry first: medgen.datasets.preprocess.label_transforms)"
            )
        out.append(controlnet.one_hot(arr, where=f"label map {i}"))
    return torch.stack(out)


def resolve_sampler(scheduler: str, train_timesteps: int, sampler: str | None, steps: int) -> str:
    """The sampler to use: the asked one, else DDIM for a DDPM/DDIM-trained model (same noise
    process, deterministic, tens of steps) and RFlow for a rectified-flow model.

    DDPM with fewer steps than it was trained with is refused: its ancestral step assumes the full
    chain, and 50 of 1000 steps give a noisy sample that then fails the quality gate.
    """
    chosen = sampler or ("rflow" if scheduler == "rflow" else "ddim")
    if (chosen == "rflow") != (scheduler == "rflow"):
        raise SamplingError(f"a model trained with {scheduler} cannot sample with {chosen}")
    if chosen == "ddpm" and steps < train_timesteps:
        raise SamplingError(
            f"DDPM samples with all {train_timesteps} timesteps it was trained with, not {steps}; "
            "use sampler ddim for fewer steps (the same model, deterministic)"
        )
    return chosen


def generate(
    generator: Generator,
    n: int,
    *,
    sampler: str | None = None,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    decode_roi: tuple[int, int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    indices: list[int] | None = None,
    condition: Mapping[str, Any] | None = None,
    guidance: float = 1.0,
    labels: Any = None,
    controlnet: ControlNetModel | None = None,
    mask_guidance: float = 1.0,
) -> list[Volume]:
    """`n` synthetic volumes, in memory, in the model's geometry (spacing, affine) and units.

    `generate` returns Volumes and writes nothing; `medgen.synthesize` is the one that makes a
    synthesis run folder (volumes + a record) that `validate_run` and `export_run` accept.

    `sampler`: 'ddpm' or 'ddim' for a model trained with ddpm/ddim, 'rflow' for rectified flow;
    None: ddim, or rflow for a rectified-flow model (`resolve_sampler`). Sample i for a seed is the same whatever `batch_size`, and whatever
    other samples are generated with it: `indices` picks which samples (default 0..n-1), so a set
    can be generated in parallel pieces.

    `condition` (a conditioned model only): e.g. {"sex": "F", "age": 70}; columns left out are
    left open, and an unknown column or level or an out-of-range value is refused (ConditionError).
    `guidance`: classifier-free guidance weight w; 1 is the conditional model as trained, larger
    follows the condition more strictly, 0 ignores it (the unconditional sample, same seed).
    `labels` with `controlnet`: a label map in model geometry (data.size), or one per sample, that
    each sample's anatomy follows; its values must be among the ControlNet's training labels.
    `mask_guidance`: guidance on the label map (`guided`): 1 as trained, more follows it harder.
    """
    indices = list(range(n)) if indices is None else list(indices)
    if n < 1 or batch_size < 1 or steps < 1 or len(indices) != n or min(indices) < 0:
        raise ValueError("n, batch_size and steps must be >= 1, indices n non-negative sample numbers")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ConditionError(f"guidance {guidance}: must be a finite number >= 0 (1 = as trained, 0 = unconditional)")
    if not (math.isfinite(mask_guidance) and mask_guidance >= 0):
        raise ConditionError(f"mask guidance {mask_guidance}: must be a finite number >= 0 (1 = as trained)")
    cond = None
    if condition:
        if generator.conditions is None:
            raise ConditionError(
                f"{generator.path}: this generator was trained without conditions; it cannot be given {dict(condition)}"
            )
        cond = generator.conditions.encode(condition)
    maps = None
    if (labels is None) != (controlnet is None):
        raise ConditionError(
            "a label map and a ControlNet go together: give both `labels` and `controlnet`, or neither"
        )
    if controlnet is not None:
        maps = label_inputs(controlnet, labels, n, tuple(generator.data_cfg.size))
    dev = torch.device(device) if device is not None else next(generator.unet.parameters()).device
    generator.autoencoder.to(dev)
    generator.unet.to(dev)
    if controlnet is not None:
        controlnet.net.to(dev)
    sampler = resolve_sampler(
        generator.diffusion_cfg.scheduler, generator.diffusion_cfg.num_train_timesteps, sampler, steps
    )
    asked = ", ".join(f"{k}={v}" for k, v in (condition or {}).items())
    shape = generator.latent_shape
    affine = generator.affine
    out: list[Volume] = []
    for start in range(0, n, batch_size):
        idx = indices[start : start + batch_size]
        gens = [sample_generator(seed, i, dev) for i in idx]
        z = torch.stack([torch.randn(shape, generator=g, device=dev) for g in gens])
        control = None
        if controlnet is not None and maps is not None:
            control = (controlnet, maps[start : start + len(idx)].to(dev))
        z = denoise_latents(generator, z, gens, sampler, steps, cond, guidance, control, mask_guidance)
        images = decode(generator, z / generator.scale_factor, decode_roi).float().cpu().numpy()
        for i, img in zip(idx, images):
            data = generator.intensity.to_units(img[0]).astype(np.float32)
            meta = VolumeMeta(
                modality=generator.modality,
                units=generator.units,
                notes=(
                    f"synthetic: {sampler}-{steps}, seed {seed}, sample {i}, generator {generator.path.name}"
                    + (f", condition {asked}, guidance {guidance:g}" if cond is not None else ""),
                ),
            )
            out.append(Volume(data, affine.copy(), meta))
        if progress:
            progress(len(out), n)
    return out
