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

from pydantic import BaseModel, ConfigDict

from medgen.errors import RunError
from medgen.io.atomic import write_text_atomic
from medgen.io.nifti import write_nifti
from medgen.provenance import code_version, model_folder_sha256, sha256_file

RECORD = "synthesis.json"


class SynthVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    file: str  # relative to the run folder
    index: int
    sha256: str


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
    )
    entries = []
    for i, vol in zip(indices, vols):
        name = f"synthetic_{i:04d}"
        path = write_nifti(vol, Path(out) / "volumes" / f"{name}.nii.gz")
        entries.append(SynthVolume(name=name, file=str(path.relative_to(out)), index=i, sha256=sha256_file(path)))
    return entries


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
) -> SynthesisRecord:
    """The run's record, written last: a run folder with a record is complete."""
    generator = Path(generator).resolve()
    record = SynthesisRecord(
        generator=str(generator),
        generator_sha256=model_folder_sha256(generator),
        sampler=sampler,
        steps=steps,
        seed=seed,
        condition=condition or None,
        guidance=guidance if condition else None,
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
) -> SynthesisRecord:
    """Generate `n` volumes into the run folder `out` and write its record (synthesis.json), the
    input of `validate_run` and `export_run`. For volumes in memory only, use `medgen.generate`.
    `condition`/`guidance`: as in `medgen.generate`, for a conditioned generator."""
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
    )
    return write_record(
        out, generator, entries, sampler=sampler, steps=steps, seed=seed, condition=condition, guidance=guidance
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
            f = run / v.file
            if not f.exists() or sha256_file(f) != v.sha256:
                raise RunError(f"{f}: missing or changed since it was generated (hash differs from {RECORD})")
    return record
