"""Builds (never downloads) a corpus of broken and tricky inputs beside good scans.

`build_corpus(root)` returns, for each case, the expected outcome of ingesting the whole tree in
one batch: ("accepted", note substring) or ("rejected", error_code). Each case lives under
root/<case>/ so its manifest row can be found by its source path.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from conftest import make_volume, oblique_affine

from medgen.io.dicom.write import write_series


def _series(folder: Path, seed: int, **kw) -> list[Path]:
    return write_series(make_volume((24, 20, 6), seed=seed), folder, **kw)


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for k, v in values.items():
        setattr(ds, k, v)
    ds.save_as(path)


def build_corpus(root: Path) -> dict[str, tuple[str, str]]:
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, tuple[str, str]] = {}
    rng = np.random.default_rng(0)

    # Good scans in the same batch: they must still ingest.
    _series(root / "good_ct", 1, patient={"PatientID": "GOOD-1", "PatientName": "Good^Patient"})
    expect["good_ct"] = ("accepted", "")
    nib.save(
        nib.Nifti1Image(rng.random((10, 11, 12), dtype=np.float32), np.diag([1.0, 1, 1, 1])), root / "good_T1w.nii.gz"
    )
    expect["good_T1w.nii.gz"] = ("accepted", "")

    # 1. truncated DICOM: one slice of a series cut in the middle of its pixel data. The file is a
    # row of its own (set aside before the series is assembled); the series, judged on the rest,
    # then has a hole.
    files = _series(root / "truncated", 2)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 300])
    expect["truncated/0003.dcm"] = ("rejected", "truncated")
    expect["truncated"] = ("rejected", "missing_slice")
    # 1b. a partial transfer of one slice lying elsewhere (same SeriesInstanceUID, same position):
    # its own rejected row; the complete series is still accepted.
    files = _series(root / "complete", 22)
    (root / "partial_copy").mkdir()
    data = files[2].read_bytes()
    (root / "partial_copy" / "0003.dcm").write_bytes(data[: len(data) // 2])
    expect["complete"] = ("accepted", "")
    expect["partial_copy"] = ("rejected", "missing_pixel_data")  # cut inside its header: no pixels at all
    # 1c. a complete second copy of one instance (same SOPInstanceUID): one slice, not a duplicate
    files = _series(root / "copied_instance", 23)
    (root / "copied_instance" / "again").mkdir()
    (root / "copied_instance" / "again" / "0002.dcm").write_bytes(files[1].read_bytes())
    expect["copied_instance"] = ("accepted", "extra copy")

    # 2. a text file named .dcm
    (root / "not_dicom.dcm").write_text("patient notes, definitely not DICOM\n")
    expect["not_dicom.dcm"] = ("rejected", "not_dicom")

    # 3. a slice without PixelData
    files = _series(root / "no_pixels", 3)
    ds = pydicom.dcmread(files[0])
    del ds.PixelData
    ds.save_as(files[0])
    expect["no_pixels/0001.dcm"] = ("rejected", "missing_pixel_data")
    expect["no_pixels"] = ("accepted", "")  # the other five slices are a whole volume

    # 4. a duplicate slice: a copy with a new SOP Instance UID at the same position
    files = _series(root / "duplicate", 4)
    ds = pydicom.dcmread(files[3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(files[3].with_name("copy.dcm"))
    expect["duplicate"] = ("rejected", "duplicate_slice")

    # 5. a missing slice
    files = _series(root / "missing_slice", 5)
    files[3].unlink()
    expect["missing_slice"] = ("rejected", "missing_slice")

    # 6. two series in one folder: both are scans of their own
    _series(root / "two_series", 6)
    _series(root / "two_series" / "second", 7)  # nested, and a distinct SeriesInstanceUID
    expect["two_series"] = ("accepted", "")

    # 7. mixed orientations within one series
    files = _series(root / "mixed_orientation", 8)
    _edit(files[2], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    expect["mixed_orientation"] = ("rejected", "mixed_orientation")

    # 8. a localizer inside the series: dropped, and said so
    files = _series(root / "localizer", 9)
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(root / "localizer" / "scout.dcm")
    expect["localizer"] = ("accepted", "dropped 1 localizer")

    # 9. a single 2D DICOM image, and a 2D NIfTI
    _series(root / "single_slice", 10)
    for f in sorted((root / "single_slice").glob("*.dcm"))[1:]:
        f.unlink()
    expect["single_slice"] = ("rejected", "not_3d")
    nib.save(nib.Nifti1Image(rng.random((20, 20), dtype=np.float32), np.eye(4)), root / "flat.nii")
    expect["flat.nii"] = ("rejected", "not_3d")

    # 10. 4D NIfTI
    nib.save(nib.Nifti1Image(rng.random((8, 8, 8, 3), dtype=np.float32), np.eye(4)), root / "fmri_bold.nii.gz")
    expect["fmri_bold.nii.gz"] = ("rejected", "four_d")

    # 11. NaN voxels
    arr = rng.random((8, 9, 10)).astype(np.float32)
    arr[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), root / "nan.nii.gz")
    expect["nan.nii.gz"] = ("rejected", "invalid_values")

    # 12. qform/sform disagreement: accepted on the sform, with a note
    img = nib.Nifti1Image(rng.random((8, 9, 10), dtype=np.float32), None)
    img.header.set_qform(np.eye(4), code=1)
    img.header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=2)
    nib.save(img, root / "qs_mismatch.nii")
    expect["qs_mismatch.nii"] = ("accepted", "qform and sform disagree")

    # 13. zero-byte files
    (root / "zero.dcm").write_bytes(b"")
    expect["zero.dcm"] = ("rejected", "empty_file")
    (root / "zero.nii.gz").write_bytes(b"")
    expect["zero.nii.gz"] = ("rejected", "empty_file")

    # 14. unreadable: a link to nothing, and a corrupt gzip
    os.symlink(root / "does-not-exist.dcm", root / "dangling.dcm")
    expect["dangling.dcm"] = ("rejected", "unreadable")
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    expect["corrupt.nii.gz"] = ("rejected", "unreadable")

    # 15. tag values that try a path: they never become one
    _series(
        root / "path_tags",
        11,
        patient={"PatientID": "../../x", "PatientName": "../../x"},
        series_description="../../../etc/passwd",
        series_uid="../../x",
    )
    expect["path_tags"] = ("accepted", "")

    # 16. mixed image sizes in one series
    files = _series(root / "mixed_size", 12)
    ds = pydicom.dcmread(files[4])
    ds.Rows, ds.Columns = 10, 10
    ds.PixelData = np.zeros((10, 10), np.int16).tobytes()
    ds.save_as(files[4])
    expect["mixed_size"] = ("rejected", "mixed_size")

    # 17. gantry tilt: each slice shifted along the column direction
    files = _series(root / "tilt", 13)
    for k, f in enumerate(sorted(files)):
        ds = pydicom.dcmread(f)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        col = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array(ipp) + col * 0.4 * k]
        ds.GantryDetectorTilt = "11"
        ds.save_as(f)
    expect["tilt"] = ("rejected", "gantry_tilt")

    # 18. non-uniform slice spacing (not a whole missing slice)
    files = _series(root / "uneven", 14)
    for f in sorted(files)[3:]:
        ds = pydicom.dcmread(f)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        row, col = (np.array([float(v) for v in ds.ImageOrientationPatient[i : i + 3]]) for i in (0, 3))
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp + np.cross(row, col) * 0.7]
        ds.save_as(f)
    expect["uneven"] = ("rejected", "non_uniform_spacing")

    # 19. a constant volume
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10), np.float32), np.eye(4)), root / "blank.nii.gz")
    expect["blank.nii.gz"] = ("rejected", "empty_volume")

    # 20. a truncated NIfTI
    good = root / "good_T1w.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((30, 30, 30), dtype=np.float32), oblique_affine()), root / "cut.nii")
    (root / "cut.nii").write_bytes((root / "cut.nii").read_bytes()[:5000])
    expect["cut.nii"] = ("rejected", "truncated")

    # 21. non-image files are ignored, not scans
    (root / "README.txt").write_text("not a scan")
    assert good.exists()
    return expect
