"""A synthesis run: generated volumes plus the record (synthesis.json) that says how they were made.

    RUN/volumes/synthetic_NNNN.nii.gz   model geometry, scanner units
    RUN/synthesis.json                  generator path and hash, sampler, steps, seed, volume hashes
    RUN/quality/                        written by medgen.quality.validate (report, montage, plots)

The record is what validation and export read; it holds no source-scan values, only hashes.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from medgen.errors import RunError
from medgen.io.atomic import write_text_atomic
from medgen.io.nifti import load_image, write_nifti
from medgen.provenance import code_version, model_folder_sha256, sha256_file

RECORD = "synthesis.json"


class SynthVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    file: str  # relative to the run folder
    index: int
    sha256: str
    label_file: str | None = None  # the label map the sample was made to follow (ControlNet)
    label_sha256: str | None = None


class SynthesisRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["medgen-synthesis"] = "medgen-synthesis"
    format_version: Literal[1] = 1
    generator: str
    generator_sha256: str
    sampler: str
    steps: int
    seed: int
    condition: dict[str, str | float] | None = None  # what a conditioned generator was asked for
    guidance: float | None = None  # its classifier-free guidance weight
    controlnet: str | None = None  # the ControlNet the samples followed label maps with
    controlnet_sha256: str | None = None
    mask_guidance: float | None = None  # guidance on the label maps (None: no ControlNet)
    label_table: dict[str, str] | None = None  # label value -> name, of the label maps
    created: str  # ISO-8601 UTC: the content date of exports
    code_version: dict[str, str | None]
    volumes: list[SynthVolume]


def generate_volumes(
    generator: str | Path,
    indices: list[int],
    out: str | Path,
    *,
    sampler: str | None = None,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 1,
    device: str | None = None,
    decode_roi: tuple[int, int, int] | None = None,
    condition: dict[str, str | float] | None = None,
    guidance: float = 1.0,
    labels: str | Path | list | None = None,
    controlnet: str | Path | None = None,
    mask_guidance: float = 1.0,
) -> list[SynthVolume]:
    """Generate samples `indices` of `seed` into OUT/volumes/ (each file atomically).

    Sample i depends only on (seed, i), so disjoint index sets can run in parallel anywhere (the
    Prefect flow fans them out as tasks) and give the same volumes as one call for all.
    """
    import torch

    from medgen.models.bundle import load_generator
    from medgen.synthesis.sampler import generate

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_generator(generator, device=dev)
    cn, label_map = None, None
    if controlnet is not None or labels is not None:
        from medgen.models.controlnet import load_controlnet

        if controlnet is None or labels is None:
            from medgen.errors import ConditionError

            raise ConditionError("a label map and a ControlNet go together: give both, or neither")
        cn = load_controlnet(controlnet, gen, device=dev)
        maps = [model_labels(f, gen.data_cfg) for f in label_files(labels)]
        label_map = [maps[i % len(maps)] for i in indices]  # sample i follows map i mod k, in any chunk
    vols = generate(
        gen,
        len(indices),
        indices=indices,
        sampler=sampler,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        device=dev,
        decode_roi=decode_roi,
        condition=condition,
        guidance=guidance,
        labels=label_map,
        controlnet=cn,
        mask_guidance=mask_guidance,
    )
    entries = []
    for n, (i, vol) in enumerate(zip(indices, vols)):
        name = f"synthetic_{i:04d}"
        path = write_nifti(vol, Path(out) / "volumes" / f"{name}.nii.gz")
        entry = SynthVolume(name=name, file=str(path.relative_to(out)), index=i, sha256=sha256_file(path))
        if cn is not None and label_map is not None:
            from medgen.io.labels import LabelMap, write_label_nifti

            lab = write_label_nifti(
                LabelMap(label_map[n], vol.affine, cn.table), Path(out) / "labels" / f"{name}_dseg.nii.gz"
            )
            entry.label_file, entry.label_sha256 = str(lab.relative_to(out)), sha256_file(lab)
        entries.append(entry)
    return entries


def label_files(labels: str | Path | list) -> list[Path]:
    """The label maps a run follows: one file, a list of files, or a folder (its *_dseg.nii.gz and
    *_dseg.nii, sorted)."""
    items = [Path(x) for x in labels] if isinstance(labels, (list, tuple)) else [Path(labels)]
    out: list[Path] = []
    for p in items:
        out += sorted([*p.rglob("*_dseg.nii.gz"), *p.rglob("*_dseg.nii")]) if p.is_dir() else [p]
    if not out:
        from medgen.io.labels import LabelError

        raise LabelError(str(labels), "no label map found (a file, a list of files, or a folder of *_dseg.nii.gz)")
    return out


def model_labels(labels: str | Path, data_cfg) -> np.ndarray:
    """A label map file (NIfTI) in the model's geometry: as is when it already has the model's grid
    size, else through the same orientation / spacing / crop chain as training scans (nearest)."""

    from medgen.datasets.preprocess import label_transforms
    from medgen.io.labels import LabelError, checked_labels

    path = Path(labels)
    try:
        img = load_image(str(path))
    except Exception as e:
        raise LabelError(path, f"unreadable label map ({type(e).__name__}: {e})") from e
    data = checked_labels(np.asanyarray(img.dataobj), path)
    if tuple(data.shape) == tuple(data_cfg.size):
        return data
    return np.asarray(label_transforms(data_cfg)({"label": str(path)})["label"][0]).round().astype(data.dtype)


def write_record(
    out: str | Path,
    generator: str | Path,
    entries: list[SynthVolume],
    *,
    sampler: str,
    steps: int,
    seed: int,
    condition: dict[str, str | float] | None = None,
    guidance: float = 1.0,
    controlnet: str | Path | None = None,
    mask_guidance: float = 1.0,
) -> SynthesisRecord:
    """The run's record, written last: a run folder with a record is complete."""
    generator = Path(generator).resolve()
    table = None
    if controlnet is not None:
        from medgen.models.folder import read_metadata

        table = read_metadata(controlnet, "controlnet folder")["labels"]["table"]
    record = SynthesisRecord(
        generator=str(generator),
        generator_sha256=model_folder_sha256(generator),
        sampler=sampler,
        steps=steps,
        seed=seed,
        condition=condition or None,
        guidance=guidance if condition else None,
        controlnet=str(Path(controlnet).resolve()) if controlnet else None,
        controlnet_sha256=model_folder_sha256(controlnet) if controlnet else None,
        mask_guidance=mask_guidance if controlnet else None,
        label_table=table,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        code_version=code_version(),
        volumes=sorted(entries, key=lambda e: e.index),
    )
    write_text_atomic(Path(out) / RECORD, record.model_dump_json(indent=1))
    return record


