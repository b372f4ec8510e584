"""A seeded mutation corpus: hundreds of broken variants of one valid DICOM series and one valid
NIfTI file, each in its own folder, to be ingested in one batch beside good scans.

Mutations cover every geometry, pixel-module and rescale tag (deleted, emptied, non-numeric, NaN,
inf, zero, negative, huge, wrong multiplicity, bogus VR), truncations at random offsets, flipped
header bytes, trailing junk, inflated dimensions; for NIfTI every header field that places or sizes
the voxels (dim, datatype, bitpix, pixdim, vox_offset, q/sform codes and rows, quaternion,
scl_slope/inter, magic), truncated and long streams, with and without gzip.

`build(root, n_dicom, n_nifti, seed)` returns {case folder name: kind}. No expected outcome is
recorded: what a mutation does is for ingest to judge; the invariants are checked by the test.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataelem import DataElement

from medgen.io.dicom.write import write_series
from medgen.volume import Volume, VolumeMeta

DICOM_TAGS = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "PixelData",
    "GantryDetectorTilt",
)
US_TAGS = {"Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel"}
STRINGS = ("", "abc", "nan", "inf", "-inf", "-1", "0", "1e308", "65535", "1\\2", "0\\0\\0\\0\\0\\0", "=1+1", "\x1b[31m")
NIFTI_FIELDS = (
    "dim",
    "datatype",
    "bitpix",
    "pixdim",
    "vox_offset",
    "qform_code",
    "sform_code",
    "srow_x",
    "srow_y",
    "quatern_b",
    "qoffset_x",
    "scl_slope",
    "scl_inter",
    "magic",
    "sizeof_hdr",
    "xyzt_units",
)


def _dicom_value(rng: np.random.Generator, tag: str):
    """A hostile value for `tag`: (how, value)."""
    kind = rng.integers(0, 5)
    if kind == 0:
        return "delete", None
    if kind == 1:
        return "bogus_vr", bytes(rng.integers(0, 256, size=int(rng.integers(0, 12)), dtype=np.uint8))
    if tag in US_TAGS:
        return "set", int(rng.choice([0, 1, 3, 7, 15, 17, 33, 64, 255, 4096, 65535]))
    if tag == "PixelData":
        return "set", bytes(rng.integers(0, 256, size=int(rng.integers(0, 600)), dtype=np.uint8))
    if kind == 2:
        return "set", str(rng.choice(STRINGS))
    return "set", f"{rng.normal() * 10.0 ** int(rng.integers(-3, 12)):.6g}"


def _mutate_dataset(ds: pydicom.Dataset, rng: np.random.Generator, tag: str, how: str, value) -> None:
    if tag == "SeriesInstanceUID" and how == "set" and value:
        value = f"{value}.{ds.PatientID}"  # two cases never share a mutated UID (they would be one series)
    if how == "delete":
        if tag in ds:
            del ds[tag]
        return
    t = pydicom.datadict.tag_for_keyword(tag)
    if how == "bogus_vr":
        ds[t] = DataElement(t, "UN", value)
        return
    vr = pydicom.datadict.dictionary_VR(t)
    ds[t] = DataElement(t, vr, value)


def _dicom_case(folder: Path, rng: np.random.Generator, index: int) -> None:
    data = rng.integers(-1000, 1500, size=(16, 14, 4)).astype(np.float32)
    vol = Volume(data, np.diag([0.9, 0.8, 2.0, 1.0]), VolumeMeta(modality="CT", units="HU"))
    files = write_series(vol, folder, patient={"PatientID": f"FUZZ-{index}"})
    family = rng.integers(0, 10)
    targets = files if rng.random() < 0.6 else [files[int(rng.integers(0, len(files)))]]
    if family < 7:  # tag mutations, one or two tags
        muts = [(str(rng.choice(DICOM_TAGS)),) for _ in range(int(rng.integers(1, 3)))]
        chosen = [(t[0], *_dicom_value(rng, t[0])) for t in muts]
        for f in targets:
            ds = pydicom.dcmread(f)
            for tag, how, value in chosen:
                try:
                    _mutate_dataset(ds, rng, tag, how, value)
                except Exception:  # pydicom refuses to even hold the value: remove the tag instead
                    _mutate_dataset(ds, rng, tag, "delete", None)
            try:
                ds.save_as(f, enforce_file_format=False)
            except Exception:  # a value pydicom cannot even write: write the raw bytes of another mutation
                f.write_bytes(f.read_bytes()[: int(rng.integers(0, f.stat().st_size))])
    elif family == 7:  # truncation at a random offset
        for f in targets:
            raw = f.read_bytes()
            f.write_bytes(raw[: int(rng.integers(0, len(raw)))])
    elif family == 8:  # flipped bytes in the header region
        for f in targets:
            raw = bytearray(f.read_bytes())
            for _ in range(int(rng.integers(1, 16))):
                raw[int(rng.integers(128, min(len(raw), 900)))] = int(rng.integers(0, 256))
            f.write_bytes(bytes(raw))
    else:  # trailing junk, or a file replaced by noise
        for f in targets:
            junk = bytes(rng.integers(0, 256, size=int(rng.integers(1, 2000)), dtype=np.uint8))
            f.write_bytes(f.read_bytes() + junk if rng.random() < 0.5 else junk)


def _nifti_bytes(rng: np.random.Generator) -> tuple[nib.Nifti1Header, bytes]:
    dtype = rng.choice([np.float32, np.int16, np.uint8])
    arr = (rng.random((12, 10, 8)) * 200).astype(dtype)
    img = nib.Nifti1Image(arr, np.diag([1.0, 1.2, 1.5, 1.0]))
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    buf = io.BytesIO()
    img.to_file_map({"image": nib.FileHolder(fileobj=buf), "header": nib.FileHolder(fileobj=buf)})
    raw = buf.getvalue()
    return nib.Nifti1Header.from_fileobj(io.BytesIO(raw)), raw


def _nifti_case(path: Path, rng: np.random.Generator) -> None:
    hdr, raw = _nifti_bytes(rng)
    family = rng.integers(0, 6)
    if family < 4:  # header fields
        for _ in range(int(rng.integers(1, 3))):
            field = str(rng.choice(NIFTI_FIELDS))
            cur = np.asarray(hdr[field])
            if field == "dim":
                new = cur.copy()
                new[int(rng.integers(0, 8))] = int(rng.choice([0, -1, 1, 2, 5, 7, 30000, 32767]))
            elif field == "magic":
                new = np.asarray(bytes(rng.integers(0, 256, size=4, dtype=np.uint8)), dtype=cur.dtype)
            elif cur.dtype.kind in "iu":
                new = np.asarray(rng.choice([0, -1, 1, 3, 7, 255, 511, 2048, 32767]), dtype=cur.dtype)
                if cur.shape:
                    new = np.full(cur.shape, new, dtype=cur.dtype)
            else:
                v = rng.choice([0.0, -1.0, np.nan, np.inf, 1e30, 1e-30, float(rng.normal() * 100)])
                new = np.full(cur.shape, v, dtype=cur.dtype) if cur.shape else np.asarray(v, dtype=cur.dtype)
            hdr[field] = new
        body = hdr.binaryblock + raw[348:]
    elif family == 4:  # truncated or extended stream
        cut = int(rng.integers(0, len(raw) + 1))
        body = raw[:cut] if rng.random() < 0.6 else raw + bytes(int(rng.integers(1, 5000)))
    else:  # inflated dimensions over the same bytes
        hdr["dim"][1:4] = [int(v) for v in rng.choice([256, 1024, 2048, 4096], size=3)]
        body = hdr.binaryblock + raw[348:]
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(body, compresslevel=1))
    else:
        path.write_bytes(body)


def build(root: Path, n_dicom: int = 130, n_nifti: int = 110, seed: int = 0) -> dict[str, str]:
    import warnings

    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _build(root, n_dicom, n_nifti, seed)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def _build(root: Path, n_dicom: int, n_nifti: int, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    cases: dict[str, str] = {}
    for i in range(n_dicom):
        name = f"dcm-{i:03d}"
        _dicom_case(root / name, rng, i)
        cases[name] = "dicom"
    for i in range(n_nifti):
        name = f"nii-{i:03d}"
        (root / name).mkdir(parents=True)
        _nifti_case(root / name / ("scan.nii.gz" if rng.random() < 0.5 else "scan.nii"), rng)
        cases[name] = "nifti"
    return cases
