"""Latent diffusion on a tiny config, CPU, seconds: training behaviour, exact resume, NaN guard,
DDP under torchrun, the generator bundle and generation determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medgen import ingest, load_volume
from medgen.config import ConfigError, PipelineConfig, load_config
from medgen.datasets.preprocess import model_affine
from medgen.models.bundle import BundleError, load_generator
from medgen.synthesis.sampler import decode, generate
from medgen.synthesis.train_autoencoder import train_autoencoder
from medgen.synthesis.train_diffusion import train_diffusion
from medgen.training.loop import Dist, Part, Trainer, TrainingDivergedError

torch.set_num_threads(1)

TINY = {
    "name": "tiny",
    "data": {
        "include": ["*"],
        "splits": ["train", "val", "test"],
        "val_splits": ["val"],
        "spacing": [4.0, 4.0, 4.0],
        "size": [16, 16, 16],
        "intensity": {"kind": "percentile", "lower": 0.0, "upper": 99.5},
    },
    "autoencoder": {
        "channels": [8, 8],
        "latent_channels": 2,
        "attention_levels": [False, False],
        "norm_num_groups": 4,
        "train": {"steps": 6, "batch_size": 2, "lr": 1e-3, "log_every": 1, "checkpoint_every": 3},
    },
    "diffusion": {
        "channels": [8, 16],
        "attention_levels": [False, True],
        "num_head_channels": 4,
        "norm_num_groups": 4,
        "train": {"steps": 6, "batch_size": 2, "lr": 1e-3, "log_every": 1, "checkpoint_every": 3, "ema_decay": 0.9},
    },
    "generate": {"steps": 5},
}


def config(**changes) -> PipelineConfig:
    raw = json.loads(json.dumps(TINY))
    for path, value in changes.items():
        node = raw
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return PipelineConfig.model_validate(raw)


def blobs(seed: int, shape=(20, 20, 20)) -> np.ndarray:
    """A smooth random 'head': an ellipsoid with two inner blobs."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = rng.uniform(0.55, 0.8, 3)
    head = ((g / r[:, None, None, None]) ** 2).sum(0) < 1
    inner = sum(np.exp(-(((g - rng.uniform(-0.3, 0.3, (3, 1, 1, 1))) ** 2).sum(0)) / 0.05) for _ in range(2))
    return (head * (600 + 400 * inner)).astype(np.float32)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("ldm_src")
    for i in range(8):
        (src / f"sub-{i:02d}").mkdir()
        nib.save(
            nib.Nifti1Image(blobs(i), np.diag([4.0, 4.0, 4.0, 1.0])), src / f"sub-{i:02d}" / f"sub-{i:02d}_T1w.nii.gz"
        )
    out = src.parent / "ldm_ingest"
    report = ingest(src, out)
    assert len(report.accepted) == 8
    return report.manifest_path


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ldm_run")
    train_autoencoder(config(), manifest, run, device="cpu")
    return train_diffusion(config(), manifest, run, device="cpu")


def losses(path: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]


def test_configs_refuse_sizes_the_networks_cannot_take(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        config(data__size=[18, 16, 16])
    bad = json.loads(json.dumps(TINY))
    bad["autoencoder"]["chanels"] = [8, 8]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="autoencoder.chanels"):
        load_config(tmp_path / "c.yaml")
    for name in ("demo", "brain_mri", "ct"):
        assert load_config(f"configs/{name}.yaml").autoencoder is not None


def test_autoencoder_loss_falls_and_run_folder_has_logs(manifest, tmp_path):
    cfg = config(autoencoder__train__steps=40)
    run = train_autoencoder(cfg, manifest, tmp_path, device="cpu")
    l1 = losses(run / "metrics.jsonl", "loss/l1")
    assert len(l1) == 40 and np.mean(l1[-5:]) < 0.7 * np.mean(l1[:5])
    stage = json.loads((run / "stage.json").read_text())
    assert stage["scale_factor"] > 0 and np.isfinite(stage["metrics"]["psnr"])
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").iterdir())


def test_killed_and_resumed_run_equals_uninterrupted_run(manifest, tmp_path):
    cfg = config(
        autoencoder__adv_weight=0.1,
        autoencoder__adv_start=2,
        autoencoder__disc_layers=1,
        autoencoder__train__ema_decay=0.9,
        autoencoder__train__steps=8,
    )
    whole = train_autoencoder(cfg, manifest, tmp_path / "whole", device="cpu")
    train_autoencoder(cfg, manifest, tmp_path / "resumed", device="cpu", stop_after=5)
    assert not (tmp_path / "resumed" / "autoencoder" / "stage.json").exists()
    resumed = train_autoencoder(cfg, manifest, tmp_path / "resumed", device="cpu")
    a = json.loads((whole / "stage.json").read_text())
    b = json.loads((resumed / "stage.json").read_text())
    assert a["weights_sha256"] == b["weights_sha256"]
    sa = torch.load(whole / "checkpoint.pt", weights_only=True)
    sb = torch.load(resumed / "checkpoint.pt", weights_only=True)
    for name in ("autoencoder", "discriminator"):
        for k, v in sa["parts"][name]["model"].items():
            assert torch.equal(v, sb["parts"][name]["model"][k]), (name, k)


