"""Denoising many scans: find them (files, DICOM folders, manifests), denoise one into files.

The denoise flow fans `denoise_scan` out as one task per scan; `medgen denoise` uses
`write_denoised` for its single scan. Outputs: NIfTI for NIfTI input; for DICOM input a new DICOM
series of the same patient and study (new series UID, ImageType DERIVED\\SECONDARY) beside a NIfTI
copy, so pipelines that only read NIfTI can still use it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from medgen.errors import InputError, OutputExistsError
from medgen.io.atomic import staging_dir
from medgen.io.nifti import write_nifti
from medgen.io.ownership import check_output, record_output
from medgen.volume import Volume


@dataclass(frozen=True)
class ScanRef:
    """One scan to denoise: a NIfTI file, or one DICOM series (folder + SeriesInstanceUID)."""

    path: str
    name: str  # output stem, unique within a batch
    files: tuple[str, ...]
    series: str | None = None

    def content_sha256(self) -> str:
        from medgen.provenance import sha256_file

        return hashlib.sha256("\n".join(sorted(sha256_file(f) for f in self.files)).encode()).hexdigest()


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "scan"


def find_scans(sources: list[str | Path]) -> list[ScanRef]:
    """NIfTI files and DICOM series under `sources`; a manifest.csv stands for its accepted volumes."""
    from medgen.io.discover import discover
    from medgen.io.manifest import read_rows

    refs: list[ScanRef] = []
    for src in map(Path, sources):
        if src.name == "manifest.csv":
            for r in read_rows(src):
                if r["status"] == "accepted":
                    f = src.parent / r["output_path"]
                    refs.append(ScanRef(str(f), _stem(f), (str(f),)))
            continue
        found = discover([src])
        refs += [ScanRef(str(f), _stem(f), (str(f),)) for f in found.nifti]
        for s in found.series:
            folder = Path(s.paths[0]).parent
            refs.append(ScanRef(str(folder), _stem(folder), tuple(s.paths), series=s.series_uid))
    names: dict[str, int] = {}
    unique = []
    for ref in refs:  # two series in one folder, or same-named files in two folders
        n = names.get(ref.name, 0)
        names[ref.name] = n + 1
        unique.append(ref if n == 0 else ScanRef(ref.path, f"{ref.name}-{n + 1}", ref.files, ref.series))
    return unique


def write_denoised(
    source: Volume,
    denoised: Volume,
    std: Volume | None,
    *,
    nifti: Path | None,
    dicom: Path | None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the NIfTI (and its uncertainty map `_std`) at `nifti`, and, when the source was DICOM,
    a new DERIVED series of the same patient and study into the folder `dicom`.

    Nothing of the user's is replaced: an output that is the source, an existing NIfTI file, or a
    non-empty folder medgen did not write is refused (`OutputExistsError`) unless `overwrite`, and
    even then only medgen's own earlier files in the folder are removed. Checked before writing.
    """
    src = source.meta.source
    inputs = [Path(src.path), *map(Path, src.files)] if src is not None else []
    if nifti is not None:
        check_output(nifti, inputs=inputs, writer=WRITER, overwrite=overwrite, is_folder=False)
    old_dicom: list[str] = []
    if dicom is not None:
        old_dicom = check_output(dicom, inputs=inputs, writer=WRITER, overwrite=overwrite, is_folder=True)
    written = []
    if nifti is not None:
        written.append(write_nifti(denoised, nifti))
        if std is not None:
            written.append(write_nifti(std, nifti.with_name(nifti.name.replace(".nii", "_std.nii"))))
        record_output(nifti.parent, [p.name for p in written], WRITER, add=True)  # a re-run may replace them
    if dicom is not None and src is not None and src.kind == "dicom":
        from medgen.io.dicom.write import SOP_CLASS, write_series

        if source.meta.modality not in SOP_CLASS:
            # a derived series keeps the source's modality; we write CT and MR image storage only
            raise InputError(
                src.path,
                f"a derived DICOM series is written for CT and MR only, this scan is {source.meta.modality or 'of no modality'}: write NIfTI",
            )
        tmp = staging_dir(dicom)
        paths = write_series(denoised, tmp, series_description="medgen denoised", **derived_from(source))
        _merge_into(tmp, dicom, old_dicom)
        record_output(dicom, [p.name for p in paths], WRITER)
        written.append(dicom)
    return written


