"""`load_volume` / `load_volumes`: any supported source path to checked RAS volumes."""

from __future__ import annotations

from pathlib import Path

from medgen.errors import AmbiguousSourceError, InputError, NotAVolumeError
from medgen.io.dicom.series import read_series
from medgen.io.discover import discover
from medgen.io.nifti import FrameMode, read_nifti
from medgen.volume import Volume


def load_volumes(path: str | Path, *, frames: FrameMode = "error", localizers: str = "drop") -> list[Volume]:
    """Every volume under `path` (a NIfTI file, a DICOM file, folder or DICOMDIR).

    Strict: the first scan that cannot be read raises its typed InputError. Use `medgen.ingest`
    for the tolerant batch that reports bad scans and goes on.
    """
    path = Path(path)
    found = discover([path])
    if found.bad_files:
        raise found.bad_files[0]
    volumes: list[Volume] = []
    for f in found.nifti:
        volumes.extend(read_nifti(f, frames=frames))
    for s in found.series:
        volumes.append(read_series(s, localizers=localizers))
    if not volumes:
        if path.is_file() and not found.ignored:
            raise NotAVolumeError(path, "no image in this file")
        raise InputError(path, "no DICOM or NIfTI image found")
    return volumes


def load_volume(
    path: str | Path, *, series: str | None = None, frames: FrameMode = "error", localizers: str = "drop"
) -> Volume:
    """The one volume at `path`. When a folder holds several series, name one by SeriesInstanceUID
    with `series=`; otherwise AmbiguousSourceError lists what is there."""
    path = Path(path)
    found = discover([path])
    candidates = found.series
    if series is not None:
        candidates = [s for s in found.series if s.series_uid == series]
        if not candidates:
            raise InputError(path, f"no series with SeriesInstanceUID {series}")
        return read_series(candidates[0], localizers=localizers)
    n = len(found.nifti) + len(found.series)
    if n > 1:
        listing = "; ".join(
            [str(f) for f in found.nifti]
            + [f"{s.modality} series {s.series_uid} ({len(s.headers)} files)" for s in found.series]
        )
        raise AmbiguousSourceError(path, f"{n} scans found, pass series= or a narrower path: {listing}")
    if found.bad_files:
        raise found.bad_files[0]
    if found.nifti:
        vols = read_nifti(found.nifti[0], frames=frames)
        if len(vols) > 1:
            raise AmbiguousSourceError(path, f"{len(vols)} frames; use load_volumes(frames='split')")
        return vols[0]
    if found.series:
        return read_series(found.series[0], localizers=localizers)
    raise NotAVolumeError(path, "no DICOM or NIfTI image found")
