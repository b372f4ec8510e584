"""Configs are data: YAML files loaded into pydantic models that refuse unknown keys and bad values.

Later stages (training, generation, the gate) add their sections beside `ingest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medgen.errors import MedgenError


class ConfigError(MedgenError):
    """A config file that cannot be used; the message names the file and every bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(_Strict):
    sources: list[Path] = Field(min_length=1)
    out: Path
    workers: int = Field(1, ge=1, le=256)
    frames: Literal["error", "split"] = "error"
    localizers: Literal["drop", "error"] = "drop"
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: str = "medgen"

    @field_validator("split")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0 or sum(v) <= 0:
            raise ValueError("split fractions must be >= 0 and not all zero")
        return v

    def options(self):
        from medgen.ingestion import IngestOptions

        return IngestOptions(frames=self.frames, localizers=self.localizers, split=self.split, split_seed=self.split_seed)


class PipelineConfig(_Strict):
    name: str = "medgen"
    sample_data: Path | None = None  # when set, the demo set is assembled here before ingest
    ingest: IngestConfig


def load_config(path: str | Path) -> PipelineConfig:
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections, got {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {problems}") from e
