"""The train flow: autoencoder, then latent diffusion, each a `torchrun` subprocess (a plain
`python -m medgen train` subprocess when the config asks for one process on one node).

    python -m flows.train configs/demo.yaml demo_run/ingest/manifest.csv

- A subprocess, not an in-process call: DataLoader workers forked inside Prefect's threaded
  process can hang, and torchrun is how the same step scales to `nproc_per_node` GPUs and several
  nodes (orchestration.torchrun in the config).
- Recovery by resuming: the training loop checkpoints atomically and resumes from the last
  checkpoint of its run folder, so a retried task (a crash, a preempted node) continues where it
  stopped instead of starting over.
- Cached on content: a stage's key hashes its config sections and the content hashes of the
  manifest rows it trains on (and, for diffusion, the autoencoder's key). Nothing new: both stages
  are cache hits. A new training scan or a changed section: the stages that depend on it re-run,
  from scratch (the training loop refuses to resume a checkpoint of other data or configs).
- GPU: a stage on CUDA holds `nproc_per_node` slots of the global concurrency limit `gpu`, so
  two trainings never share one card.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect import flow, task

from flows.common import KEY_PARAM, by_key, cached, config, ensure_gpu_limit, fresh, section_hash, stamp

STAGE_OUTPUT = {"autoencoder": "autoencoder", "diffusion": "generator", "controlnet": "controlnet"}


def stage_keys(config_path: str, manifest: str, run_dir: str) -> dict[str, str]:
    from medgen.datasets.prepared import manifest_items

    cfg = config(config_path)
    cfg.require("data", "autoencoder", "diffusion")
    data = cfg.data
    assert data is not None  # require() refused a config without it
    items = {
        "train": [(i["scan_id"], i["sha256"]) for i in manifest_items(manifest, data)],
        "val": [(i["scan_id"], i["sha256"]) for i in manifest_items(manifest, data, data.val_splits)],
    }
    ae = cached(
        {
            "stage": "autoencoder",
            "sections": section_hash(cfg, "data", "autoencoder"),
            "items": items,
            "run": str(Path(run_dir).resolve()),
        }
    )
    table = None
    if cfg.covariates is not None and cfg.covariates.table is not None:
        # a conditioned model's conditions: the table's content counts too (geometry columns come
        # from the manifest, whose items the key already holds)
        t = cfg.covariates.table
        t = t if t.is_absolute() else Path(manifest).parent / t
        table = t.read_text(errors="replace") if t.is_file() else str(t)
    dm = cached(
        {
            "stage": "diffusion",
            "autoencoder": ae,
            "sections": section_hash(cfg, "diffusion", "covariates"),
            "covariates_table": table,
        }
    )
    keys = {"autoencoder": ae, "diffusion": dm}
    if cfg.controlnet is not None:
        labels = Path(manifest).parent / "labels.csv"
        keys["controlnet"] = cached(
            {
                "stage": "controlnet",
                "diffusion": dm,
                "sections": section_hash(cfg, "controlnet"),
                "labels": labels.read_text() if labels.exists() else "",
            }
        )
    return keys


def _device(cfg) -> str:
    import torch

    return cfg.orchestration.torchrun.device or ("cuda" if torch.cuda.is_available() else "cpu")


def launch_command(t, args: list[str]) -> list[str]:
    """The subprocess command line for `args` (a `-m medgen train ...` call) under config `t`."""
    if t.nproc_per_node == 1 and t.nnodes == 1:
        # One process: torchrun's elastic agent would only add a second interpreter start (~2-3 s
        # of imports per stage); the training loop runs the same without a process group.
        return [sys.executable, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={t.nproc_per_node}"]
    if t.nnodes == 1:
        launcher.append("--standalone")  # a free local rendezvous port: parallel trainings never clash
    else:
        launcher += [
            f"--nnodes={t.nnodes}",
            f"--node_rank={t.node_rank}",
            f"--master_addr={t.master_addr}",
            f"--master_port={t.master_port}",
        ]
    return launcher + args


@task(
    cache_key_fn=by_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=[5, 30],
    task_run_name="train {stage}",
    log_prints=True,
)
def train_stage_task(stage: str, config_path: str, manifest: str, run_dir: str, cache_key: str) -> str:
    """One stage as `python -m torch.distributed.run ... -m medgen train STAGE` (or, for one process,
    `python -m medgen train STAGE`); returns its folder."""
    from prefect.concurrency.sync import concurrency

    cfg = config(config_path)
    t = cfg.orchestration.torchrun
    device = _device(cfg)
    cmd = launch_command(
        t, ["-m", "medgen", "train", stage, "-c", config_path, "-m", manifest, "-o", run_dir, "--device", device]
    )
    log = Path(run_dir) / f"{stage}.log"
    log.parent.mkdir(parents=True, exist_ok=True)

    def run() -> None:
        # the trainer's progress lines go to the log file and, through print, to the flow's log
        with (
            open(log, "a", encoding="utf-8") as f,
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as p,
        ):
            for line in p.stdout:  # type: ignore[union-attr]
                f.write(line)
                if line.startswith("["):
                    print(line.rstrip())
        if p.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{stage} training exited with {p.returncode} (log {log}):\n" + "\n".join(tail))

    if device.startswith("cuda"):
        with concurrency("gpu", occupy=t.nproc_per_node, strict=True):
            run()
    else:
        run()
    return str(Path(run_dir) / STAGE_OUTPUT[stage])


def run_train(config_path: str, manifest: str, run_dir: str | None = None) -> dict:
    cfg = config(config_path)
    run_dir = str(run_dir or cfg.orchestration.run_dir / "ldm")
    if _device(cfg).startswith("cuda"):
        ensure_gpu_limit(cfg.orchestration.gpu_slots)
    keys = stage_keys(config_path, manifest, run_dir)
    outputs = {
        "autoencoder": [Path(run_dir) / "autoencoder" / "stage.json"],
        "diffusion": [Path(run_dir) / "generator" / "configs" / "metadata.json"],
        "controlnet": [Path(run_dir) / "controlnet" / "configs" / "metadata.json"],
    }
    result = {"run_dir": run_dir}
    for stage in keys:  # autoencoder, diffusion, and controlnet when the config has one
        ok = fresh(run_dir, f"train-{stage}", keys[stage], outputs[stage])
        result[STAGE_OUTPUT[stage]] = train_stage_task.with_options(refresh_cache=not ok)(
            stage, config_path, manifest, run_dir, **{KEY_PARAM: keys[stage]}
        )
        stamp(run_dir, f"train-{stage}", keys[stage], outputs[stage])
    return result


@flow(name="medgen-train", log_prints=True)
def train_flow(config_path: str, manifest: str, run_dir: str | None = None) -> dict:
    return run_train(config_path, manifest, run_dir)


if __name__ == "__main__":
    from flows.common import entry_point

    entry_point(lambda args: print(train_flow(args[0], args[1])))
