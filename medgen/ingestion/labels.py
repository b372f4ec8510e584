"""Pairing label maps with the scans ingest accepted: OUT/labels/SCAN_dseg.nii.gz + OUT/labels.csv.

Found during the same survey as the scans, a label map is never a scan itself (a segmentation
trained on as an image would poison a model). It is paired with one accepted scan:
    BIDS dseg/mask  the NIfTI scan whose entities (sub, ses, acq, run, ...) equal the map's, less
                    the derivative-only ones (space, desc, label, res, den); a map that matches
                    several scans or none is reported, not guessed
    DICOM SEG       the DICOM series named by its ReferencedSeriesSequence or, when a writer
                    left that out, the one series holding its frames' source images
then checked (integers, a bounded number of labels) and put on exactly that scan's grid
(medgen.io.labels.on_grid). labels.csv (data_schemas/labels.schema.json) has one row per label
map, paired or refused with the reason; nothing in it identifies a subject (scan ids are salted,
the source path is the user's own, as in the manifest).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medgen.errors import InputError
from medgen.io.atomic import write_text_atomic
from medgen.io.labels import (
    LABELS_CSV,
    LABELS_DIR,
    LabelError,
    bids_entities,
    on_grid,
    read_label_rows,
    read_nifti_labels,
    read_seg_labels,
    referenced_series,
    write_label_nifti,
)
from medgen.io.nifti import load_image

COLUMNS = ["label_source", "status", "reason", "scan_id", "label_path", "labels", "notes", "sha256"]
OWN_LABEL_PATH = re.compile(LABELS_DIR + r"/scan-[0-9a-f]{16}(-t[0-9]{4})?_dseg\.nii\.gz")  # what ingest writes
DERIVATIVE_ENTITIES = {"space", "desc", "label", "res", "den", "seg"}


@dataclass(frozen=True)
class LabelSource:
    path: str
    kind: str  # 'nifti' | 'dicom-seg'


def _pair_key(path: str) -> str:
    """The label file's sha256 (reading it costs little beside parsing and resampling it); joined
    with its scan's sha256 it says whether a previous ingest's placed copy still stands."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _scan_key(row: dict[str, str]) -> str:
    """Names one written volume: its source's sha256 and when and onto which grid it was written
    (a re-ingest with other options rewrites the volume, and its map must be placed again)."""
    fields = [row.get(k, "") for k in ("sha256", "ingested_at", "shape", "spacing", "orientation", "output_path")]
    return hashlib.sha256("|".join(fields).encode()).hexdigest()


def _match_nifti(path: str, scans: dict[str, str]) -> list[str]:
    """Scan ids (of accepted NIfTI scans: scan_id -> source path) with the map's BIDS entities."""
    want = {k: v for k, v in bids_entities(path).items() if k not in DERIVATIVE_ENTITIES}
    if "sub" not in want:
        return []
    return [sid for sid, src in scans.items() if bids_entities(src) == want]


def pair_labels(
    out_dir: Path,
    rows: list[dict[str, str]],
    sources: list[LabelSource],
    series_scans: dict[str, str],
    uid_key: Callable[[str], str] = lambda uid: uid,
    instance_scans: dict[str, str] | None = None,
) -> list[dict[str, str]]:
    """Write each pairable map onto its scan's grid and OUT/labels.csv; returns the csv rows.
    `series_scans` / `instance_scans`: SeriesInstanceUID / SOPInstanceUID -> scan_id of the DICOM
    series in this ingest, the UIDs as the file index keeps them (`uid_key` turns a clear UID into
    that form)."""

    accepted = {r["scan_id"]: r for r in rows if r["status"] == "accepted"}
    nifti_scans = {sid: r["source"] for sid, r in accepted.items() if r["source_kind"] == "nifti"}
    before = {r["label_source"]: r for r in read_label_rows(out_dir).values()}
    out: list[dict[str, str]] = []
    taken: dict[str, str] = {}
    for src in sorted(sources, key=lambda s: s.path):
        row = dict.fromkeys(COLUMNS, "") | {"label_source": src.path}
        by_frames = False
        try:
            row["sha256"] = _pair_key(src.path)
            if src.kind == "nifti":
                ids = _match_nifti(src.path, nifti_scans)
            else:
                refs = referenced_series(src.path)
                ids = [series_scans[k] for k in map(uid_key, refs.series) if k in series_scans]
                if not refs.series:  # pair by the source images its frames name
                    known = instance_scans or {}
                    ids = [known[k] for k in map(uid_key, refs.instances) if k in known]
                    if ids:
                        by_frames = True
                ids = [i for i in ids if i in accepted]
            if not ids:
                raise LabelError(
                    src.path, "no accepted scan to pair with (BIDS entities or referenced series match none)"
                )
            if len(set(ids)) > 1:
                raise LabelError(src.path, f"matches {len(set(ids))} scans; name it so that it matches one")
            sid = ids[0]
            if sid in taken:
                raise LabelError(src.path, f"its scan already has a label map ({taken[sid]})")
            row["sha256"] += ":" + _scan_key(accepted[sid])
            prev = before.get(src.path)
            if (
                prev
                and prev["scan_id"] == sid
                and prev.get("sha256") == row["sha256"]
                and OWN_LABEL_PATH.fullmatch(prev["label_path"])  # only a map ingest itself wrote
                and (out_dir / prev["label_path"]).exists()
            ):
                taken[sid] = src.path  # neither the map nor its scan changed: its placed copy stands
                out.append(prev)
                continue
            scan = load_image(str(out_dir / accepted[sid]["output_path"]))
            labels = read_nifti_labels(src.path) if src.kind == "nifti" else read_seg_labels(src.path)
            placed = on_grid(labels, scan.affine, scan.shape[:3], src.path)
            rel = f"{LABELS_DIR}/{sid}_dseg.nii.gz"
            write_label_nifti(placed, out_dir / rel)
            taken[sid] = src.path
            table = {str(k): v for k, v in sorted(placed.table.items())}
            row |= {"status": "accepted", "scan_id": sid, "label_path": rel, "labels": json.dumps(table)}
            notes = list(placed.notes)
            if by_frames:
                notes.insert(0, "no ReferencedSeriesSequence: paired by its frames' source images")
            row["notes"] = "; ".join(notes)
        except InputError as e:
            row |= {"status": "rejected", "reason": e.reason}
        except Exception as e:  # one hostile file is its own row, never the end of the ingest
            row |= {"status": "rejected", "reason": f"internal error reading the label map: {type(e).__name__}: {e}"}
        out.append(row)
    previous = {r["label_path"] for r in before.values()}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(out)
    if out or (out_dir / LABELS_CSV).exists():
        write_text_atomic(out_dir / LABELS_CSV, buf.getvalue())
    # Maps the previous labels.csv named that this one does not (their scan gone or refused) are
    # removed; only those, as ingest does with volumes: never whatever else lies in labels/.
    keep = {r["label_path"] for r in out if r["label_path"]}
    for rel in previous - keep:
        if OWN_LABEL_PATH.fullmatch(rel):
            with contextlib.suppress(FileNotFoundError):
                (out_dir / rel).unlink()
    return out
