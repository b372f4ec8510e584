"""What a conditioned generator can be asked for, and the one vector each request becomes.

A condition is a few declared covariates ("sex F, age 70"). They reach MONAI's DiffusionModelUNet
by cross-attention on a context of one token (shape [B, 1, dim]), as in the UK Biobank brain LDM,
rather than by its class embedding, which takes a single integer class and no continuous value.

Encoding, column by column, in the declared order:
    categorical   one-hot over the declared levels; all zeros = not given
    continuous    (1, 2 (x - low) / (high - low) - 1); (0, 0) = not given
So the all-zero vector is "no condition": the unconditional half of classifier-free guidance, and
what a training sample is shown when its condition is dropped. A request may leave columns open.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from medgen.config import CovariateColumn, CovariatesConfig
from medgen.errors import ConditionError

ENCODING = (
    "cross-attention context [B, 1, dim]; per column in order: categorical one-hot over levels "
    "(zeros = not given), continuous (1, 2(x-low)/(high-low)-1) ((0, 0) = not given)"
)


def _width(col: CovariateColumn) -> int:
    return len(col.levels or []) if col.kind == "categorical" else 2


@dataclass(frozen=True)
class ConditionSpace:
    columns: tuple[CovariateColumn, ...]

    @classmethod
    def from_config(cls, covariates: CovariatesConfig, names: list[str]) -> "ConditionSpace":
        declared = {c.name: c for c in covariates.columns}
        return cls(tuple(declared[n] for n in names))

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "ConditionSpace":
        return cls(tuple(CovariateColumn.model_validate(c) for c in raw["columns"]))

    def to_json(self) -> dict[str, Any]:
        cols = [c.model_dump(mode="json", include={"name", "kind", "levels", "range"}) for c in self.columns]
        return {"columns": cols, "dim": self.dim, "encoding": ENCODING}

    @property
    def dim(self) -> int:
        return sum(_width(c) for c in self.columns)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def slices(self) -> list[slice]:
        """Where each column sits in the vector (for dropping one column in training)."""
        out, at = [], 0
        for c in self.columns:
            out.append(slice(at, at + _width(c)))
            at += _width(c)
        return out

    def describe(self) -> str:
        parts = []
        for c in self.columns:
            if c.kind == "categorical":
                parts.append(f"{c.name} (one of {', '.join(c.levels or [])})")
            else:
                lo, hi = c.range  # type: ignore[misc]
                parts.append(f"{c.name} (a number in [{lo:g}, {hi:g}])")
        return "; ".join(parts)

    def encode(self, condition: Mapping[str, Any] | None) -> torch.Tensor:
        """The [dim] vector for a request; refuses what the model was not trained for."""
        condition = dict(condition or {})
        known = set(self.names)
        unknown = sorted(set(condition) - known)
        if unknown:
            raise ConditionError(
                f"condition {', '.join(map(repr, unknown))}: not a column this generator was trained on "
                f"(it takes: {self.describe()})"
            )
        parts = []
        for c in self.columns:
            v = condition.get(c.name)
            if c.kind == "categorical":
                one_hot = [0.0] * len(c.levels or [])
                if v is not None:
                    level = None if isinstance(v, bool) else str(v) if isinstance(v, (str, int)) else None
                    if isinstance(v, float) and v.is_integer():
                        level = str(int(v))  # lesion=1.0 asks for level '1'
                    if level not in (c.levels or []):
                        raise ConditionError(
                            f"condition {c.name}={v!r}: not a level it was trained on (levels: {', '.join(c.levels or [])})"
                        )
                    one_hot[(c.levels or []).index(level)] = 1.0  # type: ignore[arg-type]
                parts.extend(one_hot)
            else:
                if v is None:
                    parts.extend([0.0, 0.0])
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    try:
                        v = float(v) if isinstance(v, str) else None
                    except ValueError:
                        v = None
                    if v is None:
                        raise ConditionError(f"condition {c.name}={condition[c.name]!r}: not a number")
                lo, hi = c.range  # type: ignore[misc]
                if not math.isfinite(v) or not lo <= v <= hi:
                    raise ConditionError(
                        f"condition {c.name}={v:g}: outside the range it was trained over [{lo:g}, {hi:g}]"
                    )
                parts.extend([1.0, 2.0 * (v - lo) / (hi - lo) - 1.0])
        return torch.tensor(parts, dtype=torch.float32)

    def normalise(self, condition: Mapping[str, Any]) -> dict[str, str | float]:
        """The request as recorded: levels as text, numbers as floats (checked as `encode` does)."""
        self.encode(condition)
        kinds = {c.name: c.kind for c in self.columns}
        out: dict[str, str | float] = {}
        for k, v in condition.items():
            if v is None:
                continue
            if kinds[k] == "continuous":
                out[k] = float(v)
            else:
                out[k] = str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        return out

    def context(self, vectors: torch.Tensor) -> torch.Tensor:
        """[B, dim] -> the UNet's cross-attention context [B, 1, dim]."""
        return vectors.reshape(vectors.shape[0], 1, self.dim)


def parse_condition_args(items: list[str]) -> dict[str, str]:
    """`--condition sex=F --condition age=70` -> {'sex': 'F', 'age': '70'}; `encode` reads a
    continuous column's text as a number and compares a categorical column's as its level."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConditionError(f"--condition {item!r}: write COLUMN=VALUE, e.g. sex=F or age=70")
        out[key.strip()] = value.strip()
    return out
