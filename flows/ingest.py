"""The ingest flow: one task, one library call, a path out.

Run: `python -m flows.ingest configs/demo.yaml`. Incrementality lives in `medgen.ingest` itself
(content hashes of the sources), so a scheduled re-run with nothing new reads nothing, whatever
Prefect's cache does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, task


@task(retries=2, retry_delay_seconds=[5, 30])
def sample_data_task(out: str) -> str:
    from medgen.sample_data import build_sample_data

    build_sample_data(out)
    return out


@task(retries=2, retry_delay_seconds=[5, 30])
def ingest_task(sources: list[str], out: str, workers: int, options: dict) -> dict:
    """Returns a small record (counts and the manifest path), never the volumes."""
    from medgen.ingestion import IngestOptions, ingest

    report = ingest(sources, out, options=IngestOptions(**options), workers=workers)
    return {
        "manifest": str(report.manifest_path),
        "accepted": len(report.accepted),
        "rejected": len(report.rejected),
        "converted": report.converted,
        "reused": report.reused,
    }


@flow(name="medgen-ingest")
def ingest_flow(config_path: str) -> dict:
    from medgen.config import load_config

    cfg = load_config(config_path)
    if cfg.sample_data is not None:
        sample_data_task(str(cfg.sample_data))
    ing = cfg.ingest
    opts = {"frames": ing.frames, "localizers": ing.localizers, "split": tuple(ing.split), "split_seed": ing.split_seed}
    return ingest_task([str(s) for s in ing.sources], str(ing.out), ing.workers, opts)


if __name__ == "__main__":
    print(ingest_flow(sys.argv[1] if len(sys.argv) > 1 else str(Path("configs/demo.yaml"))))
