"""Denoising with the shipped default score model (0.7M parameters: inference in seconds on CPU),
and the score-model training machinery on a tiny config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgen.config import DenoiserConfig
from medgen.denoising.denoiser import DenoiseError, denoise, denoise_detailed, estimate_sigma
from medgen.errors import EmptyVolumeError, FourDimensionalError, InvalidValuesError, NotAVolumeError
from medgen.io.nifti import write_nifti
from medgen.models.score import default_model_path, load_score_model
from medgen.volume import Volume, VolumeMeta

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """The 3D MR Shepp-Logan phantom: held out from the default model's training data."""
    import phantominator

    m0, _, _ = phantominator.mr_shepp_logan((48, 48, 48), zlims=(-0.8, 0.8))
    return (np.asarray(m0) / np.percentile(m0, 99.5)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return load_score_model(device="cpu")


def psnr(a, b):
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def test_the_default_model_ships_small_and_says_how_it_was_made(model):
    files = list(default_model_path().rglob("*.pt"))
    assert len(files) == 1 and files[0].stat().st_size < 5e6
    prov = model.metadata["provenance"]
    assert (
        "train_default_denoiser.py" in prov["command"]
        and prov["seed"] == 0
        and prov["steps"] + prov.get("initialised_from", {}).get("provenance", {}).get("steps", 0) > 1000
    )
    names = [d["name"] for d in prov["training_data"]]
    assert all(len(d["sha256"]) == 64 for d in prov["training_data"])
    assert not any("shepp" in n.lower() or "anatomical" in n or "example4d" in n for n in names)
    assert any("shepp" in h.lower() for h in prov["held_out"])


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.10])
def test_estimated_sigma_is_within_20_percent(phantom, sigma):
    rng = np.random.default_rng(1)
    y = phantom + sigma * rng.standard_normal(phantom.shape).astype(np.float32)
    assert abs(estimate_sigma(y) - sigma) / sigma < 0.2
    yr = np.sqrt(
        (phantom + sigma * rng.standard_normal(phantom.shape)) ** 2 + (sigma * rng.standard_normal(phantom.shape)) ** 2
    )
    assert abs(estimate_sigma(yr, "rician") - sigma) / sigma < 0.2


@pytest.mark.parametrize("sigma", [0.05, 0.10])
def test_denoising_raises_psnr_on_a_held_out_phantom(phantom, model, sigma):
    y = phantom + sigma * np.random.default_rng(2).standard_normal(phantom.shape).astype(np.float32)
    out = denoise(y, model=model, device="cpu")  # sigma estimated from the scan
    assert psnr(out.data, phantom) > psnr(y, phantom) + 2.0


def test_a_scan_cleaner_than_the_models_range_is_barely_touched_and_warned_about(phantom, model):
    """A noise-free scan's estimated sigma is ~0: below the model's lowest level, so the correction
    is shrunk by (sigma / sigma_min)^2 instead of smoothing the scan at sigma_min."""
    from medgen.denoising.denoiser import SigmaOutOfRangeWarning

    with pytest.warns(SigmaOutOfRangeWarning, match="below the model's range"):
        clean = denoise(phantom, model=model, device="cpu")
    assert np.abs(clean.data - phantom).max() < 0.005
    assert any("below the model's range" in n for n in clean.meta.notes)
    # a user sigma at the range's lower end still denoises (the same network call, unshrunk)
    at_min = denoise(phantom, model=model, device="cpu", sigma=model.schedule.sigma_range[0])
    assert np.abs(at_min.data - phantom).max() > 4 * np.abs(clean.data - phantom).max()
    # and a sigma above the range is denoised at the range's top, with the same kind of warning
    with pytest.warns(SigmaOutOfRangeWarning, match="above the model's range"):
        r = denoise_detailed(phantom, model=model, device="cpu", sigma=0.5)
    assert any("above the model's range" in n for n in r.notes)


def test_normalisation_keeps_a_noisy_zero_background_at_zero_but_not_ct_air(phantom):
    """Training sees a clean zero background at 0; a noisy scan's negatives that noise explains
    must not shift it (lo = 0), while real negative values (CT air in HU) still set lo."""
    from medgen.denoising.normalise import normalise

    y = phantom + 0.05 * np.random.default_rng(5).standard_normal(phantom.shape).astype(np.float32)
    assert normalise(y)[1] < -0.1  # without the noise level: the 0.5th percentile, ~ -2.6 sigma
    _, lo, hi = normalise(y, 0.05)
    assert lo == 0.0 and abs(hi - np.percentile(y, 99.5)) < 1e-6
    ct = phantom * 1400 - 1000 + 10 * np.random.default_rng(6).standard_normal(phantom.shape).astype(np.float32)
    assert normalise(ct, 10.0)[1] == pytest.approx(np.percentile(ct, 0.5))


