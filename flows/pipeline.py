"""The whole chain from one config: sample data -> ingest -> train -> synthesize (generate,
validate, export what passes) -> denoise, with Prefect artifacts and a one-screen summary.

    python -m flows.pipeline configs/demo.yaml          # the README's main job (CPU, minutes)

Each stage is a subflow (flows/ingest.py, train.py, synthesize.py, denoise.py) over medgen calls;
between them travel paths and small records. Re-run with nothing new: every task is a cache hit or
never starts (ingestion only converts changed scans), so a scheduled run costs seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from flows.common import config, entry_point, with_task_runner
from flows.denoise import denoise_flow
from flows.ingest import ingest_flow
from flows.synthesize import synthesize_flow
from flows.train import train_flow


def publish_summary(result: dict) -> None:
    """The pipeline run's own artifact: stage times and where everything went (the stages publish
    theirs: manifest summary, quality report, gate verdict, denoising table)."""
    from prefect.artifacts import create_markdown_artifact

    syn, v = result["synthesize"], result["synthesize"]["verdict"]
    lines = ["# medgen pipeline", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {t:.1f} |" for k, t in result["seconds"].items()]
    lines += [
        "",
        f"- manifest: {result['ingest']['manifest']}",
        f"- generator: {result['train']['generator']}",
        f"- gate: {'PASS' if v['passed'] else 'FAIL'}, {len(v['passing'])} passing, report {v['markdown']}",
    ]
    lines += [f"- export {e['format']}: {len(e['exported'])} -> {e['out']}" for e in syn["exports"]]
    lines += [f"- denoised {d['scan']}: " + (d.get("error") or ", ".join(d["outputs"])) for d in result["denoise"]]
    create_markdown_artifact(key="pipeline-summary", markdown="\n".join(lines), description="medgen pipeline run")


def run_pipeline(config_path: str) -> dict:
    cfg = config(config_path)
    cfg.require("ingest", "data", "autoencoder", "diffusion")
    times: dict[str, float] = {}
    t = time.perf_counter()
    ing = with_task_runner(ingest_flow, cfg)(config_path)
    times["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = train_flow(config_path, ing["manifest"])
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    synth = with_task_runner(synthesize_flow, cfg)(config_path, trained["generator"])
    times["synthesize"] = time.perf_counter() - t
    denoised: list[dict] = []
    if cfg.denoise is not None:
        t = time.perf_counter()
        denoised = with_task_runner(denoise_flow, cfg)(config_path)
        times["denoise"] = time.perf_counter() - t
    result = {
        "config": config_path,
        "ingest": ing,
        "train": trained,
        "synthesize": synth,
        "denoise": denoised,
        "seconds": times,
    }
    publish_summary(result)
    return result


@flow(name="medgen-pipeline", log_prints=True)
def pipeline_flow(config_path: str) -> dict:
    return run_pipeline(config_path)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def utility_line(u: dict) -> str:
    """Train-on-synthetic / test-on-real in one line (the full table is in report.md)."""
    parts = []
    seg = u.get("segmentation")
    if seg:
        mean = {k: _mean(seg[f"dice_{k}"]) for k in ("real", "synthetic", "real+synthetic")}
        parts.append(
            "held-out real Dice, UNet trained on real / synthetic / both: "
            + " / ".join(_num(mean[k]) for k in ("real", "synthetic", "real+synthetic"))
            + f"; mask adherence {_num(seg['mask_adherence_mean'])}"
        )
    for col, c in (u.get("conditions") or {}).items():
        parts.append(
            f"{col}={c['asked']} read back: {c['metric']} {_num(c['synthetic'])} (held-out real {_num(c['heldout_real'])})"
        )
    return "; ".join(parts)


def _mean(d: dict) -> float | None:
    vals = [x for x in d.values() if x is not None]
    return sum(vals) / len(vals) if vals else None


def print_summary(result: dict, wall: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ing, syn = result["ingest"], result["synthesize"]
    v = syn["verdict"]
    table = Table(title=f"medgen pipeline: {result['config']}  ({wall:.0f} s)", show_header=True)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result", overflow="fold")
    table.add_row(
        "ingest",
        f"{result['seconds']['ingest']:.1f}",
        f"{ing['accepted']} accepted, {ing['rejected']} rejected ({ing['converted']} scans converted, {ing['reused']} unchanged) -> {ing['manifest']}",
    )
    table.add_row("train", f"{result['seconds']['train']:.1f}", f"generator {result['train']['generator']}")
    exported = (
        "; ".join(f"{e['format']}: {len(e['exported'])} -> {e['out']}" for e in syn["exports"]) or "nothing exported"
    )
    real = v["realism"]
    table.add_row(
        "synthesize",
        f"{result['seconds']['synthesize']:.1f}",
        f"gate {'PASS' if v['passed'] else 'FAIL'}: {len(v['passing'])} of {len(v['passing']) + len(v['failing'])} volumes pass; "
        f"FID {_num(real['fid'])} (held-out real {_num(v['realism_heldout_real']['fid'])}); {exported}",
    )
    u = v.get("utility") or {}
    if u.get("segmentation") or u.get("conditions"):
        table.add_row("utility", "", utility_line(u))
    if result["denoise"]:
        table.add_row(
            "denoise",
            f"{result['seconds']['denoise']:.1f}",
            "; ".join(
                d.get("error")
                or f"{d['scan']} (sigma {d['sigma']:.3g}{''.join('; ' + n for n in d.get('notes', []))}) -> {Path(d['outputs'][0]).parent}"
                for d in result["denoise"]
            ),
        )
    console.print(table)
    console.print(
        f"run folder: {Path(syn['run']).parent}   report: {v['markdown']}   montage: {Path(v['markdown']).with_name('montage.png')}"
    )


def _main(args: list[str]) -> None:
    path = args[0] if args else "configs/demo.yaml"
    config(path)  # a bad config is one ConfigError here, before Prefect starts a run
    t0 = time.perf_counter()
    result = pipeline_flow(path)
    print_summary(result, time.perf_counter() - t0)


if __name__ == "__main__":
    entry_point(_main)
