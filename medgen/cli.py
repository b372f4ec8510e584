"""The `medgen` command line: a thin face over the library API (medgen.api functions)."""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="medgen: ingest, synthesise, denoise and export medical volumes."
)


class Frames(str, Enum):
    error = "error"
    split = "split"  # type: ignore[assignment]  # a member named like str.split, as the CLI spells it


class Localizers(str, Enum):
    drop = "drop"
    error = "error"


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def _run_ingest(
    sources: list[Path], out: Path, *, workers: int, frames: str, localizers: str, salt: str | None, force: bool
):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medgen.ingestion.run import IngestOptions, ingest

    console = _console()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
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

    from rich.markup import escape as rich_escape
    from rich.table import Table

    from medgen.text import printable

    def escape(text: str) -> str:  # names come from the user's files: no markup, no control characters
        return rich_escape(printable(text))

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
        f"{report.files_ignored} non-image files ignored, {report.seconds:.1f} s. Manifest: {escape(str(report.manifest_path))}"
    )


@app.command()
def ingest(
    sources: Annotated[
        list[Path], typer.Argument(help="Files or folders: DICOM (any tree, DICOMDIR) and NIfTI.", exists=True)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: volumes/, manifest.csv.")],
    workers: Annotated[int, typer.Option(help="Processes converting scans in parallel.")] = 1,
    frames: Annotated[
        Frames, typer.Option(help="4D NIfTI: reject (error) or one volume per frame (split).")
    ] = Frames.error,
    localizers: Annotated[
        Localizers, typer.Option(help="LOCALIZER images inside a series: drop them, or refuse the series.")
    ] = Localizers.drop,
    salt: Annotated[
        str | None,
        typer.Option(
            help="Secret for pseudonymous ids (default: $MEDGEN_SUBJECT_SALT, or one kept in OUT/.medgen/salt)."
        ),
    ] = None,
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
    from medgen.demo_data import build_sample_data

    items = build_sample_data(out, force=force)
    console = _console()
    for i in items:
        console.print(f"[bold]{i.path}[/]: {i.expect}")
    console.print(f"{len(items)} items in {out} (provenance and licences: {out / 'README.md'})")


@app.command()
def covariates(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config with a covariates section.", exists=True)],
    manifest: Annotated[
        Path, typer.Option("--manifest", "-m", help="manifest.csv written by `medgen ingest`.", exists=True)
    ],
) -> None:
    """Validate a participants.tsv / per-scan CSV against the config and join it to the manifest:
    writes covariates.csv (keyed by pseudonymous scan_id) beside the manifest."""
    from medgen.datasets.covariates import load_covariates, write_covariates

    cfg = _load_config(config)
    cfg.require("covariates")
    table = load_covariates(cfg.covariates, manifest, salt=cfg.ingest.salt if cfg.ingest else None)
    out = write_covariates(table, cfg.covariates, manifest.parent / "covariates.csv")
    console = _console()
    console.print(f"-> {out}: {len(table.values)} scans with {len(cfg.covariates.columns)} covariates")
    for sid, why in sorted(table.dropped.items()):
        console.print(f"   left out {sid}: {why}")
    for line in table.imputed:
        console.print(f"   imputed {line}")
    if table.unmatched:
        console.print(f"   {len(table.unmatched)} table rows match no accepted scan")


train_app = typer.Typer(
    no_args_is_help=True, help="Train the latent diffusion model: autoencoder first, then diffusion."
)
app.add_typer(train_app, name="train")


class Stage(str, Enum):
    autoencoder = "autoencoder"
    diffusion = "diffusion"
    controlnet = "controlnet"


@train_app.command("denoiser")
def train_denoiser_cmd(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML config with data and denoiser sections.", exists=True)
    ],
    manifest: Annotated[
        Path, typer.Option("--manifest", "-m", help="manifest.csv written by `medgen ingest`.", exists=True)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (resumed if it holds a checkpoint).")],
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda when available).")] = None,
    self_supervised: Annotated[
        bool,
        typer.Option(
            "--self-supervised",
            help="Fine-tune (self_supervised.init, default the shipped model) on the noisy scans alone, "
            "SURE loss, no clean scans: the config's self_supervised section.",
        ),
    ] = False,
) -> None:
    """The score model for `medgen denoise --model RUN/score_model`, on your own scans."""
    if self_supervised:
        from medgen.denoising.train import train_self_supervised

        path = train_self_supervised(_load_config(config), manifest, out, device=device)
    else:
        from medgen.denoising.train import train_denoiser

        path = train_denoiser(_load_config(config), manifest, out, device=device)
    _console().print(f"score model: {path}")


def _load_config(path: Path):
    from medgen.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint="--config") from e