def model_sampler(generator: str | Path, sampler: str | None, steps: int = 50) -> str:
    """The sampler a run will use (see `medgen.synthesis.sampler.resolve_sampler`)."""
    from medgen.models.bundle import generator_metadata
    from medgen.synthesis.sampler import resolve_sampler

    d = generator_metadata(generator)["diffusion"]
    return resolve_sampler(d["scheduler"], int(d.get("num_train_timesteps", 1000)), sampler, steps)


def model_condition(generator: str | Path, condition: dict[str, Any] | None) -> dict[str, str | float] | None:
    """A request checked against the generator's conditions (ConditionError if it cannot be
    honoured) before anything is generated, in the form the record keeps."""
    from medgen.errors import ConditionError
    from medgen.models.bundle import generator_metadata
    from medgen.models.conditions import ConditionSpace

    if not condition:
        return None
    meta = generator_metadata(generator)
    if "conditioning" not in meta:
        raise ConditionError(
            f"{generator}: this generator was trained without conditions; it cannot be given {condition}"
        )
    return ConditionSpace.from_json(meta["conditioning"]).normalise(condition)


def synthesize(
    generator: str | Path,
    n: int,
    out: str | Path,
    *,
    sampler: str | None = None,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 1,
    device: str | None = None,
    decode_roi: tuple[int, int, int] | None = None,
    condition: dict[str, Any] | None = None,
    guidance: float = 1.0,
    labels: str | Path | list | None = None,
    controlnet: str | Path | None = None,
    mask_guidance: float = 1.0,
) -> SynthesisRecord:
    """Generate `n` volumes into the run folder `out` and write its record (synthesis.json), the
    input of `validate_run` and `export_run`. For volumes in memory only, use `medgen.generate`.
    `condition`/`guidance`: as in `medgen.generate`, for a conditioned generator. `labels` (a NIfTI
    label map) with `controlnet` (RUN/controlnet): every sample follows that map, which is written
    beside it (labels/synthetic_NNNN_dseg.nii.gz) and exported with it as a pair; `mask_guidance`:
    as in `medgen.generate`."""
    sampler = model_sampler(generator, sampler, steps)
    condition = model_condition(generator, condition)
    entries = generate_volumes(
        generator,
        list(range(n)),
        out,
        sampler=sampler,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        device=device,
        decode_roi=decode_roi,
        condition=condition,
        guidance=guidance,
        labels=labels,
        controlnet=controlnet,
        mask_guidance=mask_guidance,
    )
    return write_record(
        out,
        generator,
        entries,
        sampler=sampler,
        steps=steps,
        seed=seed,
        condition=condition,
        guidance=guidance,
        controlnet=controlnet,
        mask_guidance=mask_guidance,
    )


def read_record(run: str | Path, *, verify: bool = True) -> SynthesisRecord:
    run = Path(run)
    path = run / RECORD
    if not path.exists():
        raise RunError(f"{run}: not a synthesis run (no {RECORD}; make one with `medgen generate MODEL --out {run}`)")
    try:
        record = SynthesisRecord.model_validate(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise RunError(f"{path}: unreadable synthesis record ({e})") from e
    if verify:
        for v in record.volumes:
            for rel, sha in ((v.file, v.sha256), (v.label_file, v.label_sha256)):
                if rel is None:
                    continue
                f = run / rel
                if not f.exists() or sha256_file(f) != sha:
                    raise RunError(f"{f}: missing or changed since it was generated (hash differs from {RECORD})")
    return record
