"""NIfTI reading and writing with explicit geometry rules.

Affine rule when reading (documented, and the one nibabel, FSL and SPM follow): use the sform when
its code is > 0, else the qform when its code is > 0, else the pixdim-only fallback (with a
warning). When both are set and disagree by more than 1e-3 mm anywhere in the volume, a
`QformSformMismatchWarning` is issued and recorded in the volume's notes. ITK prefers the qform,
which is why medgen always *writes* both identical: every reader then agrees.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from medgen.errors import (
    EmptyFileError,
    EmptyVolumeError,
    FourDimensionalError,
    InvalidHeaderError,
    InvalidValuesError,
    NotAVolumeError,
    ShearedAffineError,
    TooLargeError,
    TruncatedFileError,
    UnreadableFileError,
    UnsupportedImageError,
)
from medgen.io.atomic import atomic_path
from medgen.io.sidecar import read_sidecar
from medgen.volume import SourceInfo, Volume, VolumeMeta

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

NIFTI_SUFFIXES = (".nii", ".nii.gz")
FrameMode = Literal["error", "split"]

_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}
_MR_HINT = re.compile(r"(^|[_\-.])(t1|t1w|t2|t2w|flair|pd|pdw|bold|dwi|epi|mprage|mr|mri|anat)([_\-.]|$)", re.I)
_CT_HINT = re.compile(r"(^|[_\-.])(ct)([_\-.]|$)", re.I)


class QformSformMismatchWarning(UserWarning):
    """The file's qform and sform place voxels differently; medgen used the sform."""


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def guess_modality(path: str | Path) -> str:
    """Modality from BIDS-like name parts (``sub-01_T1w.nii.gz`` -> MR); 'OT' when unknown."""
    name = Path(path).name
    if _CT_HINT.search(name):
        return "CT"
    if _MR_HINT.search(name):
        return "MR"
    return "OT"


