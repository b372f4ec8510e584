"""The Prefect flows on a tiny config: the pipeline end to end, re-runs that do no work, one
touched scan re-ingested alone, a broken scan reported, gate rejections never exported, training
resumed after a crash, Dask fan-out equal to the default runner, schedules, the GPU limit."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from test_ldm import TINY, blobs

torch.set_num_threads(1)


def task_runs() -> dict[str, tuple[str, str]]:
    """Every task run on the test server: id -> (name, state name)."""
    from prefect import get_client

    out: dict[str, tuple[str, str]] = {}
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_task_runs(limit=200, offset=len(out))
            out.update({str(t.id): (t.name, t.state.name if t.state else "") for t in page})
            if len(page) < 200:
                return out


def new_runs(before: dict) -> list[tuple[str, str]]:
    return [v for k, v in task_runs().items() if k not in before]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny pipeline config: 12 blob subjects + one broken file, tiny LDM, 3 samples, denoising."""
    root = tmp_path_factory.mktemp("flow")
    src = root / "src"
    for i in range(12):
        (src / f"sub-{i:02d}").mkdir(parents=True)
        nib.save(
            nib.Nifti1Image(blobs(i), np.diag([4.0, 4.0, 4.0, 1.0])), src / f"sub-{i:02d}" / f"sub-{i:02d}_T1w.nii.gz"
        )
    (src / "broken_T1w.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (root / "to_denoise").mkdir()
    nib.save(
        nib.Nifti1Image(
            blobs(50) + np.random.default_rng(0).normal(0, 30, (20, 20, 20)).astype(np.float32),
            np.eye(4) * [2, 2, 2, 1],
        ),
        root / "to_denoise" / "noisy_T1w.nii.gz",
    )
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["splits"] = ["train"]
    cfg.update(
        ingest={"sources": [str(src)], "out": str(root / "ingest"), "salt": "medgen-flow-test"},
        generate={"steps": 3, "n": 3, "chunk": 2, "sampler": "ddim"},
        quality={"encoder": {"steps": 20}, "gate": {"min_pass_fraction": 0.0, "radiomics_factor": None}},
        denoise={"sources": [str(root / "to_denoise")], "out": str(root / "denoised")},
        orchestration={"run_dir": str(root / "run"), "torchrun": {"device": "cpu"}},
    )
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def first_run(tiny, prefect_harness):
    from flows.pipeline import pipeline_flow

    before = task_runs()
    result = pipeline_flow(str(tiny))
    return result, new_runs(before)


def test_pipeline_runs_end_to_end(first_run, tiny):
    result, runs = first_run
    ing, syn = result["ingest"], result["synthesize"]
    assert ing["accepted"] == 12 and ing["rejected"] == 1
    (rejected,) = ing["rejections"]  # the broken file: reported with its code and reason, the flow goes on
    assert rejected["error_code"] and rejected["reason"]
    assert sum(name.startswith("convert") for name, _ in runs) == 13
    assert sorted(n for n, _ in runs if n.startswith("train")) == ["train autoencoder", "train diffusion"]
    assert sum(n.startswith("generate") for n, _ in runs) == 2  # 3 samples in chunks of 2
    run = Path(syn["run"])
    assert len(list((run / "volumes").glob("*.nii.gz"))) == 3 and (run / "quality" / "montage.png").exists()
    assert result["denoise"] and Path(result["denoise"][0]["outputs"][0]).exists()
    # the gate's rejections never reach the export folder; what passed is there in every format
    v = syn["verdict"]
    exported = {e["format"]: set(e["exported"]) for e in syn["exports"]}
    for fmt in ("nifti", "dicom"):
        folder = Path(tiny).parent / "run" / "export" / fmt
        present = (
            {p.name.split(".")[0] for p in folder.iterdir() if p.name != "export.json"} if folder.exists() else set()
        )
        assert not any(p.name.startswith(".") for p in folder.iterdir()) if folder.exists() else True
        assert present == exported.get(fmt, set()) == (set(v["passing"]) if v["passed"] else set())
        assert not present & set(v["failing"])


def test_artifacts_are_published(first_run):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(limit=200)}
    assert {"manifest-summary", "quality-report", "gate-verdict", "denoise-summary", "pipeline-summary"} <= keys


