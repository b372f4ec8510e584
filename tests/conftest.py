from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from medgen.volume import Volume, VolumeMeta

os.environ.setdefault("MEDGEN_SUBJECT_SALT", "test-salt")
# Quiet, isolated Prefect: its own home (SQLite), warnings only, no analytics.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="medgen-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

PYDICOM_TESTS = Path(__import__("pydicom").__file__).parent / "data" / "test_files"
DICOMDIR_TESTS = PYDICOM_TESTS / "dicomdirtests"
CT5N = DICOMDIR_TESTS / "98892001" / "CT5N"


def dcm2niix_binary() -> str:
    """The dcm2niix installed with the test extra (beside this Python), or one on PATH."""
    here = Path(sys.executable).parent / "dcm2niix"
    found = str(here) if here.exists() else shutil.which("dcm2niix")
    if not found:
        pytest.fail("dcm2niix is missing: install medgen with the 'test' extra (make test does)")
    return found


def oblique_affine(spacing=(0.8, 0.9, 2.0), angles=(10.0, -7.0, 25.0), origin=(-30.0, 12.5, 40.0)) -> np.ndarray:
    from medgen.demo_data import rotation

    a = np.eye(4)
    a[:3, :3] = rotation(angles) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def make_volume(shape=(32, 28, 8), *, modality="CT", seed=0, affine=None) -> Volume:
    rng = np.random.default_rng(seed)
    if modality == "CT":
        data = rng.integers(-1000, 1500, size=shape).astype(np.float32)
        units = "HU"
    else:
        data = rng.random(shape, dtype=np.float32) * 500
        units = "a.u."
    return Volume(data, oblique_affine() if affine is None else affine, VolumeMeta(modality=modality, units=units))


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from medgen.demo_data import build_sample_data

    out = tmp_path_factory.mktemp("sample") / "sample_data"
    build_sample_data(out)
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def ingest_phantom_subjects(root: Path, shape=(24, 24, 24), noise: float = 0.0, n: int = 3, seed: int = 0):
    """n BIDS subjects of one random-ellipsoid phantom each (x800, optional Gaussian noise of
    `noise` before scaling), ingested into root/ing; the ingest report back. A manifest for the
    denoiser-training CLI tests."""
    import nibabel as nib

    from medgen import ingest
    from medgen.demo_data import random_phantom

    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / "src" / f"sub-{i}").mkdir(parents=True)
        x = random_phantom(shape, rng)
        if noise:
            x = x + noise * rng.standard_normal(shape)
        nib.save(
            nib.Nifti1Image((x * 800).astype(np.float32), np.eye(4)), root / "src" / f"sub-{i}" / f"sub-{i}_T1w.nii.gz"
        )
    return ingest(root / "src", root / "ing")