def _train(stage: str, config: Path, manifest: Path, out: Path, device: str | None):
    from medgen.synthesis.train_autoencoder import train_autoencoder
    from medgen.synthesis.train_controlnet import train_controlnet
    from medgen.synthesis.train_diffusion import train_diffusion

    cfg = _load_config(config)
    fn = {"autoencoder": train_autoencoder, "diffusion": train_diffusion, "controlnet": train_controlnet}[stage]
    return fn(cfg, manifest, out, device=device)


@train_app.command("autoencoder")
def train_autoencoder_cmd(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML config with data and autoencoder sections.", exists=True)
    ],
    manifest: Annotated[
        Path, typer.Option("--manifest", "-m", help="manifest.csv written by `medgen ingest`.", exists=True)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (resumed if it holds a checkpoint).")],
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda when available).")] = None,
) -> None:
    """Stage 1: the KL autoencoder. Under torchrun, one process per GPU (or CPU process, gloo)."""
    path = _train("autoencoder", config, manifest, out, device)
    _console().print(f"autoencoder: {path}")


@train_app.command("diffusion")
def train_diffusion_cmd(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="YAML config with data, autoencoder and diffusion sections.", exists=True),
    ],
    manifest: Annotated[
        Path, typer.Option("--manifest", "-m", help="manifest.csv written by `medgen ingest`.", exists=True)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The run folder of the autoencoder stage.")],
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda when available).")] = None,
) -> None:
    """Stage 2: the latent diffusion UNet; writes the generator bundle RUN/generator."""
    path = _train("diffusion", config, manifest, out, device)
    _console().print(f"generator: {path}")


@train_app.command("controlnet")
def train_controlnet_cmd(
    config: Annotated[
        Path,
        typer.Option(
            "--config", "-c", help="YAML config with data, autoencoder, diffusion and controlnet sections.", exists=True
        ),
    ],
    manifest: Annotated[
        Path,
        typer.Option(
            "--manifest", "-m", help="manifest.csv of an ingest that paired label maps (labels.csv).", exists=True
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The run folder holding RUN/generator.")],
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda when available).")] = None,
) -> None:
    """Stage 3 (optional): a ControlNet on the frozen generator, so samples follow a label map; writes RUN/controlnet."""
    path = _train("controlnet", config, manifest, out, device)
    _console().print(f"controlnet: {path}")


class Sampler(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"
    rflow = "rflow"


@app.command()
def generate(
    model: Annotated[Path, typer.Argument(help="A generator folder (RUN/generator).", exists=True)],
    n: Annotated[int, typer.Option("--n", min=1, help="How many volumes.")] = 4,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: volumes/synthetic_NNNN.nii.gz and synthesis.json.")
    ] = Path("synthetic"),
    sampler: Annotated[
        Sampler | None,
        typer.Option(help="Default: the config's `generate.sampler`, else ddim (rflow for a rectified-flow model)."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="Sampling steps (default: the config's, else 50; DDPM needs all it was trained with)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Sample i of a seed is the same whatever the batch size.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Memory only: the samples do not change.")] = 1,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Config whose `generate` section sets sampler and steps.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N.")] = None,
    condition: Annotated[
        list[str] | None,
        typer.Option(
            "--condition",
            help="A conditioned generator: COLUMN=VALUE, repeatable (--condition sex=F --condition age=70); "
            "columns left out stay open. Default: the config's `generate.condition`.",
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="A NIfTI label map, or a folder of *_dseg.nii.gz (sample i follows map i mod k); needs --controlnet; written and exported as pairs.",
            exists=True,
        ),
    ] = None,
    controlnet: Annotated[
        Path | None, typer.Option(help="RUN/controlnet from `medgen train controlnet` (needs --labels).", exists=True)
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Classifier-free guidance weight: 1 as trained (default), more follows the condition harder, 0 ignores it.",
        ),
    ] = None,
    mask_guidance: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="With --controlnet: guidance on the label map, 1 as trained (default: the config's, else 1), more follows it harder.",
        ),
    ] = None,
) -> None:
    """Generate synthetic volumes (NIfTI, model geometry and units) into a run folder for `medgen validate`."""
    from medgen.models.conditions import parse_condition_args

    g = _load_config(config).generate if config else None
    chosen = sampler.value if sampler else (g.sampler if g else None)
    asked = parse_condition_args(condition) if condition else (g.condition if g else None)
    weight = guidance if guidance is not None else (g.guidance if g else 1.0)
    pair = (labels or (g.labels if g else None), controlnet or (g.controlnet if g else None))
    m = mask_guidance if mask_guidance is not None else (g.mask_guidance if g else 1.0)
    _run_generate(
        model, n, out, chosen, steps or (g.steps if g else 50), seed, batch_size, device, asked, weight, pair, m
    )


