"""Write a label map as a DICOM SEG (highdicom) that references the image series it segments.

The map must lie on the series' voxel grid (what medgen's export and ingest guarantee): frame k
of the SEG is slice k of the series, so highdicom takes each frame's position and orientation
from its source image. One segment per label present; BINARY segmentation by default (the type
every viewer and dciodvfy knows), LABELMAP on request (DICOM 2024: one frame of label values, far
smaller for many labels, newer than most readers). Patient and study come from
the source images, so a SEG of a synthetic series is as synthetic (de-identified) as its series.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medgen.io.atomic import atomic_path


def write_seg(
    labels: np.ndarray,
    table: dict[int, str],
    source_files: Sequence[str | Path],
    path: str | Path,
    *,
    series_number: int = 2,
    uid_seed: str | None = None,
    description: str = "medgen labels",
    segmentation_type: str = "binary",
) -> Path:
    """`labels` (X, Y, Z) on the grid of the series whose slice k is `source_files[k]` (written by
    medgen.io.dicom.write.write_series: rows along j, columns along i)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if segmentation_type not in ("binary", "labelmap"):
        raise ValueError(f"{path}: segmentation_type {segmentation_type!r}: 'binary' or 'labelmap'")
    sources = [pydicom.dcmread(str(f)) for f in source_files]
    if len(sources) != labels.shape[2]:
        raise ValueError(f"{len(sources)} source images for a label map of {labels.shape[2]} slices")
    present = [int(v) for v in np.unique(labels) if v > 0]
    if not present:
        raise ValueError(f"{path}: an empty label map has no segment to write")
    frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))  # (slice k, row j, column i)
    # Segments are numbered 1..n in DICOM; the label values may be sparse (e.g. 2, 41): renumber.
    numbered = np.zeros(frames.shape, np.uint16)
    for n, v in enumerate(present, 1):
        numbered[frames == v] = n
    from medgen.provenance import code_version

    version = str(code_version().get("medgen") or "0")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medgen", version=version, family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=(table.get(v) or f"label {v}")[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for n, v in enumerate(present, 1)
    ]

    def uid(role: str) -> str:
        return generate_uid(entropy_srcs=[uid_seed, role]) if uid_seed else generate_uid()

    import warnings

    with warnings.catch_warnings():
        # highdicom warns that a one-component name (ANONYMOUS, SYNTHETIC) may not be a person's:
        # here it is meant so, the placeholder medgen's series carry
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=numbered,
            segmentation_type=hd.seg.SegmentationTypeValues[segmentation_type.upper()],
            segment_descriptions=segments,
            series_instance_uid=uid("seg-series"),
            series_number=series_number,
            sop_instance_uid=uid("seg-sop"),
            instance_number=1,
            manufacturer="medgen",
            manufacturer_model_name="medgen",
            software_versions=version,
            device_serial_number="0",
            series_description=description,
            omit_empty_frames=False,  # one frame per source slice: frame k is slice k for every reader
        )
    src = sources[0]
    for key in ("PatientIdentityRemoved", "DeidentificationMethod"):
        if key in src:
            setattr(seg, key, getattr(src, key))
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp), enforce_file_format=True)
    return Path(path)
