"""Configs refuse unknown keys and bad values; the ingest flow wraps the library and reads nothing twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medgen.config import ConfigError, load_config


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.ingest is not None
    assert cfg.ingest.frames == "error" and cfg.ingest.sources == [Path("demo_run/sample_data")]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ingest": {"sources": ["x"], "out": "y", "wokers": 2}}, "ingest.wokers: Extra inputs are not permitted"),
        ({"ingest": {"sources": ["x"], "out": "y", "frames": "maybe"}}, "ingest.frames"),
        ({"ingest": {"sources": [], "out": "y"}}, "ingest.sources"),
        ({"ingest": {"sources": ["x"], "out": "y", "workers": 0}}, "ingest.workers"),
        ({"ingest": {"sources": ["x"], "out": "y", "split": [-1, 1, 1]}}, "split fractions"),
    ],
)
def test_bad_configs_name_the_file_and_field(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(change))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_ingest_flow_runs_and_second_run_reuses_everything(tmp_path, sample_dir, prefect_harness):
    from flows.ingest import ingest_flow

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"ingest": {"sources": [str(sample_dir)], "out": str(tmp_path / "out")}}))
    first = ingest_flow(str(cfg))
    second = ingest_flow(str(cfg))
    assert first["accepted"] == 23 and first["converted"] == first["accepted"] + first["rejected"]
    assert second["converted"] == 0 and second["reused"] == first["converted"]
    assert Path(first["manifest"]).exists()
