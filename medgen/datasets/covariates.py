"""Per-subject or per-scan attributes (covariates) joined to the ingestion manifest.

A researcher's table, a BIDS `participants.tsv` (tab-separated, keyed by `participant_id` =
`sub-XX`) or a CSV keyed by scan, declares what conditioned generation can ask for: "sex F, age
70". Every column that is used is declared in the config (`covariates` section: kind, levels or
range, what a missing value means); the table is validated against that declaration, cell by cell,
and any problem is one CovariateError naming the file, the row, the column and the reason.

The join never writes an identifier next to the attributes: the manifest holds subjects by salted
pseudonym only, so a BIDS label is turned into the same pseudonym ingestion gave it (the ingest
folder's salt, medgen.ingestion.run), and the result, DIR/covariates.csv, is keyed by the
manifest's scan_id (data_schemas/covariates.schema.json).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from medgen.config import CovariateColumn, CovariatesConfig
from medgen.errors import MedgenError

NA_VALUES = ("", "n/a", "na", "nan", "null", "none")  # BIDS writes n/a


class CovariateError(MedgenError):
    """A covariate table or declaration that cannot be used; names the file, row and column."""

    code = "covariates"
    hint = "fix the table or the config's covariates section (declared columns, levels, ranges, missing)"


@dataclass(frozen=True)
class CovariateTable:
    """Validated values per scan_id (str for categorical, float for continuous), and what was left
    out or filled, for the run's report."""

    values: dict[str, dict[str, str | float]]
    dropped: dict[str, str]  # scan_id -> why
    imputed: list[str]  # 'scan_id: column -> value'
    unmatched: list[str]  # table keys that match no accepted scan


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise CovariateError(f"{path}: covariate table not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise CovariateError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__})") from e
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise CovariateError(f"{path}: empty table (no header row)")
    if len(set(header)) != len(header):
        raise CovariateError(f"{path}: a column name appears twice in the header")
    rows = []
    for i, r in enumerate(reader, start=2):
        if None in r:
            raise CovariateError(f"{path}: line {i} has more cells than the header")
        rows.append({k.strip(): (v or "").strip() for k, v in r.items()})
    return header, rows


def _parse(value: str, col: CovariateColumn, where: str) -> str | float | None:
    """The cell's value, or None when missing; a bad cell raises."""
    if value.lower() in NA_VALUES:
        return None
    if col.kind == "categorical":
        if value not in (col.levels or []):
            raise CovariateError(f"{where}: {col.name}={value!r} is not one of the declared levels {col.levels}")
        return value
    try:
        x = float(value)
    except ValueError:
        raise CovariateError(f"{where}: {col.name}={value!r} is not a number") from None
    lo, hi = col.range  # type: ignore[misc]
    if not math.isfinite(x) or not lo <= x <= hi:
        raise CovariateError(f"{where}: {col.name}={value} is outside the declared range [{lo:g}, {hi:g}]")
    return x


def _geometry(row: dict[str, str], source: str) -> str:
    """The manifest's native spacing ('2x2x3', mm) as the cell a geometry column reads ('' if none)."""
    try:
        spacing = [float(x) for x in (row.get("spacing") or "").split("x")]
    except ValueError:
        return ""
    if len(spacing) != 3:
        return ""
    return repr(max(spacing) if source == "spacing_max" else spacing["xyz".index(source[-1])])


