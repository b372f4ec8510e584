"""The bad-input corpus, ingested as one batch: each case gets its typed error or documented
handling, and the good scans beside them still ingest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from corpus import build_corpus

from medgen import ingest, load_volume
from medgen.errors import (
    DuplicateSliceError,
    EmptyFileError,
    GantryTiltError,
    MissingPixelDataError,
    MissingSliceError,
    MixedImageSizeError,
    MixedOrientationError,
    NonUniformSpacingError,
    NotAVolumeError,
    NotDicomError,
    TruncatedFileError,
    UnreadableFileError,
)
from medgen.ingestion.run import IngestOptions


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "corpus"
    expect = build_corpus(root)
    out = root.parent / "out"
    report = ingest(root, out)
    return root, out, expect, report


def rows_for(report, root: Path, case: str, cases=()):
    """Rows whose source is `case` or lies under it, but not under a more specific case."""
    target = root / case
    inner = [root / c for c in cases if c != case and (root / c).is_relative_to(target)]
    return [
        r
        for r in report.rows
        if (Path(r["source"]) == target or target in Path(r["source"]).parents)
        and not any(Path(r["source"]) == t or t in Path(r["source"]).parents for t in inner)
    ]


def test_corpus_has_at_least_15_bad_or_tricky_cases(batch):
    _, _, expect, _ = batch
    assert len([c for c in expect if not c.startswith("good")]) >= 15


def test_every_case_gets_its_outcome_in_one_batch(batch):
    root, out, expect, report = batch
    for case, (status, detail) in expect.items():
        rows = rows_for(report, root, case, expect)
        assert rows, f"{case}: no manifest row"
        for r in rows:
            assert r["status"] == status, f"{case}: {r['status']} ({r['error_code']}: {r['reason']})"
            if status == "rejected":
                assert r["error_code"] == detail, f"{case}: {r['error_code']}: {r['reason']}"
                assert r["reason"], case
                assert not r["output_path"]
            else:
                assert detail in r["notes"], f"{case}: notes {r['notes']!r}"
                assert (out / r["output_path"]).exists()


def test_good_scans_beside_bad_ones_ingest(batch):
    root, out, _, report = batch
    good = rows_for(report, root, "good_ct") + rows_for(report, root, "good_T1w.nii.gz")
    assert [r["status"] for r in good] == ["accepted", "accepted"]
    vol = load_volume(out / good[0]["output_path"])
    assert vol.orientation == "RAS"


def test_two_series_in_one_folder_are_two_scans(batch):
    root, _, _, report = batch
    assert len(rows_for(report, root, "two_series")) == 2


def test_non_image_files_are_ignored_not_rejected(batch):
    root, _, _, report = batch
    assert not rows_for(report, root, "README.txt")
    assert report.files_ignored >= 1


def test_path_like_tag_values_never_become_paths(batch):
    root, out, _, report = batch
    (row,) = rows_for(report, root, "path_tags")
    assert row["output_path"].startswith("volumes/scan-") and ".." not in row["output_path"]
    assert not (out.parent / "x").exists() and not (root.parent / "x").exists()
    written = {p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()}
    assert written <= {"volumes", "manifest.csv", ".medgen"}


def test_error_messages_name_the_file(batch):
    root, _, expect, report = batch
    (row,) = rows_for(report, root, "truncated/0003.dcm", expect)  # a file set aside is its own row
    assert row["source"].endswith("0003.dcm") and "truncated" in row["reason"]
    (row,) = rows_for(report, root, "truncated", expect)  # and its series says where the hole is
    assert "0002.dcm and 0004.dcm" in row["reason"]
    (row,) = rows_for(report, root, "mixed_orientation")
    assert "0003.dcm" in row["reason"]


@pytest.mark.parametrize(
    "case, error",
    [
        ("truncated", TruncatedFileError),
        ("not_dicom.dcm", NotDicomError),
        ("no_pixels", MissingPixelDataError),
        ("duplicate", DuplicateSliceError),
        ("missing_slice", MissingSliceError),
        ("mixed_orientation", MixedOrientationError),
        ("single_slice", NotAVolumeError),
        ("zero.dcm", EmptyFileError),
        ("dangling.dcm", UnreadableFileError),
        ("mixed_size", MixedImageSizeError),
        ("tilt", GantryTiltError),
        ("uneven", NonUniformSpacingError),
    ],
)
def test_load_volume_raises_the_typed_error(batch, case, error):
    root, *_ = batch
    with pytest.raises(error) as info:
        load_volume(root / case)
    assert str(root / case) in str(info.value) or case in str(info.value)


def test_localizer_policy_error_refuses_the_series(batch, tmp_path):
    root, *_ = batch
    report = ingest(root / "localizer", tmp_path / "o", options=IngestOptions(localizers="error"))
    (row,) = report.rows
    assert row["status"] == "rejected" and "localizer" in row["reason"]


def test_localizer_is_dropped_and_volume_is_the_axial_stack(batch):
    root, *_ = batch
    vol = load_volume(root / "localizer")
    assert vol.shape == (24, 20, 6)
    assert any("localizer" in n for n in vol.meta.notes)


def test_4d_split_gives_one_row_per_frame(batch, tmp_path):
    root, *_ = batch
    report = ingest(root / "fmri_bold.nii.gz", tmp_path / "o", options=IngestOptions(frames="split"))
    assert [r["status"] for r in report.rows] == ["accepted"] * 3
    assert all(r["scan_id"].endswith(f"-t{t:04d}") for t, r in enumerate(report.rows))
    assert len({r["subject_id"] for r in report.rows}) == 1


def test_nan_volume_is_not_written(batch):
    root, out, _, report = batch
    (row,) = rows_for(report, root, "nan.nii.gz")
    assert row["status"] == "rejected"
    assert len(list((out / "volumes").glob("*.nii.gz"))) == len(report.accepted)
    assert not list(out.rglob("*.partial-*"))
    assert np.isfinite(load_volume(out / report.accepted[0]["output_path"]).data).all()
