"""What the flows share: config loading, the task runner, content-keyed caching, the GPU limit.

Caching. Prefect's default cache policy includes the flow-run id, so nothing would be reused
across scheduled runs, and its INPUTS policy hashes a path string, not the file behind it. Every
cached task here gets a key built from content hashes (files, model folders, manifests) and config
hashes instead. Prefect's cache remembers results, not files: so beside each output the flow keeps
a stamp (`.medgen-flow/<task>.json`: the key and the SHA-256 of each output file) and calls the
task with `refresh_cache=True` unless the stamp matches both the key and the files on disk. A
deleted output, an output overwritten by hand, or one made under another config (a change that
was reverted) is rebuilt rather than served from the cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medgen.config import PipelineConfig, load_config
from medgen.provenance import sha256_json


def entry_point(body: Callable[[list[str]], object]) -> None:
    """Run a flow module's `__main__` body. A MedgenError (a typo in the config, a batch that failed
    the gate) is one message and exit status 1, not Prefect's page of traceback; --debug (or
    MEDGEN_DEBUG=1) keeps the traceback."""
    import logging
    import os
    import sys

    from medgen.errors import MedgenError, user_message

    args = sys.argv[1:]
    debug = "--debug" in args or os.environ.get("MEDGEN_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not debug:
        quiet = _QuietMedgenErrors()
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(quiet)
    try:
        body(args)
    except MedgenError as e:
        if debug:
            raise
        print(user_message(e), file=sys.stderr)
        sys.exit(1)


class _QuietMedgenErrors:
    """Drops the traceback Prefect logs for a MedgenError (the entry point prints its one message)."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        from medgen.errors import MedgenError

        if isinstance(exc, MedgenError):
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = f"{type(exc).__name__}: see the message below", ()
        return True


KEY_PARAM = "cache_key"  # every cached task takes its precomputed key as this parameter


def by_key(context: Any, parameters: dict[str, Any]) -> str:
    """cache_key_fn: the key the flow computed from content and config hashes."""
    return str(parameters[KEY_PARAM])


def cached(key_parts: dict[str, Any]) -> str:
    return sha256_json(key_parts)[:32]


def config(path: str | Path) -> PipelineConfig:
    return load_config(path)


def section_hash(cfg: PipelineConfig, *names: str) -> str:
    return sha256_json(
        {n: json.loads(getattr(cfg, n).model_dump_json()) if getattr(cfg, n) is not None else None for n in names}
    )


def file_sha(path: str | Path) -> str:
    from medgen.provenance import sha256_file

    return sha256_file(path)


STAMPS = ".medgen-flow"


def _stamp_path(folder: str | Path, name: str) -> Path:
    return Path(folder) / STAMPS / f"{name}.json"


def fresh(folder: str | Path, name: str, key: str, outputs: list[Path]) -> bool:
    """True when the outputs on disk are what the task with this key made (see the module doc)."""
    path = _stamp_path(folder, name)
    if not path.exists():
        return False
    stamp = json.loads(path.read_text())
    if stamp.get("key") != key or sorted(stamp.get("outputs", {})) != sorted(map(str, outputs)):
        return False
    return all(Path(o).exists() and file_sha(o) == sha for o, sha in stamp["outputs"].items())


def stamp(folder: str | Path, name: str, key: str, outputs: list[Path]) -> None:
    from medgen.io.atomic import write_text_atomic

    path = _stamp_path(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": key, "outputs": {str(o): file_sha(o) for o in outputs}}, indent=1))


def io_retries(cfg: PipelineConfig) -> dict[str, Any]:
    """with_options() for I/O tasks: retries with back-off from the config."""
    o = cfg.orchestration
    return {"retries": o.retries, "retry_delay_seconds": list(o.retry_delay_seconds)}


def task_runner(cfg: PipelineConfig):
    """The configured task runner: Prefect's default (threads), or Dask (an existing scheduler at
    `dask_address`, else a local cluster of `dask_workers` processes)."""
    o = cfg.orchestration
    if o.task_runner != "dask":
        return None
    from prefect_dask import DaskTaskRunner

    if o.dask_address:
        return DaskTaskRunner(address=o.dask_address)
    from medgen.threads import share, thread_env

    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": o.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            # each worker's torch/OpenMP gets its share of the cores (Dask's default is 1 thread each,
            # which leaves 14 of 16 cores idle with 2 workers; torch's own default oversubscribes)
            "env": thread_env(share(o.dask_workers)),
        }
    )


def with_task_runner(flow_obj, cfg: PipelineConfig):
    """`flow_obj` with the configured task runner (unchanged for the default one)."""
    runner = task_runner(cfg)
    return flow_obj.with_options(task_runner=runner) if runner is not None else flow_obj


def ensure_gpu_limit(slots: int, name: str = "gpu") -> None:
    """Create the global concurrency limit `gpu` when the server has none (an existing one, set by
    whoever runs the server, is left as it is)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


__all__ = [
    "KEY_PARAM",
    "by_key",
    "cached",
    "config",
    "section_hash",
    "file_sha",
    "fresh",
    "stamp",
    "io_retries",
    "task_runner",
    "with_task_runner",
    "ensure_gpu_limit",
]
