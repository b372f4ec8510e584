"""DICOM geometry against two independent readers: SimpleITK's series reader and dcm2niix.

For every voxel of our volume, its RAS world position must land on a voxel centre of the
reference (within 1e-3 mm) holding the same value.
"""

from __future__ import annotations

import subprocess

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import CT5N, DICOMDIR_TESTS, dcm2niix_binary, make_volume, oblique_affine
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from medgen import load_volume, load_volumes
from medgen.io.dicom.write import write_series

TOL_MM = 1e-3


def sitk_reference(folder) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    img = reader.Execute()
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float64)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, data


def dcm2niix_reference(source, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    out = tmp_path / "dcm2niix"
    out.mkdir()
    subprocess.run(
        [dcm2niix_binary(), "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    files = sorted(out.glob("*.nii"))
    assert len(files) == 1, f"dcm2niix wrote {[f.name for f in files]}"
    img = nib.load(files[0])
    return img.affine, np.asarray(img.get_fdata(), dtype=np.float64)


def assert_same_voxels(vol, ref_affine: np.ndarray, ref_data: np.ndarray, atol: float = 1e-3) -> None:
    assert int(np.prod(vol.shape)) == ref_data.size, f"{vol.shape} vs reference {ref_data.shape}"
    ijk = np.argwhere(np.ones(vol.shape, bool))
    world = vol.world(ijk)
    cont = np.linalg.solve(ref_affine, np.c_[world, np.ones(len(world))].T).T[:, :3]
    idx = np.round(cont).astype(int)
    ref_world = idx @ ref_affine[:3, :3].T + ref_affine[:3, 3]
    err = np.linalg.norm(ref_world - world, axis=1).max()
    assert err < TOL_MM, f"voxel positions differ by up to {err:.2e} mm"
    assert (idx >= 0).all() and (idx < np.array(ref_data.shape)).all()
    assert len({tuple(i) for i in idx}) == len(idx), "two voxels map to one reference voxel"
    np.testing.assert_allclose(vol.data[tuple(ijk.T)], ref_data[tuple(idx.T)], rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def generated_series(tmp_path_factory):
    """Oblique CT/MR series: uncompressed, RLE and JPEG 2000, one written with k running backwards."""
    base = tmp_path_factory.mktemp("gen")
    backwards = oblique_affine(spacing=(0.7, 0.7, -1.5), angles=(-15, 10, 5))
    cases = {
        "ct_oblique": (make_volume((40, 36, 7), seed=1), None),
        "ct_backwards": (make_volume((40, 36, 7), seed=2, affine=backwards), None),
        "ct_rle": (make_volume((48, 40, 6), seed=3), RLELossless),
        "mr_j2k": (make_volume((64, 64, 5), modality="MR", seed=4), JPEG2000Lossless),
    }
    for name, (vol, ts) in cases.items():
        write_series(vol, base / name, transfer_syntax=ts)
    return base, cases


SERIES = ["ct_oblique", "ct_backwards", "ct_rle", "mr_j2k"]


@pytest.mark.parametrize("name", SERIES)
def test_generated_series_match_simpleitk(generated_series, name):
    base, _ = generated_series
    assert_same_voxels(load_volume(base / name), *sitk_reference(base / name))


@pytest.mark.parametrize("name", SERIES)
def test_generated_series_match_dcm2niix(generated_series, name, tmp_path):
    base, _ = generated_series
    assert_same_voxels(load_volume(base / name), *dcm2niix_reference(base / name, tmp_path))


@pytest.mark.parametrize("name", SERIES)
def test_generated_series_match_the_volume_written(generated_series, name):
    base, cases = generated_series
    written = cases[name][0]
    vol = load_volume(base / name)
    # CT values are whole HU and come back exactly; MR is stored as int16 with a rescale slope.
    atol = 0.01 if written.meta.modality == "MR" else 0.0
    assert_same_voxels(vol, written.affine, written.data.astype(np.float64), atol=atol)


def test_real_ct_series_matches_simpleitk_and_dcm2niix(tmp_path):
    vol = load_volume(CT5N)
    assert vol.meta.modality == "CT" and vol.meta.units == "HU"
    assert vol.shape == (16, 16, 5)
    np.testing.assert_allclose(vol.spacing, (0.488281, 0.488281, 2.5), atol=1e-6)
    assert_same_voxels(vol, *sitk_reference(CT5N))
    assert_same_voxels(vol, *dcm2niix_reference(CT5N, tmp_path))


def test_sample_phantom_series_match_simpleitk_and_dcm2niix(sample_dir, tmp_path):
    for i, name in enumerate(["phantom_ct_rle", "phantom_mr_oblique_j2k"]):
        folder = sample_dir / "dicom" / name
        vol = load_volume(folder)
        assert_same_voxels(vol, *sitk_reference(folder))
        sub = tmp_path / str(i)
        sub.mkdir()
        assert_same_voxels(vol, *dcm2niix_reference(folder, sub))


def test_enhanced_multiframe_ct_matches_dcm2niix(tmp_path):
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    vol = load_volume(path)
    assert vol.shape == (512, 512, 2) and vol.meta.units == "HU"
    np.testing.assert_allclose(vol.spacing, (0.388672, 0.388672, 10.0), atol=1e-6)
    src = tmp_path / "in"
    src.mkdir()
    (src / "e.dcm").write_bytes(open(path, "rb").read())
    assert_same_voxels(vol, *dcm2niix_reference(src, tmp_path))


def test_compressed_enhanced_mr_frames_decode_like_uncompressed():
    """emri_small has no plane positions (it is refused as a volume), but its JPEG 2000, JPEG-LS
    and RLE pixel data must decode to exactly the uncompressed frames."""
    import pydicom

    ref = pydicom.dcmread(get_testdata_file("emri_small.dcm", download=False)).pixel_array
    for name in ["emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm"]:
        assert np.array_equal(pydicom.dcmread(get_testdata_file(name, download=False)).pixel_array, ref), name


def test_dicomdir_loads_the_series_it_references():
    vols = [v for v in load_volumes_tolerant(DICOMDIR_TESTS / "DICOMDIR")]
    ct5n = load_volume(CT5N)
    assert any(v.shape == ct5n.shape and np.array_equal(v.data, ct5n.data) for v in vols)


def load_volumes_tolerant(path):
    """The DICOMDIR test tree holds refused series too; keep the ones that load."""
    from medgen.errors import InputError
    from medgen.io.dicom.series import read_series
    from medgen.io.discover import discover

    found = discover([path])
    assert len(found.series) > 5  # the DICOMDIR was expanded into its referenced files
    out = []
    for s in found.series:
        try:
            out.append(read_series(s))
        except InputError:
            pass
    return out


def test_load_volumes_is_strict_and_load_volume_wants_one(tmp_path):
    from medgen.errors import AmbiguousSourceError

    write_series(make_volume(seed=1), tmp_path / "a")
    write_series(make_volume(seed=2), tmp_path / "b")
    assert len(load_volumes(tmp_path)) == 2
    with pytest.raises(AmbiguousSourceError, match="2 scans"):
        load_volume(tmp_path)