def test_second_run_with_nothing_changed_does_no_work(first_run, tiny):
    from flows.pipeline import pipeline_flow

    before = task_runs()
    result = pipeline_flow(str(tiny))
    runs = new_runs(before)
    assert not [n for n, _ in runs if n.startswith("convert")]
    heavy = [(n, s) for n, s in runs if n.startswith(("train", "generate", "denoise", "validate", "export"))]
    assert heavy and all(s == "Cached" for _, s in heavy), heavy
    assert result["ingest"]["converted"] == 0
    assert result["synthesize"]["verdict"] == first_run[0]["synthesize"]["verdict"]


def test_touching_one_scan_reingests_exactly_that_scan(first_run, tiny):
    from flows.ingest import ingest_flow

    src = yaml.safe_load(tiny.read_text())["ingest"]["sources"][0]
    f = Path(src) / "sub-03" / "sub-03_T1w.nii.gz"
    nib.save(nib.Nifti1Image(blobs(3) * 1.01, np.diag([4.0, 4.0, 4.0, 1.0])), f)
    before = task_runs()
    result = ingest_flow(str(tiny))
    converts = [n for n, _ in new_runs(before) if n.startswith("convert")]
    assert result["converted"] == 1 and len(converts) == 1


def test_training_resumes_from_a_checkpoint_not_from_scratch(first_run, tiny, tmp_path):
    from flows.train import train_flow
    from medgen.config import load_config
    from medgen.synthesis.train_autoencoder import train_autoencoder

    cfg = load_config(tiny)
    manifest = str(Path(cfg.ingest.out) / "manifest.csv")
    train_autoencoder(cfg, manifest, tmp_path, device="cpu", stop_after=3)  # a run that crashed at step 3
    out = train_flow(str(tiny), manifest, str(tmp_path))
    log = (tmp_path / "autoencoder.log").read_text()
    assert "resumed at step 3" in log and Path(out["generator"]).exists()
    assert len((tmp_path / "autoencoder" / "metrics.jsonl").read_text().splitlines()) >= 6 - 3


def test_a_changed_section_retrains_what_depends_on_it_and_a_revert_retrains_back(first_run, tiny, tmp_path):
    from flows.train import train_flow

    raw = yaml.safe_load(tiny.read_text())
    manifest = str(Path(raw["ingest"]["out"]) / "manifest.csv")
    run = tmp_path / "run"

    def train(diffusion_steps: int) -> list[tuple[str, str]]:
        raw["diffusion"]["train"]["steps"] = diffusion_steps
        path = tmp_path / f"c{diffusion_steps}.yaml"
        path.write_text(yaml.safe_dump(raw))
        before = task_runs()
        train_flow(str(path), manifest, str(run))
        return sorted(new_runs(before))

    def diffusion_steps_logged() -> int:
        return len(
            [1 for line in (run / "diffusion" / "metrics.jsonl").read_text().splitlines() if "loss/diffusion" in line]
        )

    assert train(6) == [("train autoencoder", "Completed"), ("train diffusion", "Completed")]
    assert train(8) == [("train autoencoder", "Cached"), ("train diffusion", "Completed")]
    assert diffusion_steps_logged() == 8  # a new run from scratch, not 6 resumed + 2
    # back to 6: Prefect's cache holds a result for that key, but the generator on disk is the
    # 8-step one: the stamp sees it and the stage trains again
    assert train(6) == [("train autoencoder", "Cached"), ("train diffusion", "Completed")]
    assert diffusion_steps_logged() == 6


def test_dask_ingest_equals_default_runner(tiny, tmp_path, prefect_harness):
    from prefect_dask import DaskTaskRunner

    from flows.ingest import ingest_flow

    def config_for(out: Path) -> str:
        raw = yaml.safe_load(tiny.read_text())
        raw["ingest"]["out"] = str(out)
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    a = ingest_flow(config_for(tmp_path / "default"))
    runner = DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    )
    b = ingest_flow.with_options(task_runner=runner)(config_for(tmp_path / "dask"))

    def rows(result: dict) -> list[dict]:
        from medgen.io.manifest import read_rows

        return [{k: v for k, v in r.items() if k != "ingested_at"} for r in read_rows(result["manifest"])]

    assert rows(a) == rows(b) and b["converted"] == 13
    for r in rows(a):
        if r["output_path"]:
            x = nib.load(tmp_path / "default" / r["output_path"]).get_fdata()
            assert np.array_equal(x, nib.load(tmp_path / "dask" / r["output_path"]).get_fdata())