def test_a_non_negative_scan_stays_non_negative_and_ct_keeps_its_negative_values(phantom, model):
    y = phantom + 0.05 * np.random.default_rng(5).standard_normal(phantom.shape).astype(np.float32)
    assert y.min() < -0.1
    assert denoise(y, model=model, sigma=0.05, device="cpu").data.min() >= 0.0
    ct = Volume(
        phantom * 1400 - 1000 + 20 * np.random.default_rng(6).standard_normal(phantom.shape).astype(np.float32),
        np.eye(4),
        VolumeMeta(modality="CT", units="HU"),
    )
    assert denoise(ct, model=model, sigma=20.0, device="cpu").data.min() < -900


def test_bf16_inference_matches_fp32(phantom, model):
    """'bf16' runs the network in bf16 on a CPU with native bf16 and must denoise as well as fp32;
    'auto' means fp32 on a CPU, as it does in training (medgen.models.precision)."""
    from medgen.models.precision import cpu_has_bf16

    y = phantom[8:40, 8:40, 8:40] + 0.05 * np.random.default_rng(4).standard_normal((32, 32, 32)).astype(np.float32)
    x = phantom[8:40, 8:40, 8:40]
    full = denoise_detailed(y, model=model, sigma=0.05, device="cpu", precision="fp32").volume.data
    half = denoise_detailed(y, model=model, sigma=0.05, device="cpu", precision="bf16").volume.data
    auto = denoise_detailed(y, model=model, sigma=0.05, device="cpu").volume.data
    np.testing.assert_array_equal(auto, full)
    if cpu_has_bf16():
        assert not np.array_equal(full, half)  # the bf16 path really ran
    else:
        np.testing.assert_array_equal(half, full)  # no native bf16: fp32, not a slow emulation
    assert abs(psnr(half, x) - psnr(full, x)) < 0.1
    with pytest.raises(DenoiseError, match="precision"):
        denoise_detailed(y, model=model, sigma=0.05, device="cpu", precision="fp8")  # type: ignore[arg-type]


def test_rician_bias_is_removed_in_the_background(phantom, model):
    s = 0.08
    rng = np.random.default_rng(3)
    y = np.sqrt(
        (phantom + s * rng.standard_normal(phantom.shape)) ** 2 + (s * rng.standard_normal(phantom.shape)) ** 2
    ).astype(np.float32)
    bg = phantom == 0
    plain = denoise(y, model=model, noise="gaussian", device="cpu")
    rician = denoise(y, model=model, noise="rician", device="cpu")
    assert rician.data[bg].mean() < 0.7 * plain.data[bg].mean()
    assert psnr(rician.data, phantom) > psnr(y, phantom)


def test_geometry_and_units_survive(model):
    """A CT-like volume in HU (negative values) on an oblique grid comes back on the same grid, in HU."""
    from conftest import oblique_affine

    from medgen.demo_data import phantom_ct

    ct = phantom_ct((40, 40, 32))
    noisy = ct + 40 * np.random.default_rng(4).standard_normal(ct.shape).astype(np.float32)
    vol = Volume(noisy, oblique_affine(), VolumeMeta(modality="CT", units="HU"))
    out = denoise(vol, model=model, device="cpu")
    assert out.shape == vol.shape and np.array_equal(out.affine, vol.affine)
    assert out.meta.units == "HU" and out.meta.modality == "CT" and "denoised" in out.meta.notes[-1]
    air = ct == -1000
    assert abs(float(out.data[air].mean()) + 1000) < 30  # still air, in HU
    assert np.abs(out.data - ct).mean() < np.abs(noisy - ct).mean()


def test_paths_and_dicom_inputs_work(tmp_path, model, phantom):
    from medgen import load_volume
    from medgen.io.dicom.write import write_series

    vol = Volume(
        phantom * 1000 + 30 * np.random.default_rng(5).standard_normal(phantom.shape).astype(np.float32),
        np.diag([1.0, 1.0, 2.0, 1.0]),
        VolumeMeta(modality="MR"),
    )
    write_series(vol, tmp_path / "series")
    out = denoise(tmp_path / "series", model=model, device="cpu")
    src = load_volume(tmp_path / "series")
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)


