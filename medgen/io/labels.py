"""Label maps (segmentations): read, check, put on their scan's grid, write.

A label map is an integer volume (0 = background) plus a table naming its labels. It comes as a
BIDS discrete segmentation (`*_dseg.nii.gz`, its table in a `*_dseg.tsv` beside it: columns
index and name), a BIDS binary mask (`*_mask.nii.gz`), or a DICOM SEG object (read by highdicom;
each segment's number and label become the table). Whatever it came as, it leaves here as an
integer array on exactly the voxel grid of the scan it belongs to, so an image and its labels can
go through the same preprocessing voxel for voxel.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medgen.errors import InputError
from medgen.io.atomic import atomic_path
from medgen.io.nifti import load_image

LABELS_CSV = "labels.csv"  # ingest's record of label maps (medgen.ingestion.labels writes it)
LABELS_DIR = "labels"
MAX_LABEL = 65535  # stored as uint16
MAX_LABELS = 1000  # distinct labels in one map: more is a continuous image, not a segmentation
LABEL_SUFFIXES = ("dseg", "mask")  # BIDS: discrete segmentation, binary mask
NOT_SCAN_SUFFIXES = ("dseg", "mask", "probseg")  # never ingested as scans (probseg: neither)
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


class LabelError(InputError):
    """A label map that cannot be paired with its scan: not integer, negative, too many labels, no
    scan to go with, or no overlap with the scan's field of view."""

    code = "invalid_label"
    hint = "fix or replace the label map; its scan is still ingested, without labels"


@dataclass
class LabelMap:
    data: np.ndarray  # integer, (X, Y, Z)
    affine: np.ndarray  # voxel -> RAS mm
    table: dict[int, str]  # label value -> name (background 0 not listed)
    notes: list[str] = field(default_factory=list)

    def replace_affine(self, affine: np.ndarray) -> "LabelMap":
        """The same voxels on the grid of their image as that image's file has it (float32 qform)."""
        return LabelMap(self.data, np.asarray(affine, dtype=float), self.table, self.notes)


def bids_suffix(path: str | Path) -> str:
    """The BIDS suffix of a NIfTI name (sub-01_T1w.nii.gz -> 'T1w'), '' when there is none."""
    stem = _NIFTI.sub("", Path(path).name)
    return stem.rsplit("_", 1)[1] if "_" in stem else ""


def bids_entities(path: str | Path) -> dict[str, str]:
    """key-value entities of a BIDS name (sub-01_ses-2_acq-x_T1w.nii.gz -> sub, ses, acq)."""
    stem = _NIFTI.sub("", Path(path).name)
    return dict(p.split("-", 1) for p in stem.split("_") if "-" in p)


def is_label_file(path: str | Path) -> bool:
    """A BIDS segmentation or mask by name (never read as a scan)."""
    return bool(_NIFTI.search(Path(path).name)) and bids_suffix(path) in NOT_SCAN_SUFFIXES


def is_label_source(path: str | Path) -> bool:
    """A label map medgen pairs (dseg, mask); a probseg is neither scan nor label map."""
    return is_label_file(path) and bids_suffix(path) in LABEL_SUFFIXES


def _table_file(path: Path) -> Path | None:
    """The dseg.tsv that names a map's labels: beside it with the same stem, else a `dseg.tsv`
    (or `*_dseg.tsv` with the same desc) in the folders above, as BIDS allows at a dataset root."""
    stem = _NIFTI.sub("", path.name)
    own = path.with_name(stem + ".tsv")
    if own.is_file():
        return own
    desc = bids_entities(path).get("desc")
    for folder in path.parents:
        for name in ([f"desc-{desc}_dseg.tsv"] if desc else []) + ["dseg.tsv"]:
            if (folder / name).is_file():
                return folder / name
        if (folder / "dataset_description.json").is_file():
            break
    return None


def read_label_table(path: Path) -> dict[int, str]:
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines(), delimiter="\t"))
        return {int(r["index"]): (r.get("name") or f"label {r['index']}").strip() for r in rows if int(r["index"]) > 0}
    except (OSError, UnicodeDecodeError, KeyError, ValueError, TypeError) as e:
        raise LabelError(path, f"label table unreadable (BIDS dseg.tsv needs columns index, name): {e}") from e


def checked_labels(values: np.ndarray, path: str | Path) -> np.ndarray:
    """The map as uint8/uint16, or LabelError: labels are non-negative integers, a few of them."""
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise LabelError(path, f"a label map is 3D; this one has shape {values.shape}")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise LabelError(path, "label map holds NaN or infinite values")
        if not np.array_equal(values, np.round(values)):
            raise LabelError(path, "label map holds non-integer values (a probability map? use a dseg)")
    elif values.dtype.kind not in "iub":
        raise LabelError(path, f"label map of type {values.dtype} is not an integer image")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0:
        raise LabelError(path, f"label map holds negative labels (min {lo:g})")
    if hi > MAX_LABEL:
        raise LabelError(path, f"label {hi:g} exceeds the largest storable label {MAX_LABEL}")
    out = values.astype(np.uint8 if hi < 256 else np.uint16)
    n = len(np.unique(out)) - (1 if (out == 0).any() else 0)
    if n > MAX_LABELS:
        raise LabelError(path, f"{n} distinct labels: more than {MAX_LABELS}, not a segmentation")
    return out


