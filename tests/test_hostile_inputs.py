"""Real hospital exports and hostile files: no input stops a batch, nothing of the user's is ever
destroyed, text from files is made safe, and every mistake is one clear message (issue 12)."""

from __future__ import annotations

import collections
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import PYDICOM_TESTS, make_volume

from medgen import ingest, load_volume, read_manifest
from medgen.errors import BundleError, ConfigError, DenoiseError, IngestError
from medgen.io.dicom.write import write_series
from medgen.volume import Volume, VolumeMeta

ROOT = Path(__file__).resolve().parents[1]


def _good(root: Path) -> None:
    write_series(make_volume((20, 18, 6), seed=1), root / "good_ct", patient={"PatientID": "GOOD-1"})
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((10, 11, 12), dtype=np.float32), np.eye(4)), root / "good_T1w.nii.gz")


def _rows_under(rows, root: Path, name: str):
    t = root / name
    return [r for r in rows if Path(r["source"]) == t or t in Path(r["source"]).parents]


def _run_ingest_subprocess(src: Path, out: Path) -> int:
    """Ingest in a fresh process; returns its peak resident memory in MiB. VmHWM belongs to the
    process image (reset by exec); ru_maxrss would carry the forking pytest process's peak over."""
    code = (
        "import re, sys, warnings; warnings.simplefilter('ignore');"
        "from medgen import ingest; ingest(sys.argv[1], sys.argv[2]);"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)"
    )
    p = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- 1 + 2: isolation, memory


def _inflated_dicom(folder: Path) -> None:
    """Six 1.4 KB slices whose headers claim 65535x65535 pixels."""
    files = write_series(make_volume((12, 10, 6), seed=3), folder)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 65535
        ds.save_as(f)


def _nifti_bomb(path: Path, shape=(2048, 2048, 2048)) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))


def test_fuzzed_dicom_and_nifti_never_stop_a_batch(tmp_path):
    """240 seeded mutations (tests/fuzz.py) beside good scans, in one batch, in a fresh process:
    the batch completes, good scans are accepted, every NIfTI mutation is exactly one row, every file
    of a DICOM mutation is in exactly one row (a file set aside is a row, its series another), no
    row is an internal error, and peak memory stays small although headers claim gigabytes."""
    import fuzz

    src = tmp_path / "src"
    cases = fuzz.build(src / "fuzz", n_dicom=130, n_nifti=110, seed=0)
    assert len(cases) >= 200
    _good(src)
    _inflated_dicom(src / "inflated")
    _nifti_bomb(src / "bomb.nii.gz")
    peak = _run_ingest_subprocess(src, tmp_path / "out")
    rows = read_manifest(tmp_path / "out" / "manifest.csv").to_dict("records")
    by_case = collections.defaultdict(list)
    for r in rows:
        rel = Path(r["source"]).relative_to(src).parts
        by_case[rel[1] if rel[:1] == ("fuzz",) and len(rel) > 1 else rel[0] if rel else ""].append(r)
    for name, kind in cases.items():
        got = by_case[name]
        if kind == "nifti":
            assert len(got) == 1, (name, got)
        else:
            n_files = sum(1 for p in (src / "fuzz" / name).iterdir() if p.is_file())
            assert got and sum(int(r["n_files"]) for r in got) == n_files, (name, got)
    assert not [r for r in rows if r["error_code"] == "internal_error"]
    assert {r["status"] for r in _rows_under(rows, src, "good_ct") + _rows_under(rows, src, "good_T1w.nii.gz")} == {
        "accepted"
    }
    assert {r["error_code"] for r in _rows_under(rows, src, "inflated")} == {"truncated"}
    (bomb,) = _rows_under(rows, src, "bomb.nii.gz")
    assert bomb["error_code"] == "too_large"
    assert peak < 1000, f"peak memory {peak} MiB"


@pytest.mark.parametrize("name", ["rtdose.dcm", "rtstruct.dcm", "rtplan.dcm", "test-SR.dcm"])
def test_non_image_dicom_objects_are_unsupported_object_rows(tmp_path, name):
    src = tmp_path / "src"
    _good(src)
    (src / name).write_bytes((PYDICOM_TESTS / name).read_bytes())
    report = ingest(src, tmp_path / "out")
    (row,) = _rows_under(report.rows, src, name)
    assert row["status"] == "rejected" and row["error_code"] == "unsupported_object", row
    assert "not an image volume" in row["reason"]
    assert len(report.accepted) == 2


