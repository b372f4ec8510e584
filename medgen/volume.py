"""The one volume type that flows from ingest to export.

A `Volume` is a float32 array indexed (i, j, k), a 4x4 affine from voxel indices to RAS world
millimetres, and metadata. Geometry is never dropped: every transform returns a new Volume with a
matching affine. LPS exists only at the DICOM boundary (medgen.io.dicom). Files are written by
medgen.io (write_nifti, write_series): the Volume knows no file format, so io may import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def centred_affine(
    spacing: tuple[float, float, float], shape: tuple[int, ...], rotation: np.ndarray | None = None
) -> np.ndarray:
    """RAS affine with `spacing` (optionally rotated: oblique) whose grid centre is the world origin."""
    a = np.eye(4)
    a[:3, :3] = (rotation if rotation is not None else np.eye(3)) @ np.diag(spacing)
    a[:3, 3] = -a[:3, :3] @ ((np.array(shape[:3]) - 1) / 2.0)
    return a


@dataclass(frozen=True)
class SourceInfo:
    """Where a volume came from.

    `identifiers` holds the source's patient/study values (PatientID, StudyInstanceUID, ...). Two
    readers only: ingestion derives a pseudonymous subject id from them, and a derived DICOM series
    of this very scan (denoising, medgen.denoising.batch) joins its patient and study with them.
    Synthetic outputs never see them, and `repr` hides them so they do not end up in logs.
    """

    kind: str  # "dicom" | "nifti" | "generated"
    path: str
    files: tuple[str, ...] = ()
    identifiers: dict[str, str] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class VolumeMeta:
    modality: str = "OT"
    units: str = "a.u."
    source: SourceInfo | None = None
    notes: tuple[str, ...] = ()  # what happened to the volume on its way (dropped localizers, clamps, ...)


@dataclass(eq=False)
class Volume:
    data: np.ndarray
    affine: np.ndarray
    meta: VolumeMeta = field(default_factory=VolumeMeta)

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.ndim != 3:
            raise ValueError(f"a Volume is 3D, got an array of shape {data.shape}")
        self.data = data.astype(np.float32, copy=False)
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError("a Volume's affine must be a finite 4x4 matrix")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("a Volume's affine is singular")
        self.affine = affine

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes such as 'RAS' or 'LPI': where each array axis points in the world."""
        import nibabel.orientations as nio

        return "".join(nio.aff2axcodes(self.affine))

    def world(self, ijk: np.ndarray) -> np.ndarray:
        """RAS mm positions of voxel indices, shape (n, 3) -> (n, 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def replace(self, **changes: Any) -> "Volume":
        return dataclasses.replace(self, **changes)

    def with_note(self, *notes: str) -> "Volume":
        """The one way to add notes: a new Volume, the same data, its metadata's notes extended."""
        return self.replace(meta=dataclasses.replace(self.meta, notes=self.meta.notes + notes))

    def as_closest_canonical(self) -> "Volume":
        """Flip/permute axes (lossless, no resampling) so the array runs R, A, S along i, j, k."""
        import nibabel.orientations as nio

        ornt = nio.io_orientation(self.affine)
        if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
            return self
        data = nio.apply_orientation(self.data, ornt)
        affine = self.affine @ nio.inv_ornt_aff(ornt, self.data.shape)
        return self.replace(data=np.ascontiguousarray(data), affine=affine)

    def __repr__(self) -> str:
        sp = "x".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, spacing={sp} mm, orientation={self.orientation}, "
            f"modality={self.meta.modality}, units={self.meta.units})"
        )
