"""Synthetic DICOM from write_series(deidentified=True) is standard-conformant and reads back.

Conformance is checked with dicom3tools: dciodvfy on every file (IOD and module rules) and dcentvfy
over each series (patient/study/series/frame-of-reference consistency across instances). Read-back
is checked with SimpleITK's series reader and medgen.load_volume: every voxel within 1e-3 mm of
where it was written, every value within half a rescale step.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import make_volume, oblique_affine
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from medgen import load_volume
from medgen.io.dicom.write import SOP_CLASS, _stored_values, write_series
from medgen.volume import Volume, VolumeMeta

TOL_MM = 1e-3
WHEN = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
ERROR = re.compile(r"(?m)^Error[^\n]*|Error - [^\n]*")  # dcentvfy may run messages together on one line


def dicom3tools() -> tuple[str, str]:
    """(dciodvfy, dcentvfy). Missing: a skip on a developer machine, a failure on CI."""
    found = shutil.which("dciodvfy"), shutil.which("dcentvfy")
    if None in found:
        if os.environ.get("CI"):
            pytest.fail(
                "dicom3tools (dciodvfy, dcentvfy) is missing on CI: .ci/run installs it (apt-get install dicom3tools)"
            )
        pytest.skip("dicom3tools not installed (apt-get install dicom3tools); CI runs these checks")
    return found  # type: ignore[return-value]


def ct_volume(shape=(40, 36, 5), seed=0, affine=None) -> Volume:
    """Non-integer HU over -1000..2000, so the int16 rescale path is the one taken."""
    data = np.random.default_rng(seed).uniform(-1000.0, 2000.0, size=shape).astype(np.float32)
    return Volume(data, oblique_affine() if affine is None else affine, VolumeMeta(modality="CT", units="HU"))


CASES = {
    "ct": (lambda: ct_volume(seed=1), {}),
    "mr": (lambda: make_volume((40, 36, 5), modality="MR", seed=2), {}),
    "ct_backwards_rle": (
        lambda: ct_volume(seed=3, affine=oblique_affine(spacing=(0.7, 0.7, -1.5), angles=(-15, 10, 5))),
        {"transfer_syntax": RLELossless},
    ),
    "mr_j2k": (lambda: make_volume((40, 36, 4), modality="MR", seed=4), {"transfer_syntax": JPEG2000Lossless}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    out = {}
    for name, (make, kw) in CASES.items():
        vol = make()
        paths = write_series(
            vol, base / name, deidentified=True, uid_seed=f"export-{name}", content_datetime=WHEN, **kw
        )
        out[name] = (vol, base / name, paths)
    return out


def run(args: list[str]) -> tuple[int, str]:
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr  # dicom3tools report on stderr


@pytest.mark.parametrize("name", list(CASES))
def test_every_file_passes_dciodvfy(exported, name):
    dciodvfy, _ = dicom3tools()
    vol, _, paths = exported[name]
    assert len(paths) == vol.shape[2]
    iod = {"CT": "CTImage", "MR": "MRImage"}[vol.meta.modality]
    for path in paths:
        _, out = run([dciodvfy, str(path)])
        assert iod in out, f"dciodvfy did not recognise {path.name} as {iod}:\n{out}"
        assert not ERROR.findall(out), f"dciodvfy {path.name}:\n{out}"


@pytest.mark.parametrize("name", list(CASES))
def test_series_passes_dcentvfy(exported, name):
    _, dcentvfy = dicom3tools()
    _, _, paths = exported[name]
    _, out = run([dcentvfy, *map(str, paths)])
    assert not ERROR.findall(out), f"dcentvfy:\n{out}"


def test_dcentvfy_would_catch_an_inconsistent_series(exported, tmp_path):
    """The check above can fail: one instance with another PatientID is an error."""
    _, dcentvfy = dicom3tools()
    _, _, paths = exported["ct"]
    ds = pydicom.dcmread(paths[1])
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(tmp_path / "odd.dcm")
    _, out = run([dcentvfy, str(paths[0]), str(tmp_path / "odd.dcm")])
    assert ERROR.findall(out), out


@pytest.mark.parametrize("name", list(CASES))
def test_deidentified_attributes(exported, name):
    vol, _, paths = exported[name]
    modality = vol.meta.modality
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SOP_CLASS[modality] and ds.Modality == modality
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
        assert str(ds.PatientName) == "SYNTHETIC" and ds.PatientID == "SYNTHETIC" and not ds.PatientBirthDate
        assert ds.BurnedInAnnotation == "NO" and ds.RecognizableVisualFeatures == "NO"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
        assert ds.StudyDate == ds.SeriesDate == ds.ContentDate == "20240506" and ds.ContentTime == "070809"
        assert ds.BitsAllocated == ds.BitsStored == 16 and ds.PixelRepresentation == 1
        assert "RescaleSlope" in ds and "RescaleIntercept" in ds  # non-integer values: int16 + rescale
        if modality == "CT":
            assert ds.RescaleType == "HU"
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == CASES[name][1].get(
        "transfer_syntax", ExplicitVRLittleEndian
    )


def test_deidentified_refuses_patient_identifiers(tmp_path):
    with pytest.raises(ValueError, match="patient"):
        write_series(make_volume((8, 8, 2)), tmp_path, deidentified=True, patient={"PatientID": "P-1"})
    with pytest.raises(ValueError, match="DERIVED"):
        write_series(make_volume((8, 8, 2)), tmp_path, deidentified=True, image_type=("ORIGINAL", "PRIMARY", "AXIAL"))


def test_int16_storage_uses_the_full_signed_range():
    data = np.random.default_rng(0).uniform(-1000.0, 2000.0, size=(10, 11, 3))
    stored, slope, intercept, rep = _stored_values(data)
    assert stored.dtype == np.int16 and rep == 1
    assert stored.min() == -32768 and stored.max() == 32767
    back = stored * float(slope) + float(intercept)
    assert np.abs(back - data).max() <= float(slope) / 2 * (1 + 1e-9)
    whole = np.round(data)  # integer-valued data in the int16 range are stored exactly
    stored, slope, intercept, rep = _stored_values(whole)
    assert (slope, intercept, rep) == ("1", "0", 1) and np.array_equal(stored, whole)


def sitk_read(folder) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's series reader, files sorted by GDCM; its LPS geometry turned into a RAS affine."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float64)  # (k, j, i) -> (i, j, k)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, data


def assert_same_grid_and_values(written: Volume, affine: np.ndarray, data: np.ndarray, tol: float) -> None:
    """Every written voxel lands within TOL_MM of a voxel centre of (affine, data), one to one, with
    its value within `tol`."""
    assert data.size == written.data.size, f"{written.shape} vs {data.shape}"
    ijk = np.argwhere(np.ones(written.shape, bool))
    world = written.world(ijk)
    idx = np.round(np.linalg.solve(affine, np.c_[world, np.ones(len(world))].T).T[:, :3]).astype(int)
    assert (idx >= 0).all() and (idx < np.array(data.shape)).all()
    err = np.linalg.norm(idx @ affine[:3, :3].T + affine[:3, 3] - world, axis=1).max()
    assert err < TOL_MM, f"voxel positions differ by up to {err:.2e} mm"
    assert len({tuple(i) for i in idx}) == len(idx), "two voxels map to one voxel"
    diff = np.abs(data[tuple(idx.T)] - written.data[tuple(ijk.T)].astype(np.float64)).max()
    assert diff <= tol, f"values differ by up to {diff:.3g} (allowed {tol:.3g})"


def value_tolerance(vol: Volume, paths) -> float:
    """Half a quantisation step, plus float32 rounding of the values (ours and the readers')."""
    slope = float(pydicom.dcmread(paths[0], stop_before_pixels=True).RescaleSlope)
    return slope / 2 + 4 * np.finfo(np.float32).eps * float(np.abs(vol.data).max())


@pytest.mark.parametrize("name", list(CASES))
def test_simpleitk_reads_back_geometry_and_values(exported, name):
    vol, folder, paths = exported[name]
    affine, data = sitk_read(folder)
    expected = vol.affine
    if affine[:3, 2] @ vol.affine[:3, 2] < 0:  # GDCM sorts slices along the normal: k may come back reversed
        flip_k = np.diag([1.0, 1.0, -1.0, 1.0])
        flip_k[2, 3] = vol.shape[2] - 1
        expected = vol.affine @ flip_k
    np.testing.assert_allclose(affine, expected, atol=1e-4)
    assert_same_grid_and_values(vol, affine, data, value_tolerance(vol, paths))


@pytest.mark.parametrize("name", list(CASES))
def test_load_volume_reads_back_geometry_and_values(exported, name):
    vol, folder, paths = exported[name]
    back = load_volume(folder)
    assert back.meta.modality == vol.meta.modality and back.meta.units == vol.meta.units
    assert_same_grid_and_values(vol, back.affine, back.data.astype(np.float64), value_tolerance(vol, paths))


def test_repeated_export_is_byte_identical(tmp_path):
    vol = ct_volume((24, 20, 3), seed=9)
    a = write_series(vol, tmp_path / "a", deidentified=True, uid_seed="same", content_datetime=WHEN)
    b = write_series(vol, tmp_path / "b", deidentified=True, uid_seed="same", content_datetime=WHEN)
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    c = write_series(
        vol, tmp_path / "c", deidentified=True, uid_seed="same", content_datetime=WHEN + dt.timedelta(days=1)
    )
    assert pydicom.dcmread(c[0]).ContentDate == "20240507"


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_a_derived_series_is_valid_and_joins_its_source(tmp_path, modality):
    """The series `medgen denoise` writes (write_series with denoising.batch.derived_from): the
    source's patient, study (dates, accession) and frame of reference, new series; dciodvfy-clean
    and dcentvfy-consistent together with the source series it joins."""
    import pydicom

    from medgen.denoising.batch import derived_from
    from medgen.io.load import load_volume

    dciodvfy, dcentvfy = dicom3tools()
    vol = ct_volume(seed=5) if modality == "CT" else make_volume((40, 36, 5), modality="MR", seed=5)
    src_paths = write_series(
        vol, tmp_path / "src", patient={"PatientID": "P1", "PatientName": "Doe^J", "PatientSex": "F"}
    )
    for p in src_paths:
        ds = pydicom.dcmread(p)
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20190314", "101500", "ACC9"
        ds.save_as(p)
    source = load_volume(tmp_path / "src")
    paths = write_series(source, tmp_path / "derived", series_description="medgen denoised", **derived_from(source))
    a, b = pydicom.dcmread(src_paths[0]), pydicom.dcmread(paths[0])
    for kw in ("FrameOfReferenceUID", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientSex"):
        assert a[kw].value == b[kw].value, kw
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    for path in paths:
        _, out = run([dciodvfy, str(path)])
        assert not ERROR.findall(out), f"dciodvfy {path.name}:\n{out}"
    _, out = run([dcentvfy, *map(str, src_paths + paths)])
    assert not ERROR.findall(out), f"dcentvfy:\n{out}"