def _edited_series(folder: Path, **values) -> list[Path]:
    files = write_series(make_volume((12, 10, 5), seed=4), folder)
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for f in files:
            ds = pydicom.dcmread(f)
            for k, v in values.items():
                ds[k].value = v
            ds.save_as(f)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved
    return files


def test_non_numeric_rescale_and_degenerate_orientation_are_rows_naming_the_file(tmp_path):
    src = tmp_path / "src"
    _good(src)
    for f in _edited_series(src / "slope", RescaleSlope="9.87"):  # then 'abc' in the raw bytes: DS cannot hold it
        raw = f.read_bytes()
        assert raw.count(b"9.87") == 1
        f.write_bytes(raw.replace(b"9.87", b"abc "))
    _edited_series(src / "iop", ImageOrientationPatient=[0, 0, 0, 0, 0, 0])
    report = ingest(src, tmp_path / "out")
    slope = _rows_under(report.rows, src, "slope")
    assert {r["error_code"] for r in slope} == {"invalid_header"} and "RescaleSlope" in slope[0]["reason"]
    (iop,) = _rows_under(report.rows, src, "iop")
    assert iop["error_code"] == "missing_geometry" and "0001.dcm" in iop["reason"]
    assert "degenerate ImageOrientationPatient" in iop["reason"]
    assert len(report.accepted) == 2


def test_a_cifti_matrix_under_a_nifti_name_is_refused_by_name(tmp_path):
    """nibabel opens a CIFTI-2 .nii as a Cifti2Image (a matrix, no voxel grid or affine): a typed
    row naming what it is, not an AttributeError deep in the geometry code."""
    import shutil

    src = tmp_path / "src"
    _good(src)
    shutil.copy(Path(nib.__file__).parent / "tests" / "data" / "row_major.dconn.nii", src / "sub-01_bold.nii")
    report = ingest(src, tmp_path / "out")
    (row,) = _rows_under(report.rows, src, "sub-01_bold.nii")
    assert row["error_code"] == "unsupported" and "Cifti2Image" in row["reason"]
    assert len(report.accepted) == 2


def test_an_unexpected_failure_is_an_internal_error_row(tmp_path, monkeypatch):
    import medgen.ingestion.run as run

    src = tmp_path / "src"
    _good(src)
    real = run.read_series

    def flaky(series, **kw):
        if "good_ct" in series.paths[0]:
            raise RuntimeError("simulated decoder crash")
        return real(series, **kw)

    monkeypatch.setattr(run, "read_series", flaky)
    report = ingest(src, tmp_path / "out")
    (row,) = _rows_under(report.rows, src, "good_ct")
    assert row["error_code"] == "internal_error" and "RuntimeError: simulated decoder crash" in row["reason"]
    assert [r["source"] for r in report.accepted] == [str(src / "good_T1w.nii.gz")]


def test_compressed_nifti_is_read_in_a_bounded_stream(tmp_path):
    from medgen.io.nifti import read_nifti

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((64, 64, 64))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    long, short = tmp_path / "long.nii.gz", tmp_path / "short.nii.gz"
    long.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\1" * (64**3 + 4096)))
    short.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\1" * (64**3 - 10)))
    with pytest.raises(Exception, match="more data follows") as e:
        read_nifti(long)
    assert e.value.code == "invalid_header"
    with pytest.raises(Exception, match="ends after") as e:
        read_nifti(short)
    assert e.value.code == "truncated"
    # a claim above the ceiling is refused before any byte is inflated; the ceiling is configurable
    big = tmp_path / "big.nii.gz"
    _nifti_bomb(big, (1024, 1024, 512))
    with pytest.raises(Exception, match="ceiling") as e:
        read_nifti(big)
    assert e.value.code == "too_large"
    with pytest.raises(Exception, match="ends after"):
        read_nifti(big, max_voxels=2**30)


# --------------------------------------------------------------------------- 3: nothing destroyed