def test_posterior_gives_samples_mean_and_an_uncertainty_map(phantom, model):
    rng = np.random.default_rng(6)
    light = phantom + 0.01 * rng.standard_normal(phantom.shape).astype(np.float32)
    heavy = phantom + 0.10 * rng.standard_normal(phantom.shape).astype(np.float32)
    half = phantom.copy()
    half[:24] = heavy[:24]
    r_light = denoise_detailed(light, model=model, method="posterior", n_samples=3, device="cpu", max_steps=8)
    r_heavy = denoise_detailed(heavy, model=model, method="posterior", n_samples=3, device="cpu", max_steps=8)
    r_half = denoise_detailed(half, model=model, method="posterior", n_samples=3, device="cpu", max_steps=8)
    assert len(r_heavy.samples) == 3 and r_heavy.std is not None
    assert np.allclose(r_heavy.volume.data, np.mean([s.data for s in r_heavy.samples], axis=0), atol=1e-5)
    assert r_heavy.std.data.mean() > 2 * r_light.std.data.mean()
    assert r_half.std.data[:24].mean() > r_half.std.data[24:].mean()  # larger where noise was added
    assert psnr(r_heavy.volume.data, phantom) > psnr(heavy, phantom)


def test_large_volumes_go_through_sliding_windows(model, phantom):
    big = np.tile(phantom, (2, 1, 1))[:80]  # 80 > the 64-voxel window
    y = big + 0.05 * np.random.default_rng(7).standard_normal(big.shape).astype(np.float32)
    out = denoise(y, model=model, device="cpu", sigma=0.05)
    assert out.shape == big.shape and psnr(out.data, big) > psnr(y, big) + 3.0


@pytest.mark.parametrize(
    "scan, kwargs, error",
    [
        (np.full((8, 8, 8), np.nan, np.float32), {}, InvalidValuesError),
        (np.zeros((8, 8), np.float32), {}, NotAVolumeError),
        (np.zeros((4, 8, 8, 8), np.float32), {}, FourDimensionalError),
        (np.ones((8, 8, 8), np.float32), {}, EmptyVolumeError),
        (np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), {"sigma": 0.0}, DenoiseError),
        (np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), {"sigma": -1.0}, DenoiseError),
        (np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), {"method": "magic"}, DenoiseError),
    ],
)
def test_bad_input_gets_a_clear_error(model, scan, kwargs, error):
    with pytest.raises(error):
        denoise(scan, model=model, device="cpu", **kwargs)


