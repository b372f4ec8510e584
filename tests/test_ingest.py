"""Ingestion: manifest schema, incremental re-runs keyed on content, pseudonyms, splits, workers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
from conftest import CT5N, make_volume

from medgen import ingest, load_volume, read_manifest
from medgen.errors import IngestError, ManifestError
from medgen.io.dicom.write import write_series
from medgen.io.manifest import COLUMNS, assign_split, read_rows, validate_rows
from medgen.io.schemas import load_schema

IDENTIFIERS = {"PatientID": "MRN-4471-XYZ", "PatientName": "Doe^Jane^Q", "PatientBirthDate": "19561203"}


@pytest.fixture()
def tree(tmp_path) -> Path:
    src = tmp_path / "src"
    write_series(make_volume(seed=1), src / "p1_ct", patient=IDENTIFIERS)
    write_series(make_volume(seed=2, modality="MR"), src / "p1_mr", patient=IDENTIFIERS)
    write_series(make_volume(seed=3), src / "p2_ct", patient={"PatientID": "OTHER-77"})
    shutil.copytree(CT5N, src / "real_ct")
    (src / "sub-07").mkdir()
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((9, 10, 11), dtype=np.float32), np.eye(4)),
        src / "sub-07" / "anat.nii.gz",
    )
    return src


def test_manifest_rows_validate_against_the_json_schema(tree, tmp_path):
    report = ingest(tree, tmp_path / "out")
    rows = read_rows(report.manifest_path)
    validator = jsonschema.Draft202012Validator(json.loads(Path("data_schemas/manifest.schema.json").read_text()))
    assert len(rows) == 5
    for r in rows:
        assert list(r) == list(COLUMNS)
        validator.validate(r)
    assert load_schema("manifest") == json.loads(Path("data_schemas/manifest.schema.json").read_text())
    df = read_manifest(report.manifest_path)
    assert set(df.status) == {"accepted"} and len(df) == 5


def test_writing_an_invalid_manifest_is_refused():
    row = {c: "" for c in COLUMNS}
    row.update(
        scan_id="scan-0123456789abcdef",
        status="accepted",
        source="x",
        source_kind="dicom",
        n_files="1",
        ingested_at="2026-01-01T00:00:00+00:00",
    )
    with pytest.raises(ManifestError, match="output_path"):
        validate_rows([row])


def test_reingest_of_an_unchanged_tree_reads_nothing(tree, tmp_path, monkeypatch):
    first = ingest(tree, tmp_path / "out")
    assert first.converted == 5 and first.files_read > 0
    before = (tmp_path / "out" / "manifest.csv").read_text()

    import medgen.ingestion.file_index as index
    import medgen.ingestion.run as ing

    def forbidden(*a, **k):
        raise AssertionError("an unchanged source was read again")

    monkeypatch.setattr(index, "read_header", forbidden)
    monkeypatch.setattr(index, "survey_file", forbidden)
    monkeypatch.setattr(ing, "read_series", forbidden)
    monkeypatch.setattr(ing, "read_nifti", forbidden)
    monkeypatch.setattr(ing, "survey_file", forbidden)
    second = ingest(tree, tmp_path / "out")
    assert (second.converted, second.reused, second.files_read) == (0, 5, 0)
    assert (tmp_path / "out" / "manifest.csv").read_text() == before


def test_a_changed_file_reingests_exactly_its_scan(tree, tmp_path):
    first = {r["source"]: r for r in ingest(tree, tmp_path / "out").rows}
    nifti = tree / "sub-07" / "anat.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(9).random((9, 10, 11), dtype=np.float32), np.eye(4)), nifti)
    report = ingest(tree, tmp_path / "out")
    assert (report.converted, report.reused) == (1, 4)
    after = {r["source"]: r for r in report.rows}
    assert after[str(nifti)]["sha256"] != first[str(nifti)]["sha256"]
    assert after[str(nifti)]["scan_id"] == first[str(nifti)]["scan_id"]
    assert {k: v["sha256"] for k, v in after.items() if k != str(nifti)} == {
        k: v["sha256"] for k, v in first.items() if k != str(nifti)
    }


def test_touched_but_identical_file_is_rehashed_not_reconverted(tree, tmp_path):
    ingest(tree, tmp_path / "out")
    f = next((tree / "p2_ct").glob("*.dcm"))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    report = ingest(tree, tmp_path / "out")
    assert (report.converted, report.files_read) == (0, 1)


def test_new_scans_are_picked_up_and_vanished_ones_removed(tree, tmp_path):
    out = tmp_path / "out"
    ingest(tree, out)
    write_series(make_volume(seed=5), tree / "p3_ct", patient={"PatientID": "NEW-1"})
    shutil.rmtree(tree / "p2_ct")
    report = ingest(tree, out)
    assert report.converted == 1 and len(report.rows) == 5
    assert sorted(p.name for p in (out / "volumes").glob("*.nii.gz")) == sorted(
        Path(r["output_path"]).name for r in report.rows
    )


def test_a_scan_that_becomes_broken_loses_its_volume(tree, tmp_path):
    out = tmp_path / "out"
    ingest(tree, out)
    victim = sorted((tree / "p2_ct").glob("*.dcm"))[2]
    victim.write_bytes(victim.read_bytes()[:400])
    report = ingest(tree, out)
    # The cut file cannot even be parsed: it is refused on its own, and its series, now one slice
    # short, is refused as having a gap (naming the neighbours of the hole).
    (series,) = [r for r in report.rows if r["source"] == str(tree / "p2_ct")]
    assert series["status"] == "rejected" and series["error_code"] == "missing_slice"
    (broken,) = [r for r in report.rows if r["source"] == str(victim)]
    assert broken["status"] == "rejected" and broken["error_code"] in ("truncated", "not_dicom", "missing_pixel_data")
    assert len(list((out / "volumes").glob("*.nii.gz"))) == 4


def test_no_identifier_reaches_the_manifest_or_the_volumes(tree, tmp_path):
    out = tmp_path / "out"
    report = ingest(tree, out)
    import gzip

    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / ".medgen" / "file_index.json") in files  # the incremental index is checked too
    blobs = [p.read_bytes() for p in files] + [gzip.decompress(p.read_bytes()) for p in files if p.name.endswith(".gz")]
    for value in list(IDENTIFIERS.values()) + ["OTHER-77", "Doe"]:
        assert not any(value.encode() in b for b in blobs), value
    assert all(r["subject_id"].startswith("sub-") for r in report.rows)


def test_subjects_are_pseudonymous_stable_and_keyed_by_salt(tree, tmp_path):
    a = {r["source"]: r for r in ingest(tree, tmp_path / "a").rows}
    b = {r["source"]: r for r in ingest(tree, tmp_path / "b").rows}
    c = {r["source"]: r for r in ingest(tree, tmp_path / "c", salt="another-secret").rows}
    same_patient = [a[str(tree / "p1_ct")]["subject_id"], a[str(tree / "p1_mr")]["subject_id"]]
    assert same_patient[0] == same_patient[1] != a[str(tree / "p2_ct")]["subject_id"]
    assert {k: v["subject_id"] for k, v in a.items()} == {k: v["subject_id"] for k, v in b.items()}
    assert not set(v["subject_id"] for v in a.values()) & set(v["subject_id"] for v in c.values())


def test_another_salt_discards_the_index_and_its_pseudonyms(tree, tmp_path):
    first = ingest(tree, tmp_path / "out")
    again = ingest(tree, tmp_path / "out", salt="rotated")
    assert again.files_read == first.files_read  # the old index (other pseudonyms) was not trusted
    assert not {r["subject_id"] for r in first.rows} & {r["subject_id"] for r in again.rows}


def test_salt_is_kept_in_the_output_when_none_is_given(tree, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDGEN_SUBJECT_SALT")
    first = {r["scan_id"] for r in ingest(tree, tmp_path / "out").rows}
    salt = tmp_path / "out" / ".medgen" / "salt"
    assert salt.stat().st_mode & 0o077 == 0
    assert {r["scan_id"] for r in ingest(tree, tmp_path / "out", force=True).rows} == first


def test_splits_are_deterministic_and_subject_level(tmp_path):
    src = tmp_path / "many"
    for i in range(24):
        for j in range(2):  # two scans per subject
            write_series(make_volume((8, 8, 3), seed=i * 2 + j), src / f"s{i}_{j}", patient={"PatientID": f"P{i:03d}"})
    rows = ingest(src, tmp_path / "out").rows
    by_subject: dict[str, set[str]] = {}
    for r in rows:
        by_subject.setdefault(r["subject_id"], set()).add(r["split"])
    assert len(by_subject) == 24 and all(len(s) == 1 for s in by_subject.values())
    counts = {s: sum(1 for v in by_subject.values() if s in v) for s in ("train", "val", "test")}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    assert [assign_split(f"sub-{i:016x}") for i in range(50)] == [assign_split(f"sub-{i:016x}") for i in range(50)]


def test_parallel_workers_give_the_same_manifest(tree, tmp_path):
    serial = ingest(tree, tmp_path / "serial").rows
    parallel = ingest(tree, tmp_path / "parallel", workers=2).rows
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ingested_at"} for r in rows]  # noqa: E731
    assert strip(serial) == strip(parallel)
    for r in parallel:
        a = load_volume(tmp_path / "serial" / r["output_path"])
        b = load_volume(tmp_path / "parallel" / r["output_path"])
        assert np.array_equal(a.data, b.data) and np.allclose(a.affine, b.affine)


def test_ingested_volumes_are_canonical_and_keep_world_geometry(tree, tmp_path):
    report = ingest(tree, tmp_path / "out")
    (row,) = [r for r in report.rows if r["source"] == str(tree / "p1_ct")]
    out = load_volume(tmp_path / "out" / row["output_path"])
    src = load_volume(tree / "p1_ct")
    assert out.orientation == "RAS" and row["orientation"] == "RAS"
    # the same world point holds the same value in the source and in the canonical output
    ijk = np.array([[0, 0, 0], [5, 7, 3], [src.shape[0] - 1, src.shape[1] - 1, src.shape[2] - 1]])
    world = src.world(ijk)
    back = np.round(np.linalg.solve(out.affine, np.c_[world, np.ones(3)].T).T[:, :3]).astype(int)
    assert np.array_equal(out.data[tuple(back.T)], src.data[tuple(ijk.T)])


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "nope", tmp_path / "out")


def test_scan_ids_do_not_depend_on_where_the_tree_lies(tree, tmp_path, monkeypatch):
    """A tree given by a relative path, then moved elsewhere: the same scan ids (so the same splits,
    training order and model), since ids hash the path below the source root, not its location."""
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    shutil.copytree(tree, moved / tree.name)
    monkeypatch.chdir(tree.parent)
    a = ingest(tree.name, tmp_path / "a", salt="s")
    monkeypatch.chdir(moved)
    b = ingest(tree.name, tmp_path / "b", salt="s")
    c = ingest(moved / tree.name, tmp_path / "c", salt="s")  # absolute this time
    ids = [sorted(r["scan_id"] for r in rep.rows) for rep in (a, b, c)]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) >= 3
