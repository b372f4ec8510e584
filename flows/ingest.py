"""The ingest flow: survey in the flow, one task per new or changed scan, then the manifest.

    python -m flows.ingest configs/demo.yaml

Incremental on content: `medgen.ingestion.run.plan_ingest` reads only files whose size or mtime
changed and compares content hashes with the last manifest, so a scheduled re-run with nothing new
starts no conversion task, and a changed scan starts exactly one. Conversion tasks take a scan's
header record and return its manifest rows (small); with `orchestration.task_runner: dask` they run
on a Dask cluster. The survey and the manifest stay in the flow process: they own the file index.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import config, io_retries, with_task_runner


@task
def sample_data_task(out: str) -> str:
    from medgen.demo_data import build_sample_data

    build_sample_data(out)  # content-checked: an existing, complete set is kept as it is
    return out


# No Prefect cache: the plan already sends only new or changed scans here (keyed on content hashes).
@task(cache_policy=NO_CACHE, task_run_name="convert {scan_id}")
def convert_task(unit, scan_id: str, out_dir: str, options) -> list[dict[str, str]]:
    from medgen.ingestion.run import convert_unit

    return convert_unit(unit, scan_id, out_dir, options)


def run_ingest(config_path: str) -> dict:
    """The flow body (shared by the ingest flow and the pipeline's ingest stage)."""
    from medgen.ingestion.run import IngestOptions, finish_ingest, ingest_lock, label_rows, plan_ingest

    cfg = config(config_path)
    cfg.require("ingest")
    ing = cfg.ingest
    assert ing is not None  # require() refused a config without it
    io = io_retries(cfg)
    if cfg.sample_data is not None:
        sample_data_task.with_options(**io)(str(cfg.sample_data))
    with ingest_lock(ing.out):  # an overlapping scheduled run waits here instead of racing
        plan = plan_ingest(
            [str(s) for s in ing.sources], ing.out, options=IngestOptions.from_config(ing), salt=ing.salt
        )
        convert = convert_task.with_options(**io)
        futures = [convert.submit(u, sid, str(plan.out_dir), plan.options) for u, sid in plan.todo]
        rows = []
        for (u, _), fut in zip(plan.todo, futures):
            rows.extend(label_rows(plan, u, fut.result()))
        report = finish_ingest(plan, rows)
    return {
        "manifest": str(report.manifest_path),
        "accepted": len(report.accepted),
        "rejected": len(report.rejected),
        "converted": report.converted,
        "reused": report.reused,
        "splits": {s: sum(r["split"] == s for r in report.accepted) for s in ("train", "val", "test")},
        "rejections": [
            {"scan_id": r["scan_id"], "error_code": r["error_code"], "reason": r["reason"]} for r in report.rejected
        ],
    }


def publish_manifest_summary(result: dict) -> None:
    from prefect.artifacts import create_table_artifact

    table = [{"status": "accepted", "split": s, "scans": n} for s, n in result["splits"].items()]
    table.append({"status": "rejected", "split": "", "scans": result["rejected"]})
    create_table_artifact(
        key="manifest-summary",
        table=table,
        description=f"{result['manifest']}: {result['converted']} scans converted, {result['reused']} unchanged",
    )


@flow(name="medgen-ingest", log_prints=True)
def ingest_flow(config_path: str) -> dict:
    result = run_ingest(config_path)
    publish_manifest_summary(result)
    return result


def _main(args: list[str]) -> None:
    path = args[0] if args else str(Path("configs/demo.yaml"))
    print(with_task_runner(ingest_flow, config(path))(path))


if __name__ == "__main__":
    from flows.common import entry_point

    entry_point(_main)
