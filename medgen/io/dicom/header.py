"""DICOM headers without pixels: the first, cheap pass of discovery.

`read_header` parses one file's header only (stopping before PixelData) into a small, picklable
`DicomHeader`, refusing what is not an image volume (SEG, RTSTRUCT, SR, ... by SOP class and
modality) and what cannot hold its pixels (truncated, empty); `group_series` groups headers into
scans by SeriesInstanceUID (an enhanced multi-frame file is a series of its own). A tree of
thousands of files is surveyed this way before a single pixel is decoded (medgen.io.dicom.series).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgen.errors import (
    EmptyFileError,
    InputError,
    InvalidHeaderError,
    MissingPixelDataError,
    NotDicomError,
    TruncatedFileError,
    UnreadableFileError,
    UnsupportedObjectError,
)
from medgen.io.dicom.write import STUDY_ATTRIBUTES

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dic")
NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit / explicit VR LE
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# DICOM objects that are not image volumes, by Modality (their SOP classes say so too; the modality
# catches private or unknown SOP classes carrying them).
NON_VOLUME_MODALITIES = frozenset(
    {
        "RTDOSE",
        "RTSTRUCT",
        "RTPLAN",
        "RTRECORD",
        "SEG",
        "SR",
        "PR",
        "KO",
        "REG",
        "RWV",
        "DOC",
        "FID",
        "PLAN",
        "AU",
        "ECG",
        "HD",
        "RESP",
        "IVOCT_REPORT",
        "SMR",
    }
)
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")  # a CS value, as the manifest schema admits it
MAX_HEADER_DIM = 65535
DEFAULT_MAX_VOXELS = (
    2**27
)  # 512^3: the per-scan ceiling (ingest.max_voxels) unless a caller raises it  # Rows/Columns are US (16-bit) in DICOM

# Patient/study identifiers kept (privately) to derive a pseudonymous subject id.
# The rest of the patient, study and frame-of-reference values join a derived (denoised) series to
# its source; the file index never stores any of them (see medgen.ingestion.file_index.FileIndex).
_IDENTIFIER_TAGS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    *STUDY_ATTRIBUTES,
    "FrameOfReferenceUID",
)


@dataclass(frozen=True)
class SliceGeometry:
    """Where one 2D image (a file, or a frame of an enhanced file) sits in patient space (LPS)."""

    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None  # row cosine (3) then column cosine (3)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), DICOM order
    slope: float = 1.0
    intercept: float = 0.0


@dataclass(frozen=True)
class DicomHeader:
    """What discovery needs from one file, without its pixels. Plain values only (picklable, JSON-able)."""

    path: str
    sop_class: str
    sop_instance: str
    series_uid: str
    modality: str
    rows: int
    columns: int
    frames: int
    image_type: tuple[str, ...]
    photometric: str
    samples_per_pixel: int
    transfer_syntax: str
    rescale_type: str
    units: str
    gantry_tilt: float
    slice: SliceGeometry | None  # classic single-frame files
    enhanced_frames: tuple[SliceGeometry, ...] = ()  # enhanced multi-frame files
    bits_allocated: int = 16
    bits_stored: int = 16
    pixel_representation: int = 0
    has_modality_lut: bool = False
    pixel_offset: int | None = None  # byte offset of the PixelData value in the file, when found
    identifiers: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in (t.upper() for t in self.image_type)

    @property
    def is_multiframe(self) -> bool:
        return self.frames > 1

    @property
    def native_pixels(self) -> bool:
        """Uncompressed little-endian greyscale with a known PixelData offset: readable without pydicom."""
        return (
            self.pixel_offset is not None
            and self.transfer_syntax in NATIVE_LITTLE_ENDIAN
            and self.samples_per_pixel == 1
            and self.bits_allocated in (8, 16, 32)
            and self.bits_stored == self.bits_allocated
            and not self.has_modality_lut
            and self.frames == 1
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DicomHeader":
        def geom(g: dict | None) -> SliceGeometry | None:
            if g is None:
                return None
            return SliceGeometry(
                position=tuple(g["position"]) if g["position"] is not None else None,
                orientation=tuple(g["orientation"]) if g["orientation"] is not None else None,
                pixel_spacing=tuple(g["pixel_spacing"]) if g["pixel_spacing"] is not None else None,
                slope=g["slope"],
                intercept=g["intercept"],
            )

        d = dict(d)
        d["image_type"] = tuple(d["image_type"])
        d["slice"] = geom(d["slice"])
        d["enhanced_frames"] = tuple(geom(g) for g in d["enhanced_frames"])
        return cls(**d)


@dataclass(frozen=True)
class DicomSeries:
    """One scan to assemble: the files of a SeriesInstanceUID, or one enhanced multi-frame file."""

    series_uid: str
    headers: tuple[DicomHeader, ...]
    group: str = ""  # the grouping key when it is not the UID (files without SeriesInstanceUID: their folder)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(h.path for h in self.headers)

    @property
    def modality(self) -> str:
        return self.headers[0].modality

    @property
    def key(self) -> str:
        """Stable identity of the scan (series UID, plus SOP instance for a multi-frame file)."""
        h = self.headers[0]
        if self.group:
            return self.group
        return f"{self.series_uid}/{h.sop_instance}" if h.is_multiframe else self.series_uid


# --------------------------------------------------------------------------- headers


def looks_like_dicom(path: str | Path, head: bytes | None = None) -> bool:
    """True for a DICOM-ish suffix or the 'DICM' magic at byte 128 (Part 10 files without suffix)."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return True
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError:
            return False
    return len(head) >= 132 and head[128:132] == b"DICM"


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _number(ds: Any, kw: str, default: float, path: str | Path) -> float:
    """A numeric header value; missing/empty -> default, anything else that is not a finite number
    is an `InvalidHeaderError` naming the tag (a RescaleSlope of 'abc' must not become 1.0 silently,
    nor a bare ValueError that stops a batch)."""
    try:
        v = ds.get(kw) if ds is not None else None
    except Exception as e:  # a bogus VR fails when pydicom converts the raw element
        raise InvalidHeaderError(path, f"{kw} cannot be parsed ({type(e).__name__}: {e})") from e
    if v is None or (isinstance(v, (str, bytes)) and not str(v).strip()):
        return default
    try:
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            v = v[0]
        f = float(v)
    except (TypeError, ValueError, IndexError) as e:
        raise InvalidHeaderError(path, f"{kw} is not a number ({str(v)[:40]!r})") from e
    if not np.isfinite(f):
        raise InvalidHeaderError(path, f"{kw} is not finite ({f})")
    return f