def _run_generate(
    model: Path,
    n: int,
    out: Path,
    sampler: str | None,
    steps: int,
    seed: int,
    batch_size: int,
    device: str | None,
    condition: dict | None = None,
    guidance: float = 1.0,
    pair: tuple[Path | None, Path | None] = (None, None),
    mask_guidance: float = 1.0,
):
    import time

    from medgen.synthesis.runs import synthesize

    t0 = time.perf_counter()
    record = synthesize(
        model,
        n,
        out,
        sampler=sampler,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        device=device,
        condition=condition,
        guidance=guidance,
        labels=pair[0],
        controlnet=pair[1],
        mask_guidance=mask_guidance,
    )
    seconds = time.perf_counter() - t0
    asked = f", condition {record.condition} at guidance {record.guidance:g}" if record.condition else ""
    _console().print(
        f"{n} volumes in {seconds:.1f} s with {record.sampler}-{steps}{asked} -> {out / 'volumes'} "
        f"(record: {out / 'synthesis.json'})"
    )
    return record


def _load_quality(config: Path | None):
    from medgen.config import QualityConfig

    return _load_config(config).quality if config else QualityConfig()


@app.command()
def validate(
    run: Annotated[
        Path, typer.Argument(help="A synthesis run folder (from `medgen generate`).", exists=True, file_okay=False)
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Config whose `quality` section sets the gate (default thresholds otherwise)."
        ),
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Training manifest, if not where the generator recorded it.")
    ] = None,
) -> None:
    """Run the quality gate on a synthesis run: metrics, verdicts, RUN/quality/report.{json,md}, montage and histograms."""
    from medgen.quality.validate import validate_run

    v = validate_run(run, quality=_load_quality(config), manifest=manifest)
    print_validation(v, _console())
    if not v.passed:
        raise typer.Exit(code=2)


def print_validation(v, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    r = v.result
    table = Table(title=f"quality gate: {v.run}")
    for col in ("volume", "verdict", "nearest NCC", "feature cos", "reasons"):
        table.add_column(col, overflow="fold")
    for vv in r.volumes:
        c = vv.checks
        ncc, cos = c.get("nearest_ncc"), c.get("nearest_feature_cosine")
        table.add_row(
            vv.name,
            "[green]pass" if vv.passed else "[red]FAIL",
            "" if ncc is None else f"{ncc:.3f}",
            "" if cos is None else f"{cos:.3f}",
            escape("; ".join(vv.reasons)),
        )
    console.print(table)
    real = ", ".join(f"{k.upper()} {val:.4g}" for k, val in r.realism.items() if val is not None)
    d = r.diversity
    console.print(f"realism vs training: {real}")
    if d["synthetic_mean_pairwise_ms_ssim"] is not None:
        console.print(
            f"diversity (mean pairwise MS-SSIM): synthetic {d['synthetic_mean_pairwise_ms_ssim']:.3f}, real {d['real_mean_pairwise_ms_ssim']:.3f}"
        )
    verdict = "[green]PASS" if r.passed else "[red]FAIL: " + escape("; ".join(r.reasons))
    console.print(f"batch verdict: {verdict}  (report: {v.report_path.parent / 'report.md'})")


class ExportFormatOption(str, Enum):
    nifti = "nifti"
    dicom = "dicom"


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A validated synthesis run folder.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Export folder.")],
    format: Annotated[
        ExportFormatOption,
        typer.Option("--format", "-f", help="nifti (with .provenance.json) or dicom (a series per volume)."),
    ] = ExportFormatOption.nifti,
    overwrite: Annotated[
        bool, typer.Option(help="Write into a non-empty folder medgen did not export to (its files are kept).")
    ] = False,
) -> None:
    """Export the volumes that passed the gate, atomically and idempotently, with provenance sidecars."""
    from medgen.export.exporter import export_run

    r = export_run(run, out, format.value, overwrite=overwrite)
    _console().print(
        f"exported {len(r.exported)} volume(s) as {r.format} -> {out}"
        + (f"; not exported (failed the gate): {', '.join(r.skipped)}" if r.skipped else "")
    )


