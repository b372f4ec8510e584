"""The quality gate and export: metrics, verdicts, reports, NIfTI/DICOM export with provenance.

Model-space gate tests use the template population (real MNI anatomy, varied) at 8 mm; run-level
tests train the tiny LDM of test_ldm on blobs plus one DICOM series that carries identifying values,
and build a 'synthetic' run from held-out real volumes, which an honest gate must pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.config import DataConfig, GateConfig, IntensityConfig
from medgen.datasets.prepared import prepare
from medgen.io.nifti import write_nifti
from medgen.quality.gate import assess, build_reference, realism
from medgen.quality.metrics import fidelity
from medgen.quality.metrics.features import EncoderSettings, train_encoder
from medgen.quality.metrics.image import ms_ssim, ms_ssim_params, paired_metrics

torch.set_num_threads(1)

DATA = DataConfig(
    modality="MR",
    spacing=(8.0, 8.0, 8.0),
    size=(24, 28, 24),
    intensity=IntensityConfig(kind="percentile", lower=0.0, upper=99.5),
)


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    from medgen.demo_data import template_population

    tmp = tmp_path_factory.mktemp("pop")
    items = []
    for i, v in enumerate(template_population(22, seed=3, spacing=4.0)):
        items.append(
            {"image": str(write_nifti(v, tmp / f"sub-{i:02d}.nii.gz")), "sha256": str(i), "scan_id": f"sub-{i:02d}"}
        )
    vols = prepare(items, DATA, tmp / "cache").images[:, 0].numpy()
    enc = train_encoder(vols[:14], tmp / "encoder", EncoderSettings(steps=60))
    return {"train": vols[:14], "cal": vols[14:18], "eval": vols[18:], "encoder": enc}


@pytest.fixture(scope="module")
def reference(population):
    p = population
    return build_reference(
        p["train"], p["cal"], [f"train-{i}" for i in range(len(p["train"]))], p["encoder"], GateConfig()
    )


def test_paired_metrics_and_ms_ssim_sizing():
    x = np.random.default_rng(0).random((32, 40, 32)).astype(np.float32)
    for shape in [(16, 16, 16), (32, 40, 32), (64, 64, 64), (200, 200, 200)]:
        p = ms_ssim_params(shape)
        assert abs(sum(p.weights) - 1) < 1e-9 and min(shape) // 2 ** (len(p.weights) - 1) >= p.kernel_size
    m_small = paired_metrics(x + 0.01, x)
    m_big = paired_metrics(
        x + np.float32(0.1) * np.random.default_rng(1).standard_normal(x.shape).astype(np.float32), x
    )
    assert m_small["psnr"] > m_big["psnr"] + 10 and m_small["mae"] < m_big["mae"]
    assert ms_ssim(x, x) == pytest.approx(1.0, abs=1e-5) and m_big["ms_ssim"] < m_small["ms_ssim"]


def test_encoder_learns_and_is_versioned(population, tmp_path):
    enc = population["encoder"]
    first, last = enc.metadata["loss_first_last"]
    assert last < 0.7 * first
    again = train_encoder(population["train"], tmp_path / "e2", EncoderSettings(steps=60))
    assert again.encoder_id == enc.encoder_id  # same data and settings -> the same weights and id
    assert enc(population["eval"]).shape == (4, enc.net.dim)


def test_realism_metrics_grow_with_corruption(population, reference):
    held = population["eval"]
    base = realism(held, reference)
    shifted = realism(held + 0.2, reference)
    noisy = realism(held + np.random.default_rng(0).normal(0, 0.15, held.shape).astype(np.float32), reference)
    for key in ("fid", "kid", "mmd", "frd", "histogram_w1"):
        assert shifted[key] > base[key] and noisy[key] > base[key], key


def test_gate_passes_heldout_real_and_fails_copies_and_broken_volumes(population, reference):
    train, held = population["train"], population["eval"]
    rng = np.random.default_rng(0)
    cases = {
        "heldout-0": held[0],
        "heldout-1": held[1],
        "heldout-2": held[2],
        "heldout-3": held[3],
        "copy": train[3].copy(),
        "noised-copy": train[5] + rng.normal(0, 0.01, train[5].shape).astype(np.float32),
        "nan": np.where(held[0] > 0.5, np.nan, held[0]).astype(np.float32),
        "blank": np.zeros_like(held[0]),
        "out-of-range": held[1] * 3.0,
    }
    res = assess(np.stack(list(cases.values())), list(cases), reference, GateConfig())
    v = {r.name: r for r in res.volumes}
    for name in ("heldout-0", "heldout-1", "heldout-2", "heldout-3"):
        assert v[name].passed, (name, v[name].reasons)
    assert any("memorized" in r for r in v["copy"].reasons) and v["copy"].nearest_train == "train-3"
    assert any("memorized" in r for r in v["noised-copy"].reasons)
    assert any("NaN" in r for r in v["nan"].reasons)
    assert any("foreground" in r for r in v["blank"].reasons)
    assert any("intensity range" in r for r in v["out-of-range"].reasons)
    assert not res.passed and any("4 of 9 volumes pass" in r for r in res.reasons)  # 4/9 < min_pass_fraction 0.5
    assert not any("memorized" in r for n in ("nan", "blank", "out-of-range") for r in v[n].reasons)


def test_batch_verdict_uses_thresholds(population, reference):
    held = population["eval"]
    res = assess(held, [f"h{i}" for i in range(len(held))], reference, GateConfig(max_fid=1e-6))
    assert not res.passed and any("FID" in r for r in res.reasons)
    assert all(v.passed for v in res.volumes)  # per-volume verdicts unchanged
    res = assess(held[:1].repeat(3, 0), ["a", "b", "c"], reference, GateConfig(max_diversity_ms_ssim=0.99))
    assert not res.passed and any("diversity" in r for r in res.reasons)


def test_glcm_texture_sees_noise():
    v = np.zeros((16, 16, 16), np.float32)
    v[4:12, 4:12, 4:12] = 0.6
    noisy = v + np.random.default_rng(0).normal(0, 0.1, v.shape).astype(np.float32)
    r0, r1 = fidelity.radiomics(v), fidelity.radiomics(noisy)
    names = fidelity.RADIOMICS_NAMES
    assert r1[names.index("glcm_contrast")] > r0[names.index("glcm_contrast")] + 0.5
    assert r1[names.index("std")] > r0[names.index("std")]
