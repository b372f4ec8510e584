"""Validate and export a run end to end: report files, gate-only export, NIfTI/DICOM geometry,
idempotence, atomicity under a kill, and no identifying value from a source scan in any output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from test_dicom_export import ERROR, dicom3tools, run
from test_ldm import blobs, config

from medgen import ingest
from medgen.config import QualityConfig
from medgen.datasets.prepared import manifest_items, prepare
from medgen.export.exporter import ExportError, export_run
from medgen.io.dicom.write import write_series
from medgen.io.nifti import write_nifti
from medgen.models.bundle import load_generator
from medgen.provenance import code_version, model_folder_sha256, sha256_file
from medgen.quality.validate import ValidationError, read_report, validate_run
from medgen.synthesis.runs import RECORD, SynthesisRecord, SynthVolume, synthesize
from medgen.synthesis.train_autoencoder import train_autoencoder
from medgen.synthesis.train_diffusion import train_diffusion
from medgen.volume import Volume, VolumeMeta

torch.set_num_threads(1)

IDENTIFIERS = {
    "PatientName": "DOE^JANE^Q",
    "PatientID": "MRN-4471923",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC-778899",
    "InstitutionName": "St Elsewhere General",
    "StudyDate": "20190314",
    "ReferringPhysicianName": "HOUSE^GREGORY",
}
# Under another root than pydicom's (1.2.826.0.1.3680043.8.498.), which export's generated UIDs
# use: a short source UID under that root is a prefix of about 1 in 10^5 generated ones, and the
# substring check below once failed on exactly that (a generated UID, not a leak).
SOURCE_UIDS = {
    "study": "1.3.6.1.4.1.55555.1.77001",
    "series": "1.3.6.1.4.1.55555.1.77002",
    "frame": "1.3.6.1.4.1.55555.1.77003",
}
QUALITY = QualityConfig(encoder={"steps": 30}, gate={"min_pass_fraction": 0.5})


def identified_series(folder: Path) -> None:
    """An MR series of a 'real patient': identifying values in names, IDs, dates and UIDs."""
    vol = Volume(blobs(100), np.diag([4.0, 4.0, 4.0, 1.0]), VolumeMeta(modality="MR", units="a.u."))
    ids = {k: IDENTIFIERS[k] for k in ("PatientName", "PatientID", "PatientBirthDate")}
    paths = write_series(
        vol,
        folder,
        patient=ids,
        study_uid=SOURCE_UIDS["study"],
        series_uid=SOURCE_UIDS["series"],
        frame_of_reference_uid=SOURCE_UIDS["frame"],
        image_type=("ORIGINAL", "PRIMARY"),
    )
    for p in paths:
        ds = pydicom.dcmread(p)
        for k in ("AccessionNumber", "InstitutionName", "StudyDate", "ReferringPhysicianName"):
            setattr(ds, k, IDENTIFIERS[k])
        ds.save_as(p)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Ingested blobs + the identified DICOM subject, a tiny generator trained on the train split."""
    src = tmp_path_factory.mktemp("q_src")
    for i in range(12):
        (src / f"sub-{i:02d}").mkdir()
        nib.save(
            nib.Nifti1Image(blobs(i), np.diag([4.0, 4.0, 4.0, 1.0])), src / f"sub-{i:02d}" / f"sub-{i:02d}_T1w.nii.gz"
        )
    identified_series(src / "patient_dicom")
    report = ingest(src, src.parent / "q_ingest", salt="medgen-quality-test")
    assert len(report.accepted) == 13
    cfg = config(data__splits=["train"])
    rundir = tmp_path_factory.mktemp("q_run")
    train_autoencoder(cfg, report.manifest_path, rundir, device="cpu")
    gen = train_diffusion(cfg, report.manifest_path, rundir, device="cpu")
    train = manifest_items(report.manifest_path, cfg.data, ["train"])
    held = manifest_items(report.manifest_path, cfg.data, ["val", "test"])
    assert len(train) >= 2 and len(held) >= 2
    dicom_row = next(r for r in report.rows if "patient_dicom" in r["source"])
    return {
        "manifest": report.manifest_path,
        "generator": gen,
        "cfg": cfg,
        "held": held,
        "dicom_split": dicom_row["split"],
    }


def fake_run(world, out: Path, arrays_model: list[np.ndarray]) -> Path:
    """A synthesis run whose 'synthetic' volumes are given model-space arrays (for gate tests)."""
    gen = load_generator(world["generator"])
    entries = []
    for i, a in enumerate(arrays_model):
        v = Volume(gen.intensity.to_units(a).astype(np.float32), gen.affine, VolumeMeta(modality="MR", units="a.u."))
        p = write_nifti(v, out / "volumes" / f"synthetic_{i:04d}.nii.gz")
        entries.append(
            SynthVolume(name=f"synthetic_{i:04d}", file=str(p.relative_to(out)), index=i, sha256=sha256_file(p))
        )
    rec = SynthesisRecord(
        generator=str(world["generator"]),
        generator_sha256=model_folder_sha256(world["generator"]),
        sampler="ddim",
        steps=5,
        seed=0,
        created="2026-01-02T03:04:05+00:00",
        code_version=code_version(),
        volumes=entries,
    )
    (out / RECORD).write_text(rec.model_dump_json())
    return out


