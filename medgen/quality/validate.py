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
from medgen.io.nifti import load_image
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
        img = load_image(run / v.file)
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
    # the maps the samples followed (ControlNet runs): read once, for the utility check and the montage
    labels = None
    if any(v.label_file for v in record.volumes):
        labels = [np.asarray(load_image(run / v.label_file).dataobj) if v.label_file else None for v in record.volumes]
    if quality.utility is not None:
        u = utility_section(record, meta, manifest, train_items, held_items, train, held, volumes, labels, quality)
        if u.get("segmentation") or u.get("conditions") or u["skipped"]:  # a plain run: nothing to say
            result.extra["utility"] = u
        failed = utility_failures(u, quality.utility)
        if failed:
            result.passed = False
            result.reasons = [*result.reasons, *failed]
    out = run / QUALITY_DIR
    report_path = write_report_files(out, record, result, volumes, ref, labels)
    return Validation(run=run, record=record, result=result, report_path=report_path)


def utility_section(
    record: SynthesisRecord,
    meta: dict,
    manifest: Path,
    train_items: list[dict],
    held_items: list[dict],
    train: np.ndarray,
    held: np.ndarray,
    volumes: np.ndarray,
    labels: list[np.ndarray | None] | None,
    quality: QualityConfig,
) -> dict:
    """What medgen.quality.utility can measure for this run: segmentation utility and mask
    adherence when the samples came with label maps and real pairs exist on both sides of the
    split; condition fidelity when the samples were asked for a condition and the real scans'
    covariates are known (RUN/covariates.csv, written when the conditioned model was trained)."""
    import csv

    from medgen.datasets.prepared import prepare_labels
    from medgen.quality.utility import Pairs, condition_fidelity, segmentation_utility

    cfg = quality.utility
    assert cfg is not None
    data_cfg = DataConfig.model_validate(meta["preprocessing"]["data"])
    u: dict = {"skipped": []}
    if labels is not None and all(m is not None for m in labels):
        tr_lab, tr_keep = prepare_labels(train_items, manifest, data_cfg)
        he_lab, he_keep = prepare_labels(held_items, manifest, data_cfg)
        if tr_keep and he_keep:
            synth_lab = np.stack(labels)  # type: ignore[arg-type]
            values = sorted(int(x) for x in set(np.unique(tr_lab.numpy())) | set(np.unique(synth_lab)) if x > 0)
            u["segmentation"] = segmentation_utility(
                Pairs(train[tr_keep], tr_lab[:, 0].numpy()),
                Pairs(volumes, synth_lab),
                Pairs(held[he_keep], he_lab[:, 0].numpy()),
                values,
                cfg,
            )
        else:
            u["skipped"].append("segmentation utility: no real image+label pairs among the training or held-out scans")
    if record.condition:
        cov_path = Path(record.generator).parent / "covariates.csv"
        spec = {c["name"]: c for c in meta.get("conditioning", {}).get("columns", [])}
        if not cov_path.is_file():
            u["skipped"].append(
                f"condition fidelity: {cov_path.name} (the real scans' covariates) not beside the generator"
            )
        else:
            rows = {r["scan_id"]: r for r in csv.DictReader(cov_path.read_text().splitlines())}
            u["conditions"] = {}
            for col, asked in record.condition.items():
                c = spec[col]
                tr = [
                    (i, rows[it["scan_id"]][col])
                    for i, it in enumerate(train_items)
                    if rows.get(it["scan_id"], {}).get(col)
                ]
                he = [
                    (i, rows[it["scan_id"]][col])
                    for i, it in enumerate(held_items)
                    if rows.get(it["scan_id"], {}).get(col)
                ]
                if len(tr) < 2 or not he:
                    u["skipped"].append(f"condition fidelity of {col}: too few real scans with a known {col}")
                    continue
                num = c["kind"] == "continuous"
                conv = (lambda x: float(x)) if num else (lambda x: x)
                res = condition_fidelity(
                    train[[i for i, _ in tr]],
                    [conv(v) for _, v in tr],
                    held[[i for i, _ in he]],
                    [conv(v) for _, v in he],
                    volumes,
                    [asked] * len(volumes),
                    c["kind"],
                    c.get("levels"),
                    cfg,
                )
                u["conditions"][col] = {**res, "asked": asked}
    return u


def utility_failures(u: dict, cfg) -> list[str]:
    """Reasons the batch fails the optional utility thresholds (none set: never fails)."""
    out = []
    seg = u.get("segmentation") or {}
    ratio, adherence = seg.get("synthetic_to_real"), seg.get("mask_adherence_mean")
    if cfg.min_synthetic_to_real is not None and ratio is not None and ratio < cfg.min_synthetic_to_real:
        out.append(f"synthetic-only Dice is {ratio:.2f} of real-only (< {cfg.min_synthetic_to_real})")
    if cfg.min_mask_adherence is not None and adherence is not None and adherence < cfg.min_mask_adherence:
        out.append(f"mask adherence Dice {adherence:.2f} < {cfg.min_mask_adherence}")
    for col, c in (u.get("conditions") or {}).items():
        acc = c.get("synthetic")
        if cfg.min_condition_accuracy is not None and c["metric"] == "accuracy" and acc is not None:
            if acc < cfg.min_condition_accuracy:
                out.append(f"condition {col}: accuracy on the samples {acc:.2f} < {cfg.min_condition_accuracy}")
    return out


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