def _count(ds: Any, kw: str, default: int, path: str | Path, lo: int = 0, hi: int = 2**31 - 1) -> int:
    """A non-negative integer header value within [lo, hi]."""
    f = _number(ds, kw, default, path)
    if f != int(f) or not lo <= f <= hi:
        raise InvalidHeaderError(path, f"{kw} = {f:g} is not an integer in [{lo}, {hi}]")
    return int(f)


def _str(ds: Any, kw: str) -> str:
    try:
        v = ds.get(kw)
        return "" if v is None else str(v).strip()
    except Exception:  # a bogus VR fails when pydicom converts the raw element: treat as absent
        return ""


def _first_item(seq_owner: Any, kw: str) -> Any:
    seq = seq_owner.get(kw) if seq_owner is not None else None
    return seq[0] if seq else None


def _enhanced_frames(ds: Any, path: str | Path) -> tuple[SliceGeometry, ...]:
    """Per-frame geometry and rescale of an enhanced multi-frame file (per-frame overrides shared)."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []

    def pick(frame: Any, group: str) -> Any:
        item = _first_item(frame, group)
        return item if item is not None else _first_item(shared, group)

    frames = []
    for fr in per_frame:
        pos = pick(fr, "PlanePositionSequence")
        ori = pick(fr, "PlaneOrientationSequence")
        meas = pick(fr, "PixelMeasuresSequence")
        pvt = pick(fr, "PixelValueTransformationSequence")
        frames.append(
            SliceGeometry(
                position=_floats(pos.get("ImagePositionPatient") if pos else None, 3),
                orientation=_floats(ori.get("ImageOrientationPatient") if ori else None, 6),
                pixel_spacing=_floats(meas.get("PixelSpacing") if meas else None, 2),
                slope=_number(pvt, "RescaleSlope", 1.0, path) if pvt else 1.0,
                intercept=_number(pvt, "RescaleIntercept", 0.0, path) if pvt else 0.0,
            )
        )
    return tuple(frames)


def header_from_dataset(ds: Any, path: str | Path, pixel_offset: int | None = None) -> DicomHeader:
    """Summarise a parsed dataset (pixels not needed)."""
    meta = getattr(ds, "file_meta", None)
    sop_class = _str(ds, "SOPClassUID") or (_str(meta, "MediaStorageSOPClassUID") if meta else "")
    frames = max(1, _count(ds, "NumberOfFrames", 1, path))
    modality = _str(ds, "Modality").upper()
    if not _MODALITY.match(modality):
        modality = "OT"  # absent, or not a DICOM code string ('-264.299'): unknown, as the manifest says
    rescale_type = _str(ds, "RescaleType").upper()
    if not rescale_type and "SharedFunctionalGroupsSequence" in ds:
        pvt = _first_item(_first_item(ds, "SharedFunctionalGroupsSequence"), "PixelValueTransformationSequence")
        rescale_type = _str(pvt, "RescaleType").upper() if pvt is not None else ""
    if modality == "CT" and rescale_type in ("", "HU", "US"):
        units = "HU"  # 'US' (unspecified) on CT is HU in practice (e.g. enhanced CT with intercept -1024)
    elif modality == "PT":
        units = _str(ds, "Units") or "a.u."
    else:
        units = rescale_type if rescale_type not in ("", "US") else "a.u."
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    classic = None
    if not enhanced:
        classic = SliceGeometry(
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
            slope=_number(ds, "RescaleSlope", 1.0, path),
            intercept=_number(ds, "RescaleIntercept", 0.0, path),
        )
        if classic.slope == 0.0:
            raise InvalidHeaderError(path, "RescaleSlope is 0: every voxel would read the same value")
    try:
        tilt = _number(ds, "GantryDetectorTilt", 0.0, path)
    except InvalidHeaderError:
        tilt = 0.0  # informative only: the geometry check measures the shear itself
    image_type = tuple(str(v).strip() for v in (ds.get("ImageType") or ()))
    bits = _count(ds, "BitsAllocated", 16, path, lo=1, hi=64)
    if bits not in (1, 8, 16, 32, 64):
        raise InvalidHeaderError(path, f"BitsAllocated = {bits} (DICOM allows 1, 8, 16, 32 or 64)")
    return DicomHeader(
        path=str(path),
        sop_class=sop_class,
        sop_instance=_str(ds, "SOPInstanceUID"),
        series_uid=_str(ds, "SeriesInstanceUID"),
        modality=modality,
        rows=_count(ds, "Rows", 0, path, hi=MAX_HEADER_DIM),
        columns=_count(ds, "Columns", 0, path, hi=MAX_HEADER_DIM),
        frames=frames,
        image_type=image_type,
        photometric=_str(ds, "PhotometricInterpretation").upper(),
        samples_per_pixel=_count(ds, "SamplesPerPixel", 1, path, lo=1, hi=4),
        transfer_syntax=_str(meta, "TransferSyntaxUID") if meta is not None else "",
        rescale_type=rescale_type,
        units=units,
        gantry_tilt=tilt,
        slice=classic,
        enhanced_frames=_enhanced_frames(ds, path) if enhanced else (),
        identifiers={t: _str(ds, t) for t in _IDENTIFIER_TAGS},
        bits_allocated=bits,
        bits_stored=_count(ds, "BitsStored", bits, path, lo=1, hi=bits),
        pixel_representation=_count(ds, "PixelRepresentation", 0, path, hi=1),
        has_modality_lut="ModalityLUTSequence" in ds,
        pixel_offset=pixel_offset,
    )


def read_header(path: str | Path, data: bytes | None = None) -> DicomHeader | None:
    """Parse one file's header. None for DICOM objects that are not images (DICOMDIR, SR, RTSTRUCT).

    `data`, when given, is the file's content already read (ingestion hashes and parses one read).
    Raises a typed InputError for empty, unreadable and non-DICOM files.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        if data is None:
            data = path.read_bytes()
    except FileNotFoundError as e:
        raise UnreadableFileError(path, f"cannot open: {e.strerror or e}") from e
    except OSError as e:
        raise UnreadableFileError(path, f"cannot read: {e.strerror or e}") from e
    if len(data) == 0:
        raise EmptyFileError(path, "file is empty (0 bytes)")
    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError as e:
        ds = _without_preamble(fp)  # some exports write the bare dataset, without preamble and meta
        if ds is None:
            raise NotDicomError(path, "not a DICOM file (no DICM preamble and no parsable header)") from e
    except EOFError as e:
        raise TruncatedFileError(path, "header ends before it is complete (truncated file)") from e
    except Exception as e:
        raise NotDicomError(path, f"DICOM header cannot be parsed ({type(e).__name__}: {e})") from e
    meta = getattr(ds, "file_meta", None)
    if meta is not None and _str(meta, "MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
        return None  # a DICOMDIR is an index of the tree, not an object of its own
    try:
        _refuse_non_volume(ds, meta, path)
        header = header_from_dataset(ds, path, _pixel_value_offset(data, fp.tell(), ds))
    except InputError:
        raise
    except Exception as e:  # a value pydicom cannot convert (bogus VR, odd multiplicity...)
        raise InvalidHeaderError(path, f"header values cannot be read ({type(e).__name__}: {e})") from e
    _check_pixel_bytes(header, data, fp.tell(), path)
    return header


def _without_preamble(fp: io.BytesIO) -> Any:
    """A bare dataset (no preamble, no file meta), accepted only when it names its SOP class and
    instance: forcing a parse of a text file would otherwise 'succeed' with garbage."""
    import pydicom

    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        ok = "SOPClassUID" in ds and "SOPInstanceUID" in ds
    except Exception:
        return None
    return ds if ok else None


def _refuse_non_volume(ds: Any, meta: Any, path: Path) -> None:
    """RT dose/structure/plan, SEG, SR, presentation states... are rows of their own, not scans."""
    import pydicom

    sop = _str(ds, "SOPClassUID") or (_str(meta, "MediaStorageSOPClassUID") if meta is not None else "")
    uid = pydicom.uid.UID(sop)
    name = uid.name if sop else ""
    known = bool(sop) and name != sop
    modality = _str(ds, "Modality").upper()
    if modality in NON_VOLUME_MODALITIES or (known and "Image" not in name):
        what = name if known else (f"SOP class {sop}" if sop else "an object without SOP class")
        raise UnsupportedObjectError(
            path, f"{what} (Modality {modality or 'unset'}) is not an image volume; set aside, not converted"
        )


def _check_pixel_bytes(h: DicomHeader, data: bytes, stop: int, path: Path) -> None:
    """Refuse, before any pixel is allocated, a file whose pixels are absent or fewer than its header
    claims: a partial transfer must be a row of its own, not a hole in its series, and a 1 KB file
    claiming 65535x65535 pixels must not cost gigabytes."""
    ended = stop >= len(data)
    if ended and (not h.rows or not h.columns):
        # A partial transfer cut inside its header and a header-only stub (pydicom's TINY_ALPHA
        # file-set) look the same from here: neither can supply pixels, so each is a row of its own.
        raise MissingPixelDataError(
            path, "an image object without Rows/Columns or PixelData (a partial copy, or a header-only file)"
        )
    if not h.rows or not h.columns:
        return  # an image object without Rows: its series is refused by read_series, naming it
    if ended:
        raise MissingPixelDataError(path, "no PixelData element (the file ends after its header)")
    if h.pixel_offset is None or h.transfer_syntax not in NATIVE_LITTLE_ENDIAN:
        return  # compressed or big-endian: the decoder checks (after the voxel ceiling has)
    need = h.rows * h.columns * h.frames * h.samples_per_pixel * h.bits_allocated // 8
    have = len(data) - h.pixel_offset
    if have < need:
        raise TruncatedFileError(
            path,
            f"pixel data is {max(have, 0)} bytes, the header ({h.rows}x{h.columns}x{h.frames}, "
            f"{h.bits_allocated} bits) needs {need} (truncated file or inflated header)",
        )


def _pixel_value_offset(data: bytes, pos: int, ds: Any) -> int | None:
    """Where the PixelData value starts: pydicom stops reading at the (7FE0,0010) tag."""
    if data[pos : pos + 4] != b"\xe0\x7f\x10\x00":
        return None
    implicit = str(ds.file_meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2"
    return pos + (8 if implicit else 12)


def dicomdir_files(path: str | Path) -> list[Path]:
    """Paths of the instances a DICOMDIR references (that exist)."""
    import pydicom
    from pydicom.fileset import FileSet

    try:
        fs = FileSet(pydicom.dcmread(str(path)))
    except Exception as e:
        raise UnreadableFileError(path, f"DICOMDIR cannot be read ({type(e).__name__}: {e})") from e
    return [Path(inst.path) for inst in fs if Path(inst.path).is_file()]


def group_series(headers: Iterable[DicomHeader]) -> list[DicomSeries]:
    """Group image headers into scans, in a stable order (by series key)."""
    groups: dict[str, list[DicomHeader]] = {}
    for h in headers:
        if not h.series_uid:  # no UID: files of one folder are one candidate series, never a tree's
            key = f"no-series-uid:{os.path.dirname(h.path)}" + (f"/{h.path}" if h.is_multiframe else "")
        else:
            key = f"{h.series_uid}/{h.sop_instance}" if h.is_multiframe else h.series_uid
        groups.setdefault(key, []).append(h)
    series = []
    for key in sorted(groups):
        hs = tuple(sorted(groups[key], key=lambda h: h.path))
        series.append(DicomSeries(series_uid=hs[0].series_uid, headers=hs, group=key if not hs[0].series_uid else ""))
    return series
