"""The synthesize flow: generate -> validate -> export only what passes the gate.

    python -m flows.synthesize configs/demo.yaml demo_run/ldm/generator

Generation fans out: sample i depends only on (seed, i), so chunks of `generate.chunk` indices
are independent tasks (on Dask when configured) that write their own files; the run record is
written after all of them. Every step is cached on content: the generator folder's hash and the
generation settings for volumes and record, the record's and the training manifest's hashes plus
the quality config for validation, the report's hash for export. A re-run with nothing new
generates, validates and exports nothing; export is idempotent anyway (same bytes, same names).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.common import KEY_PARAM, by_key, cached, config, file_sha, fresh, io_retries, section_hash, stamp


@task(cache_key_fn=by_key, persist_result=True, retries=1, task_run_name="generate {indices}")
def generate_task(generator: str, indices: list[int], out: str, settings: dict, cache_key: str) -> list[dict]:
    from medgen.synthesis.runs import generate_volumes

    entries = generate_volumes(generator, indices, out, **settings)
    return [e.model_dump() for e in entries]


@task(cache_key_fn=by_key, persist_result=True)
def record_task(out: str, generator: str, entries: list[dict], settings: dict, cache_key: str) -> str:
    from medgen.synthesis.runs import SynthVolume, write_record

    keep = ("sampler", "steps", "seed", "condition", "guidance", "controlnet", "mask_guidance")
    write_record(out, generator, [SynthVolume(**e) for e in entries], **{k: settings[k] for k in keep})
    return out


@task(cache_key_fn=by_key, persist_result=True)
def validate_task(run: str, config_path: str, cache_key: str) -> dict:
    """Returns the gate's verdict summary; the report files are in RUN/quality/."""
    from medgen.quality.validate import validate_run

    v = validate_run(run, quality=config(config_path).quality)
    r = v.result
    return {
        "report": str(v.report_path),
        "markdown": str(v.report_path.parent / "report.md"),
        "passed": r.passed,
        "reasons": r.reasons,
        "passing": r.passing,
        "failing": {x.name: x.reasons for x in r.volumes if not x.passed},
        "realism": r.realism,
        "realism_heldout_real": r.heldout_realism,
        "diversity": r.diversity,
        "utility": r.extra.get("utility"),
    }


@task(cache_key_fn=by_key, persist_result=True, task_run_name="export {fmt}")
def export_task(run: str, out: str, fmt: str, cache_key: str) -> dict:
    """Idempotent (Dask may re-run a finished task when a worker dies): same files, same bytes."""
    from medgen.export.exporter import export_run

    r = export_run(run, out, fmt)  # type: ignore[arg-type]
    return {"out": str(r.out), "format": r.format, "exported": r.exported, "not_exported": r.skipped}