def test_diffusion_resume_is_exact_too(manifest, tmp_path):
    cfg = config()
    for run in ("whole", "resumed"):
        train_autoencoder(cfg, manifest, tmp_path / run, device="cpu")
    train_diffusion(cfg, manifest, tmp_path / "whole", device="cpu")
    train_diffusion(cfg, manifest, tmp_path / "resumed", device="cpu", stop_after=2)
    train_diffusion(cfg, manifest, tmp_path / "resumed", device="cpu")
    a = (tmp_path / "whole" / "generator" / "configs" / "metadata.json").read_text()
    b = (tmp_path / "resumed" / "generator" / "configs" / "metadata.json").read_text()
    assert json.loads(a)["files"] == json.loads(b)["files"]


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))


def _toy_trainer(tmp_path, bad_steps, nan_limit=3, steps=6):
    from medgen.config import StageTrainConfig

    model = _Toy()
    cfg = StageTrainConfig(steps=steps, nan_limit=nan_limit, log_every=1, checkpoint_every=100)

    def step_fn(ctx, x):
        loss = ((model.w - x.mean()) ** 2).sum()
        return {"toy": loss * float("nan") if ctx.step in bad_steps else loss}

    part = Part("toy", model, torch.optim.SGD(model.parameters(), lr=0.1))
    return Trainer(tmp_path, cfg, [part], step_fn, torch.zeros(4, 3), Dist()), model


def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path):
    trainer, model = _toy_trainer(tmp_path, bad_steps={2})
    assert trainer.fit() == 6
    assert trainer.nan_count == 1
    # five good SGD steps pull w from 1 towards 0; the NaN step left no trace
    assert torch.isfinite(model.w).all() and model.w.abs().max() < 1.0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["nan_skipped"] == 1.0


def test_persistent_nans_abort_with_a_clear_message(tmp_path):
    trainer, _ = _toy_trainer(tmp_path, bad_steps=set(range(100)), nan_limit=3)
    with pytest.raises(TrainingDivergedError, match="4 steps with non-finite"):
        trainer.fit()


def test_bundle_round_trip_reproduces_samples_bit_for_bit(trained):
    gen = load_generator(trained)
    a = generate(gen, 2, sampler="ddim", steps=5, seed=3)
    again = load_generator(trained)
    b = generate(again, 2, sampler="ddim", steps=5, seed=3)
    for x, y in zip(a, b):
        assert np.array_equal(x.data, y.data)
    meta = json.loads((trained / "configs" / "metadata.json").read_text())
    assert meta["scale_factor"] == gen.scale_factor and meta["diffusion"]["scheduler"] == "ddpm"
    assert meta["provenance"]["training_manifest_sha256"] and len(meta["provenance"]["train_items"]) == 8


def test_altered_bundle_is_refused(trained, tmp_path):
    import shutil

    copy = tmp_path / "g"
    shutil.copytree(trained, copy)
    with open(copy / "models" / "diffusion.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match"):
        load_generator(copy)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_sample_whatever_the_batch_size(trained, sampler):
    gen = load_generator(trained)
    # DDPM runs its whole trained chain (fewer steps are refused, below); DDIM takes a few
    steps = gen.diffusion_cfg.num_train_timesteps if sampler == "ddpm" else 5
    n = 2 if sampler == "ddpm" else 3
    one = generate(gen, n, sampler=sampler, steps=steps, seed=11, batch_size=1)
    three = generate(gen, n, sampler=sampler, steps=steps, seed=11, batch_size=n)
    for x, y in zip(one, three):
        np.testing.assert_allclose(x.data, y.data, rtol=0, atol=1e-3 * (np.abs(x.data).max() + 1))
    assert not np.allclose(one[0].data, one[1].data)


def test_ddpm_with_fewer_steps_than_trained_is_refused_and_the_default_is_ddim(trained):
    from medgen.errors import SamplingError

    gen = load_generator(trained)
    assert gen.diffusion_cfg.scheduler == "ddpm"
    with pytest.raises(SamplingError, match="DDPM samples with all"):
        generate(gen, 1, sampler="ddpm", steps=50)
    (vol,) = generate(gen, 1, steps=3)
    assert "ddim-3" in vol.meta.notes[0]