def test_ingest_touches_only_its_own_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _good(src)
    (out / "volumes").mkdir(parents=True)
    mine = {out / "volumes" / "notes.txt": b"my notes", out / "volumes" / "my_scan.nii.gz": b"precious"}
    for p, b in mine.items():
        p.write_bytes(b)
    ingest(src, out)
    (src / "good_T1w.nii.gz").unlink()  # a scan vanishes: its volume goes, the user's files stay
    report = ingest(src, out)
    assert len(report.rows) == 1
    assert all(p.read_bytes() == b for p, b in mine.items())
    assert sorted(p.name for p in (out / "volumes").glob("scan-*.nii.gz")) == [Path(report.rows[0]["output_path"]).name]
    with pytest.raises(IngestError, match="inside the output folder"):
        ingest(out / "volumes", out)
    assert all(p.read_bytes() == b for p, b in mine.items())


def test_an_output_folder_inside_the_source_is_not_reingested(tmp_path):
    src = tmp_path / "src"
    _good(src)
    counts = [len(ingest(src, src / "derived").rows) for _ in range(3)]
    assert counts == [2, 2, 2]


KILL_INGEST = """
import sys
from medgen import ingest
ingest(sys.argv[1], sys.argv[2], force=True)
"""


def _written_since(folder: Path, start_ns: int) -> int:
    n = 0
    for f in folder.glob("scan-*.nii.gz"):
        try:
            n += f.stat().st_mtime_ns >= start_ns
        except FileNotFoundError:  # replaced or removed between the listing and the look
            pass
    return n


def test_kill_9_during_ingest_leaves_a_manifest_that_matches_its_volumes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    rng = np.random.default_rng(1)
    src.mkdir()
    n = 16
    for i in range(n):
        nib.save(nib.Nifti1Image(rng.random((48, 64, 64), dtype=np.float32), np.eye(4)), src / f"s{i}.nii.gz")
    ingest(src, out)
    for i in range(n):  # every scan changes shape: a re-run rewrites every volume
        nib.save(nib.Nifti1Image(rng.random((64, 64, 48), dtype=np.float32), np.eye(4)), src / f"s{i}.nii.gz")
    interrupted = 0
    # kill after the k-th volume of this run lands, not after a fixed delay: how long the import and
    # each conversion take varies with the machine's load (fixed delays once all missed)
    for k in (1, 4, 8, 12):
        start = time.time_ns()
        p = subprocess.Popen([sys.executable, "-c", KILL_INGEST, str(src), str(out)])
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            if _written_since(out / "volumes", start) >= k:
                break
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
        rows = read_manifest(out / "manifest.csv").to_dict("records")
        interrupted += len(rows) < n
        for r in rows:
            img = nib.load(out / r["output_path"])
            assert "x".join(map(str, img.shape)) == r["shape"], (k, r["scan_id"])
    assert interrupted, "no kill landed during conversion: the test proved nothing"
    report = ingest(src, out)
    assert len(report.accepted) == n and {r["shape"] for r in report.accepted} == {"64x64x48"}


# --------------------------------------------------------------------------- 4: safe text


def test_manifest_cells_that_would_be_formulas_are_neutralised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    name = "=cmd|' calc'!A1.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((8, 9, 10), dtype=np.float32), np.eye(4)), tmp_path / name)
    ingest([name], "out")
    text = (tmp_path / "out" / "manifest.csv").read_text()
    assert "'=cmd" in text and ",=cmd" not in text
    (row,) = read_manifest(tmp_path / "out" / "manifest.csv").to_dict("records")
    assert row["source"] == name  # medgen's own reader restores the value