WRITER = "medgen denoise"


def derived_from(source: Volume) -> dict:
    """`write_series` arguments that make a derived series of `source`: the same patient, study and
    frame of reference (it lies on the source's exact grid), new series and instances."""
    from medgen.io.dicom.write import STUDY_ATTRIBUTES

    ids = source.meta.source.identifiers if source.meta.source is not None else {}
    return {
        "modality": source.meta.modality,
        "patient": {k: ids[k] for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex") if ids.get(k)},
        "study": {k: ids[k] for k in STUDY_ATTRIBUTES if ids.get(k)},
        "study_uid": ids.get("StudyInstanceUID") or None,
        "frame_of_reference_uid": ids.get("FrameOfReferenceUID") or None,
        "image_type": ("DERIVED", "SECONDARY"),
    }


def _merge_into(tmp: Path, final: Path, old: list[str]) -> None:
    """Move the finished series from `tmp` into `final`, after removing medgen's own earlier files
    there (and only those): a folder of the user's keeps its files, ours is replaced whole."""
    import os
    import shutil

    if not final.exists():
        os.replace(tmp, final)
        return
    # --overwrite into a folder of the user's still never replaces one of their files: a name the
    # new series shares with a file medgen did not write is refused before anything moves.
    clash = sorted(p.name for p in tmp.iterdir() if (final / p.name).exists() and p.name not in old)
    if clash:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputExistsError(
            f"{final}: {len(clash)} file(s) of the new series would replace files medgen did not write "
            f"(e.g. {clash[0]}); choose an empty --out"
        )
    for name in old:
        p = final / name
        if p.is_file():
            p.unlink()
    for p in sorted(tmp.iterdir()):
        os.replace(p, final / p.name)
    shutil.rmtree(tmp, ignore_errors=True)


def denoise_scan(
    ref: ScanRef,
    out_dir: str | Path,
    *,
    model: str | Path | None = None,
    sigma: float | None = None,
    noise: str = "gaussian",
    method: str = "tweedie",
    n_samples: int = 4,
    seed: int = 0,
    device: str | None = None,
    precision: str = "auto",
    adapt: int = 0,
) -> dict:
    """Denoise one scan into OUT_DIR/<name>_denoised.nii.gz (+ DICOM for DICOM input); a small record back."""
    from medgen.denoising.denoiser import denoise_detailed
    from medgen.io.load import load_volume

    vol = load_volume(ref.path, series=ref.series)
    r = denoise_detailed(
        vol,
        model=model,
        sigma=sigma,
        noise=noise,
        method=method,
        n_samples=n_samples,
        seed=seed,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        adapt=adapt,
    )
    from medgen.io.dicom.write import SOP_CLASS

    out = Path(out_dir) / f"{ref.name}_denoised.nii.gz"
    notes = list(r.notes)
    dicom: Path | None = Path(out_dir) / f"{ref.name}_denoised_dicom"
    if vol.meta.modality not in SOP_CLASS and vol.meta.source is not None and vol.meta.source.kind == "dicom":
        dicom = None
        notes.append(f"no derived DICOM series: written for CT and MR only, this scan is {vol.meta.modality}")
    written = write_denoised(vol, r.volume, r.std, nifti=out, dicom=dicom)
    from medgen.denoising.figure import figure_title, write_figure

    figure = write_figure(
        vol,
        r.volume,
        Path(out_dir) / f"{ref.name}_denoised.png",
        std=r.std,
        title=figure_title(ref.name, r.sigma, vol.meta.units, r.risk),
    )
    record_output(Path(out_dir), [figure.name], WRITER, add=True)
    return {
        "scan": ref.name,
        "outputs": [str(p) for p in written],
        "sigma": float(r.sigma),
        "sigma_estimated": bool(r.sigma_estimated),
        "notes": notes,
        "expected_gain_db": None if r.risk is None or r.risk.gain_db is None else float(r.risk.gain_db),
        "figure": str(figure),
    }
