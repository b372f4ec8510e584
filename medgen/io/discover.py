"""Find the scans under a set of paths: NIfTI files and DICOM series, plus the files refused.

Shared by `load_volume` and ingestion so both see a tree the same way. A file is a candidate when
it ends in .nii/.nii.gz (NIfTI), or has a DICOM suffix or the 'DICM' magic (DICOM); anything else
(README, .json sidecars, thumbnails) is ignored and counted, never an error. BIDS label maps
(`*_dseg`, `*_mask`) are listed apart: a segmentation is never a scan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medgen.errors import InputError, InternalError
from medgen.io.dicom.header import DicomHeader, DicomSeries, dicomdir_files, group_series, looks_like_dicom, read_header
from medgen.io.labels import is_label_file, is_label_source
from medgen.io.nifti import is_nifti

HeaderReader = Callable[[Path], "DicomHeader | None"]


@dataclass
class Found:
    nifti: list[Path] = field(default_factory=list)
    series: list[DicomSeries] = field(default_factory=list)
    bad_files: list[InputError] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    labels: list[Path] = field(default_factory=list)  # BIDS dseg/mask maps: paired with scans, never scans


def list_files(paths: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Files under `paths`, recursively and in a stable order; a DICOMDIR given directly is expanded
    to the files it references. Broken links are kept (they are reported as unreadable). Files under
    an `exclude` folder are left out (ingest's own output folder, when it lies inside a source)."""
    skip = [Path(e).resolve() for e in exclude]

    def kept(q: Path) -> bool:
        if not skip:
            return True
        parent = q.parent.resolve()  # the link itself, not its target, decides where a file lies
        return not any(parent == e or e in parent.parents for e in skip)

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(
                sorted(q for q in p.rglob("*") if (q.is_file() or (q.is_symlink() and not q.exists())) and kept(q))
            )
        elif p.is_file() and p.name.upper() == "DICOMDIR":
            files.extend(f for f in dicomdir_files(p) if kept(f))
        else:
            files.append(p)
    return list(dict.fromkeys(files))


def is_candidate(path: Path) -> bool:
    """NIfTI by name, DICOM by name or magic; a broken link is a candidate (reported unreadable)."""
    return is_nifti(path) or not path.exists() or looks_like_dicom(path)


def discover(
    paths: Iterable[str | Path], header_reader: HeaderReader = read_header, files: list[Path] | None = None
) -> Found:
    """Scans under `paths` (or among `files`, when the caller listed them already)."""
    found = Found()
    headers: list[DicomHeader] = []
    for f in files if files is not None else list_files(paths):
        if is_nifti(f):
            if not is_label_file(f):
                found.nifti.append(f)
            elif is_label_source(f):
                found.labels.append(f)
            else:
                found.ignored.append(f)  # a probabilistic segmentation: neither a scan nor a label map
            continue
        if not is_candidate(f):
            found.ignored.append(f)
            continue
        try:
            h = header_reader(f)
        except InputError as e:
            found.bad_files.append(e)
            continue
        except Exception as e:  # a parser failure on one hostile file is that file's row
            found.bad_files.append(InternalError(f, f"{type(e).__name__}: {e}"))
            continue
        if h is None:
            found.ignored.append(f)
        else:
            headers.append(h)
    found.series = group_series(headers)
    return found
