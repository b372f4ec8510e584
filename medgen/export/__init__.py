"""Export: gated synthetic volumes to NIfTI and DICOM with provenance sidecars."""