def test_terminal_output_escapes_control_characters(tmp_path, capsys):
    from medgen.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "evil\x1b[2J\x1b]0;pwned\x07.nii.gz").write_bytes(b"not gzip")
    rc = main(["ingest", str(src), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "\x1b[2J" not in out and "\x07" not in out and "\\x1b" in out


def test_file_index_holds_keyed_hashes_not_uids(tmp_path):
    src = tmp_path / "src"
    files = write_series(make_volume((12, 10, 5), seed=6), src / "ct")
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files} | {pydicom.dcmread(files[0]).SeriesInstanceUID}
    ingest(src, tmp_path / "out")
    index = (tmp_path / "out" / ".medgen" / "file_index.json").read_text()
    assert not [u for u in uids if u in index]
    assert '"series_uid": "k-' in index


# --------------------------------------------------------------------------- 5: derived DICOM


def test_denoised_dicom_joins_the_source_study_and_frame_of_reference(tmp_path):
    from medgen.cli import main

    rng = np.random.default_rng(3)
    clean = np.clip(rng.normal(300, 80, (24, 24, 8)), 0, None).astype(np.float32)
    src = tmp_path / "mr"
    files = write_series(
        Volume(clean, np.diag([1.0, 1.0, 2.0, 1.0]), VolumeMeta(modality="MR")),
        src,
        patient={"PatientID": "P-7", "PatientName": "Doe^Jane", "PatientSex": "F", "PatientBirthDate": "19700101"},
    )
    for f in files:  # a study as a PACS holds it: dated, with an accession number
        ds = pydicom.dcmread(f)
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20190314", "101500", "ACC123"
        ds.save_as(f)
    source = pydicom.dcmread(files[0])
    assert main(["denoise", str(src), "--out", str(tmp_path / "den"), "--sigma", "20"]) == 0
    out = sorted((tmp_path / "den").glob("*.dcm"))
    assert len(out) == 8
    d = pydicom.dcmread(out[0])
    for kw in ("FrameOfReferenceUID", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber"):
        assert d[kw].value == source[kw].value, kw
    for kw in ("PatientID", "PatientName", "PatientSex", "PatientBirthDate"):
        assert str(d[kw].value) == str(source[kw].value), kw
    assert d.SeriesInstanceUID != source.SeriesInstanceUID and d.SOPInstanceUID != source.SOPInstanceUID
    assert list(d.ImageType[:2]) == ["DERIVED", "SECONDARY"]


def test_denoise_never_overwrites_the_source_or_a_foreign_folder(tmp_path, capsys):
    from medgen.cli import main

    src = tmp_path / "mr"
    files = write_series(make_volume((20, 20, 6), modality="MR", seed=8), src)
    before = {f: f.read_bytes() for f in files}
    assert main(["denoise", str(src), "--out", str(src), "--sigma", "5"]) == 1
    assert "is the input" in capsys.readouterr().err
    assert all(f.read_bytes() == b for f, b in before.items())

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "theirs.dcm").write_bytes(b"the user's file")
    assert main(["denoise", str(src), "--out", str(foreign), "--sigma", "5"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["denoise", str(src), "--out", str(foreign), "--sigma", "5", "--overwrite"]) == 0
    assert (foreign / "theirs.dcm").read_bytes() == b"the user's file"
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "0001.dcm").write_bytes(b"the user's slice")  # the name medgen's first slice would take
    assert main(["denoise", str(src), "--out", str(clash), "--sigma", "5", "--overwrite"]) == 1
    assert "medgen did not write" in capsys.readouterr().err
    assert sorted(p.name for p in clash.iterdir()) == ["0001.dcm"]
    assert (clash / "0001.dcm").read_bytes() == b"the user's slice"

    own = tmp_path / "own"
    for _ in range(2):  # a re-run into its own folder replaces its own series: never two mixed
        assert main(["denoise", str(src), "--out", str(own), "--sigma", "5"]) == 0
    series = {pydicom.dcmread(f).SeriesInstanceUID for f in own.glob("*.dcm")}
    assert len(series) == 1 and len(list(own.glob("*.dcm"))) == 6

    assert main(["denoise", str(src), "--out", str(tmp_path / "x.png"), "--sigma", "5"]) == 1
    assert ".nii" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- 6: model folders, configs


@pytest.fixture
def score_copy(tmp_path):
    import shutil

    from medgen.models.score import default_model_path

    dst = tmp_path / "model"
    shutil.copytree(default_model_path(), dst)
    return dst


def _edit_meta(folder: Path, fn) -> None:
    p = folder / "configs" / "metadata.json"
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(files={"../outside.pt": "0" * 64}), "not models/<name>.pt inside the folder"),
        (lambda m: m.update(files={"/etc/passwd": "0" * 64}), "not models/<name>.pt inside the folder"),
        (lambda m: m["denoiser"].update(num_train_timesteps=50_000_000), "usable model"),
        (lambda m: m.pop("denoiser"), "usable model"),
        (lambda m: m.update(files="nope"), "no weight files"),
    ],
)
def test_bad_model_metadata_is_one_bundle_error(score_copy, edit, match):
    from medgen.models.score import load_score_model

    _edit_meta(score_copy, edit)
    with pytest.raises(BundleError, match=match) as e:
        load_score_model(score_copy)
    assert str(score_copy) in str(e.value)


