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
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import multiprocessing
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgen.discover import discover
from medgen.errors import InputError, UnreadableFileError, error_class
from medgen.io.atomic import write_text_atomic
from medgen.io.dicom import DicomHeader, DicomSeries, read_header, read_series
from medgen.io.nifti import FrameMode, read_nifti
from medgen.manifest import assign_split, read_rows, write_manifest

STATE_DIR = ".medgen"
ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)
_FRAME_SUFFIX = re.compile(r"-t[0-9]{4}$")
_BIDS_SUBJECT = re.compile(r"^sub-[A-Za-z0-9]+$")


@dataclass(frozen=True)
class IngestOptions:
    frames: FrameMode = "error"  # 4D NIfTI: 'error' rejects, 'split' gives one volume per frame
    localizers: str = "drop"  # 'drop' removes LOCALIZER images mixed into a series, 'error' refuses it
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: str = "medgen"

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Unit:
    """One scan to ingest (or one file refused before it could join a scan)."""

    kind: str  # 'dicom' | 'nifti' | 'bad'
    key: str  # identity -> scan_id (series UID, or the path relative to the source root)
    source: str
    paths: tuple[str, ...]
    sha256: str
    subject_key: str
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

    @property
    def accepted(self) -> list[dict[str, str]]:
        return [r for r in self.rows if r["status"] == "accepted"]

    @property
    def rejected(self) -> list[dict[str, str]]:
        return [r for r in self.rows if r["status"] == "rejected"]


# --------------------------------------------------------------------------- state


