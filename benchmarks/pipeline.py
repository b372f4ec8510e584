"""Wall time of each stage of the demo pipeline, and what Prefect costs on top.

The same work twice in one run, into fresh folders: once as plain medgen calls in this process
(the direct path), once through `flows.pipeline` (ephemeral Prefect server, tasks, caching,
artifacts, training as a torchrun subprocess). Overhead = flow - direct, per stage and in total;
then the flow once more with nothing changed (what a scheduled re-run costs).

    python benchmarks/pipeline.py [--config configs/demo.yaml]
    python benchmarks/pipeline.py --fanout [--scans 6 --workers 2]

--fanout: throughput (scans per minute) of denoising the same scans in one process, in a pool of
worker processes that each take their share of the cores (medgen.threads, as the Dask runner and
ingest's pool do), and in a pool left at torch's default (every worker one thread per core).

Goal: orchestration overhead under 10 % of the demo's wall time. Stage times carry this shared
machine's noise (a few %): read the total, and run it twice before trusting a small difference.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry attempts from the temporary server


def relocated(config: Path, root: Path) -> Path:
    """The config with every output (and the sample data it builds) under `root`."""
    raw = yaml.safe_load(config.read_text())
    raw["sample_data"] = str(root / "sample_data")
    raw["ingest"]["sources"] = [str(root / "sample_data")]
    raw["ingest"]["out"] = str(root / "ingest")
    raw.setdefault("orchestration", {})["run_dir"] = str(root)
    if raw.get("denoise"):
        raw["denoise"]["sources"] = [str(s).replace("demo_run", str(root)) for s in raw["denoise"]["sources"]]
        raw["denoise"]["out"] = str(root / "denoised")
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def direct(config_path: Path) -> dict[str, float]:
    """The pipeline's work as plain library calls, stage by stage."""
    from medgen.config import load_config
    from medgen.demo_data import build_sample_data
    from medgen.denoising.batch import denoise_scan, find_scans
    from medgen.export.exporter import export_run
    from medgen.ingestion.run import IngestOptions, ingest
    from medgen.quality.validate import validate_run
    from medgen.synthesis.runs import synthesize
    from medgen.synthesis.train_autoencoder import train_autoencoder
    from medgen.synthesis.train_diffusion import train_diffusion

    cfg = load_config(config_path)
    run = cfg.orchestration.run_dir
    times = {}
    t = time.perf_counter()
    build_sample_data(cfg.sample_data)
    report = ingest(
        cfg.ingest.sources, cfg.ingest.out, options=IngestOptions.from_config(cfg.ingest), salt=cfg.ingest.salt
    )
    times["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    device = cfg.orchestration.torchrun.device or "cpu"
    train_autoencoder(cfg, report.manifest_path, run / "ldm", device=device)
    gen = train_diffusion(cfg, report.manifest_path, run / "ldm", device=device)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    g = cfg.generate
    synthesize(
        gen,
        g.n,
        run / "synthetic",
        sampler=g.sampler,
        steps=g.steps,
        seed=g.seed,
        batch_size=g.batch_size,
        device=device,
    )
    v = validate_run(run / "synthetic", quality=cfg.quality)
    if v.passed:
        for fmt in cfg.export.formats:
            export_run(run / "synthetic", run / "export" / fmt, fmt)
    times["synthesize"] = time.perf_counter() - t
    if cfg.denoise is not None:
        t = time.perf_counter()
        for ref in find_scans(cfg.denoise.sources):
            denoise_scan(
                ref,
                cfg.denoise.out,
                model=cfg.denoise.model,
                sigma=cfg.denoise.sigma,
                noise=cfg.denoise.noise,
                method=cfg.denoise.method,
            )
        times["denoise"] = time.perf_counter() - t
    return times


def _fanout_scan(seed: int) -> float:
    import numpy as np

    from medgen.demo_data import phantom_mr
    from medgen.denoising.denoiser import denoise

    clean = phantom_mr((56, 56, 48)).astype(np.float32)
    noisy = clean + 0.05 * float(clean.max()) * np.random.default_rng(seed).standard_normal(clean.shape)
    return float(np.mean(denoise(noisy.astype(np.float32), device="cpu").data))


def _default_threads() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # what an unconfigured worker gets


def fanout(scans: int, workers: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from medgen.threads import cores, limit_threads, share

    rows = []
    torch.set_num_threads(cores())
    t0 = time.perf_counter()
    for i in range(scans):
        _fanout_scan(i)
    rows.append((f"one process, {cores()} threads", time.perf_counter() - t0))
    for label, init, args in (
        (f"{workers} workers x {share(workers)} threads (medgen.threads)", limit_threads, (share(workers),)),
        (f"{workers} workers x {os.cpu_count()} threads (torch default)", _default_threads, ()),
    ):
        # spawned: a fork after torch started its OpenMP pool can hang the child
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=args) as pool:
            list(pool.map(_fanout_scan, range(workers)))  # start-up and imports, not timed
            t0 = time.perf_counter()
            list(pool.map(_fanout_scan, range(scans)))
            rows.append((label, time.perf_counter() - t0))
    base = rows[0][1]
    print(f"\ndenoising {scans} scans of 56x56x48 on {cores()} cores")
    print(f"{'how':<44}{'s':>8}{'scans/min':>11}{'vs one process':>16}")
    for label, sec in rows:
        print(f"{label:<44}{sec:>8.1f}{60 * scans / sec:>11.1f}{base / sec:>15.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--fanout", action="store_true", help="only the fan-out throughput table")
    ap.add_argument("--scans", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if args.fanout:
        return fanout(args.scans, args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        d = direct(relocated(args.config, Path(tmp) / "direct"))
        direct_total = time.perf_counter() - t0

        from flows.pipeline import pipeline_flow

        cfg_flow = relocated(args.config, Path(tmp) / "flow")
        t0 = time.perf_counter()
        result = pipeline_flow(str(cfg_flow))
        flow_total = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipeline_flow(str(cfg_flow))
        rerun = time.perf_counter() - t0
    f = result["seconds"]
    print(f"\n{'stage':<12}{'direct s':>10}{'flow s':>10}{'overhead s':>12}{'overhead %':>12}")
    for stage in d:
        print(
            f"{stage:<12}{d[stage]:>10.1f}{f[stage]:>10.1f}{f[stage] - d[stage]:>12.1f}{100 * (f[stage] - d[stage]) / d[stage]:>11.1f}%"
        )
    over = flow_total - direct_total
    print(f"{'total':<12}{direct_total:>10.1f}{flow_total:>10.1f}{over:>12.1f}{100 * over / direct_total:>11.1f}%")
    print(
        f"\norchestration overhead {100 * over / flow_total:.1f} % of the flow's wall time (goal < 10 %); "
        f"re-run with nothing new: {rerun:.1f} s"
    )


if __name__ == "__main__":
    main()
