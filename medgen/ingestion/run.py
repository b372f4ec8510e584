"""Ingestion: a tree of DICOM and NIfTI files -> canonical RAS volumes and a validated manifest.

    DIR/volumes/<scan_id>.nii.gz   one per accepted scan (RAS+ axes, qform == sform, float32)
    DIR/manifest.csv               one row per scan found, accepted or rejected, with the reason
    DIR/.medgen/                   salt for pseudonyms, file index (stat -> content hash + header)

Re-running is incremental and keyed on content: a file whose size and mtime are unchanged is not
read at all (its hash and header come from the index, as git's index does); a scan whose content
hash and ingest options are unchanged is not converted again. One bad file or series becomes one
rejected row and the batch goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medgen.config import IngestConfig
from medgen.errors import (
    IngestError,
    InputError,
    InternalError,
    ManifestError,
    TooLargeError,
    UnsupportedObjectError,
)
from medgen.ingestion.file_index import FileIndex, dicom_subject_id, keyed_uid, survey_file
from medgen.ingestion.labels import LabelSource, pair_labels
from medgen.io.atomic import write_text_atomic
from medgen.io.dicom.header import DEFAULT_MAX_VOXELS, DicomSeries
from medgen.io.dicom.series import read_series
from medgen.io.discover import discover, is_candidate, list_files
from medgen.io.manifest import assign_split, read_rows, row_problems, write_manifest
from medgen.io.nifti import FrameMode, is_nifti, read_nifti, write_nifti
from medgen.io.pseudonyms import BIDS_SUBJECT as _BIDS_SUBJECT
from medgen.io.pseudonyms import digest as _digest
from medgen.io.pseudonyms import ingest_salt as _salt
from medgen.io.pseudonyms import subject_id as _subject_id
from medgen.io.sidecar import sidecar_path, write_sidecar
from medgen.text import printable
from medgen.threads import limit_threads, share

STATE_DIR = ".medgen"
ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)
_FRAME_SUFFIX = re.compile(r"-t[0-9]{4}$")


@dataclass(frozen=True)
class IngestOptions:
    frames: FrameMode = "error"  # 4D NIfTI: 'error' rejects, 'split' gives one volume per frame
    localizers: str = "drop"  # 'drop' removes LOCALIZER images mixed into a series, 'error' refuses it
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: str = "medgen"
    max_voxels: int = DEFAULT_MAX_VOXELS  # per scan, checked on the header's claim before allocating

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> IngestOptions:
        """The options of a config's `ingest` section (config is below ingestion: it cannot build them)."""
        return cls(
            frames=cfg.frames,
            localizers=cfg.localizers,
            split=cfg.split,
            split_seed=cfg.split_seed,
            max_voxels=cfg.max_voxels,
        )


@dataclass
class Unit:
    """One scan to ingest (or one file refused before it could join a scan)."""

    kind: str  # 'dicom' | 'nifti' | 'bad'
    key: str  # identity -> scan_id (series UID, or the path relative to the source root)
    source: str
    paths: tuple[str, ...]
    sha256: str
    subject_id: str  # pseudonym ('sub-' + keyed hash), '' when unknown
    series: DicomSeries | None = None
    error: InputError | None = None


@dataclass
class IngestReport:
    out_dir: Path
    manifest_path: Path
    rows: list[dict[str, str]]
    converted: int  # scans read and converted (or refused) in this run
    reused: int  # scans unchanged since the last run, not read again
    files_read: int  # source files whose bytes were read in this run
    files_ignored: int
    seconds: float
    source_bytes: int = 0
    labels: list[dict[str, str]] = dataclasses.field(default_factory=list)  # labels.csv rows (paired or refused)

    @property
    def accepted(self) -> list[dict[str, str]]:
        return [r for r in self.rows if r["status"] == "accepted"]

    @property
    def rejected(self) -> list[dict[str, str]]:
        return [r for r in self.rows if r["status"] == "rejected"]