class PrecisionKind(str, Enum):
    """The choices of medgen.models.precision, so a typo is refused by the CLI in one line."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class NoiseKind(str, Enum):
    gaussian = "gaussian"
    rician = "rician"


class DenoiseMethod(str, Enum):
    tweedie = "tweedie"
    posterior = "posterior"


@app.command()
def denoise(
    scan: Annotated[
        Path, typer.Argument(help="NIfTI file, DICOM series folder or multi-frame DICOM file.", exists=True)
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="A .nii/.nii.gz file, or (DICOM input) a folder for the DICOM series.")
    ],
    sigma: Annotated[
        float | None, typer.Option(help="Noise SD in the scan's units (default: estimated from the scan).")
    ] = None,
    repeat: Annotated[
        Path | None,
        typer.Option(
            help="A second acquisition of the same scan (a repeated frame or b0): sigma is measured from "
            "the difference, far more reliably than from one scan.",
            exists=True,
        ),
    ] = None,
    noise: Annotated[NoiseKind, typer.Option(help="gaussian, or rician for magnitude MR.")] = NoiseKind.gaussian,
    method: Annotated[
        DenoiseMethod, typer.Option(help="tweedie (MMSE, one pass) or posterior (sampling, with an uncertainty map).")
    ] = DenoiseMethod.tweedie,
    n_samples: Annotated[int, typer.Option(min=1, help="Posterior samples.")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    adapt: Annotated[
        int,
        typer.Option(
            min=0,
            help="First fine-tune a copy of the model on this scan for N self-supervised (SURE) steps; "
            "kept only where SURE expects it to do better. ~0.5 s a step on 2 CPU cores.",
        ),
    ] = 0,
    model: Annotated[
        Path | None, typer.Option(help="A score-model folder (default: the one shipped with medgen).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N.")] = None,
    precision: Annotated[
        PrecisionKind,
        typer.Option(
            help="auto (bf16 on CUDA, fp32 on CPU), bf16 (also on a CPU with native bf16: ~1.9x faster), fp16, fp32."
        ),
    ] = PrecisionKind.auto,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output file, or write into a folder medgen did not write.")
    ] = False,
    figure: Annotated[
        Path | None,
        typer.Option(
            help="Also write a PNG: noisy / denoised / residual (/ uncertainty) mid-slices and the expected gain."
        ),
    ] = None,
) -> None:
    """Denoise a scan with the score model; NIfTI out, or a DERIVED DICOM series for DICOM input."""
    import numpy as np

    from medgen.denoising.batch import WRITER
    from medgen.denoising.denoiser import denoise_detailed
    from medgen.errors import DenoiseError
    from medgen.io.load import load_volume
    from medgen.io.ownership import check_output
    from medgen.text import printable

    is_nifti_out = out.name.endswith((".nii", ".nii.gz"))
    if not is_nifti_out and out.suffix and not out.is_dir():
        raise DenoiseError(
            f"--out {printable(str(out))}: a NIfTI output ends in .nii or .nii.gz; a folder (for the DICOM "
            "series of a DICOM scan, or denoised.nii.gz) has no suffix"
        )
    vol = load_volume(scan)
    src = vol.meta.source
    to_dicom = src is not None and src.kind == "dicom" and not is_nifti_out
    nifti = None if to_dicom else (out if is_nifti_out else out / "denoised.nii.gz")
    inputs = [scan, *(Path(f) for f in (src.files if src else ()))]
    # checked before the (slow) denoising, and again by write_denoised just before writing
    if to_dicom:
        check_output(out, inputs=inputs, writer=WRITER, overwrite=overwrite, is_folder=True)
    else:
        check_output(nifti, inputs=inputs, writer=WRITER, overwrite=overwrite, is_folder=False)  # type: ignore[arg-type]
    if figure is not None:
        check_output(figure, inputs=inputs, writer=WRITER, overwrite=overwrite, is_folder=False)
    correlation = None
    if repeat is not None:
        if sigma is not None:
            raise typer.BadParameter("give --sigma or --repeat, not both", param_hint="--repeat")
        from medgen.denoising.denoiser import estimate_sigma_from_repeats

        other = load_volume(repeat)
        if other.shape != vol.shape or not np.allclose(other.affine, vol.affine, atol=1e-3):
            raise DenoiseError(
                f"--repeat {printable(str(repeat))}: not on the scan's voxel grid (shape {other.shape} vs {vol.shape})"
            )
        from medgen.denoising.correlated import correlation_from_repeats

        sigma = estimate_sigma_from_repeats(vol.data, other.data)
        rho = correlation_from_repeats(vol.data, other.data)
        # white enough (|lag-1| < 0.1 on every axis): keep the white-noise model, one network pass pair
        correlation = rho if max(abs(r) for r in rho) >= 0.1 else None
    with _window_progress() as progress:
        r = denoise_detailed(
            vol,
            model=model,
            sigma=sigma,
            noise=noise.value,
            method=method.value,
            n_samples=n_samples,
            seed=seed,
            device=device,
            precision=precision.value,  # type: ignore[arg-type]
            adapt=adapt,
            progress=progress,
            noise_correlation=correlation,
        )
    from medgen.denoising.batch import write_denoised

    console = _console()
    for p in write_denoised(vol, r.volume, r.std, nifti=nifti, dicom=out if to_dicom else None, overwrite=overwrite):
        console.print(
            f"-> {p}" + (" (new DICOM series, ImageType DERIVED\\SECONDARY)" if p == out and to_dicom else "")
        )
    console.print(
        f"sigma {r.sigma:.4g} {vol.meta.units} ({'estimated' if r.sigma_estimated else ('from the repeat' if repeat else 'given')}), method {method.value}"
    )
    if figure is not None:
        from medgen.denoising.figure import figure_title, write_figure

        title = figure_title(scan.name, r.sigma, vol.meta.units, r.risk)
        console.print(f"-> {write_figure(vol, r.volume, figure, std=r.std, title=title)}")
        from medgen.io.ownership import record_output

        record_output(figure.parent, [figure.name], WRITER, add=True)
    if r.risk is not None:
        k = r.risk
        gain = f"expected gain {k.gain_db:+.2f} dB" if k.gain_db is not None else "no reliable gain estimate"
        console.print(
            f"estimated error (SURE, {k.covers}): MSE {k.mse_output:.4g} vs the input's {k.mse_input:.4g} "
            f"{vol.meta.units}^2, {gain} ({k.how or f'strength {k.strength:g}, weight {k.weight:g}'})"
        )


PROGRESS_FROM = 16  # windows: below this the run takes seconds and a bar is noise


@contextlib.contextmanager
def _window_progress():
    """A progress bar (windows done of total, on stderr) for volumes that take many windows."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("denoising windows"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=_console(stderr=True),
        transient=False,
    )
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if total < PROGRESS_FROM:
            return
        if task is None:
            bar.start()
            task = bar.add_task("denoise", total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def main(argv: list[str] | None = None) -> int:
    """The console entry point: every MedgenError becomes one clear message and exit status 1 (a
    traceback only with --debug, or MEDGEN_DEBUG=1); usage errors exit 2 as click does."""
    import os
    import sys

    import click

    from medgen.errors import MedgenError, user_message

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MEDGEN_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    # typer >= 0.29 carries its own copy of click's exceptions: catch both families
    exits = (typer.Exit, click.exceptions.Exit)
    aborts = (typer.Abort, click.exceptions.Abort)
    usage = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
    try:
        rc = app(args=args, prog_name="medgen", standalone_mode=False)
    except exits as e:
        rc = e.exit_code
    except aborts:
        print("medgen: aborted", file=sys.stderr)
        rc = 130
    except usage as e:  # a bad option or a path that does not exist: click's one-line usage message
        if not hasattr(e, "show"):
            raise
        e.show()
        rc = getattr(e, "exit_code", 2)
    except MedgenError as e:
        if debug:
            raise
        print(user_message(e), file=sys.stderr)
        rc = 1
    if argv is None:
        sys.exit(rc or 0)
    return int(rc or 0)


if __name__ == "__main__":
    main()
