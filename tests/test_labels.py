"""Label maps paired with their scans at ingest (issue 14, item 3): BIDS dseg/mask NIfTI and
DICOM SEG, checked, placed on exactly the scan's output grid, never ingested as scans."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import make_volume, oblique_affine

from medgen import ingest
from medgen.io.labels import LabelError, LabelMap, checked_labels, on_grid


def label_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int16)
    for value in (1, 2, 5):
        c = rng.integers(3, np.array(shape) - 3)
        lab[c[0] - 2 : c[0] + 3, c[1] - 2 : c[1] + 3, max(c[2] - 1, 0) : c[2] + 2] = value
    return lab


def image_from(lab: np.ndarray) -> np.ndarray:
    """An image whose every voxel says its label: label L -> 100 L + 50, so the ingested volume
    tells, voxel for voxel, which label its pair must hold there."""
    return (100.0 * lab + 50.0).astype(np.float32)


def read_labels_csv(out) -> list[dict[str, str]]:
    """labels.csv rows, each checked against data_schemas/labels.schema.json."""
    import jsonschema

    from medgen.io.schemas import load_schema

    rows = list(csv.DictReader((out / "labels.csv").read_text().splitlines()))
    for r in rows:
        jsonschema.validate(r, load_schema("labels"))
    return rows


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    src = root / "src"
    # an oblique, non-RAS grid: ingest reorients the scan, and its labels must follow exactly
    aff = oblique_affine(spacing=(1.2, 1.0, 2.5))
    aff[:3, 0] *= -1
    lab = label_volume((24, 20, 10))
    (src / "sub-01" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(image_from(lab), aff), src / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    der = src / "derivatives" / "seg"
    (der / "sub-01" / "anat").mkdir(parents=True)
    (der / "dataset_description.json").write_text('{"Name": "seg", "BIDSVersion": "1.9.0"}')
    (der / "dseg.tsv").write_text("index\tname\n1\tgrey matter\n2\twhite matter\n5\tlesion\n")
    nib.save(nib.Nifti1Image(lab, aff), der / "sub-01" / "anat" / "sub-01_space-orig_desc-aseg_dseg.nii.gz")
    nib.save(nib.Nifti1Image(lab.astype(np.float32) / 5, aff), der / "sub-01" / "anat" / "sub-01_probseg.nii.gz")
    # sub-02: a finer label grid (resampled, said so); sub-03: a broken map; sub-04: two scans, one map
    lab2 = label_volume((24, 20, 10), seed=2)
    (src / "sub-02" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(image_from(lab2), np.diag([2.0, 2, 2, 1])), src / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    fine = np.repeat(np.repeat(np.repeat(lab2, 2, 0), 2, 1), 2, 2)
    fine_aff = np.diag([1.0, 1, 1, 1])
    fine_aff[:3, 3] = -0.5
    (der / "sub-02" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(fine, fine_aff), der / "sub-02" / "anat" / "sub-02_dseg.nii.gz")
    (src / "sub-03" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(image_from(lab), aff), src / "sub-03" / "anat" / "sub-03_T1w.nii.gz")
    (der / "sub-03" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(lab + 0.5, aff), der / "sub-03" / "anat" / "sub-03_dseg.nii.gz")
    (src / "sub-04" / "anat").mkdir(parents=True)
    for suffix in ("T1w", "T2w"):
        nib.save(nib.Nifti1Image(image_from(lab), aff), src / "sub-04" / "anat" / f"sub-04_{suffix}.nii.gz")
    (der / "sub-04" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(lab, aff), der / "sub-04" / "anat" / "sub-04_dseg.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), der / "sub-01" / "anat" / "sub-09_dseg.nii.gz")  # no scan
    report = ingest(src, root / "out")
    return root / "out", report


def test_dseg_pairs_with_its_scan_on_exactly_its_grid(bids):
    out, report = bids
    assert len(report.accepted) == 5  # sub-01..04 scans; no dseg or probseg became a scan
    assert not any("dseg" in r["source"] or "probseg" in r["source"] for r in report.rows)
    rows = {r["label_source"].split("/")[-1]: r for r in read_labels_csv(out)}
    r = rows["sub-01_space-orig_desc-aseg_dseg.nii.gz"]
    assert r["status"] == "accepted", r
    assert json.loads(r["labels"]) == {"1": "grey matter", "2": "white matter", "5": "lesion"}
    scan = next(s for s in report.accepted if s["scan_id"] == r["scan_id"])
    vol, lab = nib.load(out / scan["output_path"]), nib.load(out / r["label_path"])
    np.testing.assert_allclose(lab.affine, vol.affine, atol=1e-5)
    assert lab.shape == vol.shape and lab.get_data_dtype() == np.uint8
    assert lab.header.get_intent()[0] == "label"
    expected = np.round((vol.get_fdata() - 50) / 100)
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), expected)
    assert r["notes"] == ""


def test_a_map_on_another_grid_is_resampled_nearest_and_says_so(bids):
    out, _ = bids
    r = next(r for r in read_labels_csv(out) if r["label_source"].endswith("sub-02_dseg.nii.gz"))
    assert r["status"] == "accepted" and "resampled nearest-neighbour" in r["notes"]
    assert json.loads(r["labels"]) == {"1": "grey matter", "2": "white matter", "5": "lesion"}
    vol = nib.load(out / "volumes" / f"{r['scan_id']}.nii.gz").get_fdata()
    lab = np.asanyarray(nib.load(out / r["label_path"]).dataobj)
    assert (lab == np.round((vol - 50) / 100)).mean() > 0.97


@pytest.mark.parametrize(
    "name, reason",
    [
        ("sub-03_dseg.nii.gz", "non-integer values"),
        ("sub-04_dseg.nii.gz", "matches 2 scans"),
        ("sub-09_dseg.nii.gz", "no accepted scan to pair with"),
    ],
)
def test_a_map_that_cannot_be_paired_is_a_row_of_its_own_and_its_scan_stays(bids, name, reason):
    out, report = bids
    r = next(r for r in read_labels_csv(out) if r["label_source"].endswith(name))
    assert r["status"] == "rejected" and reason in r["reason"] and not r["label_path"]
    assert len(report.accepted) == 5


@pytest.mark.parametrize(
    "values, reason",
    [
        (np.full((4, 4, 4), -1, np.int16), "negative labels"),
        (np.full((4, 4, 4), np.nan, np.float32), "NaN"),
        (np.zeros((4, 4, 4, 2), np.uint8), "3D"),
        (np.arange(64 * 32, dtype=np.int32).reshape(16, 16, 8), "distinct labels"),
        (np.full((4, 4, 4), 70000, np.int32), "exceeds"),
        (np.full((4, 4, 4), 1, np.complex64), "not an integer image"),
    ],
)
def test_label_checks_name_the_reason(values, reason):
    with pytest.raises(LabelError, match=reason):
        checked_labels(values, "x_dseg.nii.gz")


def test_a_map_outside_its_scans_field_of_view_is_refused():
    far = np.eye(4)
    far[:3, 3] = 500.0
    with pytest.raises(LabelError, match="does not overlap"):
        on_grid(LabelMap(np.ones((4, 4, 4), np.uint8), far, {1: "x"}), np.eye(4), (8, 8, 8), "x_dseg.nii.gz")


@pytest.mark.parametrize("kind", ["binary", "labelmap"])
def test_dicom_seg_pairs_with_the_series_it_references(tmp_path, kind):
    import highdicom  # noqa: F401  (the reader ingest uses)

    from medgen.io.dicom.seg import write_seg
    from medgen.io.dicom.write import write_series

    lab = label_volume((20, 18, 8), seed=4).astype(np.uint8)
    vol = make_volume((20, 18, 8), modality="MR", affine=oblique_affine())
    vol.data[:] = image_from(lab)
    files = write_series(vol, tmp_path / "src" / "series", uid_seed="seg-test")
    with pytest.raises(ValueError, match="segmentation_type 'fractional': 'binary' or 'labelmap'"):
        write_seg(lab, {1: "grey"}, files, tmp_path / "x.dcm", segmentation_type="fractional")
    write_seg(
        lab, {1: "grey", 2: "white", 5: "lesion"}, files, tmp_path / "src" / "seg" / "seg.dcm", segmentation_type=kind
    )
    report = ingest(tmp_path / "src", tmp_path / "out")
    assert len(report.accepted) == 1 and not report.rejected  # the SEG is not a rejected scan row
    (r,) = read_labels_csv(tmp_path / "out")
    assert r["status"] == "accepted", r
    assert json.loads(r["labels"]) == {"1": "grey", "2": "white", "3": "lesion"}  # SEG numbers segments 1..n
    v = nib.load(tmp_path / "out" / report.accepted[0]["output_path"])
    got = np.asanyarray(nib.load(tmp_path / "out" / r["label_path"]).dataobj)
    np.testing.assert_allclose(nib.load(tmp_path / "out" / r["label_path"]).affine, v.affine, atol=1e-4)
    expected = np.round((v.get_fdata() - 50) / 100)
    renumber = {0: 0, 1: 1, 2: 2, 5: 3}
    np.testing.assert_array_equal(got, np.vectorize(renumber.get)(expected))


@pytest.mark.parametrize("drop_frames", [False, True])
def test_a_seg_without_referenced_series_pairs_by_its_frames_source_images(tmp_path, drop_frames):
    """ReferencedSeriesSequence is type 1C and some writers leave it out; the per-frame
    DerivationImageSequence still names the source images. With neither, nothing is guessed."""
    import pydicom

    from medgen.io.dicom.seg import write_seg
    from medgen.io.dicom.write import write_series

    lab = label_volume((20, 18, 8), seed=4).astype(np.uint8)
    vol = make_volume((20, 18, 8), modality="MR", affine=oblique_affine())
    vol.data[:] = image_from(lab)
    files = write_series(vol, tmp_path / "src" / "series", uid_seed="seg-norefs")
    seg_path = tmp_path / "src" / "seg" / "seg.dcm"
    write_seg(lab, {1: "grey", 2: "white", 5: "lesion"}, files, seg_path)
    ds = pydicom.dcmread(seg_path)
    del ds.ReferencedSeriesSequence
    if drop_frames:
        for g in ds.PerFrameFunctionalGroupsSequence:
            if "DerivationImageSequence" in g:
                del g.DerivationImageSequence
        if "SourceImageSequence" in ds:
            del ds.SourceImageSequence
    ds.save_as(seg_path)
    report = ingest(tmp_path / "src", tmp_path / "out")
    assert len(report.accepted) == 1
    (r,) = read_labels_csv(tmp_path / "out")
    if drop_frames:
        assert r["status"] == "rejected" and "no accepted scan to pair with" in r["reason"], r
        return
    assert r["status"] == "accepted", r
    assert r["scan_id"] == report.accepted[0]["scan_id"]
    assert "paired by its frames' source images" in r["notes"]
    v = nib.load(tmp_path / "out" / report.accepted[0]["output_path"])
    got = np.asanyarray(nib.load(tmp_path / "out" / r["label_path"]).dataobj)
    renumber = {0: 0, 1: 1, 2: 2, 5: 3}
    np.testing.assert_array_equal(got, np.vectorize(renumber.get)(np.round((v.get_fdata() - 50) / 100)))


def _two_subjects_with_maps(tmp_path):
    """sub-01 and sub-02, each a T1w and its dseg on one grid: (label array, sources, out)."""
    lab = label_volume((16, 16, 8))
    src = tmp_path / "src"
    for sub in ("sub-01", "sub-02"):
        (src / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(image_from(lab), np.eye(4)), src / sub / f"{sub}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), src / sub / f"{sub}_dseg.nii.gz")
    return lab, src, tmp_path / "out"


def test_reingest_removes_only_label_maps_it_wrote_and_no_longer_pairs(tmp_path):
    _, src, out = _two_subjects_with_maps(tmp_path)
    ingest(src, out)
    paired = {r["label_source"].split("/")[-1]: r["label_path"] for r in read_labels_csv(out)}
    assert all((out / p).exists() for p in paired.values())
    foreign = out / "labels" / "my_notes_dseg.nii.gz"  # the user's own file in ingest's folder
    foreign.write_bytes(b"not ingest's")
    (src / "sub-02" / "sub-02_dseg.nii.gz").unlink()
    ingest(src, out)
    assert not (out / paired["sub-02_dseg.nii.gz"]).exists()  # its map is gone: ingest's copy goes too
    assert (out / paired["sub-01_dseg.nii.gz"]).exists()
    assert foreign.read_bytes() == b"not ingest's"


def test_reingest_keeps_placed_maps_whose_map_and_scan_are_unchanged(tmp_path):
    lab, src, out = _two_subjects_with_maps(tmp_path)
    ingest(src, out)
    first = {r["label_source"].split("/")[-1]: r for r in read_labels_csv(out)}
    stamps = {k: (out / r["label_path"]).stat().st_mtime_ns for k, r in first.items()}
    edited = lab.copy()
    edited[edited == 2] = 1
    nib.save(nib.Nifti1Image(edited, np.eye(4)), src / "sub-02" / "sub-02_dseg.nii.gz")
    ingest(src, out)
    second = {r["label_source"].split("/")[-1]: r for r in read_labels_csv(out)}
    assert second["sub-01_dseg.nii.gz"] == first["sub-01_dseg.nii.gz"]
    assert (out / first["sub-01_dseg.nii.gz"]["label_path"]).stat().st_mtime_ns == stamps["sub-01_dseg.nii.gz"]
    assert second["sub-02_dseg.nii.gz"]["sha256"] != first["sub-02_dseg.nii.gz"]["sha256"]
    placed = np.asanyarray(nib.load(out / second["sub-02_dseg.nii.gz"]["label_path"]).dataobj)
    assert not (placed == 2).any()  # the edited map was placed again, not the stale copy kept
