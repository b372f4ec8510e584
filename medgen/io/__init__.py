"""Reading and writing files: NIfTI (nifti), DICOM (dicom/), which files are volumes (discover),
one scan to a Volume (load), the manifest (manifest), JSON schemas (schemas), atomic writes (atomic)."""
