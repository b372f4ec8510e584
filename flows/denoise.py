"""The denoise flow: a folder or manifest of scans through `medgen.denoise`, one task per scan.

    python -m flows.denoise configs/demo.yaml

Scans come from the config's `denoise.sources` (NIfTI files, DICOM folders, manifest.csv files).
Each task is cached on the scan's content hash, the score model's hash and the denoising settings:
a re-run denoises only new or changed scans (and any whose output was deleted). With
`orchestration.task_runner: dask` the tasks run on the Dask cluster.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.common import KEY_PARAM, by_key, cached, config, fresh, io_retries, stamp


@task(cache_key_fn=by_key, persist_result=True, task_run_name="denoise {ref.name}")
def denoise_task(ref, out_dir: str, settings: dict, cache_key: str) -> dict:
    """A scan that cannot be read is a result (reported, the batch goes on), not a failure to retry."""
    from medgen.denoising.batch import denoise_scan
    from medgen.errors import InputError

    try:
        return denoise_scan(ref, out_dir, **settings)
    except InputError as e:
        return {"scan": ref.name, "error": f"{e.code}: {e}"}


def run_denoise(config_path: str, out: str | None = None) -> list[dict]:
    from medgen.denoising.batch import find_scans
    from medgen.models.score import default_model_path
    from medgen.provenance import model_folder_sha256

    cfg = config(config_path)
    cfg.require("denoise")
    job = cfg.denoise
    assert job is not None  # require() refused a config without it
    out_dir = Path(out or job.out)
    model = job.model or default_model_path()
    settings = {
        "model": str(model),
        "sigma": job.sigma,
        "noise": job.noise,
        "method": job.method,
        "n_samples": job.n_samples,
        "seed": job.seed,
        "precision": job.precision,
        "adapt": job.adapt,
    }
    model_sha = model_folder_sha256(model)
    futures = []
    for ref in find_scans([str(s) for s in job.sources]):
        key = cached(
            {
                "task": "denoise",
                "scan": ref.content_sha256(),
                "model": model_sha,
                "settings": settings,
                "out": str(out_dir.resolve()),
                "name": ref.name,
            }
        )
        output = [out_dir / f"{ref.name}_denoised.nii.gz"]
        ok = fresh(out_dir, f"denoise-{ref.name}", key, output)
        futures.append(
            (
                ref,
                key,
                output,
                denoise_task.with_options(refresh_cache=not ok, **io_retries(cfg)).submit(
                    ref, str(out_dir), settings, **{KEY_PARAM: key}
                ),
            )
        )
    results = []
    for ref, key, output, fut in futures:
        results.append(fut.result())
        if output[0].exists():
            stamp(out_dir, f"denoise-{ref.name}", key, output)
    return results


@flow(name="medgen-denoise", log_prints=True)
def denoise_flow(config_path: str, out: str | None = None) -> list[dict]:
    from prefect.artifacts import create_table_artifact

    results = run_denoise(config_path, out)
    table = [
        {
            "scan": r["scan"],
            "sigma": r.get("sigma"),
            "result": r.get("error") or ", ".join(r["outputs"]),
            "notes": "; ".join(r.get("notes", [])),
        }
        for r in results
    ]
    create_table_artifact(key="denoise-summary", table=table, description="scans through medgen.denoise")
    from prefect.artifacts import create_markdown_artifact

    figures = [
        f"### {r['scan']}\n\nexpected gain (SURE): "
        + (f"{r['expected_gain_db']:+.2f} dB" if r.get("expected_gain_db") is not None else "n/a")
        + f"\n\n![{r['scan']}]({Path(r['figure']).resolve().as_uri()})"
        for r in results
        if r.get("figure")
    ]
    if figures:
        create_markdown_artifact(
            key="denoise-figures", markdown="\n\n".join(figures), description="noisy / denoised / residual"
        )
    return results


if __name__ == "__main__":
    from flows.common import entry_point, with_task_runner

    entry_point(lambda args: print(with_task_runner(denoise_flow, config(args[0]))(args[0])))
