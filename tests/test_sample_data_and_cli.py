"""The demo data set and the command line, as a new user meets them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from medgen.cli import app
from medgen.demo_data import MARKER, build_sample_data
from medgen.io.manifest import read_rows

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich does not fold messages


def test_sample_data_mixes_real_dicom_nifti_and_phantoms(sample_dir):
    assert (sample_dir / MARKER).exists() and (sample_dir / "README.md").exists()
    assert (sample_dir / "dicom" / "pydicom_dicomdirtests" / "DICOMDIR").exists()
    assert (sample_dir / "dicom" / "enhanced_ct" / "eCT_Supplemental.dcm").exists()
    assert len(list((sample_dir / "dicom" / "phantom_ct_rle").glob("*.dcm"))) == 48
    assert (sample_dir / "nifti" / "mni152_2009a_T1w.nii.gz").exists()
    assert len(list((sample_dir / "nifti" / "population").glob("sub-*/anat/*_T1w.nii.gz"))) == 16


def test_sample_data_build_is_reproducible(tmp_path, sample_dir):
    again = tmp_path / "again"
    build_sample_data(again)
    for f in sorted((sample_dir / "dicom" / "phantom_mr_oblique_j2k").iterdir())[:3]:
        assert (again / "dicom" / "phantom_mr_oblique_j2k" / f.name).read_bytes() == f.read_bytes()


def test_cli_ingest_of_the_sample_data(sample_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["ingest", str(sample_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {Path(r["source"]).relative_to(sample_dir).as_posix(): r for r in read_rows(out / "manifest.csv")}
    accepted = {k for k, r in rows.items() if r["status"] == "accepted"}
    assert accepted == {
        "dicom/pydicom_dicomdirtests/98892001/CT5N",
        "dicom/enhanced_ct/eCT_Supplemental.dcm",
        "dicom/phantom_ct_rle",
        "dicom/phantom_mr_oblique_j2k",
        "dicom/phantom_mr_noisy",
        "nifti/mni152_2009a_T1w.nii.gz",
        "nifti/nibabel_anatomical_T1w.nii",
    } | {f"nifti/population/sub-pop{i:02d}/anat/sub-pop{i:02d}_T1w.nii.gz" for i in range(16)}
    assert rows["dicom/pydicom_dicomdirtests/77654033/CT2"]["error_code"] == "missing_slice"
    assert rows["dicom/pydicom_dicomdirtests/98892003/MR700"]["error_code"] == "mixed_orientation"
    assert rows["nifti/nibabel_example4d_bold.nii.gz"]["error_code"] == "four_d"
    assert rows["dicom/phantom_ct_rle"]["units"] == "HU" and rows["dicom/phantom_ct_rle"]["modality"] == "CT"
    assert "23 accepted" in result.output and "Rejected scans" in result.output
    # a second run converts nothing
    again = runner.invoke(app, ["ingest", str(sample_dir), "--out", str(out)])
    assert again.exit_code == 0 and "0 converted" in again.output


def test_cli_frames_split_accepts_the_4d_epi(sample_dir, tmp_path):
    result = runner.invoke(
        app,
        [
            "ingest",
            str(sample_dir / "nifti" / "nibabel_example4d_bold.nii.gz"),
            "--out",
            str(tmp_path / "o"),
            "--frames",
            "split",
        ],
    )
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in read_rows(tmp_path / "o" / "manifest.csv")] == ["accepted", "accepted"]


def test_cli_rejects_a_missing_source_with_a_clear_message(tmp_path):
    result = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_cli_help_does_not_import_heavy_libraries():
    heavy = "('torch', 'monai', 'SimpleITK', 'pydicom', 'nibabel', 'numpy')"
    code = (
        f"import sys; from medgen.cli import app; import medgen; print(sorted(m for m in {heavy} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