def read_nifti_labels(path: str | Path) -> LabelMap:

    path = Path(path)
    try:
        img = load_image(str(path))
        values = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types on a broken file
        raise LabelError(path, f"unreadable NIfTI label map ({type(e).__name__}: {e})") from e
    data = checked_labels(values, path)
    if bids_suffix(path) == "mask" and data.max() > 1:
        raise LabelError(path, "a BIDS mask is binary (0/1); a map with more labels is a dseg")
    tsv = _table_file(path)
    table = read_label_table(tsv) if tsv else {}
    present = [int(v) for v in np.unique(data) if v > 0]
    if bids_suffix(path) == "mask" and not table:
        table = {1: "mask"}
    notes = []
    if tsv is None and bids_suffix(path) == "dseg":
        notes.append("no dseg.tsv: labels named by number")
    return LabelMap(data, img.affine, {v: table.get(v, f"label {v}") for v in present} | table, notes)


def read_seg_labels(path: str | Path) -> LabelMap:
    """A DICOM SEG object as one label map: segment numbers as labels (overlapping segments are
    refused: one voxel, one label), segment labels as the table, LPS -> RAS."""
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
        vol = seg.get_volume(combine_segments=True, relabel=False)
    except Exception as e:
        raise LabelError(path, f"DICOM SEG unreadable as one label volume ({type(e).__name__}: {e})") from e
    # a LABELMAP SEG lists its background as segment 0: value 0 is background here anyway
    table = {int(s.segment_number): str(s.segment_label) for s in seg.SegmentSequence if int(s.segment_number) > 0}
    data = checked_labels(np.asarray(vol.array), path)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(vol.affine, dtype=float)
    return LabelMap(data, ras, table)


@dataclass(frozen=True)
class SegReferences:
    """What a DICOM SEG says it segments: series (ReferencedSeriesSequence, type 1C) and, per
    frame, the source images (DerivationImageSequence > SourceImageSequence), which writers that
    leave out the first still fill in."""

    series: tuple[str, ...]
    instances: tuple[str, ...]


def referenced_series(path: str | Path) -> SegReferences:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:
        raise LabelError(path, f"unreadable DICOM SEG header ({type(e).__name__})") from e
    series = [str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in s]
    instances: list[str] = [
        str(i.ReferencedSOPInstanceUID) for i in ds.get("SourceImageSequence", []) if "ReferencedSOPInstanceUID" in i
    ]
    groups = list(ds.get("SharedFunctionalGroupsSequence", [])) + list(ds.get("PerFrameFunctionalGroupsSequence", []))
    for g in groups:
        for d in g.get("DerivationImageSequence", []):
            for i in d.get("SourceImageSequence", []):
                if "ReferencedSOPInstanceUID" in i:
                    instances.append(str(i.ReferencedSOPInstanceUID))
    return SegReferences(tuple(dict.fromkeys(series)), tuple(dict.fromkeys(instances)))


def on_grid(labels: LabelMap, affine: np.ndarray, shape: tuple[int, ...], path: str | Path) -> LabelMap:
    """The map on a scan's voxel grid (affine, shape): exact index mapping when the grids agree up
    to axis order and flips, nearest-neighbour resampling (said in notes) when they do not."""
    from scipy.ndimage import affine_transform

    m = np.linalg.inv(labels.affine) @ affine  # scan voxel -> label voxel
    rot, shift = m[:3, :3], m[:3, 3]
    exact = np.allclose(rot, np.round(rot), atol=1e-3) and np.allclose(shift, np.round(shift), atol=1e-2)
    exact = exact and sorted(np.abs(np.round(rot)).sum(0).tolist()) == [1.0, 1.0, 1.0]
    notes = list(labels.notes)
    if exact:
        r, s = np.round(rot).astype(int), np.round(shift).astype(int)
        idx = np.indices(shape).reshape(3, -1)
        src = r @ idx + s[:, None]
        inside = np.all((src >= 0) & (src < np.array(labels.data.shape)[:, None]), axis=0)
        out = np.zeros(int(np.prod(shape)), labels.data.dtype)
        out[inside] = labels.data[tuple(src[:, inside])]
        out = out.reshape(shape)
    else:
        out = affine_transform(
            labels.data, rot, shift, output_shape=shape, order=0, mode="constant", cval=0, prefilter=False
        )
        notes.append(
            f"label map resampled nearest-neighbour onto the scan's grid (its grid differs: {labels.data.shape} voxels)"
        )
    if labels.data.any() and not out.any():
        raise LabelError(path, "label map does not overlap its scan's field of view (no label falls inside it)")
    return LabelMap(out, affine, labels.table, notes)


def write_label_nifti(labels: LabelMap, path: str | Path) -> Path:
    """Integer NIfTI (uint8/uint16, intent 'label'), same qform/sform convention as medgen's scans."""
    import nibabel as nib

    img = nib.Nifti1Image(labels.data, labels.affine)
    hdr = img.header
    hdr.set_data_dtype(labels.data.dtype)
    hdr.set_qform(labels.affine, code=1)
    hdr.set_sform(hdr.get_qform(), code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_intent("label")
    hdr["descrip"] = b"medgen labels"
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def read_label_rows(out_dir: str | Path) -> dict[str, dict[str, str]]:
    """scan_id -> its accepted labels.csv row ({} when the ingest found no label maps)."""
    path = Path(out_dir) / LABELS_CSV
    if not path.exists():
        return {}
    rows = csv.DictReader(path.read_text(encoding="utf-8").splitlines())
    return {r["scan_id"]: r for r in rows if r["status"] == "accepted"}
