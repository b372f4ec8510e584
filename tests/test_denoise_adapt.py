"""Self-supervised fine-tuning on noisy scans alone, and progress on large volumes (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from medgen.demo_data import phantom_mr
from medgen.denoising.adapt import adapt_to_scan, patch_shape
from medgen.denoising.denoiser import _Net, denoise_detailed
from medgen.denoising.normalise import normalise
from medgen.models.score import load_score_model


@pytest.fixture(scope="module")
def noisy_phantom():
    clean = phantom_mr((48, 48, 40)).astype(np.float32)
    clean = clean / np.percentile(clean, 99.5)
    sigma = 0.05
    noisy = (clean + sigma * np.random.default_rng(7).standard_normal(clean.shape)).astype(np.float32)
    return clean, noisy, sigma


def test_fine_tuning_on_the_noisy_scan_alone_lowers_its_true_error(noisy_phantom):
    """The loss never sees `clean`; the true error against it must fall, and the shipped model
    must be left as it was."""
    clean, noisy, sigma = noisy_phantom
    base = load_score_model()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    y, lo, hi = normalise(noisy, sigma)
    adapted, losses = adapt_to_scan(base, y, sigma / (hi - lo), steps=30, seed=0)

    def mse(model):
        out = denoise_detailed(noisy, model=model, sigma=sigma, device="cpu", tune=False).volume.data
        return float(np.mean((out - clean) ** 2))

    m0, m1 = mse(base), mse(adapted)
    assert 10 * np.log10(m0 / m1) > 1.0, (m0, m1)  # measured +2.2 dB
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    assert all((v == before[k]).all() for k, v in base.unet.state_dict().items())


def test_denoise_adapt_keeps_the_model_sure_expects_better_and_says_so(noisy_phantom):
    clean, noisy, sigma = noisy_phantom
    r = denoise_detailed(noisy, sigma=sigma, device="cpu", adapt=20)
    plain = denoise_detailed(noisy, sigma=sigma, device="cpu")
    assert any("adapted to this scan: 20 steps" in n for n in r.notes)
    assert r.risk is not None and plain.risk is not None
    assert r.risk.mse_output <= plain.risk.mse_output  # never the worse of the two by SURE
    assert np.mean((r.volume.data - clean) ** 2) < np.mean((plain.volume.data - clean) ** 2)
    with pytest.raises(Exception, match="adapt"):
        denoise_detailed(noisy, sigma=sigma, device="cpu", adapt=-1)


@pytest.mark.parametrize("rho", [(0.2, 0.3), (0.2, 1.0, 0.0), (float("nan"), 0.0, 0.0)])
def test_a_bad_noise_correlation_is_refused_clearly(noisy_phantom, rho):
    from medgen.errors import DenoiseError

    with pytest.raises(DenoiseError, match="noise_correlation must be three lag-1 correlations"):
        denoise_detailed(noisy_phantom[1], sigma=0.05, device="cpu", noise_correlation=rho)


def test_patches_narrow_to_a_thin_scan():
    assert patch_shape([(2, 256, 256), (40, 40, 40)], (32, 32, 32), 4) == (4, 32, 32)
    assert patch_shape([(48, 48, 40)], (32, 32, 32), 4) == (32, 32, 32)


def test_progress_counts_every_window_it_runs():
    """The planned total is what sliding_window_inference really runs, so a bar ends at 100 %."""
    sm = load_score_model()
    seen: list[tuple[int, int]] = []
    vol = np.random.default_rng(0).random((70, 130, 20)).astype(np.float32)
    r = denoise_detailed(vol, sigma=0.05, device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert r.volume.shape == vol.shape
    total = seen[-1][1]
    assert seen[-1][0] == total and total == _Net(sm, None, 64, 4).plan(vol.shape, 2) and total > 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_cli_fine_tunes_the_shipped_model_on_a_noisy_collection(tmp_path):
    import json

    import yaml
    from conftest import ingest_phantom_subjects
    from typer.testing import CliRunner

    from medgen.cli import app

    report = ingest_phantom_subjects(tmp_path, shape=(24, 24, 28), noise=0.05)
    cfg = {
        "data": {
            "splits": ["train", "val", "test"],
            "spacing": [1, 1, 1],
            "size": [24, 24, 24],
            "intensity": {"kind": "percentile", "lower": 0, "upper": 99.5},
        },
        "self_supervised": {"train": {"steps": 3, "batch_size": 2, "log_every": 1}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    args = ["train", "denoiser", "--self-supervised", "-c", str(tmp_path / "c.yaml")]
    args += ["-m", str(report.manifest_path), "-o", str(tmp_path / "run"), "--device", "cpu"]
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert r.exit_code == 0, r.output
    sm = load_score_model(tmp_path / "run" / "score_model")
    prov = sm.metadata["provenance"]
    assert prov["steps"] == 3 and prov["init"]["name"] == "denoiser_default"
    assert len(prov["training_data"]) == 3 and all(0.03 < d["sigma"] < 0.08 for d in prov["training_data"])
    text = json.dumps(sm.metadata)
    assert str(tmp_path) not in text and "/tmp/" not in text  # named, never by a machine path
    shipped = load_score_model()
    assert any((a != b).any() for a, b in zip(sm.unet.state_dict().values(), shipped.unet.state_dict().values()))


def test_a_zero_filled_background_is_not_noise_and_stays_zero():
    """A skull-stripped / scanner-masked scan: 60 % of voxels exactly 0. The sigma estimate must
    not collapse to 0, SURE must cover the measured voxels only, and the background stays 0."""
    from medgen.denoising.denoiser import estimate_sigma

    clean = phantom_mr((48, 48, 40)).astype(np.float32)
    clean = clean / np.percentile(clean, 99.5)
    rng = np.random.default_rng(3)
    noisy = clean + 0.05 * rng.standard_normal(clean.shape).astype(np.float32)
    inside = np.zeros(clean.shape, bool)
    inside[10:38, 10:38, 8:32] = True
    noisy[~inside] = 0.0
    assert 0.04 < estimate_sigma(noisy) < 0.06
    r = denoise_detailed(noisy, sigma=0.05, device="cpu")
    assert (r.volume.data[~inside] == 0).all()
    assert r.risk is not None and "zero-filled" in r.risk.covers
    true = float(np.mean((r.volume.data - clean)[inside] ** 2))
    assert abs(r.risk.mse_output - true) / true < 0.15, (r.risk.mse_output, true)


def test_sigma_from_two_repeats_ignores_the_anatomy_and_what_moved():
    from medgen import estimate_sigma_from_repeats

    rng = np.random.default_rng(4)
    anatomy = rng.random((40, 40, 30)).astype(np.float32)  # all texture: a single-scan MAD would fail
    a = anatomy + 0.03 * rng.standard_normal(anatomy.shape)
    b = anatomy + 0.03 * rng.standard_normal(anatomy.shape)
    b[:2] += 0.5  # two slices (5 %) moved between the two acquisitions
    assert estimate_sigma_from_repeats(a, b) == pytest.approx(0.03, rel=0.1)  # the plain SD: 0.08
    with pytest.raises(Exception, match="one shape"):
        estimate_sigma_from_repeats(a, b[:-1])


def test_correlated_noise_is_measured_from_repeats_and_sure_holds_for_it():
    """Noise with in-plane lag-1 correlation (as the real EPI's): correlation_from_repeats finds it,
    and SURE with that correlation tracks the true error where white-noise SURE does not."""
    from medgen.denoising.correlated import color, correlation_from_repeats

    rho = (0.2, 0.35, 0.0)
    clean = phantom_mr((48, 48, 40)).astype(np.float32)
    clean = clean / np.percentile(clean, 99.5)
    rng = np.random.default_rng(11)
    sigma = 0.06
    a = clean + sigma * color(rng.standard_normal(clean.shape), rho).astype(np.float32)
    b = clean + sigma * color(rng.standard_normal(clean.shape), rho).astype(np.float32)
    found = correlation_from_repeats(a, b)
    assert np.allclose(found, rho, atol=0.03), found
    assert np.std(a - clean) == pytest.approx(sigma, rel=0.03)  # coloured, still of variance sigma^2
    white = denoise_detailed(a, sigma=sigma, device="cpu", strengths=(1.0, 1.5, 2.0))
    corr = denoise_detailed(a, sigma=sigma, device="cpu", noise_correlation=found)
    assert white.risk is not None and corr.risk is not None and "correlated" in corr.risk.covers
    true_white = float(np.mean((white.volume.data - clean) ** 2))
    true_corr = float(np.mean((corr.volume.data - clean) ** 2))
    assert abs(corr.risk.mse_output - true_corr) / true_corr < 0.15, (corr.risk.mse_output, true_corr)
    # white-noise SURE is fooled (measured: 25 % low), the correlated one is not
    assert abs(white.risk.mse_output - true_white) / true_white > 2 * abs(corr.risk.mse_output - true_corr) / true_corr
    assert true_corr <= true_white * 1.02, (true_corr, true_white)


def test_cli_measures_sigma_from_a_repeat_and_refuses_one_on_another_grid(tmp_path):
    import nibabel as nib
    from typer.testing import CliRunner

    from medgen.cli import app

    clean = phantom_mr((40, 40, 32)).astype(np.float32) * 1000
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        noisy = clean + 40.0 * rng.standard_normal(clean.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(noisy, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(clean[:-2], np.eye(4)), tmp_path / "other.nii.gz")
    run = CliRunner(env={"COLUMNS": "200"}).invoke
    r = run(
        app,
        [
            "denoise",
            str(tmp_path / "a.nii.gz"),
            "--repeat",
            str(tmp_path / "b.nii.gz"),
            "--out",
            str(tmp_path / "o.nii.gz"),
        ],
    )
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("sigma "))
    assert "from the repeat" in line and 36 < float(line.split()[1]) < 44, line
    assert (tmp_path / "o.nii.gz").exists()
    r = run(
        app,
        [
            "denoise",
            str(tmp_path / "a.nii.gz"),
            "--repeat",
            str(tmp_path / "other.nii.gz"),
            "--out",
            str(tmp_path / "p.nii.gz"),
        ],
    )
    assert r.exit_code != 0 and not (tmp_path / "p.nii.gz").exists()


def test_training_augmentation_is_seeded_varied_and_keeps_clean_patches_plausible():
    import torch

    from medgen.config import DenoiseAugmentConfig
    from medgen.denoising.augment import augment
    from medgen.training.loop import StepContext, step_generator

    def ctx(step):
        return StepContext(step, 0, step_generator(0, step, 0, 0, torch.device("cpu")), torch.device("cpu"))

    x = torch.rand(6, 1, 16, 16, 16)
    cfg = DenoiseAugmentConfig(p=1.0, invert=0.5)
    a, b, c = augment(x, cfg, ctx(3)), augment(x, cfg, ctx(3)), augment(x, cfg, ctx(4))
    assert torch.equal(a, b) and not torch.equal(a, c)  # the step's generator decides: exact resume holds
    assert a.shape == x.shape and torch.isfinite(a).all() and (a >= 0).all() and a.max() < 2.5
    assert (a - x).abs().mean() > 0.02
    assert torch.equal(augment(x, DenoiseAugmentConfig(p=0.0), ctx(3)), x)
