"""DICOM: headers and series assembly (series), pixel decoding, writing derived series (write)."""
