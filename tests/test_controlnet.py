"""ControlNet on the trained generator (issue 14, item 3): samples follow a given label map.
One tiny model (16^3, ~1 min on CPU): 20 heads, each with a bright lesion at a random place and
its BIDS dseg, ingested as pairs; then asked for lesions at places it never saw."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from test_ldm import TINY, blobs

from medgen import ingest
from medgen.config import PipelineConfig
from medgen.errors import ConditionError
from medgen.models.bundle import load_generator
from medgen.models.controlnet import load_controlnet
from medgen.models.folder import BundleError
from medgen.synthesis.sampler import generate
from medgen.synthesis.train_autoencoder import train_autoencoder
from medgen.synthesis.train_controlnet import train_controlnet
from medgen.synthesis.train_diffusion import train_diffusion

torch.set_num_threads(1)


def controlnet_config() -> PipelineConfig:
    raw = json.loads(json.dumps(TINY))
    raw["data"]["splits"] = ["train", "val"]  # test stays held out, for the quality gate
    raw["autoencoder"]["train"].update(steps=300, checkpoint_every=10000, log_every=100)
    raw["diffusion"]["train"].update(steps=400, batch_size=4, lr=3e-3, checkpoint_every=10000, log_every=100)
    raw["controlnet"] = {
        "embedding_channels": [8, 16],
        "train": {"steps": 500, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 10000, "log_every": 100},
    }
    return PipelineConfig.model_validate(raw)


def sphere(shape, centre, r2) -> np.ndarray:
    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    return ((g - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= r2


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    rng = np.random.default_rng(0)
    der = root / "src" / "derivatives" / "seg"
    der.mkdir(parents=True)
    (der / "dseg.tsv").write_text("index\tname\n1\tlesion\n")
    for i in range(20):
        m = sphere((20, 20, 20), rng.integers(6, 14, 3), 9)
        (root / "src" / f"sub-{i:02d}").mkdir()
        (der / f"sub-{i:02d}").mkdir()
        aff = np.diag([4.0, 4, 4, 1])
        img = np.where(m, 1800.0, blobs(i)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, aff), root / "src" / f"sub-{i:02d}" / f"sub-{i:02d}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(m.astype(np.uint8), aff), der / f"sub-{i:02d}" / f"sub-{i:02d}_dseg.nii.gz")
    report = ingest(root / "src", root / "ing")
    assert len(report.accepted) == 20 and all(r["status"] == "accepted" for r in report.labels)
    assert any(r["split"] == "test" for r in report.accepted)
    cfg = controlnet_config()
    run = root / "run"
    train_autoencoder(cfg, report.manifest_path, run, device="cpu")
    generator = train_diffusion(cfg, report.manifest_path, run, device="cpu")
    controlnet = train_controlnet(cfg, report.manifest_path, run, device="cpu")
    return {"generator": generator, "controlnet": controlnet, "root": root}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_samples_follow_a_new_mask_far_better_than_unconditioned_samples(pairs):
    gen = load_generator(pairs["generator"])
    cn = load_controlnet(pairs["controlnet"], gen)
    rng = np.random.default_rng(5)
    masks = [sphere((16, 16, 16), rng.integers(5, 11, 3), 7).astype(np.uint8) for _ in range(8)]
    kw = dict(steps=10, seed=2, batch_size=8)
    followed = generate(gen, 8, labels=masks, controlnet=cn, **kw)
    free = generate(gen, 8, **kw)
    # the lesion is the brightest tissue: segment each sample by the model-space intensity
    seg = [gen.intensity.to_model(v.data) > 0.8 for v in followed]
    base = [gen.intensity.to_model(v.data) > 0.8 for v in free]
    d_follow = np.mean([dice(s, m.astype(bool)) for s, m in zip(seg, masks)])
    d_free = np.mean([dice(s, m.astype(bool)) for s, m in zip(base, masks)])
    assert d_follow > 0.3 and d_follow > d_free + 0.2, (d_follow, d_free)


def test_mask_guidance_zero_is_the_plain_generator_and_more_follows_the_mask_harder(pairs):
    """Mask guidance m: out_0 + m (out_cn - out_0). m = 0 must be exactly the generator without
    the ControlNet (same seed, same samples); m = 3 must follow the mask at least as well as m = 1."""
    gen = load_generator(pairs["generator"])
    cn = load_controlnet(pairs["controlnet"], gen)
    rng = np.random.default_rng(6)
    masks = [sphere((16, 16, 16), rng.integers(5, 11, 3), 7).astype(np.uint8) for _ in range(8)]
    kw = dict(steps=10, seed=3, batch_size=8)
    free = generate(gen, 8, **kw)
    off = generate(gen, 8, labels=masks, controlnet=cn, mask_guidance=0.0, **kw)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(free, off))
    d = {}
    for m in (1.0, 3.0):
        vols = generate(gen, 8, labels=masks, controlnet=cn, mask_guidance=m, **kw)
        d[m] = np.mean([dice(gen.intensity.to_model(v.data) > 0.8, k.astype(bool)) for v, k in zip(vols, masks)])
    assert d[3.0] >= d[1.0], d
    with pytest.raises(ConditionError, match="mask guidance"):
        generate(gen, 1, labels=masks[0], controlnet=cn, mask_guidance=-1.0, steps=2)


def test_controlnet_bundle_records_its_labels_and_generator(pairs):
    meta = json.loads((pairs["controlnet"] / "configs" / "metadata.json").read_text())
    assert meta["labels"]["values"] == [1] and meta["labels"]["table"] == {"1": "lesion"}
    from medgen.provenance import model_folder_sha256

    assert meta["generator_sha256"] == model_folder_sha256(pairs["generator"])


def test_masks_the_controlnet_cannot_read_are_refused(pairs):
    gen = load_generator(pairs["generator"])
    cn = load_controlnet(pairs["controlnet"], gen)
    m = np.zeros((16, 16, 16), np.uint8)
    m[4:8, 4:8, 4:8] = 3
    with pytest.raises(
        ConditionError, match=r"label\(s\) \[3\] were not in the ControlNet's training labels: 1 \(lesion\)"
    ):
        generate(gen, 1, steps=2, labels=m, controlnet=cn)
    with pytest.raises(ConditionError, match="is not the model's grid"):
        generate(gen, 1, steps=2, labels=np.zeros((8, 8, 8), np.uint8), controlnet=cn)
    with pytest.raises(ConditionError, match="give both"):
        generate(gen, 1, steps=2, labels=m)
    with pytest.raises(ConditionError, match="2 label maps for 3 samples"):
        generate(gen, 3, steps=2, labels=[m, m], controlnet=cn)


def test_a_controlnet_from_another_generator_is_refused(pairs, tmp_path):
    copy = tmp_path / "cn"
    shutil.copytree(pairs["controlnet"], copy)
    meta_path = copy / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["generator_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="trained on another generator"):
        load_controlnet(copy, load_generator(pairs["generator"]))


def test_training_a_controlnet_without_label_maps_says_so(tmp_path):
    from medgen.errors import MedgenError

    src = tmp_path / "src" / "sub-01"
    src.mkdir(parents=True)
    nib.save(nib.Nifti1Image(blobs(0), np.diag([4.0, 4, 4, 1])), src / "sub-01_T1w.nii.gz")
    report = ingest(tmp_path / "src", tmp_path / "ing")
    with pytest.raises(MedgenError, match="no training scan has a paired label map"):
        train_controlnet(controlnet_config(), report.manifest_path, tmp_path / "run", device="cpu")


def test_a_weighted_loss_on_a_label_no_map_has_is_refused(pairs, tmp_path):
    from medgen.errors import MedgenError

    cfg = controlnet_config()
    assert cfg.controlnet is not None
    cfg = cfg.model_copy(
        update={"controlnet": cfg.controlnet.model_copy(update={"weighted_loss_labels": [7], "weighted_loss": 50.0})}
    )
    run = tmp_path / "run"
    shutil.copytree(pairs["generator"], run / "generator")
    manifest = pairs["root"] / "ing" / "manifest.csv"
    with pytest.raises(
        MedgenError, match=r"weighted_loss_labels \[7\]: no training label map has them \(labels: \[1\]\)"
    ):
        train_controlnet(cfg, manifest, run, device="cpu")
    assert not (run / "controlnet").exists()


LENIENT = {
    "encoder": {"steps": 20},
    "heldout_splits": ["test"],
    "gate": {
        "intensity_tolerance": 100.0,
        "foreground_tolerance": 100.0,
        "histogram_factor": 1000.0,
        "radiomics_factor": None,
        "min_pass_fraction": 0.0,
    },
}


@pytest.fixture(scope="module")
def pair_run(pairs, tmp_path_factory):
    """Two samples made to follow one lesion mask, validated with a gate loose enough for a 1-minute
    model (the gate is tested elsewhere; here what matters is what export writes for pairs)."""
    from medgen.config import QualityConfig
    from medgen.quality.validate import validate_run
    from medgen.synthesis.runs import synthesize

    root = tmp_path_factory.mktemp("pairs")
    mask = sphere((16, 16, 16), (8, 6, 9), 7).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, np.diag([4.0, 4, 4, 1])), root / "mask_dseg.nii.gz")
    run = root / "run"
    record = synthesize(
        pairs["generator"],
        2,
        run,
        steps=5,
        labels=root / "mask_dseg.nii.gz",
        controlnet=pairs["controlnet"],
        mask_guidance=2.0,
    )
    assert record.label_table == {"1": "lesion"} and all(v.label_file for v in record.volumes)
    assert record.mask_guidance == 2.0
    verdict = validate_run(run, quality=QualityConfig.model_validate(LENIENT))
    return run, mask, verdict


def test_nifti_export_writes_image_and_dseg_pairs_on_one_grid(pair_run, tmp_path):
    from medgen.export.exporter import export_run

    run, mask, verdict = pair_run
    res = export_run(run, tmp_path / "nii", "nifti")
    assert res.exported, verdict
    name = res.exported[0]
    img = nib.load(tmp_path / "nii" / f"{name}.nii.gz")
    lab = nib.load(tmp_path / "nii" / f"{name}_dseg.nii.gz")
    np.testing.assert_array_equal(lab.affine, img.affine)
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), mask)
    assert (tmp_path / "nii" / f"{name}_dseg.tsv").read_text() == "index\tname\n1\tlesion\n"
    report = json.loads((run / "quality" / "report.json").read_text())
    seg = report["utility"]["segmentation"]
    assert seg["values"] == ["1"] and seg["n_synthetic"] == 2 and seg["n_real_test"] >= 1
    assert set(seg) >= {"dice_real", "dice_synthetic", "dice_real+synthetic", "mask_adherence_mean"}
    assert "## Utility" in (run / "quality" / "report.md").read_text()
    prov = json.loads((tmp_path / "nii" / f"{name}.provenance.json").read_text())
    assert prov["sampling"]["labels"]["table"] == {"1": "lesion"}
    assert prov["sampling"]["labels"]["mask_guidance"] == 2.0
    assert f"{name}_dseg.nii.gz" in prov["export"]["files"]


def test_dicom_export_writes_a_seg_that_passes_dciodvfy_and_lands_on_its_series(pair_run, tmp_path):
    import highdicom as hd
    import pydicom
    from test_dicom_export import ERROR, dicom3tools
    from test_dicom_export import run as run_tool

    from medgen.export.exporter import export_run

    dciodvfy, _ = dicom3tools()
    run, mask, _ = pair_run
    res = export_run(run, tmp_path / "dcm", "dicom")
    name = res.exported[0]
    folder = tmp_path / "dcm" / name
    seg_path = folder / "seg.dcm"
    rc, out = run_tool([dciodvfy, str(seg_path)])
    assert not ERROR.findall(out), out
    seg = hd.seg.segread(str(seg_path))
    images = sorted(p for p in folder.glob("*.dcm") if p.name != "seg.dcm")
    first = pydicom.dcmread(images[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.StudyInstanceUID == first.StudyInstanceUID and str(seg.PatientID) == "SYNTHETIC"
    assert seg.PatientIdentityRemoved == "YES"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"]
    # highdicom reads it back onto the right image: ingest the export, and the SEG pairs with the
    # series voxel for voxel (the same mask the sample followed, in the ingested geometry)
    report = ingest(tmp_path / "dcm", tmp_path / "re")
    rows = [r for r in report.labels if r["status"] == "accepted"]
    assert len(rows) == len(res.exported) == len(report.accepted)
    for row in rows:
        scan_path = next(r["output_path"] for r in report.accepted if r["scan_id"] == row["scan_id"])
        scan, back = nib.load(tmp_path / "re" / scan_path), nib.load(tmp_path / "re" / row["label_path"])
        np.testing.assert_allclose(back.affine, scan.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asanyarray(back.dataobj), mask)  # RAS -> DICOM LPS -> RAS: same voxels
        assert not row["notes"]  # the SEG's grid is the series' grid: no resampling


def test_weighted_loss_makes_the_listed_labels_count_more():
    """MAISI's ControlNet weighted loss: latent voxels whose footprint holds a listed label weigh
    `weighted_loss`; a label smaller than one latent voxel still counts (max-pooled)."""
    import torch

    from medgen.synthesis.train_controlnet import loss_weights
    from medgen.synthesis.train_diffusion import diffusion_loss

    labels = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    labels[0, 0, 5, 5, 5] = 3  # one voxel: inside latent voxel (1, 1, 1) of a 4x4x4 grid
    labels[1, 0, :8] = 1
    w = loss_weights(labels, [3], 50.0, (4, 4, 4))
    assert w is not None and w.shape == (2, 1, 4, 4, 4)
    assert w[0, 0, 1, 1, 1] == 50 and (w[0] == 50).sum() == 1 and (w[1] == 1).all()
    assert loss_weights(labels, [3], 1.0, (4, 4, 4)) is None and loss_weights(labels, [], 9.0, (4, 4, 4)) is None

    class Zero(torch.nn.Module):
        def forward(self, x, timesteps, **_):
            return torch.zeros_like(x)

    from monai.networks.schedulers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=100)
    z0 = torch.zeros(2, 3, 4, 4, 4)
    noise = torch.ones_like(z0)
    u = torch.full((2,), 0.5)
    plain = diffusion_loss(Zero(), sched, "ddpm", "epsilon", z0, noise, u)
    ones = diffusion_loss(Zero(), sched, "ddpm", "epsilon", z0, noise, u, weights=torch.ones(2, 1, 4, 4, 4))
    weighted = diffusion_loss(Zero(), sched, "ddpm", "epsilon", z0, noise, u, weights=w)
    assert plain == pytest.approx(1.0) and ones == pytest.approx(1.0)
    assert weighted == pytest.approx((127 + 50**2) / 128)
