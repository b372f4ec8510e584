"""The JSON sidecar beside each ingested volume: what a NIfTI header cannot say.

A NIfTI file has no field for "this is a CT in Hounsfield units", so without a sidecar an ingested
CT loads back as modality 'OT', units 'a.u.'. The keys follow BIDS sidecar style (CamelCase,
`Modality` as in DICOM); nothing identifying is written (no UIDs, names, dates or paths).
`read_nifti` reads a sidecar when it lies beside the file (scan.nii.gz -> scan.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medgen.io.atomic import write_text_atomic
from medgen.volume import Volume

_INTENSITY = {
    "dicom": "modality LUT applied (RescaleSlope/RescaleIntercept or ModalityLUTSequence); stored as float32",
    "nifti": "scl_slope/scl_inter applied; stored as float32",
}


def sidecar_path(nifti: str | Path) -> Path:
    p = Path(nifti)
    stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
    return p.with_name(stem + ".json")


def write_sidecar(volume: Volume, nifti: str | Path, *, source_kind: str) -> Path:
    body = {
        "Modality": volume.meta.modality,
        "Units": volume.meta.units,
        "SourceKind": source_kind,
        "IntensityHandling": _INTENSITY.get(source_kind, "unchanged"),
        "GeneratedBy": "medgen ingest",
    }
    return write_text_atomic(sidecar_path(nifti), json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_sidecar(nifti: str | Path) -> dict[str, Any]:
    """Modality and units from the sidecar, {} when there is none or it cannot be used (a damaged
    sidecar only loses the labels, never the volume)."""
    p = sidecar_path(nifti)
    if not p.is_file() or p.stat().st_size > 65536:
        return {}
    try:
        body = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(body, dict):
        return {}
    out: dict[str, Any] = {}
    for key in ("Modality", "Units"):
        v = body.get(key)
        if isinstance(v, str) and 0 < len(v) <= 32 and v.isprintable():
            out[key] = v
    return out