def load_covariates(cfg: CovariatesConfig, manifest: str | Path, salt: str | None = None) -> CovariateTable:
    """Validate cfg.table against the declaration and join it to the manifest's accepted scans;
    columns with a geometry `source` are read from each scan's manifest row instead (spacing).
    `salt`: the ingest salt (default: the ingest folder's, as ingestion found it)."""
    from medgen.io.manifest import read_rows

    manifest = Path(manifest)
    scans = [r for r in read_rows(manifest) if r["status"] == "accepted"]
    from_table = [c for c in cfg.columns if c.source == "table"]
    parsed: dict[str, dict[str, str | float | None]] = {}
    origin: dict[str, str] = {}
    if cfg.table is None:  # every column is the scans' own geometry (the config checks it)
        for r in scans:
            parsed[r["scan_id"]], origin[r["scan_id"]] = {}, f"manifest row of {r['scan_id']}"
        return _complete(cfg, manifest, manifest, scans, parsed, origin, [])
    path = cfg.table if cfg.table.is_absolute() else manifest.parent / cfg.table
    if not path.is_file() and cfg.table.is_file():
        path = cfg.table
    header, rows = _read_table(path)
    missing = [c for c in [cfg.key_column, *(c.name for c in from_table)] if c not in header]
    if missing:
        raise CovariateError(f"{path}: declared column(s) not in the table: {', '.join(missing)} (it has {header})")
    if cfg.key == "participant":
        from medgen.io.pseudonyms import BIDS_SUBJECT, ingest_salt, subject_id

        state = manifest.parent / ".medgen"
        if not (salt or os.environ.get("MEDGEN_SUBJECT_SALT") or (state / "salt").is_file()):
            raise CovariateError(
                f"{manifest}: the ingest folder's salt ({state / 'salt'}) is missing, so participant labels "
                "cannot be matched to its pseudonyms; give the salt ingest used (MEDGEN_SUBJECT_SALT)"
            )
        key_salt = ingest_salt(state, salt)  # reads it; never makes a new one here
        by_key: dict[str, list[str]] = {}
        for r in scans:
            by_key.setdefault(r["subject_id"], []).append(r["scan_id"])

        def scans_of(key: str, where: str) -> list[str]:
            if not BIDS_SUBJECT.match(key):
                raise CovariateError(f"{where}: {cfg.key_column}={key!r} is not a BIDS participant label (sub-<label>)")
            return by_key.get(subject_id(key_salt, "bids:" + key), [])
    else:
        index = {r["scan_id"]: r["scan_id"] for r in scans} | {r["source"]: r["scan_id"] for r in scans}

        def scans_of(key: str, where: str) -> list[str]:
            return [index[key]] if key in index else []

    seen: dict[str, int] = {}
    unmatched = []
    for line, row in enumerate(rows, start=2):
        where = f"{path}: line {line}"
        key = row[cfg.key_column]
        if not key:
            raise CovariateError(f"{where}: empty {cfg.key_column}")
        if key in seen:
            raise CovariateError(f"{where}: {cfg.key_column}={key!r} appears twice (first on line {seen[key]})")
        seen[key] = line
        cells = {c.name: _parse(row[c.name], c, where) for c in from_table}
        ids = scans_of(key, where)
        if not ids:
            unmatched.append(key)
        for sid in ids:
            parsed[sid] = dict(cells)
            origin[sid] = f"line {line} ({key})"
    return _complete(cfg, manifest, path, scans, parsed, origin, unmatched)


def _complete(
    cfg: CovariatesConfig,
    manifest: Path,
    path: Path,
    scans: list[dict[str, str]],
    parsed: dict[str, dict[str, str | float | None]],
    origin: dict[str, str],
    unmatched: list[str],
) -> CovariateTable:
    """Geometry columns read from each scan's manifest row, then missing values as each column says."""
    for r in scans:
        if r["scan_id"] in parsed:
            for c in cfg.columns:
                if c.source != "table":
                    where = f"{manifest}: scan {r['scan_id']} ({c.source} of spacing {r.get('spacing') or 'unknown'})"
                    parsed[r["scan_id"]][c.name] = _parse(_geometry(r, c.source), c, where)
    # missing values, as each column says; a continuous 'impute' takes the median of what is present
    medians = {}
    for c in cfg.columns:
        present = sorted(v[c.name] for v in parsed.values() if v[c.name] is not None)  # type: ignore[type-var]
        if c.kind == "continuous" and present:
            medians[c.name] = float(present[len(present) // 2])
    values: dict[str, dict[str, str | float]] = {}
    dropped: dict[str, str] = {}
    imputed: list[str] = []
    for r in scans:
        sid = r["scan_id"]
        v = parsed.get(sid)
        if v is None:
            dropped[sid] = f"no row for it in {path.name}"
            continue
        out: dict[str, str | float] = {}
        for c in cfg.columns:
            x = v[c.name]
            if x is None:
                if c.missing == "error":
                    raise CovariateError(
                        f"{path}: {origin[sid]}: {c.name} is missing (scan {sid}; set missing: drop or impute to allow it)"
                    )
                if c.missing == "drop":
                    dropped[sid] = f"{c.name} missing"
                    break
                x = c.fill if c.kind == "categorical" else medians.get(c.name)
                if x is None:
                    raise CovariateError(f"{path}: {c.name} has no value at all to impute from")
                imputed.append(f"{sid}: {c.name} -> {x}")
            out[c.name] = x
        else:
            values[sid] = out
    if not values:
        raise CovariateError(f"{path}: no accepted scan of {manifest} has a complete row of covariates")
    return CovariateTable(values, dropped, imputed, sorted(unmatched))


def write_covariates(table: CovariateTable, cfg: CovariatesConfig, path: str | Path) -> Path:
    """DIR/covariates.csv: scan_id + the declared columns (data_schemas/covariates.schema.json)."""
    import io

    from medgen.io.atomic import write_text_atomic

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["scan_id", *(c.name for c in cfg.columns)])
    for sid in sorted(table.values):
        w.writerow([sid, *(_cell(table.values[sid][c.name]) for c in cfg.columns)])
    return write_text_atomic(Path(path), buf.getvalue())


def _cell(v: str | float) -> str:
    return v if isinstance(v, str) else repr(float(v))
