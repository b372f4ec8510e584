"""Covariates from a BIDS participants.tsv or a per-scan CSV, validated and joined (issue 14)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medgen.config import CovariatesConfig
from medgen.datasets.covariates import CovariateError, load_covariates, write_covariates

SEX_AGE = [
    {"name": "sex", "kind": "categorical", "levels": ["F", "M"]},
    {"name": "age", "kind": "continuous", "range": [18, 100]},
]


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    import nibabel as nib

    from medgen import ingest

    root = tmp_path_factory.mktemp("cov")
    rng = np.random.default_rng(0)
    for i in range(4):
        d = root / "src" / f"sub-{i:02d}" / "anat"
        d.mkdir(parents=True)
        nib.save(
            nib.Nifti1Image(rng.random((12, 12, 10)).astype(np.float32) + 1, np.eye(4)), d / f"sub-{i:02d}_T1w.nii.gz"
        )
    report = ingest(root / "src", root / "ing")
    return root, report.manifest_path


def table(root, text, name="participants.tsv"):
    p = root / name
    p.write_text(text)
    return p


def cfg(path, columns=SEX_AGE, **kw):
    return CovariatesConfig.model_validate({"table": str(path), "columns": columns, **kw})


def test_participants_tsv_joins_by_pseudonym_and_writes_no_label(bids):
    root, manifest = bids
    from medgen.io.manifest import read_rows

    t = table(
        root,
        "participant_id\tsex\tage\tsite\nsub-00\tF\t70\tA\nsub-01\tM\t34.5\tB\nsub-02\tF\t51\tA\nsub-03\tM\t88\tB\n",
    )
    c = cfg(t)
    res = load_covariates(c, manifest)
    rows = {r["scan_id"]: r for r in read_rows(manifest) if r["status"] == "accepted"}
    assert set(res.values) == set(rows) and not res.dropped and not res.unmatched
    ages = sorted(v["age"] for v in res.values.values())
    assert ages == [34.5, 51.0, 70.0, 88.0]
    # the subject of the scan whose source is sub-00 got sub-00's row
    sid = next(s for s, r in rows.items() if "sub-00" in r["source"])
    assert res.values[sid] == {"sex": "F", "age": 70.0}
    out = write_covariates(res, c, root / "ing" / "covariates.csv")
    text = out.read_text()
    assert "sub-0" not in text and text.splitlines()[0] == "scan_id,sex,age"
    import csv

    import jsonschema

    schema = json.loads((__import__("pathlib").Path("data_schemas/covariates.schema.json")).read_text())
    for row in csv.DictReader(text.splitlines()):
        jsonschema.validate(row, schema)


@pytest.mark.parametrize(
    "body, match",
    [
        ("participant_id\tsex\tage\nsub-00\tX\t70\n", r"line 2: sex='X' is not one of the declared levels"),
        ("participant_id\tsex\tage\nsub-00\tF\t130\n", r"age=130 is outside the declared range \[18, 100\]"),
        ("participant_id\tsex\tage\nsub-00\tF\tseventy\n", r"age='seventy' is not a number"),
        ("participant_id\tsex\tage\nsub-00\tF\tinf\n", r"outside the declared range"),
        ("participant_id\tsex\tage\nsub-00\tF\t70\nsub-00\tM\t71\n", r"line 3: participant_id='sub-00' appears twice"),
        ("participant_id\tsex\nsub-00\tF\n", r"declared column\(s\) not in the table: age"),
        (
            "participant_id\tsex\tage\nsub-00\tF\tn/a\nsub-01\tM\t40\n",
            r"line 2 \(sub-00\): age is missing .* set missing: drop or impute",
        ),
        ("participant_id\tsex\tage\n00\tF\t70\n", r"not a BIDS participant label"),
        ("participant_id\tsex\tage\nsub-00\tF\t70\textra\n", r"more cells than the header"),
        ("", r"empty table"),
    ],
)
def test_bad_tables_get_one_error_naming_file_line_and_column(bids, body, match):
    root, manifest = bids
    t = table(root, body, "bad.tsv")
    with pytest.raises(CovariateError, match=match) as e:
        load_covariates(cfg(t), manifest)
    assert "bad.tsv" in str(e.value)


def test_missing_values_are_dropped_or_imputed_as_declared(bids):
    root, manifest = bids
    body = "participant_id\tsex\tage\nsub-00\tn/a\t70\nsub-01\tM\tn/a\nsub-02\tF\t50\nsub-99\tF\t60\n"
    t = table(root, body, "gaps.tsv")
    drop = load_covariates(cfg(t, [{**SEX_AGE[0], "missing": "drop"}, {**SEX_AGE[1], "missing": "drop"}]), manifest)
    assert len(drop.values) == 1 and len(drop.dropped) == 3  # sub-00, sub-01 missing; sub-03 has no row
    assert drop.unmatched == ["sub-99"]
    imp = load_covariates(
        cfg(t, [{**SEX_AGE[0], "missing": "impute", "fill": "F"}, {**SEX_AGE[1], "missing": "impute"}]), manifest
    )
    assert len(imp.values) == 3 and len(imp.imputed) == 2
    assert sorted(v["age"] for v in imp.values.values()) == [50.0, 70.0, 70.0]  # median of 50, 70 -> 70 (upper)


def test_a_csv_keyed_by_scan_id(bids):
    root, manifest = bids
    from medgen.io.manifest import read_rows

    ids = [r["scan_id"] for r in read_rows(manifest) if r["status"] == "accepted"]
    body = "scan_id,lesion\n" + "".join(f"{s},{'yes' if i % 2 else 'no'}\n" for i, s in enumerate(ids))
    t = table(root, body, "scans.csv")
    c = cfg(t, [{"name": "lesion", "kind": "categorical", "levels": ["no", "yes"]}], key="scan", key_column="scan_id")
    res = load_covariates(c, manifest)
    assert [res.values[s]["lesion"] for s in ids] == ["no", "yes", "no", "yes"]


@pytest.mark.parametrize(
    "columns",
    [
        [{"name": "sex", "kind": "categorical"}],
        [{"name": "age", "kind": "continuous", "range": [10, 5]}],
        [{"name": "sex", "kind": "categorical", "levels": ["F", "M"], "missing": "impute"}],
        [{"name": "a", "kind": "continuous", "range": [0, 1]}, {"name": "a", "kind": "continuous", "range": [0, 1]}],
    ],
)
def test_declarations_are_checked_before_any_table_is_read(columns):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CovariatesConfig.model_validate({"table": "x.tsv", "columns": columns})


def test_cli_writes_covariates_beside_the_manifest_and_reports_a_bad_table(bids):
    import yaml

    from medgen.cli import main

    root, manifest = bids
    t = table(root, "participant_id\tsex\tage\nsub-00\tF\t70\nsub-01\tM\t40\nsub-02\tF\t55\nsub-03\tM\t61\n", "p.tsv")
    (root / "c.yaml").write_text(yaml.safe_dump({"covariates": {"table": str(t), "columns": SEX_AGE}}))
    assert main(["covariates", "-c", str(root / "c.yaml"), "-m", str(manifest)]) == 0
    assert (manifest.parent / "covariates.csv").read_text().count("\n") == 5
    t.write_text("participant_id\tsex\tage\nsub-00\tQ\t70\n")
    assert main(["covariates", "-c", str(root / "c.yaml"), "-m", str(manifest)]) == 1


@pytest.fixture(scope="module")
def spaced(tmp_path_factory):
    """Three subjects scanned at different voxel spacings (1, 3 and 2 mm along the thickest axis)."""
    import nibabel as nib

    from medgen import ingest

    root = tmp_path_factory.mktemp("spacing")
    rng = np.random.default_rng(1)
    for i, sp in enumerate([(1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (2.0, 2.0, 2.0)]):
        d = root / "src" / f"sub-{i:02d}" / "anat"
        d.mkdir(parents=True)
        img = nib.Nifti1Image(rng.random((12, 12, 10)).astype(np.float32) + 1, np.diag([*sp, 1.0]))
        nib.save(img, d / f"sub-{i:02d}_T1w.nii.gz")
    report = ingest(root / "src", root / "ing")
    assert len(report.accepted) == 3
    return root, report.manifest_path


def test_spacing_columns_come_from_each_scans_geometry_with_or_without_a_table(spaced):
    root, manifest = spaced
    geo = [
        {"name": "thickness", "kind": "continuous", "range": [0.5, 5], "source": "spacing_max"},
        {"name": "dx", "kind": "continuous", "range": [0.5, 5], "source": "spacing_x"},
    ]
    alone = load_covariates(CovariatesConfig.model_validate({"columns": geo}), manifest)
    assert sorted((v["thickness"], v["dx"]) for v in alone.values.values()) == [(1.0, 1.0), (2.0, 2.0), (3.0, 1.0)]
    t = table(root, "participant_id\tsex\nsub-00\tF\nsub-01\tM\nsub-02\tF\n")
    both = load_covariates(cfg(t, [SEX_AGE[0], geo[0]]), manifest)
    assert sorted((v["sex"], v["thickness"]) for v in both.values.values()) == [("F", 1.0), ("F", 2.0), ("M", 3.0)]


def test_a_spacing_outside_its_declared_range_names_the_scan(spaced):
    _, manifest = spaced
    col = {"name": "thickness", "kind": "continuous", "range": [0.5, 2.5], "source": "spacing_max"}
    with pytest.raises(CovariateError, match=r"spacing_max of spacing 1x1x3.*thickness=3.0 is outside"):
        load_covariates(CovariatesConfig.model_validate({"columns": [col]}), manifest)


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"columns": [{"name": "t", "kind": "categorical", "levels": ["a"], "source": "spacing_z"}]}, "continuous"),
        ({"columns": [{"name": "age", "kind": "continuous", "range": [0, 1]}]}, "covariates.table is needed"),
    ],
)
def test_geometry_declarations_are_checked(raw, match):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        CovariatesConfig.model_validate(raw)
