"""Reading and writing scans: DICOM (medgen.io.dicom) and NIfTI (medgen.io.nifti)."""
