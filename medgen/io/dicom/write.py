"""Write a Volume as a classic DICOM series: one CT or MR Image Storage instance per slice.

Used to build the sample data set and the bad-input corpus from volumes we generate, and the base
that export (with provenance and the privacy rules) builds on. Geometry is written per slice in LPS;
values are stored as signed int16 with RescaleSlope/Intercept so the modality units (HU) come back.
The files pass dicom3tools' dciodvfy/dcentvfy without errors; `deidentified=True` marks synthetic
output (no source patient) as such, for export.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from medgen.io.atomic import atomic_path
from medgen.volume import Volume

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# ImageType value 3 is required by both IODs: AXIAL is the CT term for a stack of parallel slices
# (oblique included), OTHER the MR defined term for an image that is none of the listed maps.
IMAGE_TYPE_VALUE_3 = {"CT": "AXIAL", "MR": "OTHER"}
SYNTHETIC_PATIENT = {"PatientName": "SYNTHETIC", "PatientID": "SYNTHETIC", "PatientBirthDate": "", "PatientSex": "O"}
DEIDENTIFICATION_METHOD = "medgen synthetic: no source values"


def _ds(value: float) -> str:
    """`value` as a DICOM DS string (at most 16 characters), with as many digits as fit."""
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} does not fit a DS")


def _stored_values(data: np.ndarray) -> tuple[np.ndarray, str, str, int]:
    """(stored int16 values, RescaleSlope, RescaleIntercept as DS strings, PixelRepresentation).

    Integer-valued data within the int16 range are stored exactly (slope 1, intercept 0). Anything
    else is mapped linearly onto the full signed range -32768..32767, so a value comes back within
    half a step (slope / 2) of what was written. The stored integers are computed from the slope and
    intercept as written (after DS rounding), so the rounding of the header costs no precision.
    """
    lo, hi = float(data.min()), float(data.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("write_series needs finite voxel values (NaN or infinity found)")
    if np.all(data == np.round(data)) and lo >= -32768 and hi <= 32767:
        return data.astype(np.int16), "1", "0", 1
    if hi > lo:
        slope_text = _ds((hi - lo) / 65535.0)
        slope = float(slope_text)
        intercept_text = _ds(lo + 32768.0 * slope)
    else:  # constant, non-integer: every voxel is the intercept
        slope_text, slope, intercept_text = "1", 1.0, _ds(lo)
    intercept = float(intercept_text)
    stored = np.clip(np.round((data.astype(np.float64) - intercept) / slope), -32768, 32767).astype(np.int16)
    return stored, slope_text, intercept_text, 1


STUDY_ATTRIBUTES = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
)


def write_series(
    volume: Volume,
    folder: str | Path,
    *,
    modality: str | None = None,
    patient: dict[str, str] | None = None,
    series_description: str = "medgen",
    image_type: tuple[str, ...] | None = None,
    transfer_syntax: str | None = None,
    study_uid: str | None = None,
    study: dict[str, str] | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    uid_seed: str | None = None,
    deidentified: bool = False,
    content_datetime: dt.datetime | None = None,
) -> list[Path]:
    """Write `volume` into `folder` as NNNN.dcm, one file per k-slice; returns the paths.

    Every file is a conformant CT or MR Image Storage instance (checked with dicom3tools' dciodvfy
    and dcentvfy in tests/test_dicom_export.py). Values are stored as signed int16
    (PixelRepresentation 1) with RescaleSlope/Intercept (RescaleType HU for CT): exact for
    integer-valued data in the int16 range, otherwise within half a rescale step.

    `patient` values (PatientName, PatientID, PatientBirthDate, PatientSex) default to anonymous
    placeholders. `image_type` defaults to DERIVED\\SECONDARY\\AXIAL (CT) or DERIVED\\SECONDARY\\OTHER
    (MR); value 3, which both IODs require, is added when a shorter one is given.
    `transfer_syntax` may name a compressed syntax (RLE Lossless, JPEG 2000 Lossless).
    `uid_seed` makes UIDs and dates reproducible (for the sample data set, whose content hashes must
    not change between builds); without it every UID is new (`generate_uid`).
    `content_datetime` sets the study, series and content date/time (default: 2020-01-01 00:00 UTC
    with `uid_seed`, else now); with `uid_seed` it makes repeated writes byte-identical.
    `study` (StudyDate, StudyTime, AccessionNumber, StudyID, ReferringPhysicianName,
    StudyDescription) joins a derived series to its source study as the source had it; without it the
    study is dated like the series.
    `deidentified=True` is for synthetic data with no source patient: dummy patient fields
    (SYNTHETIC), PatientIdentityRemoved YES with a DeidentificationMethod, BurnedInAnnotation and
    RecognizableVisualFeatures NO, ImageType DERIVED\\SECONDARY; `patient` may not be given then.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    modality = (modality or volume.meta.modality).upper()
    if modality not in SOP_CLASS:
        raise ValueError(f"write_series writes CT or MR, not {modality}")
    image_type = tuple(str(v).upper() for v in (image_type or ("DERIVED", "SECONDARY")))
    if len(image_type) < 2:
        raise ValueError(f"image_type needs at least values 1 and 2 (e.g. DERIVED, SECONDARY), not {image_type}")
    if len(image_type) < 3:
        image_type = (*image_type, IMAGE_TYPE_VALUE_3[modality])
    if deidentified:
        if patient:
            raise ValueError("deidentified=True writes dummy patient fields; do not pass `patient`")
        if image_type[:2] != ("DERIVED", "SECONDARY"):
            raise ValueError(f"deidentified (synthetic) images are DERIVED\\SECONDARY, not {image_type[:2]}")
        patient = dict(SYNTHETIC_PATIENT)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_FROM_RAS @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos = lps[:3, 0] / spacing[0]
    col_cos = lps[:3, 1] / spacing[1]
    normal = np.cross(row_cos, col_cos)
    stored, slope, intercept, pixel_rep = _stored_values(volume.data)
    patient = {
        "PatientName": "ANONYMOUS",
        "PatientID": "ANONYMOUS",
        "PatientBirthDate": "",
        "PatientSex": "O",
        **(patient or {}),
    }

    def uid(role: str) -> UID:
        return generate_uid(entropy_srcs=[uid_seed, role]) if uid_seed else generate_uid()

    study_uid = study_uid or uid("study")
    series_uid = series_uid or uid("series")
    frame_uid = frame_of_reference_uid or uid("frame")
    if content_datetime is not None:
        now = content_datetime
    else:
        now = dt.datetime(2020, 1, 1, tzinfo=dt.UTC) if uid_seed else dt.datetime.now(dt.UTC)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    paths = []
    for k in range(volume.shape[2]):
        sop_uid = uid(f"sop{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(SOP_CLASS[modality])
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = SOP_CLASS[modality]
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        if now.utcoffset() is not None:
            ds.TimezoneOffsetFromUTC = _utc_offset(now)
        # Patient
        for key, value in patient.items():
            setattr(ds, key, value)
        if deidentified:
            ds.PatientIdentityRemoved = "YES"
            ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        # General Study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate, ds.StudyTime = date, time
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        for key, value in (study or {}).items():
            if key not in STUDY_ATTRIBUTES:
                raise ValueError(f"study attribute {key} is not one of {', '.join(STUDY_ATTRIBUTES)}")
            setattr(ds, key, value)
        # General Series
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.SeriesDescription = series_description
        ds.Laterality = ""  # Type 2C: no body part is known, so laterality is unknown (empty)
        ds.PatientPosition = "HFS"
        # Frame of Reference
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = "medgen"
        ds.ManufacturerModelName = "medgen"
        # General Image
        ds.InstanceNumber = k + 1
        ds.ImageType = list(image_type)
        ds.ContentDate, ds.ContentTime = date, time
        ds.AcquisitionNumber = 1
        if deidentified:
            ds.BurnedInAnnotation = "NO"
            ds.RecognizableVisualFeatures = "NO"
        # Image Plane
        position = lps @ np.array([0.0, 0.0, float(k), 1.0])
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (along j), column spacing (along i)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([row_cos, col_cos])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position[:3]]
        ds.SliceThickness = _ds(spacing[2])
        ds.SliceLocation = f"{position[:3] @ normal:.6f}"
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        # CT Image / MR Image (MR has no Modality LUT: rescale is written only where it is needed)
        if modality == "CT" or (slope, intercept) != ("1", "0"):
            ds.RescaleIntercept = intercept
            ds.RescaleSlope = slope
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = ""
        else:
            ds.ScanningSequence = "RM"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = ds.EchoTime = ""
            ds.EchoTrainLength = ""
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = j, columns = i
        if transfer_syntax and transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, generate_instance_uid=False)  # keep our (reproducible) UID
        path = folder / f"{k + 1:04d}.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def _utc_offset(when: dt.datetime) -> str:
    minutes = int((when.utcoffset() or dt.timedelta()).total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