def test_schedules_build_cron_deployments():
    from flows.serve import deployments, load_schedules

    deps = deployments(load_schedules("configs/schedules.yaml"))
    crons = {d.name: d.schedules[0].schedule.cron for d in deps}
    assert crons["nightly-pipeline"] == "0 2 * * *" and all(d.parameters["config_path"] for d in deps)


def test_gpu_concurrency_limit_is_created_once(prefect_harness):
    from prefect import get_client

    from flows.common import ensure_gpu_limit

    ensure_gpu_limit(1)
    ensure_gpu_limit(4)  # an existing limit (set by whoever runs the server) is kept
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1


def test_synthesize_exports_exactly_what_passes(first_run, tiny, tmp_path):
    """The tiny model's samples fail a strict gate (nothing exported) and pass a lenient one (all exported)."""
    from flows.synthesize import synthesize_flow

    result, _ = first_run
    strict = result["synthesize"]["verdict"]
    assert strict["failing"]  # 6 training steps make noise, which the default gate refuses
    raw = yaml.safe_load(tiny.read_text())
    raw["quality"]["gate"] = {
        "intensity_tolerance": 100.0,
        "foreground_tolerance": 100.0,
        "histogram_factor": 1e6,
        "radiomics_factor": None,
        "memorization_margin": 0.99,
        "feature_margin": 0.99,
    }
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(yaml.safe_dump(raw))
    out = synthesize_flow(str(lenient), result["train"]["generator"], str(tmp_path / "synthetic"))
    v = out["verdict"]
    assert v["passed"] and sorted(v["passing"]) == ["synthetic_0000", "synthetic_0001", "synthetic_0002"]
    for e in out["exports"]:
        names = {p.name.split(".")[0] for p in (tmp_path / "export" / e["format"]).iterdir() if p.name != "export.json"}
        assert names == set(e["exported"]) == set(v["passing"])


def test_training_launch_command_follows_the_torchrun_config():
    from flows.train import launch_command
    from medgen.config import TorchrunConfig

    args = ["-m", "medgen", "train", "autoencoder"]
    assert launch_command(TorchrunConfig(), args)[1:] == args  # one process: no elastic agent
    two = launch_command(TorchrunConfig(nproc_per_node=2), args)
    assert two[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"] and two[-4:] == args
    nodes = launch_command(
        TorchrunConfig(nproc_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.5", master_port=29400), args
    )
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.5", "--master_port=29400"} <= set(
        nodes
    ) and "--standalone" not in nodes


def test_generation_and_denoising_on_dask_equal_the_default_runner(first_run, tiny, tmp_path):
    """Sample i of a seed is the same wherever its chunk runs; so is a denoised scan."""
    from prefect_dask import DaskTaskRunner

    from flows.denoise import denoise_flow
    from flows.synthesize import synthesize_flow

    result, _ = first_run
    runner = DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    )
    out = synthesize_flow.with_options(task_runner=runner)(
        str(tiny), result["train"]["generator"], str(tmp_path / "synthetic")
    )
    ours = json.loads((Path(out["run"]) / "synthesis.json").read_text())["volumes"]
    theirs = json.loads((Path(result["synthesize"]["run"]) / "synthesis.json").read_text())["volumes"]
    assert [v["sha256"] for v in ours] == [v["sha256"] for v in theirs] and len(ours) == 3
    (d,) = denoise_flow.with_options(task_runner=runner)(str(tiny), str(tmp_path / "denoised"))
    (ref,) = result["denoise"]
    assert np.array_equal(nib.load(d["outputs"][0]).get_fdata(), nib.load(ref["outputs"][0]).get_fdata())


def test_dask_workers_get_their_share_of_the_cores(tmp_path):
    """Each local Dask worker process starts with cores // workers threads for torch/OpenMP."""
    from flows.common import task_runner
    from medgen.config import PipelineConfig
    from medgen.threads import cores

    cfg = PipelineConfig.model_validate({"orchestration": {"task_runner": "dask", "dask_workers": 2}})
    env = task_runner(cfg).cluster_kwargs["env"]
    assert env["OMP_NUM_THREADS"] == str(max(1, cores() // 2)) == env["MKL_NUM_THREADS"]
