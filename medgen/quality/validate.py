"""Validate a synthesis run: real reference volumes from the generator's training manifest,
the project's feature encoder, the gate, and the report files.

    RUN/quality/report.json    (data_schemas/quality_report.schema.json)
    RUN/quality/report.md      summary, with the montage and histogram plot linked
    RUN/quality/montage.png    mid-slices: each synthetic volume beside its nearest training volume
    RUN/quality/histograms.png intensity histograms, synthetic vs training (model units)

Everything is compared in the generator's model space (its grid and intensity map), the space the
model was trained in: the training volumes go through the same preprocessing, and synthetic volumes
are mapped back through the recorded intensity map (not re-normalised, which would hide shifts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgen.config import DataConfig, QualityConfig
from medgen.datasets.preprocess import IntensityMap, fingerprint, model_affine
from medgen.errors import ValidationError
from medgen.models.bundle import generator_metadata
from medgen.provenance import sha256_file, sha256_json
from medgen.quality.gate import BatchResult
from medgen.synthesis.runs import SynthesisRecord, read_record

QUALITY_DIR = "quality"
REPORT = "report.json"


@dataclass
class Validation:
    run: Path
    record: SynthesisRecord
    result: BatchResult
    report_path: Path

    @property
    def passed(self) -> bool:
        return self.result.passed


def _reference_items(
    manifest: Path, data_cfg: DataConfig, provenance: dict, heldout_splits: list[str]
) -> tuple[list[dict], list[dict]]:
    from medgen.datasets.prepared import manifest_items

    trained = {i["sha256"] for i in provenance.get("train_items", [])}
    every = manifest_items(manifest, data_cfg, splits=["train", "val", "test"])
    train = [i for i in every if i["sha256"] in trained]
    held = [i for i in manifest_items(manifest, data_cfg, splits=heldout_splits) if i["sha256"] not in trained]
    return train, held


def validate_run(
    run: str | Path, *, quality: QualityConfig = QualityConfig(), manifest: str | Path | None = None
) -> Validation:
    """Assess every volume of the run and write the report files; returns the verdicts."""
    import nibabel as nib

    from medgen.datasets.prepared import prepare
    from medgen.quality.gate import assess, build_reference
    from medgen.quality.metrics.features import EncoderSettings, load_encoder, train_encoder
    from medgen.quality.report import write_report_files

    run = Path(run)
    record = read_record(run)
    gen_path = Path(record.generator)
    meta = generator_metadata(gen_path)
    prov = meta.get("provenance", {})
    manifest = Path(manifest or prov.get("training_manifest") or "")
    if not manifest.is_file():
        raise ValidationError(
            f"{run}: the generator's training manifest {str(manifest) or '(not recorded)'} is not there; pass manifest="
        )
    data_cfg = DataConfig.model_validate(meta["preprocessing"]["data"])
    imap = IntensityMap(**meta["preprocessing"]["intensity"])
    train_items, held_items = _reference_items(manifest, data_cfg, prov, quality.heldout_splits)
    if len(train_items) < 2 or not held_items:
        raise ValidationError(
            f"{manifest}: {len(train_items)} training and {len(held_items)} held-out ({'/'.join(quality.heldout_splits)}) volumes "
            "found for this generator; the gate needs >= 2 and >= 1"
        )
    cache = gen_path.parent / "cache"
    train = prepare(train_items, data_cfg, cache).images[:, 0].numpy()
    held = prepare(held_items, data_cfg, cache, "held-out").images[:, 0].numpy()

    ec = quality.encoder
    settings = EncoderSettings(channels=ec.channels, steps=ec.steps, batch_size=ec.batch_size, lr=ec.lr, seed=ec.seed)
    key = sha256_json(
        {
            "train": sorted(i["sha256"] for i in train_items),
            "data": fingerprint(data_cfg),
            "encoder": ec.model_dump(mode="json"),
        }
    )[:16]
    enc_dir = gen_path.parent / f"feature_encoder-{key}"
    encoder = (
        load_encoder(enc_dir)
        if (enc_dir / "configs" / "metadata.json").exists()
        else train_encoder(
            train,
            enc_dir,
            settings,
            provenance={
                "train_scan_ids": [i["scan_id"] for i in train_items],
                "data_fingerprint": fingerprint(data_cfg),
            },
        )
    )

    affine = model_affine(data_cfg)
    arrays, geometry_ok = [], []
    for v in record.volumes:
        # nibabel directly, not read_nifti: NaN volumes must reach the gate (and fail there), not raise
        img = nib.load(run / v.file)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        ok = data.shape == tuple(data_cfg.size) and np.allclose(img.affine, affine, atol=1e-3)
        geometry_ok.append(bool(ok))
        arrays.append((imap.to_model(data) if ok else np.zeros(data_cfg.size)).astype(np.float32))
    volumes = np.stack(arrays)
    ref = build_reference(train, held, [i["scan_id"] for i in train_items], encoder, quality.gate)
    result = assess(volumes, [v.name for v in record.volumes], ref, quality.gate, geometry_ok)
    result.extra = {
        "generator_sha256": record.generator_sha256,
        "training_manifest_sha256": prov.get("training_manifest_sha256"),  # as the generator recorded it
        "reference_manifest_sha256": sha256_file(manifest),  # the manifest the reference volumes came from now
        "heldout_splits": list(quality.heldout_splits),
        "gate": quality.gate.model_dump(mode="json"),
        "volume_sha256": {v.name: v.sha256 for v in record.volumes},
    }
    out = run / QUALITY_DIR
    report_path = write_report_files(out, record, result, volumes, ref)
    return Validation(run=run, record=record, result=result, report_path=report_path)


def read_report(run: str | Path) -> dict:
    """The run's validated report; refuses a report older than the volumes it judged."""
    from medgen.io.schemas import load_schema

    run = Path(run)
    path = run / QUALITY_DIR / REPORT
    if not path.exists():
        raise ValidationError(f"{run}: not validated yet (no {QUALITY_DIR}/{REPORT}; run `medgen validate {run}`)")
    report = json.loads(path.read_text())
    import jsonschema

    try:
        jsonschema.validate(report, load_schema("quality_report"))
    except jsonschema.ValidationError as e:
        raise ValidationError(f"{path}: does not match quality_report.schema.json ({e.message})") from e
    record = read_record(run)
    judged = {v["name"]: v["sha256"] for v in report["volumes"]}
    if judged != {v.name: v.sha256 for v in record.volumes}:
        raise ValidationError(f"{path}: the run's volumes changed after validation; validate again")
    return report


__all__ = ["ValidationError", "Validation", "validate_run", "read_report"]
