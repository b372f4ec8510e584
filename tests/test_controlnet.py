"""ControlNet on the trained generator (issue 14, item 3): samples follow a given label map.
One tiny model (16^3, ~1 min on CPU): 16 heads, each with a bright lesion at a random place and
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
    for i in range(16):
        m = sphere((20, 20, 20), rng.integers(6, 14, 3), 9)
        (root / "src" / f"sub-{i:02d}").mkdir()
        (der / f"sub-{i:02d}").mkdir()
        aff = np.diag([4.0, 4, 4, 1])
        img = np.where(m, 1800.0, blobs(i)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, aff), root / "src" / f"sub-{i:02d}" / f"sub-{i:02d}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(m.astype(np.uint8), aff), der / f"sub-{i:02d}" / f"sub-{i:02d}_dseg.nii.gz")
    report = ingest(root / "src", root / "ing")
    assert len(report.accepted) == 16 and all(r["status"] == "accepted" for r in report.labels)
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
