"""Export the volumes of a validated run that passed the gate, as NIfTI or DICOM, with provenance.

    OUT/<name>.nii.gz  + OUT/<name>.provenance.json          (--format nifti)
    OUT/<name>/NNNN.dcm + OUT/<name>.provenance.json          (--format dicom)
    OUT/export.json                                           what this export wrote, and from where
A sample made to follow a label map (ControlNet) is exported as a pair: OUT/<name>_dseg.nii.gz
(+ OUT/<name>_dseg.tsv, the label table) beside the NIfTI image, or OUT/<name>/seg.dcm, a DICOM
SEG referencing the exported series, inside its folder.

Rules:
- Only volumes that passed, from a batch that passed. A failed batch exports nothing. Volumes an
  earlier export into the same folder wrote (listed in its export.json) that this batch does not
  export are removed, so the folder always holds exactly the last passing batch.
- Atomic: every file is written under a hidden temporary name and renamed; a DICOM series is
  assembled in a hidden temporary folder and renamed into place whole. The sidecar is written
  after its volume, so a visible sidecar means a complete export of that volume. An export killed
  midway leaves only hidden `.*.partial-*` entries, which the next export removes.
- Idempotent: UIDs derive from the generator and volume hashes (pydicom's `generate_uid` with those
  as entropy), dates from the run's creation time, so exporting the same batch twice writes the
  same bytes under the same names and never a second copy.
- Nothing from a source scan: the volume is generated, the DICOM patient fields are dummies
  (PatientIdentityRemoved YES), and the sidecar holds hashes only (no pseudonyms, no paths).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medgen.errors import ExportError
from medgen.io.atomic import TMP_MARK, replace_dir, staging_dir, write_text_atomic
from medgen.io.nifti import load_image
from medgen.provenance import code_version, sha256_json
from medgen.volume import VolumeMeta

ExportFormat = Literal["nifti", "dicom"]


@dataclass
class ExportResult:
    out: Path
    format: str
    exported: list[str]
    skipped: list[str]  # failed the gate


def _clean_partials(out: Path) -> None:
    for p in out.iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _remove_export(out: Path, name: str) -> None:
    """Remove one volume's export, sidecar first: a visible sidecar always means a complete export."""
    (out / f"{name}.provenance.json").unlink(missing_ok=True)
    (out / f"{name}.nii.gz").unlink(missing_ok=True)
    (out / f"{name}_dseg.nii.gz").unlink(missing_ok=True)
    (out / f"{name}_dseg.tsv").unlink(missing_ok=True)
    if (out / name).is_dir():
        shutil.rmtree(out / name)


def _sidecar(
    name: str, vol, entry, record, report: dict, report_sha: str, gen_prov: dict, fmt: str, files: list[str]
) -> dict:
    created = record.created
    verdict = next(v for v in report["volumes"] if v["name"] == name)
    doc = {
        "format": "medgen-provenance",
        "format_version": 1,
        "synthetic": True,
        "volume": {
            "name": name,
            "sha256": entry.sha256,
            "shape": list(vol.shape),
            "spacing_mm": [round(s, 6) for s in vol.spacing],
            "modality": vol.meta.modality,
            "units": vol.meta.units,
            "created": created,
        },
        "generator": {
            "sha256": record.generator_sha256,
            "config_sha256": gen_prov["config_sha256"],
            "config_name": gen_prov.get("config_name"),
            "training_manifest_sha256": gen_prov["training_manifest_sha256"],
        },
        "sampling": {
            "sampler": record.sampler,
            "steps": record.steps,
            "seed": record.seed,
            "index": entry.index,
            "condition": record.condition,
            "guidance": record.guidance,
            "labels": (
                {
                    "sha256": entry.label_sha256,
                    "controlnet_sha256": record.controlnet_sha256,
                    "mask_guidance": record.mask_guidance,
                    "table": record.label_table,
                }
                if entry.label_file
                else None
            ),
        },
        "code_version": record.code_version,
        "quality": {
            "verdict": "pass" if verdict["passed"] else "fail",
            "batch_verdict": "pass" if report["batch"]["passed"] else "fail",
            "report_sha256": report_sha,
            "encoder_id": report["encoder_id"],
            "checks": verdict["checks"],
            "realism": report["realism"],
            "diversity": report["diversity"],
        },
        "export": {"format": fmt, "files": files},
    }
    return doc


def _labels(run: Path, entry, record):
    """The label map a sample followed (None for a plain sample), with the record's label table."""
    if not entry.label_file:
        return None

    from medgen.io.labels import LabelMap

    img = load_image(str(run / entry.label_file))
    table = {int(k): v for k, v in (record.label_table or {}).items()}
    return LabelMap(np.asarray(img.dataobj), img.affine, table)


def _dseg_tsv(table: dict[int, str]) -> str:
    """BIDS dseg.tsv: index and name of every label."""
    return "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in sorted(table.items()))


