"""Conditioned latent diffusion (issue 14, item 2): covariates enter the UNet by cross-attention,
condition dropout trains the unconditional model that classifier-free guidance needs, and the
bundle refuses what it was not trained for. One tiny model (16^3, ~1 min on 2 CPU cores) serves
all tests: half its training scans carry a bright lesion at a fixed place, and say so."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from test_ldm import TINY, blobs

from medgen import ingest
from medgen.config import PipelineConfig
from medgen.datasets.covariates import load_covariates
from medgen.datasets.prepared import manifest_items, prepare
from medgen.errors import ConditionError
from medgen.models.bundle import load_generator
from medgen.models.conditions import ConditionSpace, parse_condition_args
from medgen.synthesis.sampler import generate
from medgen.synthesis.train_autoencoder import train_autoencoder
from medgen.synthesis.train_diffusion import drop_conditions, train_diffusion

torch.set_num_threads(1)

COLUMNS = [
    {"name": "lesion", "kind": "categorical", "levels": ["no", "yes"]},
    {"name": "age", "kind": "continuous", "range": [18, 90]},
]


def conditioned_config(**diffusion) -> PipelineConfig:
    raw = json.loads(json.dumps(TINY))
    raw["covariates"] = {"table": "participants.tsv", "columns": COLUMNS}
    raw["data"]["splits"] = ["train", "val"]  # test stays held out, for the quality report
    raw["autoencoder"]["train"].update(steps=300, checkpoint_every=10000, log_every=100)
    raw["diffusion"]["train"].update(steps=800, batch_size=4, lr=3e-3, checkpoint_every=10000, log_every=100)
    raw["diffusion"]["conditioning"] = {"columns": ["lesion", "age"], "dropout": 0.15}
    raw["diffusion"].update(diffusion)
    return PipelineConfig.model_validate(raw)


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory):
    """14 heads, the even ones with a lesion (radius 4 voxels at a fixed place), declared in a
    BIDS participants.tsv with an age column that changes nothing."""
    root = tmp_path_factory.mktemp("cond")
    g = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"))
    lesion = ((g - np.array([13, 8, 10])[:, None, None, None]) ** 2).sum(0) <= 16
    rows = ["participant_id\tlesion\tage"]
    for i in range(14):
        v = np.where(lesion, 1800.0, blobs(i)).astype(np.float32) if i % 2 == 0 else blobs(i)
        d = root / "src" / f"sub-{i:02d}"
        d.mkdir(parents=True)
        nib.save(nib.Nifti1Image(v, np.diag([4.0, 4, 4, 1])), d / f"sub-{i:02d}_T1w.nii.gz")
        rows.append(f"sub-{i:02d}\t{'yes' if i % 2 == 0 else 'no'}\t{30 + 3 * i}")
    report = ingest(root / "src", root / "ing")
    assert any(r["split"] == "test" for r in report.accepted)
    (root / "ing" / "participants.tsv").write_text("\n".join(rows) + "\n")
    cfg = conditioned_config()
    train_autoencoder(cfg, report.manifest_path, root / "run", device="cpu")
    bundle = train_diffusion(cfg, report.manifest_path, root / "run", device="cpu")
    # where the lesion is in the model's geometry: the voxels the two groups differ most in
    train = prepare(manifest_items(report.manifest_path, cfg.data), cfg.data, root / "run" / "cache")
    table = load_covariates(cfg.covariates, report.manifest_path)  # type: ignore[arg-type]
    has = np.array([table.values[i["scan_id"]]["lesion"] == "yes" for i in train.items])
    imgs = train.images[:, 0].numpy()
    diff = imgs[has].mean(0) - imgs[~has].mean(0)
    mask = diff > 0.5 * diff.max()
    threshold = 0.5 * (imgs[has][:, mask].mean() + imgs[~has][:, mask].mean())
    return {"root": root, "bundle": bundle, "manifest": report.manifest_path, "mask": mask, "threshold": threshold}


def lesion_scores(gen, vols, mask) -> np.ndarray:
    return np.array([gen.intensity.to_model(v.data)[mask].mean() for v in vols])


def test_a_lesion_asked_for_appears_far_more_often_than_chance(lesion_model):
    gen = load_generator(lesion_model["bundle"])
    mask, thr = lesion_model["mask"], lesion_model["threshold"]
    kw = dict(steps=10, seed=3, batch_size=16, guidance=3.0)
    yes = lesion_scores(gen, generate(gen, 16, condition={"lesion": "yes"}, **kw), mask)
    no = lesion_scores(gen, generate(gen, 16, condition={"lesion": "no"}, **kw), mask)
    # same seed, same starting noise: the condition alone moves the lesion region, in nearly every pair
    assert (yes > no).sum() >= 14, (yes, no)
    assert (yes > thr).mean() - (no > thr).mean() >= 0.4, (yes, no, thr)
    assert (no > thr).mean() <= 0.15


def test_guidance_zero_is_exactly_the_unconditional_sample(lesion_model):
    gen = load_generator(lesion_model["bundle"])
    plain = generate(gen, 2, steps=5, seed=8)
    zero = generate(gen, 2, steps=5, seed=8, condition={"lesion": "yes", "age": 40}, guidance=0.0)
    asked = generate(gen, 2, steps=5, seed=8, condition={"lesion": "yes"}, guidance=2.0)
    for p, z, a in zip(plain, zero, asked):
        np.testing.assert_array_equal(p.data, z.data)
        assert not np.allclose(p.data, a.data)
    assert "condition lesion=yes, guidance 2" in asked[0].meta.notes[0]


def test_conditioned_samples_are_the_same_whatever_the_batch_size(lesion_model):
    gen = load_generator(lesion_model["bundle"])
    kw = dict(steps=5, seed=4, condition={"lesion": "no", "age": 55.5}, guidance=2.5)
    one = generate(gen, 3, batch_size=1, **kw)
    three = generate(gen, 3, batch_size=3, **kw)
    for x, y in zip(one, three):
        np.testing.assert_allclose(x.data, y.data, rtol=0, atol=1e-3 * (np.abs(x.data).max() + 1))


@pytest.mark.parametrize(
    "condition, match",
    [
        ({"lesion": "maybe"}, r"lesion='maybe': not a level it was trained on \(levels: no, yes\)"),
        ({"age": 95}, r"age=95: outside the range it was trained over \[18, 90\]"),
        ({"age": "old"}, r"age='old': not a number"),
        ({"sex": "F"}, r"'sex': not a column this generator was trained on \(it takes: lesion \(one of no, yes\); age"),
        ({"lesion": True}, r"not a level"),
    ],
)
def test_the_bundle_refuses_what_it_was_not_trained_for(lesion_model, condition, match):
    gen = load_generator(lesion_model["bundle"])
    with pytest.raises(ConditionError, match=match):
        generate(gen, 1, steps=2, condition=condition)


def test_bundle_records_columns_encodings_and_training_counts_but_no_subject(lesion_model):
    meta = json.loads((lesion_model["bundle"] / "configs" / "metadata.json").read_text())
    cond = meta["conditioning"]
    assert [c["name"] for c in cond["columns"]] == ["lesion", "age"]
    assert cond["columns"][0]["levels"] == ["no", "yes"] and cond["columns"][1]["range"] == [18, 90]
    assert cond["dim"] == 4 and "one-hot" in cond["encoding"]
    counts = meta["provenance"]["training_conditions"]["lesion"]
    assert counts["no"] + counts["yes"] == meta["provenance"]["training_conditions"]["scans"] >= 10
    assert "sub-0" not in json.dumps(meta)


def test_an_unconditioned_model_refuses_a_condition(tmp_path):
    from medgen.models.bundle import Generator

    gen = Generator.__new__(Generator)
    gen.conditions = None
    gen.path = tmp_path / "generator"
    with pytest.raises(ConditionError, match="trained without conditions"):
        generate(gen, 1, condition={"sex": "F"})


def test_condition_dropout_hides_whole_conditions_and_single_columns():
    from medgen.config import ConditioningConfig, CovariateColumn

    space = ConditionSpace(tuple(CovariateColumn.model_validate(c) for c in COLUMNS))
    v = torch.stack([space.encode({"lesion": "yes", "age": 54})] * 4)
    assert v[0].tolist() == [0.0, 1.0, 1.0, 0.0]
    cfg = ConditioningConfig(columns=["lesion", "age"], dropout=0.5, column_dropout=0.5)
    out = drop_conditions(
        space,
        v,
        torch.tensor([0.1, 0.9, 0.9, 0.9]),
        torch.tensor([[0.9, 0.9], [0.1, 0.9], [0.9, 0.1], [0.9, 0.9]]),
        cfg,
    )
    assert out[0].abs().sum() == 0  # all dropped: the unconditional vector
    assert out[1].tolist() == [0.0, 0.0, 1.0, 0.0]  # lesion hidden, age kept
    assert out[2].tolist() == [0.0, 1.0, 0.0, 0.0]  # age hidden
    assert out[3].tolist() == v[3].tolist()


def test_config_refuses_conditioning_it_cannot_build():
    with pytest.raises(ValueError, match="not declared in the covariates section"):
        conditioned_config(conditioning={"columns": ["sex"]})
    with pytest.raises(ValueError, match="at least one diffusion.attention_levels"):
        conditioned_config(attention_levels=[False, False])


def test_cli_generates_to_order_and_refuses_an_unknown_level(lesion_model, tmp_path, capsys):
    from medgen.cli import main

    out, model = tmp_path / "syn", str(lesion_model["bundle"])
    asked = ["--condition", "lesion=yes", "--condition", "age=61", "--guidance", "2"]
    assert main(["generate", model, "--n", "2", "--steps", "3", "--out", str(out), *asked]) == 0
    record = json.loads((out / "synthesis.json").read_text())
    assert record["condition"] == {"lesion": "yes", "age": 61.0} and record["guidance"] == 2.0
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["generate", model, "--n", "1", "--steps", "2", "--out", str(bad), "--condition", "lesion=big"]) == 1
    err = capsys.readouterr().err
    assert "[condition]" in err and "levels: no, yes" in err and not bad.exists()
    assert parse_condition_args(["age=70", "sex=F"]) == {"age": "70", "sex": "F"}
    with pytest.raises(ConditionError, match="COLUMN=VALUE"):
        parse_condition_args(["age"])


def test_the_quality_report_reads_the_asked_condition_back(lesion_model, tmp_path):
    from medgen.config import QualityConfig
    from medgen.quality.validate import validate_run
    from medgen.synthesis.runs import synthesize

    run = tmp_path / "run"
    synthesize(lesion_model["bundle"], 4, run, steps=10, condition={"lesion": "yes"}, guidance=3.0)
    quality = QualityConfig.model_validate({"encoder": {"steps": 20}, "heldout_splits": ["test"]})
    validate_run(run, quality=quality)
    report = json.loads((run / "quality" / "report.json").read_text())
    c = report["utility"]["conditions"]["lesion"]
    assert c["metric"] == "accuracy" and c["asked"] == "yes" and c["n_synthetic"] == 4 and c["chance"] == 0.5
    assert c["heldout_real"] is not None and c["synthetic"] is not None
    assert "Condition lesion=yes" in (run / "quality" / "report.md").read_text()
