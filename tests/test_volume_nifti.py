"""Volume and NIfTI: round trips keep geometry, the qform/sform rule, and bad NIfTI is refused."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import make_volume, oblique_affine

from medgen import load_volume
from medgen.errors import (
    EmptyFileError,
    EmptyVolumeError,
    FourDimensionalError,
    InvalidValuesError,
    NotAVolumeError,
    ShearedAffineError,
    UnreadableFileError,
)
from medgen.io.nifti import QformSformMismatchWarning, read_nifti, write_nifti
from medgen.volume import Volume


def test_nifti_round_trip_keeps_affine_and_data(tmp_path):
    vol = make_volume(modality="MR", affine=oblique_affine(origin=(-120.3, 87.1, 55.9)))
    path = write_nifti(vol, tmp_path / "v.nii.gz")
    back = load_volume(path)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert back.data.dtype == np.float32
    assert np.array_equal(back.data, vol.data)


def test_written_qform_equals_sform(tmp_path):
    path = write_nifti(make_volume(affine=oblique_affine()), tmp_path / "v.nii")
    hdr = nib.load(path).header
    q, qcode = hdr.get_qform(coded=True)
    s, scode = hdr.get_sform(coded=True)
    assert qcode == 1 and scode == 1
    np.testing.assert_allclose(q, s, atol=1e-4)
    assert hdr["descrip"].tobytes().rstrip(b"\0") == b"medgen"


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    write_nifti(make_volume(), tmp_path / "v.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]


def test_canonical_reorientation_keeps_world_positions():
    flip = (
        np.diag([-1.0, 1.0, -1.0, 1.0])
        @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
        @ np.diag([0.7, 1.1, 2.0, 1])
    )
    vol = make_volume(shape=(10, 12, 6), affine=flip)
    canon = vol.as_closest_canonical()
    assert canon.orientation == "RAS" and vol.orientation != "RAS"
    ijk = np.argwhere(np.ones(vol.shape, bool))
    world = vol.world(ijk)
    back = np.linalg.solve(canon.affine, np.c_[world, np.ones(len(world))].T).T[:, :3]
    idx = np.round(back).astype(int)
    np.testing.assert_allclose(back, idx, atol=1e-6)
    assert np.array_equal(canon.data[tuple(idx.T)], vol.data[tuple(ijk.T)])


def test_qform_sform_disagreement_uses_sform_and_warns(tmp_path):
    data = np.random.default_rng(0).random((8, 9, 10), dtype=np.float32)
    img = nib.Nifti1Image(data, None)  # no affine: nibabel would overwrite the sform from it on save
    q = np.diag([1.0, 1.0, 1.0, 1.0])
    s = np.diag([2.0, 2.0, 2.0, 1.0])
    s[:3, 3] = [5, 6, 7]
    img.header.set_qform(q, code=1)
    img.header.set_sform(s, code=2)
    nib.save(img, tmp_path / "x.nii")
    with pytest.warns(QformSformMismatchWarning, match="used the sform"):
        vol = load_volume(tmp_path / "x.nii")
    np.testing.assert_allclose(vol.affine, s)
    assert any("disagree" in n for n in vol.meta.notes)


def test_qform_only_file_uses_qform(tmp_path):
    img = nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), None)
    q = np.diag([1.5, 1.5, 3.0, 1.0])
    img.header.set_qform(q, code=1)
    img.header.set_sform(np.eye(4), code=0)
    nib.save(img, tmp_path / "q.nii")
    np.testing.assert_allclose(load_volume(tmp_path / "q.nii").affine, q)


def test_units_in_metres_are_converted_to_mm(tmp_path):
    img = nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.diag([0.001, 0.001, 0.002, 1]))
    img.header.set_xyzt_units("meter")
    nib.save(img, tmp_path / "m.nii")
    np.testing.assert_allclose(load_volume(tmp_path / "m.nii").spacing, (1.0, 1.0, 2.0))


def test_4d_is_an_error_by_default_and_split_on_request(tmp_path):
    data = np.random.default_rng(0).random((6, 7, 8, 3), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "f.nii.gz")
    with pytest.raises(FourDimensionalError, match="3 frames"):
        read_nifti(tmp_path / "f.nii.gz")
    vols = read_nifti(tmp_path / "f.nii.gz", frames="split")
    assert len(vols) == 3
    assert np.array_equal(vols[2].data, data[..., 2])


def test_trailing_singleton_dimension_is_3d(tmp_path):
    data = np.random.default_rng(0).random((6, 7, 8, 1), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "s.nii.gz")
    assert load_volume(tmp_path / "s.nii.gz").shape == (6, 7, 8)


@pytest.mark.parametrize(
    "data, error, match",
    [
        (np.ones((5, 6), np.float32) * np.arange(6), NotAVolumeError, "2D"),
        (np.arange(30, dtype=np.float32).reshape(5, 6, 1), NotAVolumeError, "2D"),
        (np.where(np.eye(6)[:, :, None] > 0, np.nan, 1.0).repeat(4, 2).astype(np.float32), InvalidValuesError, "NaN"),
        (np.full((4, 5, 6), np.inf, np.float32), InvalidValuesError, "inf"),
        (np.zeros((4, 5, 6), np.float32), EmptyVolumeError, "same value"),
    ],
)
def test_bad_nifti_is_refused_with_reason(tmp_path, data, error, match):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(error, match=match) as info:
        load_volume(path)
    assert str(path) in str(info.value)


def test_zero_byte_corrupt_and_missing_files(tmp_path):
    (tmp_path / "empty.nii").write_bytes(b"")
    with pytest.raises(EmptyFileError):
        read_nifti(tmp_path / "empty.nii")
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not gzip")
    with pytest.raises(UnreadableFileError, match="not a readable NIfTI"):
        read_nifti(tmp_path / "junk.nii.gz")
    with pytest.raises(UnreadableFileError, match="cannot open"):
        read_nifti(tmp_path / "absent.nii.gz")


def test_sheared_affine_is_refused(tmp_path):
    a = np.eye(4)
    a[0, 1] = 0.3
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((4, 5, 6), dtype=np.float32), a), tmp_path / "sh.nii")
    with pytest.raises(ShearedAffineError):
        load_volume(tmp_path / "sh.nii")


def test_volume_rejects_non_3d_and_singular_affine():
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((2, 2)), np.eye(4))
    with pytest.raises(ValueError, match="singular"):
        Volume(np.zeros((2, 2, 2)), np.zeros((4, 4)))