def _check_target(run: Path, out: Path, overwrite: bool) -> None:
    from medgen.errors import OutputExistsError
    from medgen.text import printable

    r, o = run.resolve(), out.resolve()
    if r == o or o in r.parents or r in o.parents:
        raise OutputExistsError(
            f"{printable(str(out))}: the export folder and the run {printable(str(run))} overlap; export outside the run"
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{printable(str(out))} is a file, not a folder")
    if out.is_dir() and not (out / "export.json").exists() and any(out.iterdir()) and not overwrite:
        first = next(out.iterdir()).name
        raise OutputExistsError(
            f"{printable(str(out))} is not empty and holds no earlier medgen export (e.g. {printable(first)}); "
            "choose an empty folder, or pass --overwrite to export into it (its files are kept)"
        )


def export_run(
    run: str | Path, out: str | Path, fmt: ExportFormat = "nifti", *, overwrite: bool = False
) -> ExportResult:
    """Export the passing volumes of validated run `run` into `out`.

    `out` may be new, empty, or an earlier export (it holds export.json): then it is brought up to
    date. A folder holding anything else, or one that is (or holds, or lies in) the run, is refused
    with `OutputExistsError`; `overwrite=True` writes into a foreign folder anyway, keeping its files.
    """

    from medgen.io.dicom.seg import write_seg
    from medgen.io.dicom.write import SOP_CLASS, write_series
    from medgen.io.labels import write_label_nifti
    from medgen.io.nifti import read_nifti, write_nifti
    from medgen.io.schemas import validate
    from medgen.models.bundle import generator_metadata
    from medgen.provenance import sha256_file
    from medgen.quality.validate import QUALITY_DIR, REPORT, read_report
    from medgen.synthesis.runs import read_record

    if fmt not in ("nifti", "dicom"):
        raise ExportError(f"unknown export format {fmt!r} (nifti or dicom)")
    run, out = Path(run), Path(out)
    report = read_report(run)  # checks every volume's hash against the record and the report
    record = read_record(run, verify=False)  # just verified: no second pass over the volumes
    if not report["batch"]["passed"]:
        raise ExportError(
            f"{run}: the batch failed the gate ({'; '.join(report['batch']['reasons'])}); nothing exported"
        )
    report_sha = sha256_file(run / QUALITY_DIR / REPORT)
    gen_meta = generator_metadata(record.generator)
    gen_prov = gen_meta.get("provenance", {})
    if fmt == "dicom" and gen_meta["modality"] not in SOP_CLASS:
        raise ExportError(
            f"{run}: the generator makes {gen_meta['modality']} volumes and DICOM export writes CT or MR image "
            "storage only (a volume is not relabelled); export as nifti"
        )
    _check_target(run, out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _clean_partials(out)
    previous = (
        json.loads((out / "export.json").read_text()).get("exported", []) if (out / "export.json").exists() else []
    )
    verdicts = {v["name"]: v for v in report["volumes"]}
    # Claim the folder before the first file lands: a kill -9 mid-export then leaves a folder whose
    # record names everything it may hold, so the re-run knows these files are its own.
    names = sorted(set(previous) | {e.name for e in record.volumes if verdicts[e.name]["passed"]})
    write_text_atomic(
        out / "export.json", json.dumps({"format": "medgen-export", "in_progress": True, "exported": names})
    )
    created = dt.datetime.fromisoformat(record.created)
    exported, skipped = [], []
    for entry in record.volumes:
        if not verdicts[entry.name]["passed"]:
            skipped.append(entry.name)
            continue
        vol = read_nifti(run / entry.file)[0]
        # the file name carries no modality hint: the generator's metadata says what it makes
        vol = vol.replace(meta=VolumeMeta(modality=gen_meta["modality"], units=gen_meta["units"]))
        name = entry.name
        labels = _labels(run, entry, record)
        if fmt == "nifti":
            write_nifti(vol, out / f"{name}.nii.gz")
            files = [f"{name}.nii.gz"]
            if labels is not None:
                write_label_nifti(labels.replace_affine(vol.affine), out / f"{name}_dseg.nii.gz")
                write_text_atomic(out / f"{name}_dseg.tsv", _dseg_tsv(labels.table))
                files += [f"{name}_dseg.nii.gz", f"{name}_dseg.tsv"]
        else:
            tmp = staging_dir(out / name)
            paths = write_series(
                vol,
                tmp,
                series_description=f"medgen synthetic {name}",
                uid_seed=f"medgen-export:{record.generator_sha256}:{entry.sha256}",
                deidentified=True,
                content_datetime=created,
            )
            if labels is not None:
                seg = write_seg(
                    labels.data,
                    labels.table,
                    paths,
                    tmp / "seg.dcm",
                    uid_seed=f"medgen-export-seg:{record.generator_sha256}:{entry.sha256}:{entry.label_sha256}",
                    description=f"medgen synthetic {name} labels",
                )
                paths = [*paths, seg]
            # the old sidecar goes first: it must not outlive the series it describes
            (out / f"{name}.provenance.json").unlink(missing_ok=True)
            replace_dir(tmp, out / name)
            files = [f"{name}/{p.name}" for p in paths]
        doc = _sidecar(name, vol, entry, record, report, report_sha, gen_prov, fmt, files)
        validate(doc, "provenance")
        write_text_atomic(out / f"{name}.provenance.json", json.dumps(doc, indent=1, sort_keys=True))
        exported.append(name)
    # A volume an earlier export of this folder wrote that this batch does not pass (or no longer
    # holds) must not stay visible as if it had passed.
    for name in previous:
        if name not in exported:
            _remove_export(out, name)
    index = {
        "format": "medgen-export",
        "export_format": fmt,
        "generator_sha256": record.generator_sha256,
        "report_sha256": report_sha,
        "run_id": sha256_json(record.model_dump(mode="json"))[:16],
        "exported": exported,
        "not_exported_failed_gate": skipped,
        "code_version": code_version(),
    }
    write_text_atomic(out / "export.json", json.dumps(index, indent=1, sort_keys=True))
    return ExportResult(out=out, format=fmt, exported=exported, skipped=skipped)