def test_rflow_model_trains_and_samples_deterministically(manifest, tmp_path):
    cfg = config(diffusion__scheduler="rflow")
    train_autoencoder(cfg, manifest, tmp_path, device="cpu")
    gen = load_generator(train_diffusion(cfg, manifest, tmp_path, device="cpu"))
    a = generate(gen, 2, steps=4, seed=1, batch_size=2)
    b = generate(gen, 2, steps=4, seed=1, batch_size=1)
    np.testing.assert_allclose(a[1].data, b[1].data, atol=1e-3 * (np.abs(a[1].data).max() + 1))
    with pytest.raises(ValueError, match="cannot sample with ddim"):
        generate(gen, 1, sampler="ddim", steps=2)


def test_generated_volumes_have_the_models_geometry_and_units(trained):
    gen = load_generator(trained)
    (vol,) = generate(gen, 1, steps=3)
    assert vol.shape == (16, 16, 16) and vol.spacing == (4.0, 4.0, 4.0)
    np.testing.assert_allclose(vol.affine, model_affine(gen.data_cfg))
    assert gen.intensity.in_hi > 100  # back in source units, not [0, 1]
    assert vol.data.max() > 10


def test_ct_window_maps_back_to_hounsfield_units():
    from medgen.datasets.preprocess import IntensityMap

    m = IntensityMap("ct_window", -1000.0, 1000.0, 0.0, 1.0)
    hu = np.array([-1000.0, 0.0, 40.0, 1000.0])
    np.testing.assert_allclose(m.to_units(m.to_model(hu)), hu)
    assert m.to_units(np.array([0.0]))[0] == -1000.0


def test_sliding_window_decoding_matches_whole_decoding(trained):
    gen = load_generator(trained)
    z = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(0))
    whole = decode(gen, z)
    windows = decode(gen, z, roi=(6, 6, 6))
    assert windows.shape == whole.shape and torch.isfinite(windows).all()
    corr = np.corrcoef(whole.flatten().numpy(), windows.flatten().numpy())[0, 1]
    assert corr > 0.9


def test_preprocessing_cache_is_keyed_by_content_and_transform(manifest, tmp_path):
    from medgen.datasets.prepared import manifest_items, prepare

    cfg = config().data
    items = manifest_items(manifest, cfg)
    prepare(items, cfg, tmp_path)
    prepare(items, cfg, tmp_path)
    (first,) = list(tmp_path.iterdir())
    assert len(list(first.iterdir())) == len(items)
    changed = dict(items[0], sha256="0" * 64)  # what a changed source file looks like
    prepare([changed] + items[1:], cfg, tmp_path)
    assert len(list(first.iterdir())) == len(items) + 1
    prepare(items, config(data__spacing=[5.0, 5.0, 5.0]).data, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_torchrun_two_ranks_hold_equal_weights(manifest, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(TINY))))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "medgen",
        "train",
        "autoencoder",
        "--config",
        str(cfg),
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run" / "autoencoder"
    r0, r1 = (run / "weights_rank0.sha256").read_text(), (run / "weights_rank1.sha256").read_text()
    assert r0 == r1
    assert json.loads((run / "stage.json").read_text())["weights_sha256"] == r0


def test_cli_trains_and_generates(manifest, tmp_path):
    from typer.testing import CliRunner

    from medgen.cli import app

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(TINY))))
    runner = CliRunner(env={"COLUMNS": "200"})
    for stage in ("autoencoder", "diffusion"):
        r = runner.invoke(
            app, ["train", stage, "-c", str(cfg), "-m", str(manifest), "-o", str(tmp_path / "run"), "--device", "cpu"]
        )
        assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["generate", str(tmp_path / "run" / "generator"), "--n", "2", "--out", str(tmp_path / "syn"), "--steps", "3"],
    )
    assert r.exit_code == 0, r.output
    vols = [load_volume(p) for p in sorted((tmp_path / "syn" / "volumes").glob("*.nii.gz"))]
    assert len(vols) == 2 and vols[0].shape == (16, 16, 16)
    record = json.loads((tmp_path / "syn" / "synthesis.json").read_text())
    assert record["steps"] == 3 and [v["name"] for v in record["volumes"]] == ["synthetic_0000", "synthetic_0001"]


def test_preprocessing_with_spawned_workers_matches_serial(manifest, tmp_path):
    from medgen.datasets.prepared import manifest_items, prepare

    cfg = config().data
    items = manifest_items(manifest, cfg)
    serial = prepare(items, cfg, tmp_path / "a")
    parallel = prepare(items, cfg.model_copy(update={"num_workers": 2}), tmp_path / "b")
    assert torch.equal(serial.images, parallel.images)
    assert serial.intensity == parallel.intensity