@pytest.fixture(scope="module")
def passing_run(world, tmp_path_factory):
    """Held-out real volumes (incl. the identified DICOM subject when it is held out) as a run."""
    held = prepare(world["held"], world["cfg"].data, Path(world["generator"]).parent / "cache").images[:, 0].numpy()
    run_dir = fake_run(world, tmp_path_factory.mktemp("q_pass"), list(held) + [np.full_like(held[0], np.nan)])
    v = validate_run(run_dir, quality=QUALITY)
    return run_dir, v


def test_generated_run_is_validated_with_all_report_files(world, tmp_path):
    rec = synthesize(world["generator"], 2, tmp_path / "run", steps=3, seed=1)
    assert [v.name for v in rec.volumes] == ["synthetic_0000", "synthetic_0001"]
    v = validate_run(tmp_path / "run", quality=QUALITY)
    q = tmp_path / "run" / "quality"
    report = read_report(tmp_path / "run")  # schema-checked
    assert report["encoder_id"] == v.result.encoder_id and len(report["encoder_id"]) == 16
    assert report["generator_sha256"] == model_folder_sha256(world["generator"])
    for name in ("montage.png", "histograms.png"):
        assert (q / name).read_bytes()[:4] == b"\x89PNG"
    md = (q / "report.md").read_text()
    assert "Batch verdict" in md and "montage.png" in md and "synthetic_0001" in md
    # the volumes changed after validation: the report no longer counts
    vol = tmp_path / "run" / rec.volumes[0].file
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), vol)
    with pytest.raises(Exception, match="changed"):
        read_report(tmp_path / "run")


def test_gate_passes_heldout_volumes_and_only_they_are_exported(passing_run, tmp_path):
    run_dir, v = passing_run
    verdicts = {x.name: x for x in v.result.volumes}
    *held, broken = sorted(verdicts)
    assert all(verdicts[n].passed for n in held), [verdicts[n].reasons for n in held]
    assert not verdicts[broken].passed and v.passed
    r = export_run(run_dir, tmp_path / "nifti", "nifti")
    assert r.exported == held and r.skipped == [broken]
    assert not list((tmp_path / "nifti").glob(f"{broken}*"))
    for name in held:
        side = json.loads((tmp_path / "nifti" / f"{name}.provenance.json").read_text())
        assert side["generator"]["sha256"] == model_folder_sha256(passing_run[1].record.generator)
        assert side["sampling"]["seed"] == 0 and side["quality"]["verdict"] == "pass"
        img = nib.load(tmp_path / "nifti" / f"{name}.nii.gz")
        src = nib.load(run_dir / "volumes" / f"{name}.nii.gz")
        assert np.allclose(img.get_qform(), img.get_sform()) and np.allclose(img.affine, src.affine, atol=1e-5)
        assert np.array_equal(img.get_fdata(), src.get_fdata())
        s = sitk.ReadImage(str(tmp_path / "nifti" / f"{name}.nii.gz"))
        assert np.allclose(s.GetSpacing(), img.header.get_zooms()[:3], atol=1e-5)
        assert np.allclose(s.GetOrigin(), [-img.affine[0, 3], -img.affine[1, 3], img.affine[2, 3]], atol=1e-4)


def test_failed_batch_exports_nothing(world, tmp_path):
    run_dir = fake_run(world, tmp_path / "run", [np.zeros((16, 16, 16), np.float32)] * 2)
    v = validate_run(run_dir, quality=QUALITY)
    assert not v.passed
    with pytest.raises(ExportError, match="failed the gate"):
        export_run(run_dir, tmp_path / "out", "nifti")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(ValidationError, match="not validated"):
        export_run(fake_run(world, tmp_path / "run2", [np.zeros((16, 16, 16), np.float32)]), tmp_path / "o2")


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_dicom_export_is_valid_deidentified_and_idempotent(passing_run, world, tmp_path):
    run_dir, v = passing_run
    out = tmp_path / "dicom"
    r = export_run(run_dir, out, "dicom")
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r2 = export_run(run_dir, out, "dicom")
    second = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert r2.exported == r.exported and first == second  # same files, same bytes, no duplicates
    assert r.exported
    dciodvfy, dcentvfy = dicom3tools()
    blob = all_bytes(out) + all_bytes(run_dir)
    for value in list(IDENTIFIERS.values()) + list(SOURCE_UIDS.values()):
        assert value.encode() not in blob, value
    # the export folder holds no pseudonym (scan-/sub- ids) and no path of the machine it ran on
    exported_text = all_bytes(out)
    for marker in (b"scan-", b"sub-", str(run_dir).encode(), str(Path(world["manifest"]).parent).encode(), b"/tmp/"):
        assert marker not in exported_text, marker
    for name in r.exported:
        files = sorted((out / name).glob("*.dcm"))
        for f in files:
            rc, text = run([dciodvfy, str(f)])
            assert not ERROR.search(text), text
        rc, text = run([dcentvfy, *map(str, files)])
        assert not ERROR.search(text), text
        ds = pydicom.dcmread(files[0])
        assert ds.PatientIdentityRemoved == "YES" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.PatientName == "SYNTHETIC" and ds.PixelRepresentation == 1
        # geometry: SimpleITK (LPS) and the exported NIfTI twin agree voxel by voxel
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(out / name)))
        img = reader.Execute()
        src = nib.load(run_dir / "volumes" / f"{name}.nii.gz")
        direction = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
        lps = np.eye(4)
        lps[:3, :3], lps[:3, 3] = direction, img.GetOrigin()
        ras = np.diag([-1, -1, 1, 1]) @ lps
        assert np.allclose(ras, src.affine, atol=1e-3)
        arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
        data = src.get_fdata()
        assert np.max(np.abs(arr - data)) <= float(ds.RescaleSlope) + 1e-3 * max(1.0, np.abs(data).max())