# --------------------------------------------------------------------------- units


def _relative_key(path: Path, roots: Sequence[Path]) -> str:
    """Path relative to the parent of the source root it lies under: stable when the tree moves."""
    ap = path.absolute()
    for r in roots:
        base = (r if r.is_dir() else r.parent).absolute()  # a relative root must not fall through to ap
        try:
            return str(ap.relative_to(base.parent))
        except ValueError:
            continue
    return str(ap)


def _nifti_subject_id(salt: str, rel: str) -> str:
    """BIDS subject folder (sub-XX) when there is one; otherwise each file is its own subject."""
    for part in Path(rel).parts:
        if _BIDS_SUBJECT.match(part):
            return _subject_id(salt, "bids:" + part)
    return _subject_id(salt, "file:" + rel)


def _series_source(series: DicomSeries) -> str:
    paths = series.paths
    return paths[0] if len(paths) == 1 else os.path.commonpath(paths)


def find_units(
    sources: Sequence[Path], index: FileIndex, pool: cf.Executor | None = None, exclude: Sequence[Path] = ()
) -> tuple[list[Unit], int, list[LabelSource]]:
    """The scans under `sources`, how many files were ignored, and the label maps found beside
    them (BIDS dseg/mask NIfTI, DICOM SEG), which are paired with scans, never scans themselves."""
    files = list_files(sources, exclude=exclude)
    if pool is not None:  # read and parse the changed files in parallel; discovery then finds them indexed
        stale = [str(f) for f in files if is_candidate(f) and f.exists() and index.fresh(f) is None]
        kinds = [not is_nifti(f) for f in stale]
        for entry in pool.map(survey_file, stale, kinds, chunksize=max(1, len(stale) // 32)):
            index.add(entry)
    found = discover(sources, header_reader=index.dicom_header, files=files)
    units: list[Unit] = []
    labels = [LabelSource(str(f), "nifti") for f in found.labels]
    for f in found.nifti:
        rel = _relative_key(f, sources)
        sha = index.sha256(f)
        units.append(Unit("nifti", "nifti:" + rel, str(f), (str(f),), sha, _nifti_subject_id(index.salt, rel)))
    for s in found.series:
        file_hashes = sorted(index.sha256(Path(p)) for p in s.paths)
        sha = hashlib.sha256("\n".join(file_hashes).encode()).hexdigest()
        subject = dicom_subject_id(index.salt, s.headers[0].identifiers)
        units.append(Unit("dicom", "dicom:" + s.key, _series_source(s), s.paths, sha, subject, series=s))
    for err in found.bad_files:
        # a DICOM SEG is refused as a scan by read_header (a non-image object); it is a label map
        if isinstance(err, UnsupportedObjectError) and "(Modality SEG)" in err.reason:
            labels.append(LabelSource(err.path, "dicom-seg"))
            continue
        p = Path(err.path)
        rel = _relative_key(p, sources)
        units.append(Unit("bad", "file:" + rel, str(p), (str(p),), index.sha256(p), "", error=err))
    return units, len(found.ignored), labels


# --------------------------------------------------------------------------- conversion


def _fmt(values: Iterable[float]) -> str:
    return "x".join(f"{v:.6g}" for v in values)


def _rejected(scan_id: str, err: InputError, modality: str = "") -> dict[str, str]:
    return {
        "scan_id": scan_id,
        "status": "rejected",
        "reason": err.reason,
        "error_code": err.code,
        "modality": modality,
        "units": "",
        "shape": "",
        "spacing": "",
        "orientation": "",
        "output_path": "",
        "notes": "",
    }


def convert_unit(unit: Unit, scan_id: str, out_dir: str, options: IngestOptions) -> list[dict[str, str]]:
    """Read, check and write one scan. Returns its row(s) (several for a split 4D NIfTI).

    Module-level so worker processes can run it.
    """
    modality = unit.series.modality if unit.series else ""
    try:
        return _convert(unit, scan_id, out_dir, options)
    except InputError as e:
        return [_rejected(scan_id, e, modality)]
    except MemoryError:
        return [_rejected(scan_id, TooLargeError(unit.source, "ran out of memory converting this scan"), modality)]
    except Exception as e:  # one scan's unexpected failure is its row, not the batch's end
        return [_rejected(scan_id, InternalError(unit.source, f"{type(e).__name__}: {e}"), modality)]


def _convert(unit: Unit, scan_id: str, out_dir: str, options: IngestOptions) -> list[dict[str, str]]:
    if unit.error is not None:
        raise unit.error
    if unit.kind == "dicom":
        assert unit.series is not None
        volumes = [
            read_series(unit.series, where=unit.source, localizers=options.localizers, max_voxels=options.max_voxels)
        ]
    else:
        volumes = read_nifti(unit.source, frames=options.frames, max_voxels=options.max_voxels)
    rows = []
    for t, vol in enumerate(volumes):
        sid = f"{scan_id}-t{t:04d}" if len(volumes) > 1 else scan_id
        canon = vol.as_closest_canonical()
        rel = f"volumes/{sid}.nii.gz"
        write_sidecar(canon, Path(out_dir) / rel, source_kind=unit.kind)  # first: a volume never lacks its sidecar
        write_nifti(canon, Path(out_dir) / rel)
        rows.append(
            {
                "scan_id": sid,
                "status": "accepted",
                "reason": "",
                "error_code": "",
                "modality": canon.meta.modality,
                "units": canon.meta.units,
                "shape": "x".join(map(str, canon.shape)),
                "spacing": _fmt(canon.spacing),
                "orientation": canon.orientation,
                "output_path": rel,
                "notes": "; ".join(canon.meta.notes),
            }
        )
    return rows


def _base_id(scan_id: str) -> str:
    return _FRAME_SUFFIX.sub("", scan_id)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class IngestPlan:
    """What an ingest run will do: rows reused unchanged, and the scans to convert.

    Made by `plan_ingest` (survey: reads only files whose size or mtime changed), finished by
    `finish_ingest` (labels rows, writes manifest and state). Between the two, `convert_unit` runs
    once per scan to do, in any process: the Prefect flow fans those calls out as tasks.
    """

    out_dir: Path
    manifest_path: Path
    options: IngestOptions
    key: str
    index: FileIndex
    reused: list[dict[str, str]]
    todo: list[tuple[Unit, str]]  # (scan, scan_id)
    n_units: int
    ignored: int
    t0: float
    existing: list[dict[str, str]] = dataclasses.field(default_factory=list)  # the manifest found on disk
    labels: list[LabelSource] = dataclasses.field(default_factory=list)  # label maps to pair (medgen.ingestion.labels)
    series_scans: dict[str, str] = dataclasses.field(default_factory=dict)  # SeriesInstanceUID -> scan_id
    instance_scans: dict[str, str] = dataclasses.field(default_factory=dict)  # SOPInstanceUID -> scan_id


@contextlib.contextmanager
def ingest_lock(out: str | Path):
    """One ingest at a time per output folder (an hourly ingest and a nightly pipeline may overlap):
    an exclusive lock on OUT/.medgen/lock, held from the survey to the written manifest. A POSIX
    advisory lock: it serialises processes on one host (and on filesystems that honour flock)."""
    import fcntl

    state = Path(out) / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def plan_ingest(
    sources: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    options: IngestOptions | None = None,
    salt: str | None = None,
    force: bool = False,
    pool: cf.Executor | None = None,
) -> IngestPlan:
    t0 = time.perf_counter()
    options = options or IngestOptions()
    srcs = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(s) for s in sources]
    out_dir = Path(out)
    check_sources(srcs, out_dir)
    state = out_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    (out_dir / "volumes").mkdir(exist_ok=True)
    manifest_path = out_dir / "manifest.csv"
    key = _salt(state, salt)
    index = FileIndex(state / "file_index.json", key)

    existing = _own_rows(manifest_path)
    options_file = state / "options.json"
    same_options = options_file.exists() and options_file.read_text() == options.fingerprint()
    previous: dict[str, list[dict[str, str]]] = {}
    if same_options and not force:
        for r in existing:
            previous.setdefault(_base_id(r["scan_id"]), []).append(r)

    units, ignored, labels = find_units(srcs, index, pool, exclude=[out_dir])
    reused: list[dict[str, str]] = []
    todo: list[tuple[Unit, str]] = []
    series_scans: dict[str, str] = {}
    instance_scans: dict[str, str] = {}
    for u in units:
        scan_id = "scan-" + _digest(key, u.key)
        if u.series is not None and u.series.series_uid:
            series_scans[u.series.series_uid] = scan_id
        if u.series is not None:
            instance_scans.update({h.sop_instance: scan_id for h in u.series.headers if h.sop_instance})
        prev = previous.get(scan_id)
        if (
            prev
            and all(r["sha256"] == u.sha256 for r in prev)
            and all(r["status"] == "rejected" or (out_dir / r["output_path"]).exists() for r in prev)
        ):
            reused.extend(prev)
            continue
        todo.append((u, scan_id))
    # Before any volume is rewritten, the manifest stops naming the ones that will be: a kill -9
    # during conversion then leaves a manifest whose every row matches the file it names.
    redo = {sid for _, sid in todo}
    if any(_base_id(r["scan_id"]) in redo and r["output_path"] for r in existing):
        write_manifest([r for r in existing if _base_id(r["scan_id"]) not in redo], manifest_path)
    return IngestPlan(
        out_dir,
        manifest_path,
        options,
        key,
        index,
        reused,
        todo,
        len(units),
        ignored,
        t0,
        existing,
        labels,
        series_scans,
        instance_scans,
    )


def check_sources(sources: Sequence[Path], out_dir: Path) -> None:
    """Refuse what would make ingest read its own output or lose the user's files: a missing
    source, or a source inside the output folder (OUT or OUT/volumes given as a source). An output
    folder inside a source is fine: the survey leaves it out."""
    out_abs = out_dir.resolve()
    for s in sources:
        if not s.exists() and not s.is_symlink():
            raise IngestError(f"ingest source does not exist: {printable(str(s))}")
        sa = s.resolve()
        if sa == out_abs or out_abs in sa.parents:
            raise IngestError(
                f"ingest source {printable(str(s))} lies inside the output folder {printable(str(out_dir))}: "
                "ingest writes and prunes that folder, so it cannot read from it; choose another --out"
            )


def _own_rows(manifest_path: Path) -> list[dict[str, str]]:
    """The rows of this folder's manifest: ingest's own record of the volumes it wrote. A manifest
    that cannot be read gives no record, so nothing is deleted on its word."""
    if not manifest_path.exists():
        return []
    try:
        return read_rows(manifest_path)
    except (ManifestError, OSError, UnicodeDecodeError, KeyError, ValueError):
        return []


def label_rows(plan: IngestPlan, unit: Unit, converted: list[dict[str, str]]) -> list[dict[str, str]]:
    """Complete `convert_unit`'s rows with source, hash, pseudonym and split."""
    for r in converted:
        accepted = r["status"] == "accepted"
        r.update(
            source=unit.source,
            source_kind=unit.kind if unit.kind != "bad" else "unknown",
            n_files=str(len(unit.paths)),
            sha256=unit.sha256,
            subject_id=unit.subject_id,
            split=assign_split(unit.subject_id, plan.options.split, plan.options.split_seed) if accepted else "",
            ingested_at=_now(),
        )
    return converted


def _remove_volume(out_dir: Path, rel: str) -> None:
    """Remove a volume ingest wrote (named by one of its rows) and its sidecar."""
    for f in (out_dir / rel, sidecar_path(out_dir / rel)):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()


def _schema_safe(rows: list[dict[str, str]], out_dir: Path) -> list[dict[str, str]]:
    """A row the schema refuses (a header value no check foresaw) becomes that scan's
    internal_error row (its volume removed), so one odd scan never stops the batch's manifest."""
    out = []
    for r in rows:
        problems = row_problems(r)
        if problems:
            err = InternalError(r.get("source", "?"), f"row failed the manifest schema ({problems})")
            if r.get("output_path"):
                _remove_volume(out_dir, r["output_path"])
            r = {**r, **_rejected(r["scan_id"], err), "split": ""}
        out.append(r)
    return out


def finish_ingest(plan: IngestPlan, converted_rows: list[dict[str, str]]) -> IngestReport:
    """Write the manifest (reused + converted rows) and the state; drop volumes no row names."""
    rows = plan.reused + _schema_safe(converted_rows, plan.out_dir)
    out_dir = plan.out_dir
    write_manifest(rows, plan.manifest_path)
    plan.index.save()
    write_text_atomic(out_dir / STATE_DIR / "options.json", plan.options.fingerprint())
    # Volumes the old manifest named and the new one does not (a scan that vanished or is now
    # rejected) are removed after the new manifest is in place. Only those: ingest deletes files
    # its own records say it wrote, never whatever else lies in volumes/.
    keep = {r["output_path"] for r in rows if r["output_path"]}
    for r in plan.existing:
        if r["output_path"] and r["output_path"] not in keep:
            _remove_volume(out_dir, r["output_path"])
    paired = pair_labels(
        out_dir, rows, plan.labels, plan.series_scans, lambda uid: keyed_uid(plan.key, uid), plan.instance_scans
    )
    return IngestReport(
        out_dir=out_dir,
        manifest_path=plan.manifest_path,
        rows=sorted(rows, key=lambda r: r["scan_id"]),
        converted=len(plan.todo),
        reused=plan.n_units - len(plan.todo),
        files_read=plan.index.files_read,
        files_ignored=plan.ignored,
        seconds=time.perf_counter() - plan.t0,
        source_bytes=plan.index.bytes_read,
        labels=paired,
    )


def ingest(
    sources: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    options: IngestOptions | None = None,
    workers: int = 1,
    salt: str | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> IngestReport:
    """Ingest `sources` (files and folders) into `out`. See the module docstring for the layout.

    `workers` > 1 converts scans in that many processes (spawned, so it is safe inside threaded
    hosts such as Prefect workers). `force` converts every scan again.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(ingest_lock(out))
        pool = (
            stack.enter_context(
                cf.ProcessPoolExecutor(
                    max_workers=workers,
                    mp_context=_mp_context(),
                    initializer=limit_threads,
                    initargs=(share(workers),),
                )
            )
            if workers > 1
            else None
        )
        if progress:
            progress("survey", 0, 1)
        plan = plan_ingest(sources, out, options=options, salt=salt, force=force, pool=pool)
        if progress:
            progress("survey", 1, 1)
            progress("convert", 0, len(plan.todo))
        opts, out_dir = plan.options, str(plan.out_dir)
        if pool is not None and len(plan.todo) > 1:
            futures = {pool.submit(convert_unit, u, sid, out_dir, opts): u for u, sid in plan.todo}
            results = ((futures[f], f.result()) for f in cf.as_completed(futures))
        else:
            results = ((u, convert_unit(u, sid, out_dir, opts)) for u, sid in plan.todo)
        rows: list[dict[str, str]] = []
        for done, (u, converted) in enumerate(results, 1):
            rows.extend(label_rows(plan, u, converted))
            if progress:
                progress("convert", done, len(plan.todo))
        return finish_ingest(plan, rows)


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork when this process runs one thread (fast: no re-import); spawn otherwise, because a
    fork inside a threaded host (Prefect, Dask, a web server) can copy a held lock and hang."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")
