"""medgen: medical-imaging synthesis and reconstruction.

The public API is imported lazily so `import medgen` (and `medgen --help`) stays instant: torch,
MONAI and SimpleITK load only when something needs them.

    ingest -> train_autoencoder, train_diffusion -> synthesize -> validate_run -> export_run
    generate(gen, n)      volumes in memory (nothing written)
    synthesize(gen, n, out)  a synthesis run folder (volumes + record), what validation and export take
    denoise(scan) / denoise_detailed(scan) -> DenoiseResult; train_denoiser for your own score model
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # data
    "Volume": "medgen.volume",
    "VolumeMeta": "medgen.volume",
    "load_volume": "medgen.io.load",
    "load_volumes": "medgen.io.load",
    "write_nifti": "medgen.io.nifti",
    "ingest": "medgen.ingestion.run",
    "IngestReport": "medgen.ingestion.run",
    "read_manifest": "medgen.io.manifest",
    "build_sample_data": "medgen.demo_data",
    "load_config": "medgen.config",
    # training entry points
    "train_autoencoder": "medgen.synthesis.train_autoencoder",
    "train_diffusion": "medgen.synthesis.train_diffusion",
    "train_denoiser": "medgen.denoising.train",
    "train_score": "medgen.denoising.train",
    # synthesis
    "load_generator": "medgen.models.bundle",
    "Generator": "medgen.models.bundle",
    "generate": "medgen.synthesis.sampler",
    "synthesize": "medgen.synthesis.runs",
    "SynthesisRecord": "medgen.synthesis.runs",
    "read_record": "medgen.synthesis.runs",
    "validate_run": "medgen.quality.validate",
    "export_run": "medgen.export.exporter",
    "ExportResult": "medgen.export.exporter",
    # denoising
    "denoise": "medgen.denoising.denoiser",
    "denoise_detailed": "medgen.denoising.denoiser",
    "estimate_sigma_from_repeats": "medgen.denoising.denoiser",
    "DenoiseResult": "medgen.denoising.denoiser",
    "load_score_model": "medgen.models.score",
    # errors: every error medgen raises derives from MedgenError; bad scans from InputError
    "MedgenError": "medgen.errors",
    "InputError": "medgen.errors",
    "ConfigError": "medgen.errors",
    "ManifestError": "medgen.errors",
    "BundleError": "medgen.errors",
    "RunError": "medgen.errors",
    "ValidationError": "medgen.errors",
    "ExportError": "medgen.errors",
    "DenoiseError": "medgen.errors",
    "TrainingDivergedError": "medgen.errors",
    "NoTrainingDataError": "medgen.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from medgen.config import load_config
    from medgen.demo_data import build_sample_data
    from medgen.denoising.denoiser import DenoiseResult, denoise, denoise_detailed, estimate_sigma_from_repeats
    from medgen.denoising.train import train_denoiser, train_score
    from medgen.errors import (
        BundleError,
        ConfigError,
        DenoiseError,
        ExportError,
        InputError,
        ManifestError,
        MedgenError,
        NoTrainingDataError,
        RunError,
        TrainingDivergedError,
        ValidationError,
    )
    from medgen.export.exporter import ExportResult, export_run
    from medgen.ingestion.run import IngestReport, ingest
    from medgen.io.load import load_volume, load_volumes
    from medgen.io.manifest import read_manifest
    from medgen.io.nifti import write_nifti
    from medgen.models.bundle import Generator, load_generator
    from medgen.models.score import load_score_model
    from medgen.quality.validate import validate_run
    from medgen.synthesis.runs import SynthesisRecord, read_record, synthesize
    from medgen.synthesis.sampler import generate
    from medgen.synthesis.train_autoencoder import train_autoencoder
    from medgen.synthesis.train_diffusion import train_diffusion
    from medgen.volume import Volume, VolumeMeta


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medgen' has no attribute {name!r}")
