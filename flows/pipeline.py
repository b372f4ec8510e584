"""The whole chain from one config: sample data -> ingest -> train -> synthesize (generate,
validate, export what passes) -> denoise, with Prefect artifacts and a one-screen summary.

    python -m flows.pipeline configs/demo.yaml          # the README's main job (CPU, minutes)

Each stage is a subflow (flows/ingest.py, train.py, synthesize.py, denoise.py) over medgen calls;
between them travel paths and small records. Re-run with nothing new: every task is a cache hit or
never starts (ingestion only converts changed scans), so a scheduled run costs seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from prefect import flow

from flows.common import config, task_runner
from flows.denoise import denoise_flow
from flows.ingest import ingest_flow
from flows.synthesize import synthesize_flow
from flows.train import train_flow


def _runner(f, cfg):
    r = task_runner(cfg)
    return f.with_options(task_runner=r) if r is not None else f


def publish_artifacts(ingest: dict, synth: dict, denoised: list[dict]) -> None:
    """Artifacts on the run: manifest summary table, the quality report, the gate verdict."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = [{"status": "accepted", "split": s, "scans": n} for s, n in ingest["splits"].items()]
    table.append({"status": "rejected", "split": "", "scans": ingest["rejected"]})
    create_table_artifact(key="manifest-summary", table=table, description=f"{ingest['manifest']}: {ingest['converted']} converted, {ingest['reused']} unchanged")
    v = synth["verdict"]
    md_path = Path(v["markdown"])
    report_md = md_path.read_text()
    quality_dir = md_path.parent.resolve()
    # links to the montage and plots by absolute file URI, so they open from the Prefect UI's host
    report_md = report_md.replace("](montage.png)", f"]({(quality_dir / 'montage.png').as_uri()})").replace(
        "](histograms.png)", f"]({(quality_dir / 'histograms.png').as_uri()})"
    )
    create_markdown_artifact(key="quality-report", markdown=report_md, description="medgen quality report")
    lines = [f"# Gate verdict: {'PASS' if v['passed'] else 'FAIL'}", ""]
    lines += [f"- {r}" for r in v["reasons"]]
    lines += [f"- passed: {', '.join(v['passing']) or 'none'}"]
    lines += [f"- failed {name}: {'; '.join(reasons)}" for name, reasons in v["failing"].items()]
    lines += [f"- exported {e['format']}: {len(e['exported'])} volume(s) -> {e['out']}" for e in synth["exports"]]
    lines += [f"- denoised {d['scan']}: " + (d.get("error") or ", ".join(d["outputs"])) for d in denoised]
    create_markdown_artifact(key="gate-verdict", markdown="\n".join(lines), description="what passed the gate and left the pipeline")


def run_pipeline(config_path: str) -> dict:
    cfg = config(config_path)
    cfg.require("ingest", "data", "autoencoder", "diffusion")
    times: dict[str, float] = {}
    t = time.perf_counter()
    ing = _runner(ingest_flow, cfg)(config_path)
    times["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = train_flow(config_path, ing["manifest"])
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    synth = _runner(synthesize_flow, cfg)(config_path, trained["generator"])
    times["synthesize"] = time.perf_counter() - t
    denoised: list[dict] = []
    if cfg.denoise is not None:
        t = time.perf_counter()
        denoised = _runner(denoise_flow, cfg)(config_path)
        times["denoise"] = time.perf_counter() - t
    publish_artifacts(ing, synth, denoised)
    return {"config": config_path, "ingest": ing, "train": trained, "synthesize": synth, "denoise": denoised, "seconds": times}


@flow(name="medgen-pipeline", log_prints=True)
def pipeline_flow(config_path: str) -> dict:
    return run_pipeline(config_path)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


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
    table.add_row("ingest", f"{result['seconds']['ingest']:.1f}", f"{ing['accepted']} accepted, {ing['rejected']} rejected ({ing['converted']} scans converted, {ing['reused']} unchanged) -> {ing['manifest']}")
    table.add_row("train", f"{result['seconds']['train']:.1f}", f"generator {result['train']['generator']}")
    exported = "; ".join(f"{e['format']}: {len(e['exported'])} -> {e['out']}" for e in syn["exports"]) or "nothing exported"
    real = v["realism"]
    table.add_row(
        "synthesize", f"{result['seconds']['synthesize']:.1f}",
        f"gate {'PASS' if v['passed'] else 'FAIL'}: {len(v['passing'])} of {len(v['passing']) + len(v['failing'])} volumes pass; "
        f"FID {_num(real['fid'])} (held-out real {_num(v['realism_heldout_real']['fid'])}); {exported}",
    )
    if result["denoise"]:
        table.add_row("denoise", f"{result['seconds']['denoise']:.1f}", "; ".join(
            d.get("error") or f"{d['scan']} (sigma {d['sigma']:.3g}) -> {Path(d['outputs'][0]).parent}" for d in result["denoise"]))
    console.print(table)
    console.print(f"run folder: {Path(syn['run']).parent}   report: {v['markdown']}   montage: {Path(v['markdown']).with_name('montage.png')}")


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "configs/demo.yaml"
    t0 = time.perf_counter()
    result = pipeline_flow(path)
    print_summary(result, time.perf_counter() - t0)