def _max_corner_distance(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    ca = corners @ a[:3, :3].T + a[:3, 3]
    cb = corners @ b[:3, :3].T + b[:3, 3]
    return float(np.max(np.linalg.norm(ca - cb, axis=1)))


def _choose_affine(img, path: Path) -> tuple[np.ndarray, list[str]]:
    hdr = img.header
    notes: list[str] = []
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    if scode and scode > 0:
        affine = sform
        if qcode and qcode > 0:
            dist = _max_corner_distance(qform, sform, img.shape)
            if dist > 1e-3:
                msg = f"qform and sform disagree by up to {dist:.3g} mm; used the sform"
                warnings.warn(f"{path}: {msg}", QformSformMismatchWarning, stacklevel=3)
                notes.append(msg)
    elif qcode and qcode > 0:
        affine = qform
    else:
        affine = hdr.get_base_affine()
        msg = "neither qform nor sform is set; used pixdim only (orientation unknown)"
        warnings.warn(f"{path}: {msg}", UserWarning, stacklevel=3)
        notes.append(msg)
    unit = hdr.get_xyzt_units()[0]
    scale = _UNIT_TO_MM.get(unit, 1.0)
    if scale != 1.0:
        affine = affine.copy()
        affine[:3, :] *= scale
        notes.append(f"spatial unit {unit} converted to mm")
    return np.asarray(affine, dtype=np.float64), notes


def check_orthogonal(affine: np.ndarray, path: str | Path) -> None:
    """Refuse sheared affines: a qform cannot express them, so qform == sform would be impossible."""
    m = affine[:3, :3]
    cols = m / np.linalg.norm(m, axis=0)
    gram = cols.T @ cols
    off = np.abs(gram - np.eye(3)).max()
    if off > 1e-4:
        raise ShearedAffineError(
            path, f"affine is sheared (axes {np.degrees(np.arccos(np.clip(1 - off, -1, 1))):.2f} deg off orthogonal)"
        )


def check_values(data: np.ndarray, path: str | Path) -> None:
    """Reject NaN/inf and information-free volumes with a reason."""
    if data.size == 0:
        raise EmptyVolumeError(path, f"volume has no voxels (shape {data.shape})")
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise InvalidValuesError(path, f"{bad} of {data.size} voxels are NaN or inf")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise EmptyVolumeError(path, f"every voxel has the same value ({lo:g})")


DEFAULT_MAX_VOXELS = 2**27  # 512^3 voxels per scan (all frames together) unless the caller raises it
_CHUNK = 1 << 22


def _read_voxels(img, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The voxel array, read in a bounded stream rather than through nibabel's proxy.

    A header can claim any size. Reading exactly the claimed bytes into a buffer allocated once (and
    checked against the ceiling before) means a 69-byte gzip claiming 2048^3 or a bomb that inflates
    far past its claim costs nothing; a stream that ends early or runs on is refused, naming the file.
    """
    import gzip
    import zlib

    proxy = img.dataobj  # nibabel's ArrayProxy knows the real offset, dtype and scaling; we only read
    dtype = np.dtype(proxy.dtype)
    count = int(np.prod(img.shape, dtype=np.int64))
    need = count * dtype.itemsize
    offset = int(proxy.offset)
    compressed = str(path).lower().endswith(".gz")
    if not compressed and path.stat().st_size < offset + need:
        raise TruncatedFileError(
            path,
            f"file holds {max(path.stat().st_size - offset, 0)} voxel bytes, the header ({img.shape}) needs {need}",
        )
    raw = np.empty(count, dtype=dtype)
    view = memoryview(raw.view(np.uint8))
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            skip = offset
            while skip:
                got = len(f.read(min(skip, _CHUNK)))
                if not got:
                    raise TruncatedFileError(path, "file ends before its voxel data begins")
                skip -= got
            done = 0
            while done < need:
                n = f.readinto(view[done : min(need, done + _CHUNK)])
                if not n:
                    raise TruncatedFileError(
                        path, f"voxel data ends after {done} of {need} bytes the header ({img.shape}) claims"
                    )
                done += n
            if f.read(1):
                raise InvalidHeaderError(
                    path, f"more data follows the {need} voxel bytes the header ({img.shape}) claims; its size is wrong"
                )
    except (OSError, EOFError, zlib.error) as e:
        raise UnreadableFileError(path, f"voxel data cannot be read ({type(e).__name__}: {e})") from e
    slope, inter = float(proxy.slope), float(proxy.inter)
    arr = raw.reshape(img.shape, order="F")
    data = arr if arr.dtype == np.dtype(np.float32) else arr.astype(np.float32)
    del raw, arr
    if slope != 1.0:
        data *= np.float32(slope)
    if inter != 0.0:
        data += np.float32(inter)
    return data.reshape(shape, order="F")


def load_image(path: str | Path) -> SpatialImage:
    """`nib.load`, typed as what medgen reads: an image with a voxel grid and an affine. Anything
    else nibabel can open under a NIfTI name (a CIFTI-2 matrix, say) is refused by name."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    img = nib.load(str(path))
    if not isinstance(img, SpatialImage):
        raise UnsupportedImageError(path, f"a {type(img).__name__} is not an image on a voxel grid")
    return img


def read_nifti(path: str | Path, *, frames: FrameMode = "error", max_voxels: int = DEFAULT_MAX_VOXELS) -> list[Volume]:
    """Read a NIfTI file into one Volume, or one per frame of a 4D file when `frames='split'`."""

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise EmptyFileError(path, "file is empty (0 bytes)")
        img = load_image(path)
    except (EmptyFileError, UnsupportedImageError):
        raise
    except FileNotFoundError as e:
        raise UnreadableFileError(path, f"cannot open: {e.strerror or e}") from e
    except PermissionError as e:
        raise UnreadableFileError(path, "permission denied") from e
    except Exception as e:  # nibabel raises many kinds for corrupt files
        raise UnreadableFileError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from e

    shape = img.shape
    if img.get_data_dtype().names or np.issubdtype(img.get_data_dtype(), np.complexfloating):
        raise UnsupportedImageError(path, f"voxel type {img.get_data_dtype()} (RGB/complex) is not a scalar image")
    # Trailing singleton dims (x, y, z, 1) are a 3D volume written by a 4D-minded tool.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) <= 1:
        raise NotAVolumeError(path, f"image of shape {img.shape} is 2D, not a volume")
    if len(shape) > 4:
        raise UnsupportedImageError(path, f"image of shape {img.shape} has more than 4 dimensions")
    if len(shape) == 4 and frames == "error":
        raise FourDimensionalError(
            path,
            f"4D image with {shape[3]} frames (shape {img.shape}); ingest with frames='split' for one volume per frame",
        )

    claimed = int(np.prod(img.shape, dtype=np.int64))
    if claimed > max_voxels:
        raise TooLargeError(
            path,
            f"the header claims {claimed:,} voxels (shape {img.shape}); the ceiling is {max_voxels:,} (ingest.max_voxels)",
        )
    try:
        affine, notes = _choose_affine(img, path)
    except (ValueError, KeyError, TypeError, np.linalg.LinAlgError) as e:  # a quaternion or unit code no reader can use
        raise InvalidHeaderError(path, f"the header's geometry cannot be read ({type(e).__name__}: {e})") from e
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidHeaderError(path, "the header's affine (pixdim, srow or quaternion) is singular or not finite")
    check_orthogonal(affine, path)
    data = _read_voxels(img, path, shape)

    side = read_sidecar(path)
    modality = side.get("Modality") or guess_modality(path)
    units = side.get("Units") or ("HU" if modality == "CT" else "a.u.")
    stacks = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
    volumes = []
    for t, stack in enumerate(stacks):
        where = f"{path} frame {t}" if len(stacks) > 1 else path
        check_values(stack, where)
        frame_notes = tuple(notes) + ((f"frame {t} of {len(stacks)}",) if len(stacks) > 1 else ())
        meta = VolumeMeta(
            modality=modality,
            units=units,
            source=SourceInfo(kind="nifti", path=str(path), files=(str(path),)),
            notes=frame_notes,
        )
        volumes.append(Volume(np.ascontiguousarray(stack), affine.copy(), meta))
    return volumes


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write float32 NIfTI-1 with identical qform and sform (code 1, scanner), mm units.

    The header carries nothing from the source: `descrip` says only that medgen wrote it.
    """
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: a NIfTI path ends in .nii or .nii.gz")
    check_orthogonal(volume.affine, path)
    img = nib.Nifti1Image(volume.data, volume.affine)
    hdr = img.header
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(volume.affine, code=1)
    # The sform is set from the qform as stored (a quaternion in float32), not from the input
    # affine, so the two are the same matrix in the file, not two near-equal ones.
    hdr.set_sform(hdr.get_qform(), code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"medgen"
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
