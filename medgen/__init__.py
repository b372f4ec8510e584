"""medgen: medical-imaging synthesis and reconstruction.

The public API is imported lazily so `import medgen` (and `medgen --help`) stays instant: torch,
MONAI and SimpleITK load only when something needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Volume": "medgen.volume",
    "VolumeMeta": "medgen.volume",
    "load_volume": "medgen.load",
    "load_volumes": "medgen.load",
    "ingest": "medgen.ingestion",
    "IngestReport": "medgen.ingestion",
    "read_manifest": "medgen.manifest",
    "build_sample_data": "medgen.sample_data",
    "load_generator": "medgen.models.bundle",
    "Generator": "medgen.models.bundle",
    "generate": "medgen.sample",
    "denoise": "medgen.denoising",
    "denoise_detailed": "medgen.denoising",
    "load_score_model": "medgen.models.score",
    "synthesize": "medgen.synthesis",
    "validate_run": "medgen.validate",
    "export_run": "medgen.export",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from medgen.ingestion import IngestReport, ingest
    from medgen.load import load_volume, load_volumes
    from medgen.manifest import read_manifest
    from medgen.models.bundle import Generator, load_generator
    from medgen.denoising import denoise, denoise_detailed
    from medgen.models.score import load_score_model
    from medgen.export import export_run
    from medgen.sample import generate
    from medgen.synthesis import synthesize
    from medgen.validate import validate_run
    from medgen.sample_data import build_sample_data
    from medgen.volume import Volume, VolumeMeta


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medgen' has no attribute {name!r}")