KILLER = """
import os, sys, pydicom
from medgen.export.exporter import export_run
from medgen.io.nifti import write_nifti
count = {"n": 0}
orig = pydicom.dataset.Dataset.save_as
def save_as(self, *a, **k):
    count["n"] += 1
    if count["n"] == int(sys.argv[3]):
        os.kill(os.getpid(), 9)
    return orig(self, *a, **k)
pydicom.dataset.Dataset.save_as = save_as
export_run(sys.argv[1], sys.argv[2], "dicom")
"""


def test_a_killed_export_leaves_no_visible_partial_file(passing_run, tmp_path):
    run_dir, v = passing_run
    out = tmp_path / "dicom"
    n_slices = 16
    p = subprocess.run(
        [sys.executable, "-c", KILLER, str(run_dir), str(out), str(n_slices + 5)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == -9, p.stderr
    visible = [q for q in out.iterdir() if not q.name.startswith(".")]
    # the first volume is complete (series + sidecar); the second was killed mid-series: invisible
    first = v.result.passing[0]
    # export.json is the in-progress claim written before the first file (the re-run's record)
    assert sorted(q.name for q in visible) == sorted(["export.json", first, f"{first}.provenance.json"])
    assert json.loads((out / "export.json").read_text())["in_progress"] is True
    assert len(list((out / first).glob("*.dcm"))) == n_slices
    assert any(q.name.startswith(".") for q in out.iterdir())  # the hidden partial is there
    export_run(run_dir, out, "dicom")  # a re-run finishes the job and sweeps the partial away
    assert not any(q.name.startswith(".") for q in out.iterdir())
    assert sorted(q.name for q in out.iterdir() if q.is_dir()) == sorted(v.result.passing)


def test_cli_validate_and_export(passing_run, world, tmp_path):
    from typer.testing import CliRunner

    from medgen.cli import app

    run_dir, v = passing_run
    cfg = tmp_path / "q.yaml"
    cfg.write_text("quality:\n  encoder: {steps: 30}\n  gate: {min_pass_fraction: 0.5}\n")
    runner = CliRunner(env={"COLUMNS": "200"})
    r = runner.invoke(app, ["validate", str(run_dir), "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "batch verdict: PASS" in r.output and "contains NaN" in r.output
    r = runner.invoke(app, ["export", str(run_dir), "--format", "nifti", "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "x").glob("*.nii.gz")) == [f"{n}.nii.gz" for n in v.result.passing]
    strict = tmp_path / "strict.yaml"
    strict.write_text("quality:\n  encoder: {steps: 30}\n  gate: {min_pass_fraction: 1.0}\n")
    r = runner.invoke(app, ["validate", str(run_dir), "-c", str(strict)])
    assert r.exit_code == 2 and "FAIL" in r.output
    r = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and "failed the gate" in str(r.exception)


def test_bad_runs_get_clear_typed_errors(passing_run, world, tmp_path):
    from medgen.synthesis.runs import RunError

    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(RunError, match="not_a_run.*no synthesis.json"):
        validate_run(empty)
    with pytest.raises(ValidationError, match="training manifest .*nowhere.csv.* is not there"):
        validate_run(passing_run[0], quality=QUALITY, manifest=tmp_path / "nowhere.csv")
    with pytest.raises(ExportError, match="unknown export format 'png'"):
        export_run(passing_run[0], tmp_path / "out", "png")  # type: ignore[arg-type]
    broken = fake_run(world, tmp_path / "run", [np.zeros((16, 16, 16), np.float32)])
    (broken / RECORD).write_text("{not json")
    with pytest.raises(RunError, match="unreadable synthesis record"):
        validate_run(broken)


def test_serving_without_a_server_is_refused(monkeypatch):
    from flows import serve

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(sys, "argv", ["serve", "configs/schedules.yaml"])
    with pytest.raises(SystemExit, match="needs a Prefect server"):
        serve.main()
