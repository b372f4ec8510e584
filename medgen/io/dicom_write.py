"""Write a Volume as a classic DICOM series: one CT or MR Image Storage instance per slice.

Used to build the sample data set and the bad-input corpus from volumes we generate, and the base
that export (with provenance and the privacy rules) builds on. Geometry is written per slice in LPS;
values are stored as integers with RescaleSlope/Intercept so the modality units (HU) come back.
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


def _stored_values(data: np.ndarray) -> tuple[np.ndarray, float, float, int]:
    """(stored integers, slope, intercept, PixelRepresentation): exact when the data are int16 values."""
    lo, hi = float(data.min()), float(data.max())
    if np.all(data == np.round(data)) and lo >= -32768 and hi <= 32767:
        return data.astype(np.int16), 1.0, 0.0, 1
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.round((data - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, lo, 0


def write_series(
    volume: Volume,
    folder: str | Path,
    *,
    modality: str | None = None,
    patient: dict[str, str] | None = None,
    series_description: str = "medgen",
    image_type: tuple[str, ...] = ("DERIVED", "SECONDARY", "AXIAL"),
    transfer_syntax: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    uid_seed: str | None = None,
) -> list[Path]:
    """Write `volume` into `folder` as NNNN.dcm, one file per k-slice; returns the paths.

    `patient` values (PatientName, PatientID, PatientBirthDate, PatientSex) default to anonymous
    placeholders. `transfer_syntax` may name a compressed syntax (RLE Lossless, JPEG 2000 Lossless).
    `uid_seed` makes UIDs and dates reproducible (for the sample data set, whose content hashes must
    not change between builds); without it every UID is new (`generate_uid`).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    modality = (modality or volume.meta.modality).upper()
    if modality not in SOP_CLASS:
        raise ValueError(f"write_series writes CT or MR, not {modality}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_FROM_RAS @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos = lps[:3, 0] / spacing[0]
    col_cos = lps[:3, 1] / spacing[1]
    stored, slope, intercept, pixel_rep = _stored_values(volume.data)
    patient = {"PatientName": "ANONYMOUS", "PatientID": "ANONYMOUS", "PatientBirthDate": "", "PatientSex": "O", **(patient or {})}

    def uid(role: str) -> str:
        return generate_uid(entropy_srcs=[uid_seed, role]) if uid_seed else generate_uid()

    study_uid = study_uid or uid("study")
    series_uid = series_uid or uid("series")
    frame_uid = frame_of_reference_uid or uid("frame")
    now = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc) if uid_seed else dt.datetime.now(dt.timezone.utc)
    paths = []
    for k in range(volume.shape[2]):
        sop_uid = uid(f"sop{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = SOP_CLASS[modality]
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(image_type)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "medgen"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = series_description
        for key, value in patient.items():
            setattr(ds, key, value)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        position = lps @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position[:3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([row_cos, col_cos])]
        ds.PixelSpacing = [f"{spacing[1]:.8g}", f"{spacing[0]:.8g}"]
        ds.SliceThickness = f"{spacing[2]:.8g}"
        ds.SliceLocation = f"{position[:3] @ np.cross(row_cos, col_cos):.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = f"{intercept:.10g}"
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = ""
            ds.AcquisitionNumber = 1
        else:
            ds.ScanningSequence = "RM"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime = ds.RepetitionTime = ""
            ds.EchoTrainLength = ""
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = j, columns = i
        if transfer_syntax and transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, generate_instance_uid=False)  # keep our (reproducible) UID
        path = folder / f"{k + 1:04d}.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths
