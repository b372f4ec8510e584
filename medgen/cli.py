"""The `medgen` command line: a thin face over the library API (medgen.api functions)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="medgen: ingest, synthesise, denoise and export medical volumes.")


class Frames(str, Enum):
    error = "error"
    split = "split"


class Localizers(str, Enum):
    drop = "drop"
    error = "error"


def _console():
    from rich.console import Console

    return Console()


def _run_ingest(sources: list[Path], out: Path, *, workers: int, frames: str, localizers: str, salt: str | None, force: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medgen.ingestion import IngestOptions, ingest

    console = _console()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task("surveying files" if phase == "survey" else "converting scans", total=total)
            bar.update(tasks[phase], completed=done, total=total)

        report = ingest(
            sources,
            out,
            options=IngestOptions(frames=frames, localizers=localizers),  # type: ignore[arg-type]
            workers=workers,
            salt=salt,
            force=force,
            progress=progress,
        )
    print_ingest_summary(report, console)
    return report


def print_ingest_summary(report, console) -> None:
    """Accepted scans as a table, rejected ones as one line each (reasons are long; tables wrap badly)."""
    import os
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    root = os.path.commonpath([r["source"] for r in report.rows]) if report.rows else ""

    def rel(src: str) -> str:
        return os.path.relpath(src, root) if root and src != root else src

    table = Table(title=f"Accepted scans -> {report.out_dir / 'volumes'}")
    for col in ("scan_id", "modality", "shape", "spacing mm", "split", "source"):
        table.add_column(col, overflow="fold")
    for r in sorted(report.accepted, key=lambda r: (r["modality"], r["source"])):
        table.add_row(r["scan_id"], r["modality"], r["shape"], r["spacing"], r["split"], escape(rel(r["source"])))
    console.print(table)
    if report.rejected:
        console.print(f"[bold red]Rejected scans[/] (under {escape(root)}):")
        for r in sorted(report.rejected, key=lambda r: r["source"]):
            console.print(f"  [red]{r['error_code']}[/] {escape(rel(r['source']))}: {escape(r['reason'])}")
    splits = Counter(r["split"] for r in report.accepted)
    console.print(
        f"[bold]{len(report.accepted)} accepted[/], [bold]{len(report.rejected)} rejected[/] "
        f"(train {splits.get('train', 0)} / val {splits.get('val', 0)} / test {splits.get('test', 0)}); "
        f"{report.converted} converted, {report.reused} unchanged and skipped, {report.files_read} files read, "
        f"{report.files_ignored} non-image files ignored, {report.seconds:.1f} s. Manifest: {report.manifest_path}"
    )


@app.command()
def ingest(
    sources: Annotated[list[Path], typer.Argument(help="Files or folders: DICOM (any tree, DICOMDIR) and NIfTI.", exists=True)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: volumes/, manifest.csv.")],
    workers: Annotated[int, typer.Option(help="Processes converting scans in parallel.")] = 1,
    frames: Annotated[Frames, typer.Option(help="4D NIfTI: reject (error) or one volume per frame (split).")] = Frames.error,
    localizers: Annotated[Localizers, typer.Option(help="LOCALIZER images inside a series: drop them, or refuse the series.")] = Localizers.drop,
    salt: Annotated[str | None, typer.Option(help="Secret for pseudonymous ids (default: $MEDGEN_SUBJECT_SALT, or one kept in OUT/.medgen/salt).")] = None,
    force: Annotated[bool, typer.Option(help="Convert every scan again, even unchanged ones.")] = False,
) -> None:
    """Turn DICOM series and NIfTI files into canonical RAS volumes and a validated manifest."""
    _run_ingest(sources, out, workers=workers, frames=frames.value, localizers=localizers.value, salt=salt, force=force)


@app.command("sample-data")
def sample_data(
    out: Annotated[Path, typer.Argument(help="Folder to assemble the demo set in.")],
    force: Annotated[bool, typer.Option(help="Rebuild even if a complete set is there.")] = False,
) -> None:
    """Assemble the demo data set from files inside installed packages (no download)."""
    from medgen.sample_data import build_sample_data

    items = build_sample_data(out, force=force)
    console = _console()
    for i in items:
        console.print(f"[bold]{i.path}[/]: {i.expect}")
    console.print(f"{len(items)} items in {out} (provenance and licences: {out / 'README.md'})")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("demo_run"),
    workers: Annotated[int, typer.Option(help="Processes for ingestion.")] = 1,
) -> None:
    """The main job on the bundled sample data, on CPU: assemble the sample set, ingest it, summarise."""
    from medgen.sample_data import build_sample_data

    console = _console()
    console.rule("[bold]1/2 sample data")
    build_sample_data(out / "sample_data")
    console.print(f"sample data in {out / 'sample_data'} (see its README.md)")
    console.rule("[bold]2/2 ingest")
    report = _run_ingest([out / "sample_data"], out / "ingest", workers=workers, frames="error", localizers="drop", salt=None, force=False)
    if not report.accepted:
        raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