@pytest.mark.parametrize("amp", ["auto", "bf16"])  # auto = fp32 on CPU; bf16 where the CPU has it natively
def test_score_training_loss_falls_and_bundle_round_trips(tmp_path, phantom, amp):
    from medgen.denoising.train import train_score

    cfg = DenoiserConfig.model_validate(
        {
            "channels": [8, 8],
            "attention_levels": [False, False],
            "norm_num_groups": 4,
            "num_head_channels": 4,
            "patch": [16, 16, 16],
            "train": {"steps": 40, "batch_size": 4, "lr": 2e-3, "log_every": 1, "checkpoint_every": 100, "amp": amp},
        }
    )
    path = train_score(cfg, [phantom, phantom[::-1].copy()], tmp_path, device="cpu", provenance={"command": "test"})
    losses = [json.loads(x)["loss/score"] for x in (tmp_path / "score" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    sm = load_score_model(path)
    assert sm.metadata["provenance"]["steps"] == 40
    a = denoise(phantom + 0.05, model=sm, sigma=0.05, device="cpu")
    b = denoise(phantom + 0.05, model=load_score_model(path), sigma=0.05, device="cpu")
    assert np.array_equal(a.data, b.data)


def test_cli_denoise_writes_nifti_or_a_derived_dicom_series(tmp_path, phantom):
    import pydicom
    from typer.testing import CliRunner

    from medgen import load_volume
    from medgen.cli import app
    from medgen.io.dicom.write import write_series

    noisy = phantom[:, :, :16] * 1000 + 40 * np.random.default_rng(8).standard_normal((48, 48, 16)).astype(np.float32)
    vol = Volume(noisy, np.diag([0.9, 0.9, 2.5, 1.0]), VolumeMeta(modality="MR"))
    write_series(vol, tmp_path / "in", patient={"PatientID": "P-77", "PatientName": "Doe^J"})
    write_nifti(vol, tmp_path / "in.nii.gz")
    runner = CliRunner(env={"COLUMNS": "200"})
    r = runner.invoke(
        app, ["denoise", str(tmp_path / "in.nii.gz"), "--out", str(tmp_path / "out.nii.gz"), "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert load_volume(tmp_path / "out.nii.gz").shape == (48, 48, 16)
    r = runner.invoke(app, ["denoise", str(tmp_path / "in"), "--out", str(tmp_path / "out_dcm"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    src = [pydicom.dcmread(p) for p in sorted((tmp_path / "in").glob("*.dcm"))]
    dst = [pydicom.dcmread(p) for p in sorted((tmp_path / "out_dcm").glob("*.dcm"))]
    assert len(dst) == len(src)
    assert {d.SeriesInstanceUID for d in dst}.isdisjoint({s.SeriesInstanceUID for s in src})
    assert {d.SOPInstanceUID for d in dst}.isdisjoint({s.SOPInstanceUID for s in src})
    assert dst[0].StudyInstanceUID == src[0].StudyInstanceUID and dst[0].PatientID == "P-77"
    assert list(dst[0].ImageType)[:2] == ["DERIVED", "SECONDARY"]
    a, b = load_volume(tmp_path / "in"), load_volume(tmp_path / "out_dcm")
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    assert np.abs(b.data - phantom[:, :, :16] * 1000).mean() < np.abs(a.data - phantom[:, :, :16] * 1000).mean()
    r = runner.invoke(
        app, ["denoise", str(tmp_path / "in.nii.gz"), "--out", str(tmp_path / "p.nii.gz"), "--precision", "fp8"]
    )
    assert r.exit_code == 2 and "--precision" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p.nii.gz").exists()


def test_a_non_ct_mr_dicom_series_is_denoised_to_nifti_with_a_note_not_relabelled(tmp_path, phantom, model):
    """A derived series keeps its source's modality, and we write CT and MR image storage only: a PT
    series gets its NIfTI and a note saying why no DICOM came back (it used to be written as MR)."""
    from pathlib import Path

    import pydicom

    from medgen.denoising.batch import denoise_scan, find_scans
    from medgen.io.dicom.write import write_series

    noisy = phantom[:, :, :16] * 1000 + 40 * np.random.default_rng(9).standard_normal((48, 48, 16)).astype(np.float32)
    for f in write_series(Volume(noisy, np.diag([2.0, 2.0, 3.0, 1.0]), VolumeMeta(modality="MR")), tmp_path / "pt"):
        ds = pydicom.dcmread(f)
        ds.Modality = "PT"
        ds.save_as(f)
    (ref,) = find_scans([tmp_path / "pt"])
    rec = denoise_scan(ref, tmp_path / "out", model=model, device="cpu")
    assert [Path(o).name for o in rec["outputs"]] == [f"{ref.name}_denoised.nii.gz"]
    assert any("no derived DICOM series" in n and "PT" in n for n in rec["notes"])
    assert not (tmp_path / "out" / f"{ref.name}_denoised_dicom").exists()


def test_cli_trains_a_denoiser_from_a_manifest(tmp_path):
    import yaml
    from conftest import ingest_phantom_subjects
    from typer.testing import CliRunner

    from medgen.cli import app

    report = ingest_phantom_subjects(tmp_path)
    cfg = {
        "data": {
            "splits": ["train", "val", "test"],
            "spacing": [1, 1, 1],
            "size": [24, 24, 24],
            "intensity": {"kind": "percentile", "lower": 0, "upper": 99.5},
        },
        "denoiser": {
            "channels": [8, 8],
            "attention_levels": [False, False],
            "norm_num_groups": 4,
            "num_head_channels": 4,
            "patch": [16, 16, 16],
            "train": {"steps": 5, "batch_size": 2, "log_every": 1},
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner(env={"COLUMNS": "200"}).invoke(
        app,
        [
            "train",
            "denoiser",
            "-c",
            str(tmp_path / "c.yaml"),
            "-m",
            str(report.manifest_path),
            "-o",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    sm = load_score_model(tmp_path / "run" / "score_model")
    assert len(sm.metadata["provenance"]["training_data"]) == 3 and sm.metadata["provenance"]["steps"] == 5