def test_unreadable_metadata_and_pickles_are_bundle_errors(score_copy):
    from medgen.models.score import load_score_model

    (score_copy / "configs" / "metadata.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read"):
        load_score_model(score_copy)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_payload_is_refused_without_suggesting_weights_only_false(score_copy):
    from medgen.models.score import load_score_model
    from medgen.provenance import sha256_file

    (f,) = (score_copy / "models").glob("*.pt")
    torch.save({"x": _Payload()}, f)
    _edit_meta(score_copy, lambda m: m.update(files={f"models/{f.name}": sha256_file(f)}))
    with pytest.raises(BundleError) as e:
        load_score_model(score_copy)
    assert "weights_only=False" not in str(e.value) and "not a plain tensor file" in str(e.value)


def test_configs_are_strict_about_depth_and_types(tmp_path):
    from medgen.config import load_config

    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 500 + "]" * 500 + "\n")
    with pytest.raises(ConfigError, match="nested"):
        load_config(deep)
    cfg = (ROOT / "configs" / "demo.yaml").read_text().replace("steps: 300", "steps: true", 1)
    assert "steps: true" in cfg
    boolean = tmp_path / "bool.yaml"
    boolean.write_text(cfg)
    with pytest.raises(ConfigError, match="valid integer"):
        load_config(boolean)


# --------------------------------------------------------------------------- 7: denoise inputs


def test_denoise_input_checks():
    from medgen import denoise

    ct = make_volume((16, 16, 16), seed=9)  # HU, down to -1000
    with pytest.raises(DenoiseError, match="magnitude"):
        denoise(ct, noise="rician", sigma=10.0)
    arr = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    for bad in (True, "0.1", -1.0, float("nan"), 1j):
        with pytest.raises(DenoiseError, match="sigma"):
            denoise(arr, sigma=bad)
    for dtype in (np.complex64, bool):
        with pytest.raises(DenoiseError, match="real-valued"):
            denoise(arr.astype(dtype), sigma=0.1)


# --------------------------------------------------------------------------- 8: one clear message


def test_routine_mistakes_print_one_message_not_a_traceback(tmp_path, capsys):
    from medgen.cli import main

    text = tmp_path / "notes.dcm"
    text.write_text("not a scan")
    vol = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.eye(4)), vol)
    for argv, expect in [
        (["denoise", str(text), "--out", str(tmp_path / "o.nii.gz")], "[not_dicom]"),
        (["denoise", str(vol), "--out", str(tmp_path / "o.nii.gz"), "--sigma", "-1"], "sigma"),
    ]:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err and "what to do" in err
        assert len(err.strip().splitlines()) <= 3
    # click's own checks (a path that does not exist, an unknown option): its usage line, exit 2
    for argv in (
        ["denoise", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "o.nii.gz")],
        ["ingest", "--bogus"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Error:" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 4


def test_a_bad_config_given_to_a_flow_is_one_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  sources: [x]\n  out: y\n  workers: true\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    p = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert p.returncode == 1
    assert "ingest.workers" in p.stderr and "Traceback" not in p.stderr + p.stdout
    assert len((p.stderr + p.stdout).strip().splitlines()) <= 4


# --------------------------------------------------------------------------- 9: metadata survives ingest


def test_ingested_ct_loads_back_as_ct_in_hu(tmp_path):
    src = tmp_path / "src"
    write_series(make_volume((14, 12, 6), seed=10), src / "ct")
    report = ingest(src, tmp_path / "out")
    (row,) = report.accepted
    vol = load_volume(tmp_path / "out" / row["output_path"])
    assert (vol.meta.modality, vol.meta.units) == ("CT", "HU")
    side = json.loads((tmp_path / "out" / row["output_path"].replace(".nii.gz", ".json")).read_text())
    assert side["SourceKind"] == "dicom" and not {"PatientID", "SeriesInstanceUID", "StudyDate"} & set(side)