class FileIndex:
    """path -> (size, mtime_ns, sha256, parsed header or error). Lets a re-run skip unchanged files."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a damaged index only costs a full re-read
        self.used: dict[str, dict[str, Any]] = {}
        self.files_read = 0
        self.bytes_read = 0

    def _fresh(self, p: Path) -> tuple[dict[str, Any] | None, os.stat_result | None]:
        try:
            st = p.stat()
        except OSError:
            return None, None
        e = self.entries.get(str(p))
        if e and e["size"] == st.st_size and e["mtime_ns"] == st.st_mtime_ns:
            self.used[str(p)] = e
            return e, st
        return None, st

    def _read(self, p: Path) -> bytes:
        try:
            data = p.read_bytes()
        except FileNotFoundError as e:
            raise UnreadableFileError(p, f"cannot open: {e.strerror or e}") from e
        except OSError as e:
            raise UnreadableFileError(p, f"cannot read: {e.strerror or e}") from e
        self.files_read += 1
        self.bytes_read += len(data)
        return data

    def _store(self, p: Path, st: os.stat_result, **values: Any) -> dict[str, Any]:
        e = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **values}
        self.entries[str(p)] = self.used[str(p)] = e
        return e

    def dicom_header(self, p: Path) -> DicomHeader | None:
        """Header from the index when the file is unchanged, else read + hash + parse in one read."""
        e, st = self._fresh(p)
        if e is None:
            if st is None:
                raise UnreadableFileError(p, "cannot open: no such file (broken link?)")
            data = self._read(p)
            sha = hashlib.sha256(data).hexdigest()
            try:
                h = read_header(p, data)
            except InputError as err:
                self._store(p, st, sha256=sha, header=None, error={"code": err.code, "reason": err.reason})
                raise
            e = self._store(p, st, sha256=sha, header=h.to_json() if h else None, error=None)
            return h
        if e.get("error"):
            raise error_class(e["error"]["code"])(p, e["error"]["reason"])
        return DicomHeader.from_json(e["header"]) if e.get("header") else None

    def sha256(self, p: Path) -> str:
        """Content hash; '' when the file cannot be read (its row says why)."""
        e, st = self._fresh(p)
        if e is not None:
            return e["sha256"]
        if st is None:
            return ""
        try:
            sha = hashlib.sha256(self._read(p)).hexdigest()
        except UnreadableFileError:
            return ""
        self._store(p, st, sha256=sha, header=None, error=None)
        return sha

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.used, sort_keys=True))


def _salt(state: Path, salt: str | None) -> str:
    """The secret behind the pseudonyms: given, from MEDGEN_SUBJECT_SALT, or made once and kept."""
    if salt:
        return salt
    if os.environ.get("MEDGEN_SUBJECT_SALT"):
        return os.environ["MEDGEN_SUBJECT_SALT"]
    f = state / "salt"
    if not f.exists():
        write_text_atomic(f, secrets.token_hex(32))
        f.chmod(0o600)
    return f.read_text().strip()


def _digest(salt: str, message: str) -> str:
    return hmac.new(salt.encode(), message.encode(), hashlib.sha256).hexdigest()[:16]


# --------------------------------------------------------------------------- units


def _relative_key(path: Path, roots: Sequence[Path]) -> str:
    """Path relative to the parent of the source root it lies under: stable when the tree moves."""
    ap = path.absolute()
    for r in roots:
        base = r if r.is_dir() else r.parent
        try:
            return str(ap.relative_to(base.parent))
        except ValueError:
            continue
    return str(ap)


def _dicom_subject_key(ids: dict[str, str]) -> str:
    if ids.get("PatientID"):
        return "pid:" + ids["PatientID"]
    if ids.get("PatientName"):
        return f"pname:{ids['PatientName']}|{ids.get('PatientBirthDate', '')}"
    if ids.get("StudyInstanceUID"):
        return "study:" + ids["StudyInstanceUID"]
    return ""


def _nifti_subject_key(rel: str) -> str:
    """BIDS subject folder (sub-XX) when there is one; otherwise each file is its own subject."""
    for part in Path(rel).parts:
        if _BIDS_SUBJECT.match(part):
            return "bids:" + part
    return "file:" + rel


def _series_source(series: DicomSeries) -> str:
    paths = series.paths
    return paths[0] if len(paths) == 1 else os.path.commonpath(paths)


def find_units(sources: Sequence[Path], index: FileIndex) -> tuple[list[Unit], int]:
    found = discover(sources, header_reader=index.dicom_header)
    units: list[Unit] = []
    for f in found.nifti:
        rel = _relative_key(f, sources)
        sha = index.sha256(f)
        units.append(Unit("nifti", "nifti:" + rel, str(f), (str(f),), sha, _nifti_subject_key(rel)))
    for s in found.series:
        file_hashes = sorted(index.sha256(Path(p)) for p in s.paths)
        sha = hashlib.sha256("\n".join(file_hashes).encode()).hexdigest()
        subject = _dicom_subject_key(s.headers[0].identifiers)
        units.append(Unit("dicom", "dicom:" + s.key, _series_source(s), s.paths, sha, subject, series=s))
    for err in found.bad_files:
        p = Path(err.path)
        rel = _relative_key(p, sources)
        units.append(Unit("bad", "file:" + rel, str(p), (str(p),), index.sha256(p), "", error=err))
    return units, len(found.ignored)


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
    if unit.error is not None:
        return [_rejected(scan_id, unit.error)]
    modality = unit.series.modality if unit.series else ""
    try:
        if unit.kind == "dicom":
            volumes = [read_series(unit.series, where=unit.source, localizers=options.localizers)]  # type: ignore[arg-type]
        else:
            volumes = read_nifti(unit.source, frames=options.frames)
    except InputError as e:
        return [_rejected(scan_id, e, modality)]
    rows = []
    for t, vol in enumerate(volumes):
        sid = f"{scan_id}-t{t:04d}" if len(volumes) > 1 else scan_id
        canon = vol.as_closest_canonical()
        rel = f"volumes/{sid}.nii.gz"
        canon.to_nifti(Path(out_dir) / rel)
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
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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
    t0 = time.perf_counter()
    options = options or IngestOptions()
    srcs = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(s) for s in sources]
    for s in srcs:
        if not s.exists() and not s.is_symlink():
            raise FileNotFoundError(f"ingest source does not exist: {s}")
    out_dir = Path(out)
    state = out_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    (out_dir / "volumes").mkdir(exist_ok=True)
    manifest_path = out_dir / "manifest.csv"
    key = _salt(state, salt)
    index = FileIndex(state / "file_index.json")

    previous: dict[str, list[dict[str, str]]] = {}
    options_file = state / "options.json"
    same_options = options_file.exists() and options_file.read_text() == options.fingerprint()
    if manifest_path.exists() and same_options and not force:
        for r in read_rows(manifest_path):
            previous.setdefault(_base_id(r["scan_id"]), []).append(r)

    if progress:
        progress("survey", 0, 1)
    units, ignored = find_units(srcs, index)
    if progress:
        progress("survey", 1, 1)

    rows: list[dict[str, str]] = []
    todo: list[tuple[Unit, str]] = []
    for u in units:
        scan_id = "scan-" + _digest(key, u.key)
        prev = previous.get(scan_id)
        if prev and all(r["sha256"] == u.sha256 for r in prev) and all(
            r["status"] == "rejected" or (out_dir / r["output_path"]).exists() for r in prev
        ):
            rows.extend(prev)
            continue
        todo.append((u, scan_id))

    def finish(u: Unit, scan_id: str, converted: list[dict[str, str]]) -> None:
        subject = "sub-" + _digest(key, "subject:" + u.subject_key) if u.subject_key else ""
        for r in converted:
            accepted = r["status"] == "accepted"
            r.update(
                source=u.source,
                source_kind=u.kind if u.kind != "bad" else "unknown",
                n_files=str(len(u.paths)),
                sha256=u.sha256,
                subject_id=subject,
                split=assign_split(subject, options.split, options.split_seed) if accepted else "",
                ingested_at=_now(),
            )
            rows.append(r)

    done = 0
    if progress:
        progress("convert", 0, len(todo))
    if workers > 1 and len(todo) > 1:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(convert_unit, u, sid, str(out_dir), options): (u, sid) for u, sid in todo}
            for fut in cf.as_completed(futures):
                u, sid = futures[fut]
                finish(u, sid, fut.result())
                done += 1
                if progress:
                    progress("convert", done, len(todo))
    else:
        for u, sid in todo:
            finish(u, sid, convert_unit(u, sid, str(out_dir), options))
            done += 1
            if progress:
                progress("convert", done, len(todo))

    # Volumes this directory holds but the new manifest does not name (a scan that vanished or is
    # now rejected) are removed, so volumes/ always matches manifest.csv.
    keep = {r["output_path"] for r in rows if r["output_path"]}
    for f in (out_dir / "volumes").glob("*.nii.gz"):
        if f"volumes/{f.name}" not in keep:
            f.unlink()
    write_manifest(rows, manifest_path)
    index.save()
    write_text_atomic(options_file, options.fingerprint())
    return IngestReport(
        out_dir=out_dir,
        manifest_path=manifest_path,
        rows=sorted(rows, key=lambda r: r["scan_id"]),
        converted=len(todo),
        reused=len(units) - len(todo),
        files_read=index.files_read,
        files_ignored=ignored,
        seconds=time.perf_counter() - t0,
        source_bytes=index.bytes_read,
    )
