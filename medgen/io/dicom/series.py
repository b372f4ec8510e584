"""DICOM series reading that a radiologist would trust: the second pass of discovery.

The first pass (`medgen.io.dicom.header`: `read_header`, `group_series`) surveys headers without
pixels. `read_series` then checks the geometry of a group (one orientation, one image size,
uniform slice steps along the slice normal, no gantry tilt, no duplicates or gaps), reads the
pixels, applies each slice's modality LUT (RescaleSlope/Intercept) and returns one RAS `Volume`.

A check that fails raises a typed `GeometryError` (or another `InputError`) naming the files: we
refuse rather than return a sheared or gappy volume. Pixels are read with pydicom (not SimpleITK's
series reader) so that enhanced multi-frame files, compressed transfer syntaxes (through
python-gdcm / pylibjpeg) and per-file errors all go through one path; SimpleITK and dcm2niix are
the references our tests compare against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medgen.errors import (
    DuplicateSliceError,
    GantryTiltError,
    InputError,
    MissingGeometryError,
    MissingPixelDataError,
    MissingSliceError,
    MixedImageSizeError,
    MixedOrientationError,
    NonUniformSpacingError,
    NotAVolumeError,
    TooLargeError,
    TruncatedFileError,
    UnreadableFileError,
    UnsupportedImageError,
)
from medgen.io.dicom.header import DEFAULT_MAX_VOXELS, LPS_TO_RAS, DicomHeader, DicomSeries, SliceGeometry
from medgen.io.nifti import check_values
from medgen.volume import SourceInfo, Volume, VolumeMeta

# Tolerances of the geometry checks, in the units named.
ORIENTATION_TOL = 1e-4  # direction cosine difference between slices
SPACING_REL_TOL = 0.01  # a slice step may differ from the median step by 1%...
SPACING_ABS_TOL = 1e-3  # ...or by 1 micron, whichever is larger
DRIFT_FRACTION = 0.05  # in-plane drift over the whole stack, as a fraction of a pixel (gantry tilt)

# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class StackGeometry:
    """The checked geometry of a stack: slice order and the LPS affine of the (i, j, k) array."""

    order: tuple[int, ...]  # indices into the input slices, in increasing position along the normal
    affine_lps: np.ndarray
    notes: tuple[str, ...] = ()


def _name(label: str) -> str:
    """A slice label for messages: the file name, with ' frame n' kept for enhanced frames."""
    return os.path.basename(label)


def check_stack(
    slices: Sequence[SliceGeometry], labels: Sequence[str], sizes: Sequence[tuple[int, int]], where: str
) -> StackGeometry:
    """Check that 2D images form one regular 3D grid and return its affine (LPS).

    `labels` name each slice in error messages (file names, or 'file frame n').
    """
    n = len(slices)
    if n < 2:
        raise NotAVolumeError(where, f"one 2D image ({_name(labels[0])}), not a volume")
    for s, lab in zip(slices, labels):
        missing = [
            name
            for name, v in (
                ("ImagePositionPatient", s.position),
                ("ImageOrientationPatient", s.orientation),
                ("PixelSpacing", s.pixel_spacing),
            )
            if v is None
        ]
        if missing:
            raise MissingGeometryError(where, f"{_name(lab)} lacks {', '.join(missing)}; its place in space is unknown")
        if min(s.pixel_spacing) <= 0:  # type: ignore[arg-type]
            raise MissingGeometryError(where, f"{_name(lab)} has non-positive PixelSpacing {s.pixel_spacing}")
    if len(set(sizes)) > 1:
        found = sorted(set(sizes))
        raise MixedImageSizeError(
            where, f"images of different sizes in one series: {', '.join(f'{r}x{c}' for r, c in found)}"
        )
    ori = np.array([s.orientation for s in slices], dtype=np.float64)
    if np.abs(ori - ori[0]).max() > ORIENTATION_TOL:
        odd = int(np.argmax(np.abs(ori - ori[0]).max(axis=1)))
        raise MixedOrientationError(
            where, f"slices have different orientations (e.g. {_name(labels[0])} vs {_name(labels[odd])})"
        )
    spacings = np.array([s.pixel_spacing for s in slices])
    if np.abs(spacings - spacings[0]).max() > SPACING_ABS_TOL:
        raise MixedImageSizeError(where, "slices have different PixelSpacing")

    rn, cn = np.linalg.norm(ori[0, :3]), np.linalg.norm(ori[0, 3:])
    if min(rn, cn) < 0.5 or abs(ori[0, :3].dot(ori[0, 3:])) > 0.01 * rn * cn:
        raise MissingGeometryError(
            where,
            f"{_name(labels[0])} has a degenerate ImageOrientationPatient {tuple(ori[0])} "
            "(row and column cosines must be unit vectors at right angles)",
        )
    row = ori[0, :3] / rn
    col = ori[0, 3:] - ori[0, 3:].dot(row) * row  # orthonormalise the (6-digit) cosines
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    pos = np.array([s.position for s in slices], dtype=np.float64)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    pos, dist = pos[order], dist[order]
    steps = np.diff(dist)
    median = float(np.median(steps))
    tol = max(SPACING_ABS_TOL, SPACING_REL_TOL * abs(median))
    dup = np.flatnonzero(steps <= tol)
    if dup.size:
        a, b = labels[order[dup[0]]], labels[order[dup[0] + 1]]
        raise DuplicateSliceError(
            where,
            f"{dup.size} slice position(s) occur twice (e.g. {_name(a)} and {_name(b)} at {dist[dup[0]]:.3f} mm); "
            "a duplicate file, or echoes/time points mixed in one series",
        )
    off = np.abs(steps - median) > tol
    if off.any():
        i = int(np.flatnonzero(off)[0])
        ratio = steps[i] / median
        a, b = labels[order[i]], labels[order[i + 1]]
        if abs(ratio - round(ratio)) * median <= tol and round(ratio) >= 2:
            n_missing = int(sum(round(s / median) - 1 for s in steps[off]))
            raise MissingSliceError(
                where,
                f"{n_missing} slice(s) missing: gap of {steps[i]:.3f} mm between {_name(a)} and {_name(b)} "
                f"where the series steps {median:.3f} mm",
            )
        raise NonUniformSpacingError(
            where,
            f"slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm "
            f"(e.g. {steps[i]:.3f} mm between {_name(a)} and {_name(b)}; median {median:.3f} mm)",
        )
    step = (pos[-1] - pos[0]) / (n - 1)
    drift = step - step.dot(normal) * normal
    pixel = float(min(spacings[0]))
    if np.linalg.norm(drift) * (n - 1) > DRIFT_FRACTION * pixel:
        angle = float(np.degrees(np.arctan2(np.linalg.norm(drift), step.dot(normal))))
        raise GantryTiltError(
            where,
            f"slices are sheared by {angle:.2f} deg (gantry tilt); medgen refuses sheared volumes "
            "rather than misplace voxels: resample the series to an orthogonal grid first",
        )
    residual = pos - (pos[0] + np.outer(np.arange(n), step))
    if np.abs(residual).max() > max(tol, DRIFT_FRACTION * pixel):
        raise NonUniformSpacingError(where, "slice positions do not lie on one straight line")

    affine = np.eye(4)
    affine[:3, 0] = row * spacings[0][1]  # i runs along a row: the column spacing
    affine[:3, 1] = col * spacings[0][0]  # j runs down the rows: the row spacing
    affine[:3, 2] = normal * median
    affine[:3, 3] = pos[0]
    return StackGeometry(order=tuple(int(o) for o in order), affine_lps=affine)


# --------------------------------------------------------------------------- pixels


def _read_dataset(path: str) -> Any:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError as e:
        raise UnreadableFileError(path, f"cannot open: {e.strerror or e}") from e
    except OSError as e:
        raise UnreadableFileError(path, f"cannot read: {e.strerror or e}") from e
    except Exception as e:
        raise TruncatedFileError(path, f"file cannot be parsed to its end ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MissingPixelDataError(path, "no PixelData element")
    return ds


def _pixels(ds: Any, path: str) -> np.ndarray:
    try:
        return _decode(ds, path)
    except InputError:
        raise
    except Exception as e:  # a header pydicom's decoder trips on (a bogus transfer syntax, odd VRs)
        raise UnsupportedImageError(path, f"pixel data cannot be decoded ({type(e).__name__}: {e})") from e


def _decode(ds: Any, path: str) -> np.ndarray:
    ts = ds.file_meta.TransferSyntaxUID
    if not ts.is_compressed and "PixelData" in ds:
        frames = int(ds.get("NumberOfFrames") or 1)
        expected = ds.Rows * ds.Columns * frames * int(ds.get("SamplesPerPixel") or 1) * (ds.BitsAllocated // 8)
        if len(ds.PixelData) < expected:
            raise TruncatedFileError(
                path, f"pixel data is {len(ds.PixelData)} bytes, the header needs {expected} (truncated file)"
            )
    try:
        return ds.pixel_array
    except (ValueError, EOFError) as e:
        msg = str(e)
        if "too short" in msg or "less than expected" in msg or "truncated" in msg.lower() or isinstance(e, EOFError):
            raise TruncatedFileError(path, f"pixel data shorter than the header says ({msg.splitlines()[0]})") from e
        raise UnsupportedImageError(path, f"pixel data cannot be decoded ({msg.splitlines()[0]})") from e
    except NotImplementedError as e:
        raise UnsupportedImageError(
            path, f"no decoder for transfer syntax {ds.file_meta.TransferSyntaxUID.name}"
        ) from e
    except Exception as e:
        raise UnsupportedImageError(path, f"pixel data cannot be decoded ({type(e).__name__}: {e})") from e


def _read_native(h: DicomHeader, where: str) -> np.ndarray:
    """Pixels of an uncompressed slice read at the offset found by the header pass.

    pydicom's `pixel_array` is the general path (compressed and big-endian syntaxes, odd bit
    depths, modality LUTs); parsing every file a second time just to reach the bytes costs a third
    of ingest time on large series, so the common case skips it.
    """
    dtype = np.dtype(f"<{'i' if h.pixel_representation else 'u'}{h.bits_allocated // 8}")
    count = h.rows * h.columns
    try:
        with open(h.path, "rb") as f:
            f.seek(h.pixel_offset)  # type: ignore[arg-type]
            buf = f.read(count * dtype.itemsize)
    except OSError as e:
        raise UnreadableFileError(where, f"{_name(h.path)}: cannot read ({e.strerror or e})") from e
    if len(buf) < count * dtype.itemsize:
        raise TruncatedFileError(
            where,
            f"{_name(h.path)}: pixel data is {len(buf)} bytes, the header needs {count * dtype.itemsize} (truncated file)",
        )
    arr = np.frombuffer(buf, dtype=dtype).reshape(h.rows, h.columns)
    g = h.slice
    return arr * g.slope + g.intercept if g and (g.slope != 1.0 or g.intercept != 0.0) else arr  # type: ignore[union-attr]


def _read_pixels(path: str, where: str) -> tuple[Any, np.ndarray]:
    """Dataset and stored pixel values of one file; errors name the series and the file."""
    try:
        ds = _read_dataset(path)
        return ds, _pixels(ds, path)
    except InputError as e:
        if e.path == where:
            raise
        raise type(e)(where, f"{_name(path)}: {e.reason}") from e


def _check_image_kind(h: DicomHeader, where: str) -> None:
    if h.samples_per_pixel != 1 or h.photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise UnsupportedImageError(
            where, f"{_name(h.path)} is a colour image ({h.photometric}); medgen reads greyscale scans"
        )


def _volume(data_kji: np.ndarray, geom: StackGeometry, series: DicomSeries, notes: list[str], where: str) -> Volume:
    data = np.ascontiguousarray(data_kji.transpose(2, 1, 0), dtype=np.float32)
    check_values(data, where)
    h0 = series.headers[0]
    identifiers = dict(h0.identifiers)
    identifiers["SeriesInstanceUID"] = series.series_uid
    meta = VolumeMeta(
        modality=h0.modality,
        units=h0.units,
        source=SourceInfo(kind="dicom", path=where, files=series.paths, identifiers=identifiers),
        notes=tuple(notes) + geom.notes,
    )
    try:
        return Volume(data, LPS_TO_RAS @ geom.affine_lps, meta)
    except ValueError as e:  # e.g. a spacing so extreme the affine is singular
        raise MissingGeometryError(where, f"the slices do not define a usable grid ({e})") from e


def read_series(
    series: DicomSeries, *, where: str | None = None, localizers: str = "drop", max_voxels: int = DEFAULT_MAX_VOXELS
) -> Volume:
    """Assemble one checked volume from a series (classic slices or one enhanced multi-frame file).

    `localizers`: 'drop' removes images whose ImageType says LOCALIZER from a series that also has
    axial/other images (and notes it); 'error' refuses such a series. `max_voxels` is checked on
    what the headers claim, before any pixel buffer is allocated.
    """
    where = where or (os.path.dirname(series.headers[0].path) if len(series.headers) > 1 else series.headers[0].path)
    headers, notes = _unique_instances(series.headers)
    claimed = sum(h.rows * h.columns * h.frames for h in headers)
    if claimed > max_voxels:
        raise TooLargeError(
            where,
            f"the headers claim {claimed:,} voxels ({len(headers)} image(s) of {headers[0].rows}x{headers[0].columns}); "
            f"the ceiling is {max_voxels:,} (ingest.max_voxels)",
        )
    for h in headers:
        if not h.rows or not h.columns:
            raise MissingPixelDataError(
                where, f"{_name(h.path)} is an image object without Rows/Columns (no pixel data)"
            )
        _check_image_kind(h, where)
    if headers[0].is_multiframe:
        return _read_enhanced(series, where)

    locs = [h for h in headers if h.is_localizer]
    if locs and len(locs) < len(headers):
        if localizers == "error":
            raise MixedOrientationError(
                where, f"{len(locs)} localizer image(s) mixed into the series (e.g. {_name(locs[0].path)})"
            )
        headers = [h for h in headers if not h.is_localizer]
        notes.append(f"dropped {len(locs)} localizer image(s): {', '.join(_name(h.path) for h in locs)}")
    elif locs:
        raise NotAVolumeError(where, f"the series holds only localizer (scout) images ({len(locs)})")
    slices = [h.slice for h in headers]
    geom = check_stack(slices, [h.path for h in headers], [(h.rows, h.columns) for h in headers], where)  # type: ignore[arg-type]
    ordered = [headers[i] for i in geom.order]
    data = np.empty((len(ordered), ordered[0].rows, ordered[0].columns), dtype=np.float32)
    for k, h in enumerate(ordered):
        if h.native_pixels:
            data[k] = _read_native(h, where)
            continue
        ds, arr = _read_pixels(h.path, where)
        if arr.shape != data.shape[1:]:
            raise MixedImageSizeError(
                where, f"{_name(h.path)} pixel array is {arr.shape}, header says {data.shape[1:]}"
            )
        data[k] = _rescale(arr, ds)
    return _volume(data, geom, series, notes, where)


def _unique_instances(headers: Sequence[DicomHeader]) -> tuple[list[DicomHeader], list[str]]:
    """Drop extra copies of one SOP instance (the same UID twice in a tree: a copied file). A UID
    names one instance, so the copies are one slice, not a duplicate position."""
    seen: dict[str, DicomHeader] = {}
    out, dropped = [], []
    for h in headers:
        if h.sop_instance and h.sop_instance in seen and h.slice == seen[h.sop_instance].slice:
            dropped.append(h)
            continue
        seen.setdefault(h.sop_instance, h)
        out.append(h)
    notes = [f"ignored {len(dropped)} extra copy(ies) of an instance: {', '.join(_name(h.path) for h in dropped)}"]
    return out, notes if dropped else []


def _rescale(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values -> modality units (HU for CT) via the modality LUT or RescaleSlope/Intercept."""
    from pydicom.pixels import apply_modality_lut

    return apply_modality_lut(arr, ds)


def _read_enhanced(series: DicomSeries, where: str) -> Volume:
    h = series.headers[0]
    if not h.enhanced_frames:
        raise MissingGeometryError(
            where,
            f"multi-frame file {_name(h.path)} has no per-frame functional groups (plane position/orientation); "
            "its frames cannot be placed in space",
        )
    labels = [f"{h.path} frame {i + 1}" for i in range(len(h.enhanced_frames))]
    geom = check_stack(h.enhanced_frames, labels, [(h.rows, h.columns)] * len(labels), where)
    ds, arr = _read_pixels(h.path, where)
    if arr.ndim != 3 or arr.shape[0] != len(h.enhanced_frames):
        raise UnsupportedImageError(
            where, f"pixel array of shape {arr.shape} does not match {len(h.enhanced_frames)} frames"
        )
    data = np.empty(arr.shape, dtype=np.float32)
    for k, i in enumerate(geom.order):
        g = h.enhanced_frames[i]
        data[k] = arr[i].astype(np.float64) * g.slope + g.intercept
    return _volume(data, geom, series, [], where)
