"""Serve the flows as scheduled deployments (cron from configs/schedules.yaml).

    prefect server start --host 127.0.0.1 --port 4200 --analytics-off     # or use an existing server
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve configs/schedules.yaml

`flow.serve` needs a real Prefect server (on the ephemeral one schedules never fire), so this
refuses to start without PREFECT_API_URL; `--dry-run` prints the deployments it would serve.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

FLOWS = ("pipeline", "ingest", "denoise")


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    flow: Literal["pipeline", "ingest", "denoise"]
    config: Path
    cron: str
    timezone: str = "UTC"


class Schedules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    deployments: list[Deployment] = Field(min_length=1)


def load_schedules(path: str | Path) -> Schedules:
    from medgen.config import load_config

    s = Schedules.model_validate(yaml.safe_load(Path(path).read_text()))
    for d in s.deployments:
        load_config(d.config)  # a broken pipeline config fails now, not at 2 a.m.
    return s


def _flow(name: str):
    if name == "pipeline":
        from flows.pipeline import pipeline_flow

        return pipeline_flow
    if name == "ingest":
        from flows.ingest import ingest_flow

        return ingest_flow
    from flows.denoise import denoise_flow

    return denoise_flow


def deployments(schedules: Schedules) -> list:
    from prefect.client.schemas.schedules import CronSchedule

    return [
        _flow(d.flow).to_deployment(
            name=d.name,
            schedule=CronSchedule(cron=d.cron, timezone=d.timezone),
            parameters={"config_path": str(d.config)},
            tags=["medgen", d.flow],
        )
        for d in schedules.deployments
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("schedules", nargs="?", default="configs/schedules.yaml")
    ap.add_argument("--dry-run", action="store_true", help="print the deployments and exit")
    args = ap.parse_args()
    deps = deployments(load_schedules(args.schedules))
    if args.dry_run:
        for d in deps:
            print(
                f"{d.flow_name}/{d.name}: {d.schedules[0].schedule.cron} ({d.schedules[0].schedule.timezone}) {d.parameters}"
            )
        return
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit(
            "flows.serve needs a Prefect server: start one (`prefect server start`) and set PREFECT_API_URL"
        )
    from prefect import serve

    serve(*deps)


if __name__ == "__main__":
    main()