def run_synthesize(config_path: str, generator: str, out: str | None = None) -> dict:
    import torch

    from medgen.provenance import model_folder_sha256
    from medgen.synthesis.runs import RECORD, label_files, model_condition, model_sampler

    cfg = config(config_path)
    g = cfg.generate
    io = io_retries(cfg)
    run = Path(out or cfg.orchestration.run_dir / "synthetic")
    device = cfg.orchestration.torchrun.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = {
        "sampler": model_sampler(generator, g.sampler, g.steps),
        "steps": g.steps,
        "seed": g.seed,
        "batch_size": g.batch_size,
        "device": device,
        "decode_roi": g.decode_roi,
        "condition": model_condition(generator, g.condition),
        "guidance": g.guidance,
        "labels": [str(f) for f in label_files(g.labels)] if g.labels else None,
        "controlnet": str(g.controlnet) if g.controlnet else None,
        "mask_guidance": g.mask_guidance,
    }
    base = {
        "generator": model_folder_sha256(generator),
        **settings,
        "out": str(run.resolve()),
        "labels_sha": [file_sha(f) for f in label_files(g.labels)] if g.labels else None,
        "controlnet_sha": model_folder_sha256(g.controlnet) if g.controlnet else None,
    }
    chunks = [list(range(i, min(g.n, i + g.chunk))) for i in range(0, g.n, g.chunk)]
    futures = []
    for idx in chunks:
        key = cached({"task": "generate", **base, "indices": idx})
        files = [run / "volumes" / f"synthetic_{i:04d}.nii.gz" for i in idx]
        ok = fresh(run, f"generate-{idx[0]}-{idx[-1]}", key, files)
        futures.append(
            (
                idx,
                key,
                files,
                generate_task.with_options(refresh_cache=not ok).submit(
                    generator, idx, str(run), settings, **{KEY_PARAM: key}
                ),
            )
        )
    entries = []
    for idx, key, files, fut in futures:
        entries += fut.result()
        stamp(run, f"generate-{idx[0]}-{idx[-1]}", key, files)
    rec_key = cached({"task": "record", **base, "volumes": sorted(e["sha256"] for e in entries)})
    ok = fresh(run, "record", rec_key, [run / RECORD])
    record_task.with_options(refresh_cache=not ok, **io)(str(run), generator, entries, settings, **{KEY_PARAM: rec_key})
    stamp(run, "record", rec_key, [run / RECORD])
    manifest = _training_manifest(generator)
    v_key = cached(
        {
            "task": "validate",
            "record": file_sha(run / RECORD),
            "quality": section_hash(cfg, "quality"),
            "manifest": file_sha(manifest) if manifest and Path(manifest).exists() else None,
        }
    )
    report = run / "quality" / "report.json"
    ok = fresh(run, "validate", v_key, [report])
    verdict = validate_task.with_options(refresh_cache=not ok, **io)(str(run), config_path, **{KEY_PARAM: v_key})
    stamp(run, "validate", v_key, [report])
    exports = []
    if verdict["passed"]:
        for fmt in cfg.export.formats:
            dest = (cfg.orchestration.run_dir / "export" / fmt) if out is None else (run.parent / "export" / fmt)
            e_key = cached({"task": "export", "report": file_sha(report), "format": fmt, "out": str(dest.resolve())})
            # the stamp lives in the run folder: the export folder holds nothing but the deliverable
            ok = fresh(run, f"export-{fmt}", e_key, [dest / "export.json"])
            exports.append(
                export_task.with_options(refresh_cache=not ok, **io)(str(run), str(dest), fmt, **{KEY_PARAM: e_key})
            )
            stamp(run, f"export-{fmt}", e_key, [dest / "export.json"])
    return {"run": str(run), "verdict": verdict, "exports": exports}


def _training_manifest(generator: str) -> str | None:
    from medgen.models.bundle import generator_metadata

    return generator_metadata(generator).get("provenance", {}).get("training_manifest")


def publish_quality(result: dict) -> None:
    """The quality report (montage and histograms linked by file URI, so they open from the UI's
    host) and the gate verdict with what left the pipeline."""
    from prefect.artifacts import create_markdown_artifact

    v = result["verdict"]
    md_path = Path(v["markdown"])
    quality_dir = md_path.parent.resolve()
    report_md = md_path.read_text()
    for name in ("montage.png", "histograms.png"):
        report_md = report_md.replace(f"]({name})", f"]({(quality_dir / name).as_uri()})")
    create_markdown_artifact(key="quality-report", markdown=report_md, description="medgen quality report")
    lines = [f"# Gate verdict: {'PASS' if v['passed'] else 'FAIL'}", ""]
    lines += [f"- {r}" for r in v["reasons"]]
    lines += [f"- passed: {', '.join(v['passing']) or 'none'}"]
    lines += [f"- failed {name}: {'; '.join(reasons)}" for name, reasons in v["failing"].items()]
    lines += [f"- exported {e['format']}: {len(e['exported'])} volume(s) -> {e['out']}" for e in result["exports"]]
    create_markdown_artifact(
        key="gate-verdict", markdown="\n".join(lines), description="what passed the gate and left the pipeline"
    )


@flow(name="medgen-synthesize", log_prints=True)
def synthesize_flow(config_path: str, generator: str, out: str | None = None) -> dict:
    result = run_synthesize(config_path, generator, out)
    publish_quality(result)
    return result


if __name__ == "__main__":
    from flows.common import entry_point, with_task_runner

    entry_point(lambda args: print(with_task_runner(synthesize_flow, config(args[0]))(args[0], args[1])))
